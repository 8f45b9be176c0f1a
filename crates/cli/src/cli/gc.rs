//! `btm gc`: delete chunks that no backup references, with the two-phase
//! protocol that keeps concurrent exports safe (see `docs/format.md`).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use btm_chunk::gc::GcOptions;
use btm_daemon::settings::parse_duration;

use super::print_json;
use super::store::StoreArgs;

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
    let store = args.store.open_writable()?;
    let opts = GcOptions {
        grace: args.grace,
        dry_run: args.dry_run,
    };
    let report = store.with(|s| {
        args.store
            .repo(&s)
            .gc(&opts)
            .with_context(|| format!("garbage collection of {} failed", s.describe()))
    })?;
    if args.json {
        print_json(out, &report)?;
    } else {
        let verb = if args.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        writeln!(
            out,
            "{} indexes reference {} of {} chunks in {} packs; {verb} {} pack(s), {} tree segment(s) and {} version 1 chunk(s), repacked {} ({} freed) from {} expired mark(s); {} newly marked, {} awaiting the grace period",
            report.indexes,
            report.referenced,
            report.chunks,
            report.packs,
            report.packs_deleted,
            report.trees_deleted,
            report.chunks_deleted,
            report.packs_repacked,
            super::human_bytes(report.bytes_freed),
            report.marks_swept,
            report.marked,
            report.pending
        )?;
        if let Some(why) = &report.deferred {
            writeln!(out, "sweep deferred: {why}")?;
        }
        for u in &report.unreadable {
            writeln!(out, "unreadable: {u}")?;
        }
    }
    // Nothing is ever deleted while an index is unreadable: say so loudly
    // enough for a cron job to notice.
    if !report.unreadable.is_empty() {
        bail!(
            "{} backup index(es) cannot be read; garbage collection cannot delete anything until they are fixed or forgotten (btm forget NAME)",
            report.unreadable.len()
        );
    }
    Ok(())
}
