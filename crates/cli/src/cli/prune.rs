//! `btm prune`: apply a retention policy now, or show what it would do.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use super::{destroy_failures, print_json, PolicyArgs, VolumeArgs};

/// Arguments of `btm prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Only print what would be destroyed and why
    #[arg(long)]
    dry_run: bool,
    /// Print the plan as JSON
    #[arg(long)]
    json: bool,
    /// How long branches kept by rollbacks live [default: `keep_branches`
    /// in the configuration, else 7d]
    #[arg(long, value_name = "DURATION", value_parser = btm_daemon::settings::parse_keep)]
    keep_branches: Option<std::time::Duration>,
    /// Configuration file, for its `keep_branches` key [default: /etc/btm/btm.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

pub fn run(args: PruneArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args
        .volume
        .cfg(args.policy.itv, args.policy.cap, args.policy.algo)?;
    let (plan, report) = cfg.prune(!args.dry_run)?;
    let keep = match args.keep_branches {
        Some(k) => k,
        None => super::daemon::load_file(args.config.as_deref())?
            .keep_branches
            .unwrap_or(btm_daemon::settings::DEFAULT_KEEP_BRANCHES),
    };
    let expiry = cfg
        .ops()?
        .expire_branches(chrono::Utc::now(), keep, !args.dry_run)?
        .verdicts;
    if args.json {
        print_json(out, &plan)?;
    } else {
        for (name, e, failed) in &expiry {
            let what = match (e.drops(), args.dry_run, failed) {
                (true, _, Some(err)) => format!("could not drop: {err}"),
                (true, true, None) => "would drop: expired".into(),
                (true, false, None) => "dropped: expired".into(),
                (false, _, _) => format!("keep: {e}"),
            };
            writeln!(out, "branch {name}  {what}")?;
        }
        let verb = if args.dry_run { "would " } else { "" };
        for v in &plan.verdicts {
            writeln!(out, "{:>12}  {verb}{}", v.height, plan.describe(v))?;
        }
        let n = plan.deleted().len();
        writeln!(
            out,
            "{} kept, {n} {}",
            plan.kept().len(),
            if args.dry_run {
                "would be destroyed"
            } else {
                "destroyed"
            }
        )?;
    }
    match report {
        Some(r) => destroy_failures(&r),
        None => Ok(()),
    }
}
