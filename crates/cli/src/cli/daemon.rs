//! `btm daemon`: load the configuration (file, then flags), set up logging
//! (journald under systemd), and hand over to [`btm_daemon::supervise`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use btm::retention::Algo;
use btm::SnapMode;
use btm_daemon::settings::{
    parse_duration, ConfigError, DaemonOptions, DaemonSettings, ExportOptions, DEFAULT_CONFIG,
};

/// Arguments of `btm daemon`. Each has a key of the same name in the file.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Configuration file [default: /etc/btm/btm.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The volume (ZFS dataset or btrfs subvolume path)
    #[arg(short = 'p', long, env = "BTM_VOLUME", value_parser = super::parse_volume)]
    volume: Option<String>,
    /// Snapshot interval in blocks [default: 10]
    #[arg(short = 'i', long, value_parser = clap::value_parser!(u64).range(1..))]
    itv: Option<u64>,
    /// Most snapshots kept [default: 100]
    #[arg(short = 'c', long, value_parser = clap::value_parser!(u64).range(1..))]
    cap: Option<u64>,
    /// zfs or btrfs [default: detected]
    #[arg(short = 'm', long, value_parser = super::parse_mode)]
    mode: Option<SnapMode>,
    /// fair or fade [default: fair]
    #[arg(short = 'a', long, value_parser = super::parse_algo)]
    algo: Option<Algo>,
    /// push, cometbft, ethereum, file or command [default: push]
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    /// Node RPC URL for cometbft and ethereum (http://…); with another
    /// source and --rpc-kind, only asked for exports' chain identity
    #[arg(long, value_name = "URL")]
    rpc_url: Option<String>,
    /// cometbft or ethereum: the kind of --rpc-url when the source is push,
    /// file or command
    #[arg(long, value_name = "KIND")]
    rpc_kind: Option<String>,
    /// File holding the height, for source file
    #[arg(long, value_name = "PATH")]
    height_file: Option<PathBuf>,
    /// Command printing the height, for source command (split on spaces;
    /// use the config file for arguments with spaces)
    #[arg(long, value_name = "CMD")]
    height_command: Option<String>,
    /// Time between polls, e.g. 1s, 500ms [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    poll_interval: Option<std::time::Duration>,
    /// Control socket [default: /run/btm/btm.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Prometheus endpoint address, e.g. 127.0.0.1:9375
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    export: ExportFlags,
    /// Check the configuration and the volume, print a summary, and exit
    #[arg(long)]
    check_config: bool,
}

/// The `[export]` keys as flags, shared by `btm daemon` and `btm export`.
#[derive(Debug, Clone, Default, Args)]
pub struct ExportFlags {
    /// Export store: a path, file://…, s3://…, gs://… or az://…
    #[arg(long, value_name = "STORE")]
    pub export_store: Option<String>,
    /// Export at each new multiple of this many blocks [default: 100 × itv]
    #[arg(long, value_name = "BLOCKS", value_parser = clap::value_parser!(u64).range(1..))]
    pub export_every: Option<u64>,
    /// Backup tag [default: the host name]
    #[arg(long, value_name = "TAG")]
    pub export_tag: Option<String>,
    /// Backups of the tag kept after each export [default: 7]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub export_keep: Option<u64>,
    /// Local chunk cache directory
    #[arg(long, value_name = "DIR")]
    pub export_cache: Option<PathBuf>,
}

impl ExportFlags {
    /// The flags as `[export]` options; `None` when no flag was given.
    pub fn options(&self) -> Option<ExportOptions> {
        let o = ExportOptions {
            store: self.export_store.clone(),
            every: self.export_every,
            tag: self.export_tag.clone(),
            keep: self.export_keep,
            cache: self.export_cache.clone(),
            ..ExportOptions::default()
        };
        (o != ExportOptions::default()).then_some(o)
    }
}

impl DaemonArgs {
    fn options(&self, log_level: Option<String>) -> DaemonOptions {
        DaemonOptions {
            volume: self.volume.clone(),
            mode: self.mode,
            itv: self.itv,
            cap: self.cap,
            algo: self.algo,
            source: self.source.clone(),
            rpc_url: self.rpc_url.clone(),
            rpc_kind: self.rpc_kind.clone(),
            height_file: self.height_file.clone(),
            height_command: self
                .height_command
                .as_ref()
                .map(|c| c.split_whitespace().map(str::to_owned).collect()),
            poll_interval: self.poll_interval,
            socket: self.socket.clone(),
            metrics_listen: self.metrics_listen.clone(),
            log_level,
            export: self.export.options(),
            ..DaemonOptions::default()
        }
    }

    /// The file's options (if any) overlaid by the flags, resolved.
    fn load(&self, log_level: Option<String>) -> Result<DaemonSettings, ConfigError> {
        load_file(self.config.as_deref())?
            .overlay(self.options(log_level))
            .resolve()
    }
}

/// The configuration file's options: `path`, else /etc/btm/btm.toml when
/// it exists, else nothing.
pub fn load_file(path: Option<&Path>) -> Result<DaemonOptions, ConfigError> {
    match path {
        Some(path) => DaemonOptions::load(path),
        None if Path::new(DEFAULT_CONFIG).exists() => {
            DaemonOptions::load(Path::new(DEFAULT_CONFIG))
        }
        None => Ok(DaemonOptions::default()),
    }
}

pub fn run(args: DaemonArgs, log_level: Option<String>) -> Result<()> {
    let settings = args.load(log_level.clone())?;
    if args.check_config {
        return check(&settings);
    }
    crate::init_logging(settings.log_level.as_deref(), "info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(btm_daemon::supervise(settings, || {
        args.load(log_level.clone())
    }));
    // A blocking call still running (a source read up to its timeout, a
    // hung `zfs`) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    Ok(())
}

/// `--check-config`: everything the daemon checks before it starts, without
/// starting (the volume is opened read-only).
fn check(s: &DaemonSettings) -> Result<()> {
    let cfg = btm::BtmCfg::new(&s.volume, s.mode, s.itv, s.cap, s.algo)?;
    // Open it too: with the mode given, nothing above looked at the volume.
    let ops = cfg.ops_in(s.dirs.clone())?;
    println!(
        "configuration OK: volume {} ({}), itv {}, cap {}, {}, source {}{}",
        ops.volume().name(),
        cfg.mode,
        cfg.itv,
        cfg.cap,
        cfg.algo,
        s.source.name(),
        s.export.as_ref().map_or(String::new(), |e| format!(
            ", export to {} every {} blocks as '{}', keep {}",
            e.store, e.every, e.tag, e.keep
        ))
    );
    Ok(())
}
