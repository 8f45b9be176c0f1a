//! `btm export`: export one snapshot by hand, through the same code and
//! configuration as the daemon's periodic exports.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use btm::SnapMode;
use btm_daemon::export::{self, Which};
use btm_daemon::settings::{DaemonOptions, DaemonSettings, ExportOptions};

use super::print_json;

/// Arguments of `btm export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Configuration file [default: /etc/btm/btm.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The volume [default: from the configuration]
    #[arg(short = 'p', long, env = "BTM_VOLUME", value_parser = super::parse_volume)]
    volume: Option<String>,
    /// zfs or btrfs [default: detected]
    #[arg(short = 'm', long, value_parser = super::parse_mode)]
    mode: Option<SnapMode>,
    /// The snapshot to export [default: the newest]
    #[arg(long, value_name = "H")]
    height: Option<u64>,
    #[command(flatten)]
    export: ExportOptions,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: ExportArgs, out: &mut dyn Write) -> Result<()> {
    let settings = settings(&args)?;
    let export = settings
        .export
        .clone()
        .context("no export store configured")?;
    let cfg = btm::BtmCfg::new(
        &settings.volume,
        settings.mode,
        settings.itv,
        settings.cap,
        settings.algo,
    )?;
    let ops = cfg.ops_in(settings.dirs.clone())?;
    if let Err(e) = btm::sys::lower_thread_priority() {
        tracing::warn!(error = %e, "could not lower CPU and IO priority");
    }
    let which = args.height.map_or(Which::Newest, Which::Height);
    let progress = Arc::new(btm_chunk::Progress::default());
    let reporter = super::progress::Reporter::start(
        format!("exporting {}", settings.volume),
        Arc::clone(&progress),
    );
    let store = btm_chunk::store::open(&export.store, btm_chunk::store::Open::Write)?;
    let result = export::export(&ops, store, which, &export, progress, settings.lock_timeout);
    drop(reporter);
    let report = result.context("export failed; no backup was written")?;
    for w in &report.warnings {
        eprintln!("btm: warning: {w}");
    }
    if args.json {
        return print_json(out, &report);
    }
    print_report(&report, out)
}

/// The configuration file overlaid with the flags, as the daemon reads it.
fn settings(args: &ExportArgs) -> Result<DaemonSettings> {
    let flags = DaemonOptions {
        volume: args.volume.clone(),
        mode: args.mode,
        export: Some(args.export.clone()),
        ..DaemonOptions::default()
    };
    let mut file = super::daemon::load_file(args.config.as_deref())?;
    if file.export.is_none() && args.export.store.is_none() {
        anyhow::bail!(
            "no export store: give --export-store or set [export] store in the configuration"
        );
    }
    // Only the volume and export keys matter here, and the node RPC that
    // names the chain (recorded by a by-hand export too). A height file or
    // command of the file must not make a by-hand export fail.
    if !matches!(file.source.as_deref(), Some("cometbft" | "ethereum")) {
        file.source = None;
        if file.rpc_kind.is_none() {
            file.rpc_url = None;
        }
    }
    file.height_file = None;
    file.height_command = None;
    Ok(file.overlay(flags).resolve()?)
}

/// The backup's name on stdout; what else happened on stderr.
fn print_report(report: &export::ExportReport, out: &mut dyn Write) -> Result<()> {
    match (&report.backup, &report.already_exported) {
        (Some(b), _) => {
            writeln!(out, "{}", b.name)?;
            super::backup::print_summary(b);
        }
        (None, Some(name)) => {
            writeln!(out, "{name}")?;
            eprintln!("{} is already exported as {name}", report.snapshot);
        }
        (None, None) => {}
    }
    if let Some(c) = &report.chain {
        eprintln!("chain at height {}: {}", c.height, c.describe());
    }
    if !report.pruned.is_empty() {
        eprintln!("retention deleted {} old backup(s)", report.pruned.len());
    }
    if let Some(g) = &report.gc {
        eprintln!(
            "gc: {} packs deleted, {} repacked, {} newly marked, {} pending{}",
            g.packs_deleted,
            g.packs_repacked,
            g.marked,
            g.pending,
            g.deferred
                .as_ref()
                .map_or(String::new(), |d| format!(" (sweep deferred: {d})"))
        );
    }
    Ok(())
}
