//! `btm daemon`: follow the node's height and snapshot at block-height
//! intervals, for months, without attention.
//!
//! [`run`] is one *generation*: it checks the volume and the source, binds
//! the control socket, tells systemd it is ready, and runs its tasks (the
//! control server, the poller for polled sources, the watchdog) until the
//! shutdown broadcast fires; then it stops taking new snapshots, lets the one
//! in flight finish, and waits for every task. [`supervise`] owns the
//! signals: SIGTERM/SIGINT end the generation and the process; SIGHUP
//! re-reads the configuration and, only if it is valid, replaces the
//! generation with a new one (a bad file is logged and ignored). A running
//! export outlives a reload and is cancelled only when the process ends.

mod control;
mod exporter;
mod metrics;
mod poll;
mod scheduler;
mod state;
mod systemd;

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

use crate::config::daemon::{ConfigError, DaemonSettings};
use crate::height::Poller;
use crate::protocol::{Counters, Status};

use crate::BtmCfg;
use state::State;

pub use scheduler::{poll_due, push_due, PollDecision};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The volume cannot be used.
    #[error(transparent)]
    Volume(#[from] crate::Error),
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another daemon already answers on the socket.
    #[error("another btm daemon is already listening on {0}")]
    SocketInUse(PathBuf),
    /// The metrics address could not be bound.
    #[error("metrics_listen {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The configured socket group does not exist.
    #[error("invalid socket_group: no group named '{0}'")]
    Group(String),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// A task of the daemon panicked (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Run one daemon generation with `settings` until `shutdown` fires.
///
/// Contract: returns only after every task it started has ended and any
/// snapshot in flight has finished; the socket file is removed. Startup
/// errors (volume missing, socket in use, …) are returned before READY=1.
pub async fn run(
    settings: DaemonSettings,
    shutdown: broadcast::Receiver<()>,
) -> Result<(), DaemonError> {
    let carry = Arc::new(exporter::Carry::default());
    let result = run_generation(settings, shutdown, Arc::clone(&carry)).await;
    carry.cancel().await;
    result
}

/// One generation whose running export, if any, outlives it in `carry`:
/// the caller cancels it, or hands `carry` to the next generation.
async fn run_generation(
    settings: DaemonSettings,
    shutdown: broadcast::Receiver<()>,
    carry: Arc<exporter::Carry>,
) -> Result<(), DaemonError> {
    let (cfg, volume, heights) = {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || -> Result<_, crate::Error> {
            let cfg = BtmCfg::new(&s.volume, s.mode, s.itv, s.cap, s.algo)?;
            let volume: Arc<dyn crate::volume::Volume> = Arc::from(cfg.open()?);
            let heights = volume.heights()?;
            // Views left by a daemon killed mid-export (ZFS clones).
            if let Err(e) = volume.cleanup_stale_views() {
                tracing::warn!(error = %e, "could not remove stale snapshot views");
            }
            Ok((cfg, volume, heights))
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))??
    };
    let state = Arc::new(State::new(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        started_at: Utc::now(),
        volume: cfg.volume.clone(),
        mode: cfg.mode,
        source: settings.source.name().to_owned(),
        itv: cfg.itv,
        cap: cfg.cap,
        algo: cfg.algo,
        last_height: None,
        last_height_at: None,
        source_failing_since: None,
        last_snapshot: None,
        in_progress: None,
        snapshot_count: heights.len(),
        next_due: None,
        export_store: settings.export.as_ref().map(|e| e.store.clone()),
        last_export: None,
        export: None,
        recent_errors: Vec::new(),
        counters: Counters::default(),
    }));
    let exporter = settings.export.clone().map(|e| {
        Arc::new(exporter::Exporter::new(
            cfg.clone(),
            Arc::clone(&volume),
            e,
            settings.lock_timeout,
            settings
                .source
                .is_polled()
                .then(|| settings.poll_interval * 2 + settings.source_timeout),
            Arc::clone(&state),
            Arc::clone(&carry),
        ))
    });
    let scheduler = Arc::new(scheduler::Scheduler::new(
        cfg.clone(),
        volume,
        settings.clone(),
        Arc::clone(&state),
        &heights,
        exporter.clone(),
    ));

    let poller = settings.source.is_polled().then(|| {
        Arc::new(Poller::new(
            settings.source.clone(),
            settings.source_timeout,
        ))
    });
    if let Some(p) = &poller {
        // Check the source once before READY=1. A node that is down is not
        // fatal (the daemon waits for it), but the operator hears of it now.
        let p2 = Arc::clone(p);
        match tokio::task::spawn_blocking(move || p2.fetch()).await {
            Ok(Ok(h)) => {
                state.height_seen(h);
                tracing::info!(
                    source = settings.source.name(),
                    height = h,
                    "height source answers"
                );
            }
            Ok(Err(e)) => {
                state.source_failed(&e.to_string());
                tracing::warn!(source = settings.source.name(), error = %e, "height source does not answer yet; will keep trying");
            }
            Err(e) => return Err(DaemonError::Internal(e.to_string())),
        }
    }

    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let listener = control::bind(
        &settings.socket,
        settings.socket_group.as_deref(),
        settings.socket_mode,
    )?;
    let mut tasks = JoinSet::new();
    tasks.spawn(control::serve(
        listener,
        settings.socket.clone(),
        Arc::clone(&scheduler),
        Arc::clone(&state),
        !settings.source.is_polled(),
        shutdown.resubscribe(),
    ));
    if let Some(p) = poller {
        tasks.spawn(poll::run(
            p,
            Arc::clone(&scheduler),
            Arc::clone(&state),
            settings.poll_interval,
            shutdown.resubscribe(),
        ));
    }
    if let Some(listener) = metrics_listener {
        tasks.spawn(metrics::serve(
            listener,
            Arc::clone(&state),
            shutdown.resubscribe(),
        ));
    }
    if let Some(period) = systemd::watchdog_period() {
        tasks.spawn(systemd::watchdog(
            period,
            Arc::clone(&state),
            shutdown.resubscribe(),
        ));
    }
    tracing::info!(
        volume = %cfg.volume,
        mode = %cfg.mode,
        source = settings.source.name(),
        itv = cfg.itv,
        cap = cfg.cap,
        algo = %cfg.algo,
        socket = %settings.socket.display(),
        export_store = settings.export.as_ref().map(|e| e.store.as_str()),
        export_every = settings.export.as_ref().map(|e| e.every),
        "btm daemon ready"
    );
    systemd::ready(&state.summary());

    let mut shutdown = shutdown;
    let _ = shutdown.recv().await;
    scheduler.stop().await;
    if let Some(x) = &exporter {
        x.stop();
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            result = Err(DaemonError::Internal(e.to_string()));
        }
    }
    tracing::info!("btm daemon stopped");
    result
}

/// Run generations of the daemon under signal control until SIGTERM or
/// SIGINT. `reload` re-reads the configuration on SIGHUP; if it fails, the
/// running generation continues untouched.
pub async fn supervise(
    initial: DaemonSettings,
    reload: impl FnMut() -> Result<DaemonSettings, ConfigError>,
) -> Result<(), DaemonError> {
    let signals = Signals {
        term: signal(SignalKind::terminate()).map_err(DaemonError::Signals)?,
        int: signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?,
        hup: signal(SignalKind::hangup()).map_err(DaemonError::Signals)?,
    };
    // A running export survives reloads; it is cancelled when the daemon
    // ends, however it ends.
    let carry = Arc::new(exporter::Carry::default());
    let result = generations(initial, reload, signals, &carry).await;
    carry.cancel().await;
    result
}

/// The signals [`supervise`] acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

async fn generations(
    mut settings: DaemonSettings,
    mut reload: impl FnMut() -> Result<DaemonSettings, ConfigError>,
    mut signals: Signals,
    carry: &Arc<exporter::Carry>,
) -> Result<(), DaemonError> {
    loop {
        let (tx, rx) = broadcast::channel(1);
        let mut generation = tokio::spawn(run_generation(settings.clone(), rx, Arc::clone(carry)));
        let next = loop {
            tokio::select! {
                ended = &mut generation => {
                    return ended.map_err(|e| DaemonError::Internal(e.to_string()))?;
                }
                _ = signals.term.recv() => break None,
                _ = signals.int.recv() => break None,
                _ = signals.hup.recv() => match reload() {
                    Ok(new) => {
                        tracing::info!("configuration reloaded; restarting with it");
                        break Some(new);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "new configuration rejected; the running one stays in force");
                    }
                },
            }
        };
        match &next {
            None => systemd::stopping(),
            Some(_) => systemd::reloading(),
        }
        let _ = tx.send(());
        generation
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))??;
        match next {
            None => return Ok(()),
            Some(new) => settings = new,
        }
    }
}
