//! `btm restore --live` and `btm live status|finish`: a node served from
//! a backup while it streams in (the server is `btm-live`;
//! docs/live-restore.md).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use btm_live::control::{self, FinishLine};
use btm_live::LiveOptions;

use super::store::{find_backup_of, StoreArgs};
use super::{human_bytes, print_json};

/// What `restore --live` needs from `restore`'s arguments.
pub(super) struct LiveRestore<'a> {
    pub(super) wanted: String,
    pub(super) dir: PathBuf,
    pub(super) store: &'a StoreArgs,
    pub(super) tag: &'a str,
    pub(super) height: Option<u64>,
    pub(super) chain: Option<&'a str>,
    pub(super) read_timeout: Duration,
    pub(super) passthrough: bool,
    pub(super) finish_on_stop: bool,
}

/// Serve a backup live at a directory until `btm live finish`.
pub(super) fn restore_live(r: LiveRestore<'_>) -> Result<()> {
    let target = btm_live::open_target(&r.dir)?;
    let store = r.store.open_reader()?;
    // A rerun goes on with the backup it started, whatever `latest` is now.
    let wanted = match target.unfinished() {
        Some(b) if r.wanted == "latest" => b.to_owned(),
        _ => r.wanted,
    };
    let (height, chain) = if target.unfinished().is_some() {
        (None, None)
    } else {
        (r.height, r.chain)
    };
    let (name, index) = find_backup_of(store.as_ref(), &wanted, r.tag, height, chain)?;
    let repo = r.store.repo(&store);
    let opts = LiveOptions {
        read_timeout: r.read_timeout,
        passthrough: r.passthrough,
        finish_on_stop: r.finish_on_stop,
        ..LiveOptions::default()
    };
    let holds = btm_daemon::chain::Chain::of_meta(index.meta());
    btm_live::serve(target, repo, &name, &index, &opts)
        .with_context(|| format!("live restore of {name} at {}", r.dir.display()))?;
    super::store::remember_chain(&r.dir, &name, holds);
    Ok(())
}

/// Arguments of `btm live`.
#[derive(Debug, Args)]
pub struct LiveArgs {
    #[command(subcommand)]
    command: LiveCommand,
}

#[derive(Debug, Subcommand)]
enum LiveCommand {
    /// How far a live restore is: bytes local, fetch rates, why it waits
    Status {
        /// The directory a `btm restore --live` serves
        dir: PathBuf,
        /// Print the figures as JSON
        #[arg(long)]
        json: bool,
    },
    /// With the node stopped: wait until every byte is local, unmount, and
    /// leave DIR a plain directory (the server then exits 0)
    Finish {
        /// The directory a `btm restore --live` serves
        dir: PathBuf,
    },
}

pub fn run(args: LiveArgs, out: &mut dyn Write) -> Result<()> {
    match args.command {
        LiveCommand::Status { dir, json } => {
            let st = control::status(&dir)?;
            if json {
                return print_json(out, &st);
            }
            print_status(out, &dir, &st)
        }
        LiveCommand::Finish { dir } => finish(&dir, out),
    }
}

fn print_status(out: &mut dyn Write, dir: &std::path::Path, st: &btm_live::Status) -> Result<()> {
    let pct = if st.total_bytes == 0 {
        100.0
    } else {
        st.present_bytes as f64 * 100.0 / st.total_bytes as f64
    };
    writeln!(out, "{} serves {} ({})", dir.display(), st.backup, st.state)?;
    writeln!(
        out,
        "  local: {} of {} ({pct:.1}%), {} files still to fetch",
        human_bytes(st.present_bytes),
        human_bytes(st.total_bytes),
        st.files_left
    )?;
    writeln!(
        out,
        "  background: {}/s now, {} in {} requests",
        human_bytes(st.background_rate as u64),
        human_bytes(st.background_bytes),
        st.background_requests
    )?;
    writeln!(
        out,
        "  on demand: {}/s now, {} in {} fetches, {:.1} ms mean, {:.1} ms max, {} failed",
        human_bytes(st.demand_rate as u64),
        human_bytes(st.demand_bytes),
        st.demand_fetches,
        st.demand_latency_ms,
        st.demand_latency_max_ms,
        st.demand_failures
    )?;
    writeln!(
        out,
        "  opens: {} passed through to the kernel, {} through this server",
        st.opens_passed_through, st.opens_served
    )?;
    if let Some(w) = &st.waiting {
        writeln!(out, "  waiting: {w}")?;
    }
    writeln!(
        out,
        "  server: {} of memory, {} descriptors",
        human_bytes(st.rss_bytes),
        st.open_files
    )?;
    Ok(())
}

fn finish(dir: &std::path::Path, out: &mut dyn Write) -> Result<()> {
    let mut result: Option<control::Finished> = None;
    let mut last_print = std::time::Instant::now() - Duration::from_secs(10);
    control::ask(dir, "finish", |line| {
        match serde_json::from_str::<FinishLine>(line) {
            Ok(FinishLine::Finished(f)) => {
                result = Some(f);
                false
            }
            Ok(FinishLine::Progress(st)) => {
                if last_print.elapsed() >= Duration::from_secs(5) {
                    last_print = std::time::Instant::now();
                    eprintln!(
                        "waiting for hydration: {} of {} local, {}/s",
                        human_bytes(st.present_bytes),
                        human_bytes(st.total_bytes),
                        human_bytes(st.background_rate as u64)
                    );
                }
                true
            }
            Err(_) => true,
        }
    })?;
    match result {
        Some(f) if f.done => {
            writeln!(out, "finished: {} is a plain directory", dir.display())?;
            Ok(())
        }
        Some(f) => bail!(f
            .error
            .unwrap_or_else(|| "the live restore did not finish".into())),
        None => bail!(
            "the live restore of {} ended without saying whether it finished",
            dir.display()
        ),
    }
}
