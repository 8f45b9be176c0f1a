//! `btm clean`: destroy all btm snapshots but the newest KEPT and the
//! protected ones (unless named by `--label`). Snapshots made by other tools
//! are never touched.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use btm::volume::Label;

use super::{destroy_failures, VolumeArgs};

/// Arguments of `btm clean`.
#[derive(Debug, Args)]
pub struct CleanArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// How many of the newest snapshots to keep
    #[arg(short = 'k', long, default_value_t = 0)]
    kept: u64,
    /// Destroy the snapshots protected with LABEL too (repeatable); other
    /// protected snapshots are always kept
    #[arg(long, value_name = "LABEL")]
    label: Vec<Label>,
    /// Only print what would be destroyed
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: CleanArgs, out: &mut dyn Write) -> Result<()> {
    let ops = args.volume.plain_cfg()?.ops()?;
    if args.dry_run {
        let doomed: Vec<String> = ops
            .clean_candidates(args.kept, &args.label)?
            .iter()
            .map(u64::to_string)
            .collect();
        writeln!(
            out,
            "would destroy {} snapshot(s): {}",
            doomed.len(),
            doomed.join(" ")
        )?;
        return Ok(());
    }
    let report = ops.clean(args.kept, &args.label)?;
    let gone: Vec<String> = report.destroyed.iter().map(u64::to_string).collect();
    writeln!(
        out,
        "destroyed {} snapshot(s): {}",
        gone.len(),
        gone.join(" ")
    )?;
    destroy_failures(&report)
}
