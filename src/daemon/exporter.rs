//! The daemon's export job: after each snapshot, decide whether it is due
//! for export ([`crate::export::export_due`]) and, if so, run
//! [`crate::export::export`] on a dedicated low-priority thread.
//!
//! At most one export runs: a due export finding the previous one still
//! running is skipped and logged, never queued. Snapshots go on being
//! taken meanwhile (the export holds the volume lock only while pinning).
//! A failed export is retried at the next due height. Stopping the daemon
//! cancels a running export, which then writes no index; the chunks it
//! uploaded are reused by the next one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::Utc;

use crate::chunk::{ChunkError, Progress};
use crate::export::{self, ExportError, ExportSettings, Which};
use crate::protocol::LastExport;
use crate::volume::Volume;
use crate::BtmCfg;

use super::state::State;

/// Runs exports for one daemon generation.
pub struct Exporter {
    ctx: Arc<Context>,
    job: Mutex<Job>,
}

/// What every export of this generation needs, shared with its thread.
struct Context {
    cfg: BtmCfg,
    volume: Arc<dyn Volume>,
    settings: ExportSettings,
    lock_timeout: Duration,
    /// Polled sources: how long to wait for the snapshot's height window
    /// (recorded at the next poll) so the export's metadata carries it.
    window_wait: Option<Duration>,
    state: Arc<State>,
    /// Last successful export and last attempt, updated by the job thread.
    heights: Mutex<Heights>,
}

#[derive(Default)]
struct Job {
    handle: Option<JoinHandle<()>>,
    progress: Option<Arc<Progress>>,
    stopping: bool,
}

#[derive(Default, Clone, Copy)]
struct Heights {
    exported: Option<u64>,
    attempted: Option<u64>,
}

impl Exporter {
    /// An exporter for `volume`; nothing runs until [`Exporter::consider`].
    pub fn new(
        cfg: BtmCfg,
        volume: Arc<dyn Volume>,
        settings: ExportSettings,
        lock_timeout: Duration,
        window_wait: Option<Duration>,
        state: Arc<State>,
    ) -> Self {
        Exporter {
            ctx: Arc::new(Context {
                cfg,
                volume,
                settings,
                lock_timeout,
                window_wait,
                state,
                heights: Mutex::default(),
            }),
            job: Mutex::new(Job::default()),
        }
    }

    /// A snapshot at `height` exists now: start its export if it is due.
    #[tracing::instrument(skip(self))]
    pub fn consider(&self, height: u64) {
        let mut job = self.job.lock().unwrap_or_else(|p| p.into_inner());
        if job.stopping {
            return;
        }
        let h = *self.ctx.heights.lock().unwrap_or_else(|p| p.into_inner());
        if !export::export_due(height, self.ctx.settings.every, h.exported, h.attempted) {
            return;
        }
        if let Some(handle) = job.handle.take() {
            if !handle.is_finished() {
                job.handle = Some(handle);
                tracing::warn!(
                    height,
                    "export due but the previous export is still running; skipped"
                );
                self.ctx.state.count(|c| c.exports_skipped += 1);
                return;
            }
            let _ = handle.join();
        }
        self.ctx
            .heights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attempted = Some(height);
        let progress = Arc::new(Progress::default());
        let run = Run {
            ctx: Arc::clone(&self.ctx),
            progress: Arc::clone(&progress),
            height,
        };
        match std::thread::Builder::new()
            .name("btm-export".into())
            .spawn(move || run.run())
        {
            Ok(handle) => {
                job.handle = Some(handle);
                job.progress = Some(progress);
            }
            Err(e) => {
                tracing::error!(height, error = %e, "cannot start the export thread");
                self.ctx
                    .state
                    .error("export", &format!("cannot start the export thread: {e}"));
                self.ctx.state.count(|c| c.export_failures += 1);
            }
        }
    }

    /// Cancel a running export and wait for its thread to end.
    pub async fn stop(&self) {
        let handle = {
            let mut job = self.job.lock().unwrap_or_else(|p| p.into_inner());
            job.stopping = true;
            if let Some(p) = &job.progress {
                p.cancel.store(true, Ordering::SeqCst);
            }
            job.handle.take()
        };
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// One export, owned by its thread.
struct Run {
    ctx: Arc<Context>,
    progress: Arc<Progress>,
    height: u64,
}

impl Run {
    fn run(self) {
        let height = self.height;
        if let Err(e) = crate::sys::lower_thread_priority() {
            tracing::warn!(error = %e, "could not lower the export's CPU and IO priority");
        }
        self.ctx
            .state
            .export_running(Some((height, Arc::clone(&self.progress))));
        if let Some(wait) = self.ctx.window_wait {
            let deadline = std::time::Instant::now() + wait;
            while !crate::window::load(self.ctx.volume.name()).contains_key(&height)
                && std::time::Instant::now() < deadline
                && !self.progress.cancel.load(Ordering::Relaxed)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let result = export::export(
            &self.ctx.cfg,
            self.ctx.volume.as_ref(),
            Which::DueHeight(height),
            &self.ctx.settings,
            Arc::clone(&self.progress),
            self.ctx.lock_timeout,
        );
        self.ctx.state.export_running(None);
        match result {
            Ok(report) => {
                self.ctx
                    .heights
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .exported = Some(height);
                for w in &report.warnings {
                    tracing::warn!(height, warning = %w, "export finished with a warning");
                    self.ctx.state.error("export", w);
                }
                let last = report.backup.as_ref().map(|b| LastExport {
                    height,
                    backup: b.name.clone(),
                    at: Utc::now(),
                    duration_ms: report.duration_ms,
                    bytes_read: b.bytes_read,
                    bytes_uploaded: b.bytes_uploaded,
                    files_unchanged: b.files_unchanged,
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
                self.ctx.state.export_done(last);
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
                self.ctx.state.count(|c| c.exports_skipped += 1);
            }
            Err(e) => {
                tracing::error!(height, store = %self.ctx.settings.store, error = %e, "export failed; will retry at the next due height");
                self.ctx
                    .state
                    .error("export", &format!("export of {height}: {e}"));
                self.ctx.state.count(|c| c.export_failures += 1);
            }
        }
    }
}
