//! `btm snapshot --height H`: one snapshot by hand, optionally followed by
//! pruning. Without `--prune` nothing is ever destroyed.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use btm::retention::Algo;
use btm::volume::Label;
use btm::{SnapshotOptions, SnapshotOutcome};

use super::{describe_failures, print_json, VolumeArgs};

/// Arguments of `btm snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// Block height the snapshot is named after
    #[arg(long, value_name = "H")]
    height: u64,
    /// Protect the snapshot with LABEL (an upgrade's name): no retention
    /// policy prunes it and `clean` keeps it until `btm release LABEL`.
    /// An existing snapshot at the height is protected as it is
    #[arg(long, value_name = "LABEL")]
    protect: Option<Label>,
    /// Apply the retention policy (-i, -c, -a) after taking the snapshot
    #[arg(long)]
    prune: bool,
    /// Snapshot interval for --prune
    #[arg(short = 'i', long, requires = "prune", value_parser = clap::value_parser!(u64).range(1..))]
    itv: Option<u64>,
    /// Most snapshots kept, for --prune
    #[arg(short = 'c', long, requires = "prune", value_parser = clap::value_parser!(u64).range(1..))]
    cap: Option<u64>,
    /// fair or fade, for --prune
    #[arg(short = 'a', long, requires = "prune", value_parser = super::parse_algo)]
    algo: Option<Algo>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: SnapshotArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args.volume.cfg(
        args.itv.unwrap_or(btm::config::DEFAULT_ITV),
        args.cap.unwrap_or(btm::config::DEFAULT_CAP),
        args.algo.unwrap_or(Algo::Fair),
    )?;
    let opts = SnapshotOptions {
        prune: if args.prune {
            Some(cfg.policy()?)
        } else {
            None
        },
        lock_wait: btm::lock::DEFAULT_WAIT,
        protect: args.protect.clone(),
    };
    let report = cfg.ops()?.snapshot(args.height, &opts)?;
    if args.json {
        print_json(out, &report)?;
    } else {
        match report.outcome {
            SnapshotOutcome::Created => {
                writeln!(out, "created snapshot at height {}", report.height)?
            }
            SnapshotOutcome::AlreadyExists => writeln!(
                out,
                "snapshot at height {} already exists; left unchanged",
                report.height
            )?,
        }
        if let Some(l) = &args.protect {
            writeln!(out, "protected as {l}")?;
        }
        if !report.pruned.is_empty() {
            let list: Vec<String> = report.pruned.iter().map(u64::to_string).collect();
            writeln!(out, "pruned: {}", list.join(" "))?;
        }
    }
    if !report.prune_failures.is_empty() {
        anyhow::bail!(
            "snapshot taken, but pruning failed for: {}",
            describe_failures(&report.prune_failures)
        );
    }
    Ok(())
}
