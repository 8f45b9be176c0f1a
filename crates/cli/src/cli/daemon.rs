//! `btm daemon`: load the configuration (file, then flags), set up logging
//! (journald under systemd), and hand over to [`btm_daemon::supervise`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use btm_daemon::settings::{ConfigError, DaemonOptions, DaemonSettings, DEFAULT_CONFIG};

/// Arguments of `btm daemon`: the configuration file, and a flag for each
/// key of it (declared once, in [`DaemonOptions`]).
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Configuration file [default: /etc/btm/btm.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: DaemonOptions,
    /// Check the configuration and the volume, print a summary, and exit
    #[arg(long)]
    check_config: bool,
}

impl DaemonArgs {
    /// The file's options (if any) overlaid by the flags, resolved.
    fn load(&self, log_level: Option<String>) -> Result<DaemonSettings, ConfigError> {
        let flags = DaemonOptions {
            log_level,
            ..self.options.clone()
        };
        load_file(self.config.as_deref())?.overlay(flags).resolve()
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
