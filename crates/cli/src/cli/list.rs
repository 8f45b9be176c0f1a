//! `btm list`: the volume's btm snapshots, newest first.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::{human_bytes, print_json, VolumeArgs};

/// Arguments of `btm list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Listing<'a> {
    volume: &'a str,
    mode: btm::SnapMode,
    snapshots: &'a [btm::Snapshot],
    /// Kept lines, apart from the active one (`btm branches`).
    branches: &'a [btm::volume::Branch],
    /// The command to run again to finish a half-done switch.
    half_done: Option<String>,
}

pub fn run(args: ListArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args.volume.plain_cfg()?;
    let ops = cfg.ops()?;
    let half_done = ops.pending_switch()?.map(|p| p.command);
    let listed = ops.list().and_then(|s| Ok((s, ops.branches()?)));
    let (snaps, branches) = match (listed, &half_done) {
        (Ok(l), _) => l,
        // Stopped between a ZFS switch's two renames: the name is on
        // neither line until the switch is finished.
        (Err(e), Some(c)) => {
            writeln!(
                out,
                "WARNING: a rollback or undo was left half done; run `{c}` again to finish it ({e})"
            )?;
            return Ok(());
        }
        (Err(e), None) => return Err(e.into()),
    };
    if args.json {
        return print_json(
            out,
            &Listing {
                volume: &cfg.volume,
                mode: cfg.mode,
                snapshots: &snaps,
                branches: &branches,
                half_done,
            },
        );
    }
    if let Some(c) = &half_done {
        writeln!(
            out,
            "WARNING: a rollback or undo was left half done; run `{c}` again to finish it"
        )?;
    }
    if !branches.is_empty() {
        let names: Vec<&str> = branches.iter().map(|b| b.name.as_str()).collect();
        writeln!(
            out,
            "{} branch(es) kept apart from this line: {} (see `btm branches`)",
            names.len(),
            names.join(", ")
        )?;
    }
    if snaps.is_empty() {
        writeln!(out, "no btm snapshots on {} ({})", cfg.volume, cfg.mode)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>12}  {:<23}  {:>8}  NAME",
        "HEIGHT", "CREATED (UTC)", "USED"
    )?;
    // Protected snapshots end their line with the label; a snapshot whose
    // durable state is at another height than its label says so.
    for s in &snaps {
        let created = s
            .created
            .map(|c| c.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
        let used = s.used.map(human_bytes).unwrap_or_else(|| "-".into());
        let mut label = s
            .protected
            .as_ref()
            .map_or(String::new(), |l| format!("  protected: {l}"));
        if let Some(d) = s.durable_height.filter(|d| *d != s.height) {
            label.push_str(&format!("  WARNING: holds the node's state at {d}"));
        }
        writeln!(
            out,
            "{:>12}  {:<23}  {:>8}  {}{label}",
            s.height, created, used, s.name
        )?;
    }
    Ok(())
}
