//! The backup files that are not wholly local yet, and the one place that
//! moves their chunks from the store into their backing files.
//!
//! Every path that touches a live file's bytes comes through here: a read
//! through the mount ([`Files::ensure`]), a write, truncate or hole punch
//! ([`Files::before_write`], [`Files::before_truncate`]), and background
//! hydration ([`LiveFile::fill`]). The rules of [`crate::presence`] keep them
//! apart: a chunk is written from the store only by whoever claimed it,
//! and never once the node has overwritten it.
//!
//! Durability: a chunk made present joins its file's `pending` list. A
//! checkpoint (`syncfs`, or the file's `fsync` when the node asks) makes
//! the bytes durable first and journals the chunks after, so a resumed run
//! never fetches a journalled chunk over the node's synced bytes.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use btm_chunk::format::tree::ChunkRef;
use btm_chunk::restore::write_sparse;
use nix::errno::Errno;
use nix::sys::time::TimeSpec;

use crate::journal::{ranges, Journal};
use crate::presence::{plan_truncate, plan_write, touched, Claim, Presence};
use crate::source::{frame, Source, SourceError, Wanted};
use crate::stats::Stats;
use crate::LiveError;

/// The extended attribute that marks a backing file as not wholly local,
/// with its file id (8 bytes, little-endian). It follows the inode through
/// renames and hard links and dies with it; the mount never shows it.
pub const MARK: &str = "user.btm.live";

/// Reads of this many bytes of a pack at most, on demand.
const DEMAND_MAX_READ: u64 = 4 << 20;
/// Frames this close share an on-demand read.
const DEMAND_GAP: u64 = 64 << 10;

/// A backing file, open for reading and writing, and its inode number.
#[derive(Debug)]
pub struct Backing {
    /// The file.
    pub file: File,
    /// Its inode number in the backing file system.
    pub ino: u64,
}

/// One backup file not wholly local yet.
pub struct LiveFile {
    /// Its place in the backup's stream of files: the journal's key.
    pub id: u64,
    /// Its path in the backup, for messages.
    pub path: String,
    /// Its chunks in the backup, in order, all `chunk_size` long but the
    /// last.
    pub chunks: Box<[ChunkRef]>,
    /// The backup's chunk size.
    pub chunk_size: u64,
    /// The backing file, open for reading and writing.
    pub file: File,
    /// Its inode number in the backing file system.
    pub ino: u64,
    inner: Mutex<Inner>,
    changed: Condvar,
}

struct Inner {
    presence: Presence,
    /// Chunks made present since the last checkpoint of this file.
    pending: Vec<u64>,
    /// The modification time a fill puts back (a write changes it): the
    /// backup's, or what the node's last change left.
    mtime: TimeSpec,
    /// No name refers to it any more.
    unlinked: bool,
    /// Opens through the mount.
    opens: u32,
}

impl LiveFile {
    /// Backup file `id` (`path`, `chunks` of `chunk_size`) not local yet,
    /// over `backing`; fills keep modification time `mtime`. Its empty
    /// chunks are present from the start; an earlier run's journal adds
    /// more ([`LiveFile::mark_present`]).
    pub fn new(
        id: u64,
        path: String,
        chunks: Vec<ChunkRef>,
        chunk_size: u64,
        backing: Backing,
        mtime: TimeSpec,
    ) -> Self {
        let presence = Presence::new(chunks.len(), |i| chunks[i as usize].hash.is_none());
        LiveFile {
            id,
            path,
            chunks: chunks.into_boxed_slice(),
            chunk_size,
            file: backing.file,
            ino: backing.ino,
            inner: Mutex::new(Inner {
                presence,
                pending: Vec::new(),
                mtime,
                unlinked: false,
                opens: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of the backup this file still lacks (absent or being
    /// fetched).
    pub fn absent_bytes(&self) -> u64 {
        let inner = self.lock();
        inner
            .presence
            .missing_chunks()
            .map(|i| self.chunks[i as usize].len)
            .sum()
    }

    /// Whether every chunk is local and nothing awaits the journal.
    fn settled(&self) -> bool {
        let inner = self.lock();
        inner.presence.complete() && inner.pending.is_empty()
    }

    /// Whether hydrating it is pointless: no name refers to it and nobody
    /// has it open.
    pub fn abandoned(&self) -> bool {
        let inner = self.lock();
        inner.unlinked && inner.opens == 0
    }

    /// Queue every absent chunk for hydration.
    pub fn queue_absent(&self) -> Vec<u64> {
        let mut inner = self.lock();
        if inner.unlinked {
            return Vec::new();
        }
        let n = self.chunks.len() as u64;
        inner.presence.queue(0..n)
    }

    /// Hydration is about to ask for queued chunk `i`: whether it is still
    /// hydration's (a reader may have taken it over).
    pub fn start(&self, i: u64) -> bool {
        self.lock().presence.start(i)
    }

    /// Hydration gives queued chunks up without asking for them.
    pub fn unqueue(&self, chunks: &[u64]) {
        let mut inner = self.lock();
        for &i in chunks {
            inner.presence.unqueue(i);
        }
    }

    /// The chunk `i` as a store wants it.
    pub fn wanted(&self, i: u64) -> Option<Wanted> {
        let c = self.chunks.get(i as usize)?;
        Some(Wanted {
            hash: c.hash?,
            raw_len: c.len,
        })
    }

    /// Write chunk `i`, claimed by the caller, from `data`, and settle it.
    pub fn fill(&self, i: u64, data: &[u8]) -> std::io::Result<()> {
        let mut inner = self.lock();
        let off = self.chunks.get(i as usize).map_or(0, |c| c.off);
        // The backing file has a hole there: zeros need not be written.
        let written = write_sparse(&self.file, off, data, 0).and_then(|_| {
            let omit = TimeSpec::UTIME_OMIT;
            nix::sys::stat::futimens(&self.file, &omit, &inner.mtime).map_err(std::io::Error::from)
        });
        inner.presence.settle(i, written.is_ok());
        if written.is_ok() {
            inner.pending.push(i);
        }
        drop(inner);
        self.changed.notify_all();
        written
    }

    /// Give chunks claimed by the caller back: they could not be fetched.
    pub fn release(&self, chunks: &[u64]) {
        let mut inner = self.lock();
        for &i in chunks {
            inner.presence.settle(i, false);
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// Claim over chunks `range`, or wait (until `deadline`) while others
    /// fetch them.
    fn claim_or_wait(
        &self,
        range: std::ops::Range<u64>,
        deadline: Instant,
    ) -> Result<Claim, Errno> {
        let mut inner = self.lock();
        loop {
            let claim = inner.presence.claim(range.clone());
            if !claim.wait || !claim.mine.is_empty() {
                return Ok(claim);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Errno::EIO);
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The modification time fills keep, in nanoseconds.
    pub fn mtime_ns(&self) -> i64 {
        let t = self.lock().mtime;
        t.tv_sec() * 1_000_000_000 + t.tv_nsec()
    }

    /// Chunk ranges an earlier run journalled are local.
    pub fn mark_present(&self, ranges: &[std::ops::Range<u64>]) {
        let mut inner = self.lock();
        for r in ranges {
            inner.presence.cover(r.clone());
        }
    }

    /// Record the node's change: fills keep the modification time it left.
    pub fn node_changed(&self) {
        if let Ok(st) = nix::sys::stat::fstat(&self.file) {
            self.lock().mtime = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
        }
    }

    /// One more open through the mount.
    pub fn opened(&self) {
        self.lock().opens += 1;
    }

    /// One open fewer; `true` if it was the last of a file with no name.
    pub fn closed(&self) -> bool {
        let mut inner = self.lock();
        inner.opens = inner.opens.saturating_sub(1);
        inner.unlinked && inner.opens == 0
    }

    /// Chunks present but not journalled yet, taken.
    fn take_pending(&self) -> Vec<u64> {
        let mut p = std::mem::take(&mut self.lock().pending);
        p.sort_unstable();
        p
    }

    /// Put back pending chunks whose checkpoint failed.
    fn restore_pending(&self, chunks: Vec<u64>) {
        self.lock().pending.extend(chunks);
    }
}

/// Every live file, by backing inode, and what moves their chunks.
pub struct Files {
    by_ino: RwLock<HashMap<u64, Arc<LiveFile>>>,
    source: Source,
    journal: Mutex<Journal>,
    /// The backing tree's root, for `syncfs`.
    root: OwnedFd,
    /// How long a read through the mount waits for the store.
    read_timeout: Duration,
    /// The figures `btm live status` shows.
    pub stats: Stats,
}

impl Files {
    /// The live files `files` over backing tree `root`.
    pub fn new(
        files: Vec<Arc<LiveFile>>,
        source: Source,
        journal: Journal,
        root: OwnedFd,
        read_timeout: Duration,
        stats: Stats,
    ) -> Self {
        let by_ino = files.into_iter().map(|f| (f.ino, f)).collect();
        Files {
            by_ino: RwLock::new(by_ino),
            source,
            journal: Mutex::new(journal),
            root,
            read_timeout,
            stats,
        }
    }

    /// The store's chunks.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The live file at backing inode `ino`, if that inode is one.
    pub fn get(&self, ino: u64) -> Option<Arc<LiveFile>> {
        let map = self.by_ino.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(&ino).cloned()
    }

    /// Every live file.
    pub fn all(&self) -> Vec<Arc<LiveFile>> {
        let map = self.by_ino.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// How many files are not wholly local.
    pub fn count(&self) -> usize {
        self.by_ino.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Make bytes `off..off+len` of `f` local, fetching what is absent
    /// ahead of hydration. `EIO` if the store cannot deliver in time or
    /// delivers wrong bytes: never a wrong byte served.
    pub fn ensure(self: &Arc<Self>, f: &Arc<LiveFile>, off: u64, len: u64) -> Result<(), Errno> {
        let range = touched(off, len, f.chunk_size);
        let range = range.start..range.end.min(f.chunks.len() as u64);
        self.ensure_chunks(f, range)
    }

    fn ensure_chunks(
        self: &Arc<Self>,
        f: &Arc<LiveFile>,
        range: std::ops::Range<u64>,
    ) -> Result<(), Errno> {
        let deadline = Instant::now() + self.read_timeout;
        let failed: Arc<Mutex<Option<bool>>> = Arc::default();
        loop {
            // What our last fetch said: a chunk that is corrupt or missing
            // will not get better; a store that failed may.
            match failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(true) => return Err(Errno::EIO),
                Some(false) => std::thread::sleep(Duration::from_millis(100)),
                None => {}
            }
            let claim = match f.claim_or_wait(range.clone(), deadline) {
                Ok(c) => c,
                Err(e) => {
                    self.stats
                        .demand_failed(&"no answer from the store in time");
                    return Err(e);
                }
            };
            if claim.is_done() {
                return Ok(());
            }
            // The fetch runs on its own thread, so that a store that hangs
            // holds the reader no longer than the deadline; what it brings
            // late is still written (and waited for by the next reader).
            if !claim.mine.is_empty() {
                let (files, file, failed) = (Arc::clone(self), Arc::clone(f), Arc::clone(&failed));
                let mine = claim.mine;
                std::thread::spawn(move || {
                    let started = Instant::now();
                    match files.fetch_now(&file, &mine, deadline) {
                        Ok(bytes) => files.stats.demand(bytes, started.elapsed()),
                        Err(e) => {
                            tracing::warn!(file = %file.path, error = %e, "a read through the mount could not fetch");
                            files.stats.demand_failed(&e);
                            let permanent =
                                matches!(e, SourceError::Corrupt { .. } | SourceError::Missing(_));
                            // Said before the claims go: the reader they
                            // wake must know why.
                            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(permanent);
                            file.release(&mine);
                        }
                    }
                });
            }
        }
    }

    /// Fetch chunks `mine` of `f` (claimed) now, fill them, and return the
    /// bytes downloaded.
    fn fetch_now(&self, f: &LiveFile, mine: &[u64], deadline: Instant) -> Result<u64, SourceError> {
        let wanted: Vec<Wanted> = mine.iter().filter_map(|&i| f.wanted(i)).collect();
        let mut attempt = 0;
        let reads = loop {
            match self.source.plan(&wanted, DEMAND_GAP, DEMAND_MAX_READ) {
                Err(SourceError::Missing(_)) if attempt == 0 => {
                    attempt += 1;
                    self.source.reload()?;
                }
                r => break r?,
            }
        };
        let mut dctx = zstd::bulk::Decompressor::new().map_err(SourceError::Zstd)?;
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        for read in &reads {
            if Instant::now() >= deadline {
                return Err(SourceError::TimedOut(self.read_timeout));
            }
            self.source.get_until(read, &mut buf, deadline)?;
            bytes += buf.len() as u64;
            for c in &read.chunks {
                let w = &wanted[c.slot];
                self.source
                    .open(w, frame(&buf, read, c), &mut dctx, &mut out)?;
                // `wanted` skips chunks without a hash; none are claimed.
                let i = mine[c.slot];
                f.fill(i, &out).map_err(SourceError::Write)?;
            }
        }
        Ok(bytes)
    }

    /// Before the node writes `off..off+len` of `f` (or punches a hole, or
    /// zeroes it): chunks it covers in part are made local, those it covers
    /// whole become the node's.
    pub fn before_write(
        self: &Arc<Self>,
        f: &Arc<LiveFile>,
        off: u64,
        len: u64,
    ) -> Result<(), Errno> {
        let size = f.chunks.last().map_or(0, |c| c.off + c.len);
        let plan = plan_write(off, len, size, f.chunk_size);
        for &e in &plan.edges {
            if e < f.chunks.len() as u64 {
                self.ensure_chunks(f, e..e + 1)?;
            }
        }
        self.cover(f, plan.covered)
    }

    /// Before the node truncates `f` to `new` bytes.
    pub fn before_truncate(self: &Arc<Self>, f: &Arc<LiveFile>, new: u64) -> Result<(), Errno> {
        let plan = plan_truncate(new, f.chunks.len() as u64, f.chunk_size);
        if let Some(e) = plan.edge {
            self.ensure_chunks(f, e..e + 1)?;
        }
        self.cover(f, plan.dropped)
    }

    /// Make all of `f` local (before what cannot be planned per chunk:
    /// collapsing or inserting ranges).
    pub fn ensure_all(self: &Arc<Self>, f: &Arc<LiveFile>) -> Result<(), Errno> {
        self.ensure_chunks(f, 0..f.chunks.len() as u64)
    }

    fn cover(&self, f: &LiveFile, range: std::ops::Range<u64>) -> Result<(), Errno> {
        let deadline = Instant::now() + self.read_timeout;
        let mut inner = f.lock();
        loop {
            let absent: Vec<u64> = range
                .clone()
                .filter(|&i| inner.presence.state(i) != crate::presence::State::Present)
                .collect();
            if inner.presence.cover(range.clone()) {
                inner.pending.extend(absent);
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Errno::EIO);
            }
            inner = f
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The node asked for `f`'s data to be durable: sync the file, then
    /// journal its chunks made present.
    pub fn sync_file(&self, f: &LiveFile, data_only: bool) -> Result<(), LiveError> {
        let pending = f.take_pending();
        let synced = if data_only {
            f.file.sync_data()
        } else {
            f.file.sync_all()
        };
        if let Err(e) = synced {
            f.restore_pending(pending);
            return Err(LiveError::state("syncing a file", e));
        }
        let records: Vec<_> = ranges(&pending).into_iter().map(|r| (f.id, r)).collect();
        let appended = self.lock_journal().append(&records);
        if appended.is_err() {
            f.restore_pending(pending);
        }
        appended
    }

    fn lock_journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make everything written so far durable, journal it, and let go of
    /// the files that are now wholly and durably local. Returns how many
    /// files remain.
    pub fn checkpoint(&self) -> Result<usize, LiveError> {
        let files = self.all();
        let taken: Vec<(Arc<LiveFile>, Vec<u64>)> = files
            .iter()
            .map(|f| (Arc::clone(f), f.take_pending()))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let synced = nix::unistd::syncfs(self.root.as_fd())
            .map_err(|e| LiveError::state("syncing the backing file system", e.into()));
        let records: Vec<_> = taken
            .iter()
            .flat_map(|(f, p)| ranges(p).into_iter().map(|r| (f.id, r)))
            .collect();
        let journalled = synced.and_then(|()| self.lock_journal().append(&records));
        if let Err(e) = journalled {
            for (f, p) in taken {
                f.restore_pending(p);
            }
            return Err(e);
        }
        let done: Vec<u64> = files
            .iter()
            .filter(|f| f.settled() || f.abandoned())
            .map(|f| {
                if !f.abandoned() {
                    // A mark left behind costs a look at the journal on
                    // resume, nothing more.
                    let _ = xattr::FileExt::remove_xattr(&f.file, MARK);
                }
                f.ino
            })
            .collect();
        let mut map = self.by_ino.write().unwrap_or_else(|p| p.into_inner());
        for ino in done {
            map.remove(&ino);
        }
        Ok(map.len())
    }

    /// After a name went away (unlink, or a rename over it): if `ino` was
    /// a live file and no name is left, hydration stops caring for it;
    /// reads through opens that remain still get the backup's bytes.
    pub fn maybe_unlinked(&self, ino: u64) {
        let Some(f) = self.get(ino) else { return };
        let gone = nix::sys::stat::fstat(&f.file).is_ok_and(|st| st.st_nlink == 0);
        if gone {
            let last = {
                let mut inner = f.lock();
                inner.unlinked = true;
                inner.opens == 0
            };
            if last {
                self.forget(ino);
            }
        }
    }

    /// Stop tracking `ino` (its last name and open are gone).
    pub fn forget(&self, ino: u64) {
        self.by_ino
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
    }

    /// Bytes still absent, over every live file.
    pub fn absent_bytes(&self) -> u64 {
        self.all().iter().map(|f| f.absent_bytes()).sum()
    }
}
