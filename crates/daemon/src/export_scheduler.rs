//! The export scheduler: after each snapshot, decide whether it is due
//! for export ([`crate::export::export_due`]) and, if so, run the export
//! job ([`crate::export::export`]) on a dedicated low-priority thread.
//!
//! At most one export runs: a due export finding the previous one still
//! running is skipped and logged, never queued. Snapshots go on being
//! taken meanwhile (the export holds the volume lock only while pinning).
//! A failed export is retried at the next due height.
//!
//! The running export and the record of what was exported live in a
//! [`ExportLedger`] that outlives a generation: a reload (SIGHUP) lets a running
//! export finish, reporting to the new generation's status. Stopping the
//! daemon cancels it ([`ExportLedger::cancel`]); it then writes no index, and the
//! chunks it uploaded are reused by the next export.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::Utc;

use crate::export::{self, ExportError, ExportSettings, Which};
use btm::protocol::LastExport;
use btm::Ops;
use btm_chunk::store::{Location, Store, StoreError};
use btm_chunk::{ChunkError, Progress};

use super::state::State;

/// Runs exports for one daemon generation.
pub struct ExportScheduler {
    ctx: Arc<Context>,
    ledger: Arc<ExportLedger>,
    stopping: AtomicBool,
}

/// Opens the export store by URL for each export: lazily, so a store
/// that is down fails that export, never the daemon. Tests pass one that
/// returns an in-memory store.
pub type StoreOpener = Arc<dyn Fn(&Location) -> Result<Arc<dyn Store>, StoreError> + Send + Sync>;

/// What the exports of one generation need, shared with their thread.
struct Context {
    ops: Ops,
    open_store: StoreOpener,
    settings: ExportSettings,
    lock_timeout: Duration,
    /// Polled sources: how long to wait for the snapshot's height window
    /// (recorded at the next poll) so the export's metadata carries it.
    window_wait: Option<Duration>,
}

/// Export state that outlives a daemon generation.
#[derive(Default)]
pub struct ExportLedger {
    jobs: Mutex<Jobs>,
    /// The status the running job reports to: the current generation's.
    state: Mutex<Option<Arc<State>>>,
}

/// The running export and what the exports so far did, under one lock:
/// deciding whether an export is due reads both.
#[derive(Default)]
struct Jobs {
    running: Option<Running>,
    /// Last successful export, set by the job thread.
    exported: Option<u64>,
    /// Last export started.
    attempted: Option<u64>,
}

/// An export thread (perhaps finished, not yet joined).
struct Running {
    handle: JoinHandle<()>,
    progress: Arc<Progress>,
    height: u64,
}

impl ExportLedger {
    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> Option<Arc<State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn report(&self, f: impl FnOnce(&State)) {
        if let Some(s) = self.state() {
            f(&s);
        }
    }

    /// Cancel a running export and wait for its thread to end.
    pub async fn cancel(&self) {
        let running = self.jobs().running.take();
        if let Some(r) = running {
            r.progress.cancel.cancel();
            let _ = tokio::task::spawn_blocking(move || r.handle.join()).await;
        }
    }
}

impl ExportScheduler {
    /// An export_scheduler for the volume of `ops`; nothing runs until
    /// [`ExportScheduler::consider`].
    /// A running export in `ledger` (from before a reload) now reports to
    /// `state`.
    pub fn new(
        ops: Ops,
        open_store: StoreOpener,
        settings: ExportSettings,
        lock_timeout: Duration,
        window_wait: Option<Duration>,
        state: Arc<State>,
        ledger: Arc<ExportLedger>,
    ) -> Self {
        {
            let jobs = ledger.jobs();
            if let Some(r) = jobs.running.as_ref().filter(|r| !r.handle.is_finished()) {
                state.export_running(Some((r.height, Arc::clone(&r.progress))));
            }
            *ledger.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        }
        ExportScheduler {
            ctx: Arc::new(Context {
                ops,
                open_store,
                settings,
                lock_timeout,
                window_wait,
            }),
            ledger,
            stopping: AtomicBool::new(false),
        }
    }

    /// A snapshot at `height` exists now: start its export if it is due.
    #[tracing::instrument(skip(self))]
    pub fn consider(&self, height: u64) {
        let mut jobs = self.ledger.jobs();
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let every = self.ctx.settings.every;
        if !export::export_due(height, every, jobs.exported, jobs.attempted) {
            return;
        }
        if let Some(r) = jobs.running.take() {
            if !r.handle.is_finished() {
                tracing::warn!(
                    height,
                    running = r.height,
                    "export due but the previous export is still running; skipped"
                );
                jobs.running = Some(r);
                self.ledger.report(|s| s.count(|c| c.exports_skipped += 1));
                return;
            }
            let _ = r.handle.join();
        }
        jobs.attempted = Some(height);
        let progress = Arc::new(Progress::default());
        let run = Run {
            ctx: Arc::clone(&self.ctx),
            ledger: Arc::clone(&self.ledger),
            progress: Arc::clone(&progress),
            height,
        };
        match std::thread::Builder::new()
            .name("btm-export".into())
            .spawn(move || run.run())
        {
            Ok(handle) => {
                jobs.running = Some(Running {
                    handle,
                    progress,
                    height,
                });
            }
            Err(e) => {
                tracing::error!(height, error = %e, "cannot start the export thread");
                self.ledger.report(|s| {
                    s.error("export", &format!("cannot start the export thread: {e}"));
                    s.count(|c| c.export_failures += 1);
                });
            }
        }
    }

    /// Start no more exports in this generation. A running one goes on
    /// (see [`ExportLedger::cancel`]).
    pub fn stop(&self) {
        // Taken under the jobs lock, so no `consider` is half-way through.
        let _jobs = self.ledger.jobs();
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// One export, owned by its thread.
struct Run {
    ctx: Arc<Context>,
    ledger: Arc<ExportLedger>,
    progress: Arc<Progress>,
    height: u64,
}

impl Run {
    fn run(self) {
        let height = self.height;
        if let Err(e) = btm::sys::lower_thread_priority() {
            tracing::warn!(error = %e, "could not lower the export's CPU and IO priority");
        }
        self.ledger
            .report(|s| s.export_running(Some((height, Arc::clone(&self.progress)))));
        if let Some(wait) = self.ctx.window_wait {
            let deadline = std::time::Instant::now() + wait;
            let (dirs, name) = (self.ctx.ops.dirs(), self.ctx.ops.volume().name());
            // The window file is another process's to write, so it is
            // looked at now and then; cancellation ends the wait at once.
            while !btm::window::load(dirs, name).contains_key(&height)
                && std::time::Instant::now() < deadline
                && !self.progress.cancel.sleep(Duration::from_millis(50))
            {}
        }
        let result = (self.ctx.open_store)(&self.ctx.settings.store)
            .map_err(ExportError::Store)
            .and_then(|store| {
                export::export(
                    &self.ctx.ops,
                    store,
                    Which::DueHeight(height),
                    &self.ctx.settings,
                    Arc::clone(&self.progress),
                    self.ctx.lock_timeout,
                )
            });
        self.ledger.report(|s| s.export_running(None));
        self.finished(result);
    }

    /// Record how the export ended: state, counters and the log.
    fn finished(&self, result: Result<export::ExportReport, ExportError>) {
        let height = self.height;
        match result {
            Ok(report) => {
                self.ledger.jobs().exported = Some(height);
                for w in &report.warnings {
                    tracing::warn!(height, warning = %w, "export finished with a warning");
                    self.ledger.report(|s| s.error("export", w));
                }
                if report.gc_failed {
                    self.ledger.report(|s| s.count(|c| c.gc_failures += 1));
                }
                let last = report.backup.as_ref().map(|b| LastExport {
                    height,
                    backup: b.name.clone(),
                    at: Utc::now(),
                    duration_ms: report.duration_ms,
                    bytes_read: b.bytes_read,
                    bytes_uploaded: b.bytes_uploaded,
                    files_unchanged: b.files_unchanged,
                    chain: report.chain.as_ref().map(|c| c.describe()),
                });
                if let Some(b) = &report.backup {
                    tracing::info!(
                        height,
                        backup = %b.name,
                        duration_ms = report.duration_ms,
                        bytes_read = b.bytes_read,
                        bytes_uploaded = b.bytes_uploaded,
                        files_unchanged = b.files_unchanged,
                        pruned = ?report.pruned,
                        "export finished"
                    );
                }
                self.ledger.report(|s| s.export_done(last));
            }
            Err(ExportError::Chunk(ChunkError::Cancelled)) => {
                tracing::info!(
                    height,
                    "export cancelled (daemon stopping); no backup was written"
                );
            }
            Err(ExportError::Busy(v)) => {
                tracing::warn!(
                    height,
                    volume = %v,
                    "export skipped: another export of this volume (btm export?) is running"
                );
                self.ledger.report(|s| s.count(|c| c.exports_skipped += 1));
            }
            Err(e) => {
                tracing::error!(height, store = %self.ctx.settings.store, error = %e, "export failed; will retry at the next due height");
                self.ledger.report(|s| {
                    s.error("export", &format!("export of {height}: {e}"));
                    s.count(|c| c.export_failures += 1);
                });
            }
        }
    }
}

/// The export_scheduler on an in-memory volume and store: due heights, skipping
/// while one runs, cancellation, a store that is down. No root, no server.
#[cfg(test)]
mod tests {
    use super::*;
    use btm::volume::Volume;
    use btm_chunk::store::MemStore;

    struct Rig {
        export_scheduler: ExportScheduler,
        ledger: Arc<ExportLedger>,
        ops: Ops,
        store: MemStore,
        state: Arc<State>,
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = crate::test_support::settings(
            "[export]\nstore = \"/unused\"\nevery = 20\ntag = \"t\"\nkeep = 2\ngc = false\n",
            dir.path(),
        );
        let vol = crate::test_support::fake_volume(dir.path());
        let live = vol.root().expect("root");
        std::fs::write(live.join("state.db"), vec![7u8; 300_000]).expect("write");
        let ops = Ops::new(vol, settings.dirs.clone());
        let store = MemStore::new();
        let opener = {
            let store = store.clone();
            Arc::new(move |_: &Location| Ok(Arc::new(store.clone()) as Arc<dyn Store>))
                as StoreOpener
        };
        let cfg = btm::BtmCfg {
            volume: "tank/chain".into(),
            ..btm::BtmCfg::default()
        };
        let state = Arc::new(State::new(crate::initial_status(&cfg, &settings, 0)));
        let ledger = Arc::new(ExportLedger::default());
        let export_scheduler = ExportScheduler::new(
            ops.clone(),
            opener,
            settings.export.clone().expect("export"),
            Duration::from_secs(1),
            None,
            Arc::clone(&state),
            Arc::clone(&ledger),
        );
        Rig {
            export_scheduler,
            ledger,
            ops,
            store,
            state,
            _dir: dir,
        }
    }

    impl Rig {
        fn snapshot_and_consider(&self, h: u64) {
            let only = btm::SnapshotOptions::unpruned(Duration::ZERO);
            self.ops.snapshot(h, &only).expect("snapshot");
            self.export_scheduler.consider(h);
        }

        fn wait_idle(&self) {
            for _ in 0..1000 {
                let jobs = self.ledger.jobs();
                if jobs.running.as_ref().is_none_or(|r| r.handle.is_finished()) {
                    return;
                }
                drop(jobs);
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("the export did not end");
        }

        fn exported_heights(&self) -> Vec<u64> {
            btm_chunk::inventory::list_backups(&self.store, None)
                .expect("list")
                .into_iter()
                .map(|n| {
                    btm_chunk::inventory::read_index(&self.store, &n.to_string())
                        .expect("index")
                        .height()
                        .expect("height")
                })
                .collect()
        }

        fn wait_for_writes(&self) {
            for _ in 0..1000 {
                if self.store.writes() > 0 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("the export wrote nothing");
        }
    }

    #[test]
    fn one_export_per_bucket_and_retention_keeps_k() {
        let r = rig();
        for h in (10..=60).step_by(10) {
            r.snapshot_and_consider(h);
            r.wait_idle();
        }
        assert_eq!(r.exported_heights(), vec![60, 40]);
        let c = r.state.status().counters;
        assert_eq!((c.exports, c.export_failures, c.exports_skipped), (4, 0, 0));
    }

    #[test]
    fn a_due_export_is_skipped_not_queued_while_one_runs() {
        let r = rig();
        r.store.hold_writes();
        r.snapshot_and_consider(20);
        r.wait_for_writes();
        r.snapshot_and_consider(40);
        assert_eq!(r.state.status().counters.exports_skipped, 1);
        r.store.release_writes();
        r.wait_idle();
        assert_eq!(r.exported_heights(), vec![20]);
        // The skipped bucket was never attempted: the next due one runs.
        r.snapshot_and_consider(60);
        r.wait_idle();
        assert_eq!(r.exported_heights(), vec![60, 20]);
    }

    #[test]
    fn a_cancelled_export_writes_no_index_and_is_no_failure() {
        let r = rig();
        r.store.hold_writes();
        r.snapshot_and_consider(20);
        r.wait_for_writes();
        if let Some(running) = &r.ledger.jobs().running {
            running.progress.cancel.cancel();
        }
        r.store.release_writes();
        r.wait_idle();
        assert!(r.exported_heights().is_empty());
        let c = r.state.status().counters;
        assert_eq!((c.exports, c.export_failures), (0, 0));
    }

    #[test]
    fn a_store_that_is_down_fails_the_export_and_the_next_bucket_retries() {
        let r = rig();
        r.store.set_down(true);
        r.snapshot_and_consider(20);
        r.wait_idle();
        // Not retried at every snapshot of the same bucket...
        r.snapshot_and_consider(30);
        r.wait_idle();
        assert_eq!(r.state.status().counters.export_failures, 1);
        r.store.set_down(false);
        // ...but at the next one.
        r.snapshot_and_consider(40);
        r.wait_idle();
        assert_eq!(r.exported_heights(), vec![40]);
        let s = r.state.status();
        assert_eq!((s.counters.exports, s.counters.export_failures), (1, 1));
        assert!(s.recent_errors.iter().any(|e| e.kind == "export"), "{s:?}");
    }

    /// An export whose store keeps failing makes one call's attempts (the
    /// store's one policy) and fails; the scheduler does not repeat the
    /// call, and tries a new export only at the next due height.
    #[test]
    fn a_failing_store_costs_one_calls_attempts_per_due_export() {
        use btm_chunk::store::{Fault, Request, RetryPolicy};
        let r = rig();
        r.store.inject(Request::Any, 1, u64::MAX, Fault::Fail);
        r.snapshot_and_consider(20);
        r.wait_idle();
        let attempts = u64::from(RetryPolicy::ATTEMPTS);
        assert_eq!(r.store.faulted(), attempts);
        r.snapshot_and_consider(30);
        r.wait_idle();
        assert_eq!(r.store.faulted(), attempts);
        r.snapshot_and_consider(40);
        r.wait_idle();
        assert_eq!(r.store.faulted(), 2 * attempts);
        let c = r.state.status().counters;
        assert_eq!((c.exports, c.export_failures), (0, 2));
    }

    /// A reload: the next generation's export_scheduler takes over the ledger, and
    /// the export still running reports to the new generation's status.
    #[test]
    fn a_running_export_carries_over_a_reload() {
        let r = rig();
        r.store.hold_writes();
        r.snapshot_and_consider(20);
        r.wait_for_writes();
        let settings = r.export_scheduler.ctx.settings.clone();
        let state2 = Arc::new(State::new(r.state.status()));
        r.export_scheduler.stop();
        let next = ExportScheduler::new(
            r.ops.clone(),
            Arc::clone(&r.export_scheduler.ctx.open_store),
            settings,
            Duration::from_secs(1),
            None,
            Arc::clone(&state2),
            Arc::clone(&r.ledger),
        );
        assert_eq!(state2.status().export.map(|e| e.height), Some(20));
        // Not due again while it runs: skipped, not queued.
        r.ops
            .snapshot(40, &btm::SnapshotOptions::unpruned(Duration::ZERO))
            .expect("snapshot");
        next.consider(40);
        assert_eq!(state2.status().counters.exports_skipped, 1);
        r.store.release_writes();
        r.wait_idle();
        assert_eq!(r.exported_heights(), vec![20]);
        let last = state2.status().last_export.map(|l| l.height);
        assert_eq!(
            last,
            Some(20),
            "the new generation reports the carried export"
        );
        assert_eq!(r.state.status().counters.exports, 0);
    }

    #[test]
    fn a_stopped_exporter_starts_nothing() {
        let r = rig();
        r.export_scheduler.stop();
        r.snapshot_and_consider(20);
        r.wait_idle();
        assert!(r.exported_heights().is_empty());
        assert_eq!(r.store.writes(), 0);
    }
}
