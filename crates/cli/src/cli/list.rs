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
}

pub fn run(args: ListArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args.volume.plain_cfg()?;
    let snaps = cfg.list_snapshots()?;
    if args.json {
        return print_json(
            out,
            &Listing {
                volume: &cfg.volume,
                mode: cfg.mode,
                snapshots: &snaps,
            },
        );
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
