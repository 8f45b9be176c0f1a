//! `btm gc`: delete chunks that no backup references, with the two-phase
//! protocol that keeps concurrent exports safe (see `docs/format.md`).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use btm::chunk::gc::{self, GcOptions};
use btm::config::daemon::parse_duration;

use super::backup::StoreArgs;
use super::print_json;

/// Arguments of `btm gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Time a chunk must stay unreferenced before it is deleted
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "24h")]
    grace: Duration,
    /// Report what would be marked and deleted; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: GcArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_existing()?;
    let opts = GcOptions {
        grace: args.grace,
        dry_run: args.dry_run,
    };
    let report = gc::gc(store.as_ref(), &opts)
        .with_context(|| format!("garbage collection of {} failed", store.describe()))?;
    if args.json {
        return print_json(out, &report);
    }
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    writeln!(
        out,
        "{} indexes reference {} of {} chunks; {verb} {} chunk(s) from {} expired mark(s); {} newly marked, {} awaiting the grace period",
        report.indexes,
        report.referenced,
        report.chunks,
        report.deleted,
        report.marks_swept,
        report.marked,
        report.pending
    )?;
    if let Some(why) = &report.deferred {
        writeln!(out, "sweep deferred: {why}")?;
    }
    Ok(())
}
