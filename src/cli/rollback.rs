//! `btm rollback`: return the volume to a snapshot. Shows what it will do
//! first (including the newer snapshots that are destroyed), asks on a
//! terminal, and needs `--yes` anywhere else.

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::{bail, Result};
use clap::Args;

use btm::preserve::{self, RelPath};
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
    /// Do not ask for confirmation
    #[arg(short = 'y', long)]
    yes: bool,
    /// Keep the current content of this file (relative to the volume root)
    #[arg(long, value_name = "PATH", value_parser = parse_relpath)]
    preserve: Vec<RelPath>,
}

fn parse_relpath(s: &str) -> Result<RelPath, String> {
    s.parse().map_err(|e: preserve::Error| e.to_string())
}

pub fn run(args: RollbackArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args.volume.plain_cfg()?;
    let target = u64::try_from(args.snapshot_id).ok();
    let prepared = cfg.prepare_rollback(target, args.strict)?;
    let vol = prepared.volume();
    preserve::check_sources(&vol.root()?, &args.preserve)?;
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
    for p in &args.preserve {
        writeln!(out, "Current content kept: {}", p.as_path().display())?;
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
    prepared.execute(&args.preserve)?;
    writeln!(out, "rolled back to height {h}")?;
    Ok(())
}
