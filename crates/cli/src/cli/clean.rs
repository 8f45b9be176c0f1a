//! `btm clean`: destroy all btm snapshots but the newest KEPT. Snapshots
//! made by other tools are never touched.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use super::{destroy_failures, VolumeArgs};

/// Arguments of `btm clean`.
#[derive(Debug, Args)]
pub struct CleanArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// How many of the newest snapshots to keep
    #[arg(short = 'k', long, default_value_t = 0)]
    kept: u64,
    /// Only print what would be destroyed
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: CleanArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args.volume.plain_cfg()?;
    if args.dry_run {
        let doomed: Vec<String> = cfg
            .get_sorted_snapshots()?
            .into_iter()
            .skip(usize::try_from(args.kept).unwrap_or(usize::MAX))
            .map(|h| h.to_string())
            .collect();
        writeln!(
            out,
            "would destroy {} snapshot(s): {}",
            doomed.len(),
            doomed.join(" ")
        )?;
        return Ok(());
    }
    let report = cfg.clean(args.kept)?;
    let gone: Vec<String> = report.destroyed.iter().map(u64::to_string).collect();
    writeln!(
        out,
        "destroyed {} snapshot(s): {}",
        gone.len(),
        gone.join(" ")
    )?;
    destroy_failures(&report)
}
