//! `btm status`: what the running daemon is doing, from its socket.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Args;

use super::print_json;

/// Arguments of `btm status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Control socket [default: /run/btm/btm.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the status as JSON
    #[arg(long)]
    json: bool,
}

fn ago(t: Option<DateTime<Utc>>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let secs = (Utc::now() - t).num_seconds().max(0) as u64;
            format!(
                "{} ({} ago)",
                t.format("%Y-%m-%d %H:%M:%S UTC"),
                humantime::format_duration(Duration::from_secs(secs))
            )
        }
    }
}

pub fn run(args: StatusArgs, out: &mut dyn Write) -> Result<()> {
    let socket = args.socket.unwrap_or_else(btm::client::default_socket);
    let s = btm::client::status(&socket, Duration::from_secs(10))?;
    if args.json {
        return print_json(out, &s);
    }
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    writeln!(
        out,
        "btm daemon {} (pid {}), up since {}",
        s.version,
        s.pid,
        ago(Some(s.started_at))
    )?;
    writeln!(out, "volume:         {} ({})", s.volume, s.mode)?;
    writeln!(
        out,
        "policy:         {} itv {} cap {}",
        s.algo, s.itv, s.cap
    )?;
    writeln!(
        out,
        "source:         {}{}",
        s.source,
        match s.source_failing_since {
            Some(t) => format!(", FAILING since {}", ago(Some(t))),
            None => String::new(),
        }
    )?;
    writeln!(
        out,
        "last height:    {} at {}",
        opt(s.last_height),
        ago(s.last_height_at)
    )?;
    match &s.last_snapshot {
        Some(l) => writeln!(
            out,
            "last snapshot:  {}{}{} at {}, took {} ms",
            l.height,
            l.height_after.map_or(String::new(), |a| format!(
                " (node was at {}..{a})",
                l.height
            )),
            l.durable_height
                .map_or(String::new(), |d| format!(", durable at {d}")),
            ago(Some(l.at)),
            l.duration_ms
        )?,
        None => writeln!(out, "last snapshot:  none since start")?,
    }
    if let Some(h) = s.in_progress {
        writeln!(out, "in progress:    snapshot at {h}")?;
    }
    if let Some(m) = &s.height_mismatch {
        writeln!(out, "WARNING:        {}", m.message)?;
    }
    if let Some(t) = s.volume_stalled_since {
        writeln!(
            out,
            "volume:         NOT ANSWERING since {}: its commands time out (suspended pool? frozen filesystem?)",
            ago(Some(t))
        )?;
    }
    writeln!(
        out,
        "snapshots:      {} on the volume; next due at {}",
        s.snapshot_count,
        opt(s.next_due)
    )?;
    print_branches(out, &s)?;
    print_exports(out, &s)?;
    print_counters(out, &s)
}

/// The branches line, when rollbacks kept some, and a half-done switch.
fn print_branches(out: &mut dyn Write, s: &btm::protocol::Status) -> Result<()> {
    if s.branch_count > 0 {
        writeln!(
            out,
            "branches:       {} kept by rollbacks, holding {} (btm branches)",
            s.branch_count,
            s.branch_bytes
                .map_or("an unknown amount".to_owned(), super::human_bytes)
        )?;
    }
    if let Some(c) = &s.half_done {
        writeln!(
            out,
            "WARNING:        a rollback or undo was left half done; run `{c}` again to finish it"
        )?;
    }
    Ok(())
}

/// The export lines, when exports are configured.
fn print_exports(out: &mut dyn Write, s: &btm::protocol::Status) -> Result<()> {
    if let Some(store) = &s.export_store {
        writeln!(out, "export store:   {store}")?;
        match &s.last_export {
            Some(l) => writeln!(
                out,
                "last export:    height {} as {} at {}, took {}; read {}, uploaded {}, {} files unchanged",
                l.height,
                l.backup,
                ago(Some(l.at)),
                ms(l.duration_ms),
                super::human_bytes(l.bytes_read),
                super::human_bytes(l.bytes_uploaded),
                l.files_unchanged
            )?,
            None => writeln!(out, "last export:    none since start")?,
        }
        if let Some(chain) = s.last_export.as_ref().and_then(|l| l.chain.as_ref()) {
            writeln!(out, "exported from:  {chain}")?;
        }
        if let Some(r) = &s.export {
            writeln!(
                out,
                "exporting:      height {} since {}; read {} of {}, uploaded {}",
                r.height,
                ago(Some(r.started_at)),
                super::human_bytes(r.bytes_read),
                super::human_bytes(r.bytes_total),
                super::human_bytes(r.bytes_uploaded)
            )?;
        }
    }
    Ok(())
}

/// Counters since start and the recent errors.
fn print_counters(out: &mut dyn Write, s: &btm::protocol::Status) -> Result<()> {
    let c = &s.counters;
    writeln!(
        out,
        "since start:    {} taken, {} skipped, {} failed, {} prune failures, {} source errors",
        c.snapshots, c.skipped, c.snapshot_failures, c.prune_failures, c.source_errors
    )?;
    if s.export_store.is_some() {
        writeln!(
            out,
            "exports:        {} done, {} failed, {} skipped (one still running)",
            c.exports, c.export_failures, c.exports_skipped
        )?;
    }
    if s.recent_errors.is_empty() {
        writeln!(out, "recent errors:  none")?;
    } else {
        writeln!(out, "recent errors:")?;
        for e in &s.recent_errors {
            writeln!(
                out,
                "  {} [{}] {}",
                e.at.format("%Y-%m-%d %H:%M:%S"),
                e.kind,
                e.message
            )?;
        }
    }
    Ok(())
}

fn ms(d: u64) -> String {
    if d < 10_000 {
        format!("{d} ms")
    } else {
        format!("{:.1} s", d as f64 / 1000.0)
    }
}
