//! `btm rollback`: return the volume to a snapshot. Shows what it will do
//! first (including the newer snapshots that are destroyed), asks on a
//! terminal, and needs `--yes` anywhere else.

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::{bail, Result};
use clap::Args;

use btm::preserve::{self, RelPath};
use btm::volume::Label;
use btm::SnapMode;

use super::VolumeArgs;

/// Arguments of `btm rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// Target height; absent or negative means the latest snapshot
    #[arg(short = 's', long = "snapshot-id", alias = "height", value_name = "HEIGHT", allow_negative_numbers = true, default_value_t = -1)]
    snapshot_id: i64,
    /// Fail unless a snapshot exists at exactly that height
    #[arg(short = 'S', long)]
    strict: bool,
    /// Roll back to the snapshot protected with LABEL (an upgrade's, taken
    /// before it: the way back from a failed upgrade)
    #[arg(long, value_name = "LABEL", conflicts_with_all = ["snapshot_id", "strict"])]
    to_protected: Option<Label>,
    /// Do not ask for confirmation
    #[arg(short = 'y', long)]
    yes: bool,
    /// Also keep the current content of this file (relative to the volume
    /// root); validator signing state is kept without it
    #[arg(long, value_name = "PATH", value_parser = parse_relpath)]
    preserve: Vec<RelPath>,
    /// Roll back everything, validator signing state included (it can make
    /// a validator double-sign)
    #[arg(long, conflicts_with = "preserve")]
    no_preserve: bool,
    /// Configuration file, for its `preserve` key [default: /etc/btm/btm.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

/// The height of the snapshot protected with `label` (exactly one).
fn protected_height(ops: &btm::Ops, label: &Label) -> Result<u64> {
    match ops.protected_with(label)?.as_slice() {
        [h] => Ok(*h),
        many => {
            bail!(
            "{} snapshots are protected with label '{label}' ({}); roll back by height (-s H -S)",
            many.len(),
            many.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        )
        }
    }
}

/// What a rollback carries across, and why each.
fn carried(args: &RollbackArgs, root: &std::path::Path) -> Result<Vec<(RelPath, String)>> {
    if args.no_preserve {
        return Ok(Vec::new());
    }
    let mut out: Vec<(RelPath, String)> = Vec::new();
    for found in btm::validator::find_signing_state(root)? {
        out.push((found.path, found.stack.to_owned()));
    }
    let file = super::daemon::load_file(args.config.as_deref())?;
    for p in file.preserve.iter().flatten() {
        let rel: RelPath = p
            .parse()
            .map_err(|e: preserve::Error| anyhow::anyhow!("config key preserve: {e}"))?;
        out.push((rel, "preserve in the configuration".into()));
    }
    for p in &args.preserve {
        out.push((p.clone(), "--preserve".into()));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|(p, _)| seen.insert(p.clone()));
    Ok(out)
}

fn parse_relpath(s: &str) -> Result<RelPath, String> {
    s.parse().map_err(|e: preserve::Error| e.to_string())
}

pub fn run(args: RollbackArgs, out: &mut dyn Write) -> Result<()> {
    let ops = args.volume.plain_cfg()?.ops()?;
    let (target, strict) = match &args.to_protected {
        Some(label) => (Some(protected_height(&ops, label)?), true),
        None => (u64::try_from(args.snapshot_id).ok(), args.strict),
    };
    let prepared = ops.prepare_rollback(target, strict)?;
    let vol = prepared.volume();
    let carry = carried(&args, &vol.root()?)?;
    let paths: Vec<RelPath> = carry.iter().map(|(p, _)| p.clone()).collect();
    preserve::check_sources(&vol.root()?, &paths)?;
    let fx = prepared.effects();

    match target {
        Some(t) if t != fx.target => writeln!(
            out,
            "No snapshot at height {t}; the closest below is {}.",
            fx.target
        )?,
        _ => {}
    }
    writeln!(
        out,
        "Roll back {} ({}) to height {}.",
        vol.name(),
        vol.mode(),
        fx.target
    )?;
    let record = btm::window::records(ops.dirs(), vol.name())
        .get(&fx.target)
        .copied()
        .unwrap_or_default();
    if let Some(d) = record.durable.filter(|d| *d != fx.target) {
        writeln!(
            out,
            "WARNING: the snapshot labelled {} holds the node's state at height {d} (the write forced before it said so): the node will restart at {d}.",
            fx.target
        )?;
    }
    if vol.mode() == SnapMode::Btrfs {
        writeln!(
            out,
            "The live subvolume is replaced by a writable snapshot of {}@{}.",
            vol.name(),
            fx.target
        )?;
    }
    if fx.destroys.is_empty() {
        writeln!(out, "No snapshots are destroyed.")?;
    } else {
        let list: Vec<String> = fx.destroys.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "This destroys {} newer snapshot(s): {}",
            list.len(),
            list.join(" ")
        )?;
    }
    for (p, why) in &carry {
        writeln!(
            out,
            "Current content kept: {} ({why})",
            p.as_path().display()
        )?;
    }
    if args.no_preserve {
        writeln!(
            out,
            "--no-preserve: validator signing state is rolled back too; a validator restarted on it can double-sign."
        )?;
    }
    writeln!(out, "Stop the node using this volume before rolling back.")?;
    out.flush()?;

    if !args.yes {
        if !io::stdin().is_terminal() {
            bail!("not rolling back: no terminal to confirm on; pass --yes to confirm");
        }
        eprint!("Proceed? [y/N] ");
        let mut answer = String::new();
        io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            bail!("not rolling back: not confirmed");
        }
    }
    let h = fx.target;
    prepared.execute(&paths)?;
    writeln!(out, "rolled back to height {h}")?;
    Ok(())
}
