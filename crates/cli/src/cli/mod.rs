//! The `btm` command line: argument definitions shared by the verbs, and
//! dispatch to one module per verb. Flags keep the original btm's spelling
//! (`-p/--volume`, `$BTM_VOLUME`, `-m`, `-i`, `-c`, `-a`, `-s`, `-S`, `-k`).

mod backup;
mod backups;
mod branches;
mod check;
mod clean;
mod daemon;
mod docs;
mod export;
mod forget;
mod gc;
mod key;
mod list;
mod live;
mod notify;
mod progress;
mod prune;
mod publish;
mod release;
mod restore;
mod rollback;
mod rpc;
mod simulate;
mod snapshot;
mod status;
mod store;
mod verify;

use std::io::{self, Write};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use btm::retention::Algo;
use btm::volume::SnapMode;
use btm::BtmCfg;

/// Treat a `BTM_*` variable set to the empty string as unset: a container
/// given its options by a ConfigMap (`BTM_HEIGHT: ""`) means none, not an
/// empty height. Called before anything else runs, on one thread.
pub fn forget_empty_env() {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(k, v)| v.is_empty() && k.as_encoded_bytes().starts_with(b"BTM_"))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}

/// Blockchain Time Machine: block-height snapshots of a node's ZFS or btrfs
/// volume, with fair/fade retention and rollback.
#[derive(Debug, Parser)]
#[command(name = "btm", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); `RUST_LOG` also works.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List btm snapshots, newest first
    List(list::ListArgs),
    /// Take one snapshot at a block height
    Snapshot(snapshot::SnapshotArgs),
    /// Apply a retention policy to the existing snapshots
    Prune(prune::PruneArgs),
    /// Roll the volume back to a snapshot
    Rollback(rollback::RollbackArgs),
    /// List the branches rollbacks kept, or drop them
    Branches(branches::BranchesArgs),
    /// Return snapshots protected with a label to normal retention
    Release(release::ReleaseArgs),
    /// Destroy all btm snapshots except the newest KEPT
    Clean(clean::CleanArgs),
    /// Preview which heights a policy keeps, without touching any volume
    Simulate(simulate::SimulateArgs),
    /// Run the daemon: follow the node's height and snapshot at intervals
    Daemon(Box<daemon::DaemonArgs>),
    /// Tell the daemon the node reached a height (push mode); waits for the snapshot
    Notify(notify::NotifyArgs),
    /// Show what the running daemon is doing
    Status(status::StatusArgs),
    /// Back up a directory to a chunk store (sparse, incremental)
    Backup(backup::BackupArgs),
    /// List the backups in a store, or show one
    Backups(backups::BackupsArgs),
    /// Restore a backup into a directory, in place
    Restore(restore::RestoreArgs),
    /// Watch or finish a live restore (`btm restore --live`)
    Live(live::LiveArgs),
    /// Verify a store: indexes parse and every chunk exists (or re-hashes)
    Check(check::CheckArgs),
    /// Forget a backup: delete its index (its data goes at the next gc)
    Forget(forget::ForgetArgs),
    /// Export a snapshot to the export store now (what the daemon does periodically)
    Export(export::ExportArgs),
    /// Delete chunks no backup references (two-phase, safe alongside exports)
    Gc(gc::GcArgs),
    /// Publish a store: write its signed catalog, so anyone can restore
    /// from it through a web server or a public bucket
    Publish(publish::PublishArgs),
    /// Make or show the ed25519 key publishing signs with
    Key(key::KeyArgs),
    /// Check that a node running on restored data is on the exported chain
    /// at the exported height (block hash and app hash or state root)
    Verify(verify::VerifyArgs),
    /// Print a shell completion script (bash, zsh, fish, …)
    Completions(docs::CompletionsArgs),
    /// Write the man pages (btm.1, btm-VERB.1) into a directory
    #[command(hide = true)]
    Manpages(docs::ManpagesArgs),
}

/// Which volume to act on.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// The volume: a ZFS dataset (zroot/data) or a btrfs subvolume path (/data)
    #[arg(short = 'p', long, env = "BTM_VOLUME", value_parser = parse_volume)]
    pub volume: String,

    /// `zfs` or `btrfs`, case-insensitive; detected (read-only) if omitted
    #[arg(short = 'm', long, value_parser = parse_mode)]
    pub mode: Option<SnapMode>,
}

/// A retention policy given on the command line.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Snapshot interval in blocks (fade's slot base)
    #[arg(short = 'i', long, default_value_t = btm::config::DEFAULT_ITV, value_parser = clap::value_parser!(u64).range(1..))]
    pub itv: u64,

    /// Most snapshots kept
    #[arg(short = 'c', long, default_value_t = btm::config::DEFAULT_CAP, value_parser = clap::value_parser!(u64).range(1..))]
    pub cap: u64,

    /// `fair` (newest CAP) or `fade` (thinning with age), case-insensitive
    #[arg(short = 'a', long, default_value = "fair", value_parser = parse_algo)]
    pub algo: Algo,
}

fn parse_log_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("bad log level '{s}': {e}"))?;
    Ok(s.to_owned())
}

// The same grammar as the daemon's flags and file keys.
use btm_daemon::settings::{parse_algo, parse_mode, parse_volume};

impl VolumeArgs {
    /// A [`BtmCfg`] for this volume with the given policy parameters.
    fn cfg(&self, itv: u64, cap: u64, algo: Algo) -> Result<BtmCfg> {
        Ok(BtmCfg::new(&self.volume, self.mode, itv, cap, algo)?)
    }

    /// A [`BtmCfg`] for commands that do not use a policy.
    fn plain_cfg(&self) -> Result<BtmCfg> {
        self.cfg(
            btm::config::DEFAULT_ITV,
            btm::config::DEFAULT_CAP,
            Algo::Fair,
        )
    }
}

/// Run the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    // The daemon sets up its own logging once its configuration is read,
    // and its own command timeout.
    if !matches!(cli.command, Command::Daemon(_)) {
        crate::init_logging(cli.log_level.as_deref(), "warn");
        if let Some(t) = std::env::var_os("BTM_COMMAND_TIMEOUT") {
            let t = t.to_string_lossy();
            let limit = humantime::parse_duration(t.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("BTM_COMMAND_TIMEOUT '{t}' is not a duration such as 30s or 2m")
                })?;
            btm::volume::cmd::set_limit(limit);
        }
    }
    let out = &mut io::stdout().lock();
    match cli.command {
        Command::Daemon(a) => daemon::run(*a, cli.log_level),
        Command::Notify(a) => notify::run(a, out),
        Command::Status(a) => status::run(a, out),
        Command::List(a) => list::run(a, out),
        Command::Snapshot(a) => snapshot::run(a, out),
        Command::Prune(a) => prune::run(a, out),
        Command::Rollback(a) => rollback::run(a, out),
        Command::Branches(a) => branches::run(a, out),
        Command::Release(a) => release::run(a, out),
        Command::Clean(a) => clean::run(a, out),
        Command::Simulate(a) => simulate::run(a, out),
        Command::Backup(a) => backup::backup(a, out),
        Command::Backups(a) => backups::run(a, out),
        Command::Restore(a) => restore::run(a, out),
        Command::Live(a) => live::run(a, out),
        Command::Check(a) => check::run(a, out),
        Command::Forget(a) => forget::run(a, out),
        Command::Export(a) => export::run(a, out),
        Command::Gc(a) => gc::run(a, out),
        Command::Publish(a) => publish::run(a, out),
        Command::Key(a) => key::run(a, out),
        Command::Verify(a) => verify::run(a, out),
        Command::Completions(a) => docs::completions(a, out),
        Command::Manpages(a) => docs::manpages(a, out),
    }
}

/// Ask on the terminal before an irreversible or large change; `yes`
/// (`--yes`) answers for the operator. Without a terminal, refuses.
fn confirm(yes: bool, what: &str) -> Result<()> {
    use std::io::{BufRead, IsTerminal};
    if yes {
        return Ok(());
    }
    if !io::stdin().is_terminal() {
        anyhow::bail!("not {what}: no terminal to confirm on; pass --yes to confirm");
    }
    eprint!("Proceed? [y/N] ");
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        anyhow::bail!("not {what}: not confirmed");
    }
    Ok(())
}

/// Heights for a sentence, oldest first: all of a few, the ends of many.
fn height_list(newest_first: &[u64]) -> String {
    match newest_first {
        [] => "none".into(),
        [newest, .., oldest] if newest_first.len() > 6 => {
            format!("{oldest} … {newest} ({})", newest_first.len())
        }
        hs => hs
            .iter()
            .rev()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Print a value as one line of JSON.
fn print_json(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Turn a batch destroy's failures into one error line.
fn destroy_failures(report: &btm::volume::DestroyReport) -> Result<()> {
    if report.failed.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "could not destroy {} snapshot(s): {}",
        report.failed.len(),
        describe_failures(&report.failed)
    )
}

/// `"20 (reason); 30 (reason)"` for per-height failures.
fn describe_failures<E: std::fmt::Display>(failed: &[(u64, E)]) -> String {
    failed
        .iter()
        .map(|(h, e)| format!("{h} ({e})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Render a byte count the way `zfs list` does (1024-based, one decimal).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bytes_render_like_zfs() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0G");
    }
}
