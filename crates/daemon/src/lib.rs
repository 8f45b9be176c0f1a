//! `btm daemon`: follow the node's height and snapshot at block-height
//! intervals, for months, without attention.
//!
//! The process has long-lived parts and *generations*. The control socket,
//! the metrics endpoint, the systemd watchdog and a running export live as
//! long as the process: a reload never closes the socket, so a node's
//! notify is never refused or dropped by one. A generation holds what a
//! configuration decides: the opened volume, the scheduler, the poller. It
//! starts in stages (open the volume, check the source), each of which
//! gives way at once to a stop, then publishes itself to the servers and
//! runs until its stop fires; then it refuses new takes, lets the one in
//! flight finish, and waits for its tasks. A notify that reaches a stopping
//! generation is handed to the next one, or fails if the daemon is shutting
//! down.
//!
//! Every task observes stops through [`Shutdown`], which also reports a stop
//! fired before the task began. [`run`] runs one configuration until its
//! stop; [`supervise`] owns the signals: SIGTERM/SIGINT stop the process
//! (a second one exits without waiting), SIGHUP re-reads the configuration
//! and, only if it is valid, replaces the generation.
//!
//! The crate also holds what only the daemon and the CLI above it need:
//! [`settings`] (the configuration file and flags), [`height`] (polled
//! height sources and chain identities) and [`export`] (one export of a
//! snapshot to a chunk store). It sits above `btm-chunk` and the `btm`
//! library, which know nothing of it.

pub mod chain;
mod control;
pub mod export;
mod export_scheduler;
pub mod height;
#[cfg(test)]
mod lifecycle_tests;
mod metrics;
mod policy;
mod poll;
mod scheduler;
pub mod settings;
mod shutdown;
mod state;
mod systemd;
#[cfg(test)]
mod test_support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::height::Poller;
use crate::settings::{ConfigError, DaemonSettings};
use btm::protocol::{Counters, Status};

use btm::{BtmCfg, Ops};
use state::State;

pub use scheduler::{
    check_height, poll_due, push_due, PollDecision, Refusal, Taken, DEFAULT_MAX_HEIGHT_JUMP,
    MAX_HEIGHT,
};
pub use shutdown::{channel as shutdown_channel, Shutdown, Trigger};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The volume cannot be used.
    #[error(transparent)]
    Volume(#[from] btm::Error),
    /// The control socket could not be set up.
    #[error("control socket {path}: {cause}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// Another daemon already answers on the socket.
    #[error("another btm daemon is already listening on {0}")]
    SocketInUse(PathBuf),
    /// The metrics address could not be bound.
    #[error("metrics_listen {addr}: {cause}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        cause: std::io::Error,
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
    /// A second SIGTERM or SIGINT arrived while the daemon was stopping.
    #[error("stopped by a second signal before the snapshot in flight finished")]
    Interrupted,
}

/// One running configuration, as the long-lived servers see it.
pub(crate) struct Generation {
    /// Distinguishes generations, so a notify handed back by a stopping
    /// one waits for the next.
    id: u64,
    scheduler: Arc<scheduler::Scheduler>,
    state: Arc<State>,
    /// Push mode: notifies are taken; otherwise they are refused.
    push: bool,
}

/// The newest generation that finished starting (`None` before the first):
/// what the servers dispatch to.
type Current = watch::Receiver<Option<Arc<Generation>>>;

/// What a generation opens, passed in: the real volume drivers and stores
/// ([`Deps::default`]), or in-memory fakes in tests.
#[derive(Clone)]
pub struct Deps {
    /// Open the configured volume, read its heights, clean stale views.
    /// Blocking; run on a blocking thread.
    pub open_volume: VolumeOpener,
    /// Open the export store by URL, at each export.
    pub open_store: export_scheduler::StoreOpener,
}

/// See [`Deps::open_volume`].
pub type VolumeOpener =
    Arc<dyn Fn(&DaemonSettings) -> Result<(BtmCfg, Ops, Vec<u64>), btm::Error> + Send + Sync>;

pub use export_scheduler::StoreOpener;
pub use policy::node_policy;

impl Default for Deps {
    /// The volume named in the settings, through its driver; stores by URL.
    fn default() -> Self {
        Deps {
            open_volume: Arc::new(open_volume),
            open_store: Arc::new(|l: &btm_chunk::store::Location| {
                btm_chunk::store::open(l, btm_chunk::store::Open::Write)
            }),
        }
    }
}

/// The parts of the daemon that outlive generations.
struct Daemon {
    deps: Deps,
    current: watch::Sender<Option<Arc<Generation>>>,
    control: Mutex<Option<control::Server>>,
    metrics: Mutex<Option<metrics::Server>>,
    ledger: Arc<export_scheduler::ExportLedger>,
    /// The process's stop, seen by the servers and their clients.
    stopped: Shutdown,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    generations: AtomicU64,
}

impl Daemon {
    /// Bind the control socket (and the metrics endpoint) for `settings`
    /// and start the watchdog. Nothing is dispatched until a generation is
    /// published.
    fn start(
        settings: &DaemonSettings,
        stopped: Shutdown,
        deps: Deps,
    ) -> Result<Daemon, DaemonError> {
        let (current, rx) = watch::channel(None);
        let watchdog = systemd::watchdog_period()
            .map(|period| tokio::spawn(systemd::watchdog(period, rx, stopped.clone())));
        let daemon = Daemon {
            deps,
            current,
            control: Mutex::new(None),
            metrics: Mutex::new(None),
            ledger: Arc::new(export_scheduler::ExportLedger::default()),
            stopped,
            watchdog,
            generations: AtomicU64::new(0),
        };
        daemon.configure_servers(settings)?;
        Ok(daemon)
    }

    /// Make the control socket and the metrics endpoint match `settings`:
    /// kept as they are when unchanged (a reload never closes them), the
    /// socket's owner and mode updated in place, rebound when the address
    /// changed.
    fn configure_servers(&self, settings: &DaemonSettings) -> Result<(), DaemonError> {
        let binding = control::Binding::of(settings);
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        match control.as_mut() {
            Some(server) if server.binding().path == binding.path => server.rebind(binding)?,
            _ => {
                let new = control::Server::start(
                    binding,
                    self.current.subscribe(),
                    self.stopped.clone(),
                )?;
                if let Some(old) = control.replace(new) {
                    old.retire();
                }
            }
        }
        drop(control);
        let mut metrics = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        let same = metrics.as_ref().map(|m| m.addr()) == settings.metrics_listen;
        if !same {
            if let Some(old) = metrics.take() {
                old.retire();
            }
            if let Some(addr) = settings.metrics_listen {
                *metrics = Some(metrics::Server::start(
                    addr,
                    self.current.subscribe(),
                    self.stopped.clone(),
                )?);
            }
        }
        Ok(())
    }

    /// Stop the servers (clients being served get their answers), cancel a
    /// running export, and wait for all of it.
    async fn finish(self) {
        let control = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = control {
            c.stop().await;
        }
        let metrics = self
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(m) = metrics {
            m.stop().await;
        }
        self.ledger.cancel().await;
        if let Some(w) = self.watchdog {
            let _ = w.await;
        }
    }

    /// Run one generation with `settings` until `stop` fires (see the
    /// module documentation). A stop during start-up returns at once.
    async fn generation(
        &self,
        settings: DaemonSettings,
        mut stop: Shutdown,
    ) -> Result<(), DaemonError> {
        btm::volume::cmd::set_limit(settings.command_timeout);
        let opening = {
            let (s, open) = (settings.clone(), Arc::clone(&self.deps.open_volume));
            tokio::task::spawn_blocking(move || open(&s))
        };
        let Some(opened) = stop.until(opening).await else {
            return Ok(());
        };
        let (cfg, ops, heights) = opened.map_err(|e| DaemonError::Internal(e.to_string()))??;
        let state = Arc::new(State::new(initial_status(&cfg, &settings, heights.len())));
        let census = {
            let ops = ops.clone();
            tokio::task::spawn_blocking(move || scheduler::branch_census(&ops))
        };
        match stop.until(census).await {
            None => return Ok(()),
            Some(Ok(Some(c))) => state.branches_seen(c),
            Some(Ok(None)) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "could not count branches"),
        }
        let export_scheduler = settings.export.clone().map(|e| {
            Arc::new(export_scheduler::ExportScheduler::new(
                ops.clone(),
                Arc::clone(&self.deps.open_store),
                e,
                settings.lock_timeout,
                settings
                    .source
                    .is_polled()
                    .then(|| settings.poll_interval * 2 + settings.source_timeout),
                Arc::clone(&state),
                Arc::clone(&self.ledger),
            ))
        });
        let scheduler = Arc::new(scheduler::Scheduler::new(
            cfg.clone(),
            ops,
            settings.clone(),
            Arc::clone(&state),
            &heights,
            export_scheduler.clone(),
        ));
        let Some(poller) = start_poller(&settings, &state, &mut stop).await else {
            return Ok(());
        };
        self.configure_servers(&settings)?;
        let generation = Arc::new(Generation {
            id: self.generations.fetch_add(1, Ordering::Relaxed),
            scheduler: Arc::clone(&scheduler),
            state: Arc::clone(&state),
            push: !settings.source.is_polled(),
        });
        self.current.send_replace(Some(generation));
        let polling = poller.map(|p| {
            tokio::spawn(poll::run(
                p,
                Arc::clone(&scheduler),
                Arc::clone(&state),
                settings.poll_interval,
                stop.clone(),
            ))
        });
        log_ready(&cfg, &settings);
        systemd::ready(&state.summary());

        stop.wait().await;
        scheduler.stop().await;
        if let Some(x) = &export_scheduler {
            x.stop();
        }
        let mut result = Ok(());
        if let Some(task) = polling {
            if let Err(e) = task.await {
                result = Err(DaemonError::Internal(e.to_string()));
            }
        }
        result
    }
}

/// Open the configured volume, read its heights, and remove views left by
/// a daemon killed mid-export (ZFS clones). Blocking.
fn open_volume(s: &DaemonSettings) -> Result<(BtmCfg, Ops, Vec<u64>), btm::Error> {
    let cfg = BtmCfg::new(&s.volume, s.mode, s.itv, s.cap, s.algo)?;
    let ops = cfg.ops_in(s.dirs.clone())?;
    let heights = ops.volume().heights()?;
    if let Err(e) = ops.volume().cleanup_stale_views() {
        tracing::warn!(error = %e, "could not remove stale snapshot views");
    }
    Ok((cfg, ops, heights))
}

/// The poller of a polled source (`Some(None)` in push mode), after a
/// first read: a node that is down is not fatal (the daemon waits for it),
/// but the operator hears of it now. `None`: a stop came first.
async fn start_poller(
    settings: &DaemonSettings,
    state: &State,
    stop: &mut Shutdown,
) -> Option<Option<Arc<Poller>>> {
    Some(match settings.source.is_polled() {
        false => None,
        true => {
            let p = Arc::new(Poller::new(
                settings.source.clone(),
                settings.source_timeout,
            ));
            let first = poll::fetch(&p);
            let first = stop.until(first).await?;
            match first {
                Ok(h) => {
                    state.height_seen(h);
                    tracing::info!(
                        source = settings.source.name(),
                        height = h,
                        "height source answers"
                    );
                }
                Err(e) => {
                    state.source_failed(&e.to_string());
                    tracing::warn!(source = settings.source.name(), error = %e, "height source does not answer yet; will keep trying");
                }
            }
            Some(p)
        }
    })
}

/// The one line that says the daemon is up, with what it runs.
fn log_ready(cfg: &BtmCfg, settings: &DaemonSettings) {
    tracing::info!(
        volume = %cfg.volume,
        mode = %cfg.mode,
        source = settings.source.name(),
        itv = cfg.itv,
        cap = cfg.cap,
        algo = %cfg.algo,
        socket = %settings.socket.display(),
        export_store = settings.export.as_ref().map(|e| e.store.to_string()),
        export_every = settings.export.as_ref().map(|e| e.every),
        "btm daemon ready"
    );
}

fn initial_status(cfg: &BtmCfg, settings: &DaemonSettings, snapshots: usize) -> Status {
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        started_at: Utc::now(),
        volume: cfg.volume.clone(),
        mode: cfg.mode,
        source: settings.source.name().to_owned(),
        height_mismatch: None,
        itv: cfg.itv,
        cap: cfg.cap,
        algo: cfg.algo,
        last_height: None,
        last_height_at: None,
        source_failing_since: None,
        last_snapshot: None,
        in_progress: None,
        volume_stalled_since: None,
        snapshot_count: snapshots,
        protected_count: 0,
        branch_count: 0,
        branch_bytes: None,
        half_done: None,
        next_due: None,
        export_store: settings.export.as_ref().map(|e| e.store.to_string()),
        export_every: settings.export.as_ref().map(|e| e.every),
        last_export: None,
        export: None,
        recent_errors: Vec::new(),
        counters: Counters::default(),
    }
}

/// Run the daemon with `settings` until `shutdown` fires.
///
/// Contract: a stop fired before or during start-up is honoured; returns
/// only after every task it started has ended, the snapshot in flight (if
/// any) has finished, every client has had its answer, and a running
/// export was cancelled; the socket file is removed. Start-up errors
/// (volume missing, socket in use, …) are returned before READY=1.
pub async fn run(settings: DaemonSettings, shutdown: Shutdown) -> Result<(), DaemonError> {
    run_with(settings, shutdown, Deps::default()).await
}

/// [`run`] with what it opens passed in.
pub async fn run_with(
    settings: DaemonSettings,
    shutdown: Shutdown,
    deps: Deps,
) -> Result<(), DaemonError> {
    let daemon = Daemon::start(&settings, shutdown.clone(), deps)?;
    let result = daemon.generation(settings, shutdown).await;
    daemon.finish().await;
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
    let mut signals = Signals {
        term: signal(SignalKind::terminate()).map_err(DaemonError::Signals)?,
        int: signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?,
        hup: signal(SignalKind::hangup()).map_err(DaemonError::Signals)?,
    };
    let (stop, stopped) = shutdown::channel();
    let daemon = Daemon::start(&initial, stopped, Deps::default())?;
    let result = generations(&daemon, initial, reload, &mut signals, &stop).await;
    stop.fire();
    let finished = daemon.finish();
    tokio::pin!(finished);
    // Clients waiting for the snapshot in flight get their answers; a
    // second signal stops waiting.
    tokio::select! {
        _ = &mut finished => {}
        _ = signals.term.recv() => return Err(DaemonError::Interrupted),
        _ = signals.int.recv() => return Err(DaemonError::Interrupted),
    }
    tracing::info!("btm daemon stopped");
    result
}

/// The signals [`supervise`] acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

async fn generations(
    daemon: &Daemon,
    mut settings: DaemonSettings,
    mut reload: impl FnMut() -> Result<DaemonSettings, ConfigError>,
    signals: &mut Signals,
    stop: &Trigger,
) -> Result<(), DaemonError> {
    loop {
        let (gen_stop, gen_stopped) = shutdown::channel();
        let generation = daemon.generation(settings.clone(), gen_stopped);
        tokio::pin!(generation);
        let next = loop {
            tokio::select! {
                ended = &mut generation => return ended,
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
            None => {
                systemd::stopping();
                stop.fire();
            }
            Some(_) => systemd::reloading(),
        }
        gen_stop.fire();
        tokio::select! {
            ended = &mut generation => ended?,
            _ = signals.term.recv() => return Err(DaemonError::Interrupted),
            _ = signals.int.recv() => return Err(DaemonError::Interrupted),
        }
        match next {
            None => return Ok(()),
            Some(new) => settings = new,
        }
    }
}
