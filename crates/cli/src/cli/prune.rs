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
}

pub fn run(args: PruneArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args
        .volume
        .cfg(args.policy.itv, args.policy.cap, args.policy.algo)?;
    let (plan, report) = cfg.prune(!args.dry_run)?;
    if args.json {
        print_json(out, &plan)?;
    } else {
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
