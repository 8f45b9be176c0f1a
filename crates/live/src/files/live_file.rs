//! One live file while something works on it: the node has it open, a
//! read fills it, or hydration has claimed its chunks. It holds the
//! file's place in the table and in the chunk states, and the locks that
//! order the node's changes and the fills; no descriptor.

use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use btm::sys::FileHandle;
use nix::errno::Errno;
use nix::sys::time::TimeSpec;

use crate::presence::{Claim, FileChunks, States};
use crate::table::Extent;

/// One backup file not wholly local yet, while something works on it.
pub struct LiveFile {
    /// Its slot in the live files' table.
    pub slot: u32,
    /// Its path in the backup, for messages.
    pub path: String,
    /// How to reach its backing file.
    pub handle: FileHandle,
    /// Where its chunks are, and its size in the backup.
    pub extent: Extent,
    pub(super) chunk_size: u64,
    pub(super) states: Arc<States>,
    pub(super) inner: Mutex<Inner>,
    pub(super) changed: Condvar,
    /// Held shared by the node's changes to the file's bytes and times,
    /// exclusively by a fill: a fill puts back the modification time the
    /// node's last change left, never one from before it.
    pub(super) gate: RwLock<()>,
}

#[derive(Default)]
pub(super) struct Inner {
    /// The modification time a fill puts back: the backup's, or what the
    /// node's last change left (read when first needed).
    pub(super) mtime: Option<TimeSpec>,
}

impl LiveFile {
    /// The file's chunks, locked for a decision.
    pub(super) fn lock(&self) -> (MutexGuard<'_, Inner>, FileChunks<'_>) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g, self.states.file(self.extent.range(self.chunk_size)))
    }

    /// Its number of chunks.
    pub fn chunks(&self) -> u64 {
        self.extent.chunks(self.chunk_size)
    }

    /// Whether every chunk is local.
    pub fn complete(&self) -> bool {
        self.lock().1.complete()
    }

    /// Queue up to `max` absent chunks from chunk `from` on for hydration;
    /// where to go on.
    pub fn queue(&self, from: u64, max: usize) -> (Vec<u64>, u64) {
        self.lock().1.queue(from, max)
    }

    /// Hydration is about to ask for queued chunk `i`: whether it is still
    /// hydration's (a reader may have taken it over).
    pub fn start(&self, i: u64) -> bool {
        self.lock().1.start(i)
    }

    /// Hydration gives queued chunks up without asking for them.
    pub fn unqueue(&self, chunks: &[u64]) {
        let (_g, c) = self.lock();
        for &i in chunks {
            c.unqueue(i);
        }
    }

    /// Give chunks claimed by the caller back: they could not be fetched.
    pub fn release(&self, chunks: &[u64]) {
        {
            let (_g, c) = self.lock();
            for &i in chunks {
                c.settle(i, false);
            }
        }
        self.changed.notify_all();
    }

    /// Decide about the file's chunks with `decide` under its lock, again
    /// each time they change, until it decides (`Some`) or `deadline`
    /// passes (`EIO`).
    pub(super) fn decide<T>(
        &self,
        deadline: Instant,
        mut decide: impl FnMut(&FileChunks<'_>) -> Option<T>,
    ) -> Result<T, Errno> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(t) = decide(&self.states.file(self.extent.range(self.chunk_size))) {
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Errno::EIO);
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Claim over chunks `range`, or wait (until `deadline`) while others
    /// fetch them.
    pub(super) fn claim_or_wait(
        &self,
        range: Range<u64>,
        deadline: Instant,
    ) -> Result<Claim, Errno> {
        self.decide(deadline, |c| {
            let claim = c.claim(range.clone());
            (!claim.wait || !claim.mine.is_empty()).then_some(claim)
        })
    }

    /// Run `change`, the node's change to the file's bytes or times
    /// through descriptor `file`, and remember the modification time it
    /// left: fills keep it.
    pub fn node_change<T>(&self, file: &File, change: impl FnOnce() -> T) -> T {
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let out = change();
        if let Ok(st) = nix::sys::stat::fstat(file) {
            self.inner.lock().unwrap_or_else(|p| p.into_inner()).mtime =
                Some(TimeSpec::new(st.st_mtime, st.st_mtime_nsec));
        }
        out
    }
}
