//! The checkpoint stage: now and then, sync the destination's file
//! system and journal what that made durable, so that an interrupted
//! restore resumes without reading again what it finished.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use super::journal::{Durable, Journal, Record, Stamp};
use super::{Shared, CHECKPOINT_BYTES, CHECKPOINT_EVERY, CHECKPOINT_FILES};
use crate::ChunkError;

/// Once every read is handed out, bytes written that make the checkpointer
/// sync again at once (see [`drain`]): enough that a sync is not only its
/// fixed cost.
const DRAIN_SYNC_BYTES: u64 = 4 << 20;
/// How often the draining checkpointer looks at what the last reads wrote.
const DRAIN_POLL: Duration = Duration::from_millis(5);

impl Shared<'_> {
    /// Whether a checkpoint is due, the last one having been at `last`.
    fn checkpoint_due(&self, last: Instant) -> bool {
        last.elapsed() >= CHECKPOINT_EVERY
            || self.since_checkpoint.load(Ordering::Relaxed) >= CHECKPOINT_BYTES
            || self
                .completed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len()
                >= CHECKPOINT_FILES
    }

    /// Tell the checkpointer that every read is handed to a fetcher. It
    /// then syncs again each time the last reads have written
    /// [`DRAIN_SYNC_BYTES`], until none is left, and returns. Those syncs
    /// overlap the last reads, so the restore's own last sync has little
    /// left but what the last read wrote: it waited for everything written
    /// since the last checkpoint (up to 64 MiB, then what the reads in
    /// flight at the hand-out wrote, 160 MiB on a node) with the cores
    /// idle.
    pub(super) fn stop_checkpoints(&self) {
        *self
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = true;
        self.checkpoint_now.notify_one();
    }
}

/// Every 10 s, 64 MiB or 65,536 files, make a [`checkpoint`]; once every
/// read is handed out, [`drain`].
pub(super) fn checkpointer(
    shared: &Shared<'_>,
    journal: &Mutex<Journal>,
    dest: &OwnedFd,
) -> Result<(), ChunkError> {
    let mut last = Instant::now();
    loop {
        let draining = {
            let guard = shared
                .checkpoint_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // The stop flag is read under the lock before waiting: a stop
            // set during the previous checkpoint's sync is not missed (it
            // cost every such restore up to ten idle seconds).
            if *guard {
                true
            } else if shared.checkpoint_due(last) {
                // Its trigger may have fired during the previous sync,
                // when nobody waited.
                false
            } else {
                let (guard, _) = shared
                    .checkpoint_now
                    .wait_timeout(guard, CHECKPOINT_EVERY.saturating_sub(last.elapsed()))
                    .unwrap_or_else(|p| p.into_inner());
                *guard
            }
        };
        if shared.pipeline.aborted() {
            // An aborted restore leaves what the last checkpoint recorded.
            return Ok(());
        }
        if draining {
            return drain(shared, journal, dest);
        }
        if shared.checkpoint_due(last) {
            last = Instant::now();
            checkpoint(shared, journal, dest)?;
        }
    }
}

/// Every read is handed out: sync whenever the reads still running have
/// written [`DRAIN_SYNC_BYTES`], until they are done. Polled: it lasts as
/// long as the last reads do, a fraction of a second.
fn drain(shared: &Shared<'_>, journal: &Mutex<Journal>, dest: &OwnedFd) -> Result<(), ChunkError> {
    loop {
        if shared.pipeline.aborted() || shared.reads_left.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        if shared.since_checkpoint.load(Ordering::Relaxed) >= DRAIN_SYNC_BYTES {
            checkpoint(shared, journal, dest)?;
            continue;
        }
        let guard = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Woken early by the last read's end.
        drop(
            shared
                .checkpoint_now
                .wait_timeout(guard, DRAIN_POLL)
                .unwrap_or_else(|p| p.into_inner()),
        );
    }
}

/// Sync the filesystem, then journal the files (and prefixes of large
/// files) that the sync made durable.
fn checkpoint(
    shared: &Shared<'_>,
    journal: &Mutex<Journal>,
    dest: &OwnedFd,
) -> Result<(), ChunkError> {
    shared.since_checkpoint.store(0, Ordering::Relaxed);
    // What is claimed is taken before the sync: it is all on disk once
    // the sync returns.
    let mut records =
        std::mem::take(&mut *shared.completed.lock().unwrap_or_else(|p| p.into_inner()));
    {
        let mut big = shared.big.lock().unwrap_or_else(|p| p.into_inner());
        big.retain(|w| w.strong_count() > 0);
        for job in big.iter().filter_map(Weak::upgrade) {
            let prefix = job.prefix_bytes();
            // Stamped before the sync: a write after it moves the
            // change time, and the record is then not trusted.
            let stamp = nix::sys::stat::fstat(&job.file).map(|st| Stamp::of(&st));
            if let (Ok(stamp), true) = (stamp, prefix > 0 && prefix < job.size) {
                records.push(Durable {
                    path: job.entry.path.clone(),
                    record: Record { stamp, prefix },
                    chunks: None,
                });
            }
        }
    }
    nix::unistd::syncfs(dest)
        .map_err(|e| ChunkError::io(Path::new("(restore destination)"), e.into()))?;
    journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(&records)
}
