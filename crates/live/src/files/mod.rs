//! The backup files that are not wholly local yet, and the one place that
//! moves their chunks from the store into their backing files.
//!
//! Every path that touches a live file's bytes comes through here: a read
//! through the mount ([`Files::ensure`]), a write, truncate or hole punch
//! ([`Files::node_write`], [`Files::node_truncate`]), and background
//! hydration ([`Files::fill`]). The rules of [`crate::presence`] keep them
//! apart: a chunk is written from the store only by whoever claimed it,
//! and never once the node has overwritten it.
//!
//! Memory does not grow with the tree. What the server knows of each live
//! file is on disk ([`crate::table`]); in memory are two bits a chunk
//! ([`States`]) and two bits a file (done, may still carry its mark). A
//! [`LiveFile`] is made when something works on the file (the node has it
//! open, a read or hydration fills it) and dropped when nothing does; it
//! holds no descriptor ([`Backing`] does, boundedly).
//!
//! Durability: a chunk made present joins the `pending` list. A checkpoint
//! (`syncfs`, or the file's `fsync` when the node asks) makes the bytes
//! durable first and records the chunks after ([`Durable`]), so a resumed
//! run never fetches a recorded chunk over the node's synced bytes. A file
//! whose every chunk is recorded is done: its mark is removed, and opens
//! from then on are passed through to the kernel.

mod bits;
mod live_file;

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use btm_chunk::restore::write_sparse;
use nix::errno::Errno;
use nix::sys::time::TimeSpec;

use bits::Bits;
pub use live_file::LiveFile;

use crate::backing::Backing;
use crate::durable::Durable;
use crate::presence::{plan_truncate, plan_write, touched, States};
use crate::source::{frame, Source, SourceError, Wanted};
use crate::stats::Stats;
use crate::table::Table;
use crate::LiveError;

/// The extended attribute that marks a backing file as not wholly local,
/// with its slot in the live files' table (8 bytes, little-endian). It
/// follows the inode through renames and hard links and dies with it; the
/// mount never shows it.
pub const MARK: &str = "user.btm.live";

/// Reads of this many bytes of a pack at most, on demand.
const DEMAND_MAX_READ: u64 = 4 << 20;
/// Frames this close share an on-demand read.
const DEMAND_GAP: u64 = 64 << 10;

/// Files made while something works on them, by slot.
#[derive(Default)]
struct Active {
    map: HashMap<u32, Weak<LiveFile>>,
    /// Prune dead entries once the map reaches this size.
    prune_at: usize,
}

/// What [`Files::new`] needs: the table and what is known to be local.
pub struct Loaded {
    /// The live files' table.
    pub table: Table,
    /// What is durably local.
    pub durable: Durable,
}

/// Every live file, and what moves their chunks.
pub struct Files {
    table: Table,
    chunk_size: u64,
    states: Arc<States>,
    durable: Mutex<Durable>,
    /// Per slot: nothing left to do (every chunk durably local, or the
    /// file is gone).
    done: Bits,
    /// Per slot: the backing file may still carry its mark.
    marked: Bits,
    files_left: AtomicU64,
    absent_bytes: AtomicU64,
    /// Chunks made present since the last checkpoint, by slot.
    pending: Mutex<Vec<(u32, Range<u64>)>>,
    active: Mutex<Active>,
    checkpointing: Mutex<()>,
    backing: Arc<Backing>,
    source: Source,
    /// How long a read through the mount waits for the store.
    read_timeout: Duration,
    /// The figures `btm live status` shows.
    pub stats: Stats,
}

impl Files {
    /// The live files of `loaded`, over `backing`, fetched from `source`.
    /// Reads the table once through to learn what is left.
    pub fn new(
        loaded: Loaded,
        backing: Arc<Backing>,
        source: Source,
        read_timeout: Duration,
        stats: Stats,
    ) -> Result<Self, LiveError> {
        let Loaded { table, durable } = loaded;
        let head = table.head;
        let states = States::new(head.chunks, |g| durable.contains(g));
        let done = Bits::new(head.files, false);
        let (mut files_left, mut absent) = (0u64, 0u64);
        for item in table.extents() {
            let (slot, ext) =
                item.map_err(|e| LiveError::state("reading the live files' table", e))?;
            let (mut missing, mut bytes) = (0u64, 0u64);
            for g in ext.range(head.chunk_size).filter(|&g| !durable.contains(g)) {
                missing += 1;
                bytes += ext.chunk_len(head.chunk_size, g - ext.first);
            }
            if missing == 0 {
                done.set(slot);
            } else {
                files_left += 1;
                absent += bytes;
            }
        }
        stats.total_bytes.store(head.total_bytes, Ordering::Relaxed);
        Ok(Files {
            chunk_size: head.chunk_size,
            marked: Bits::new(head.files, true),
            done,
            files_left: AtomicU64::new(files_left),
            absent_bytes: AtomicU64::new(absent),
            states: Arc::new(states),
            durable: Mutex::new(durable),
            pending: Mutex::default(),
            active: Mutex::default(),
            checkpointing: Mutex::default(),
            table,
            backing,
            source,
            read_timeout,
            stats,
        })
    }

    /// The store's chunks.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The live files' table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The backing tree.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Files not wholly and durably local.
    pub fn files_left(&self) -> u64 {
        self.files_left.load(Ordering::Relaxed)
    }

    /// Bytes of the backup not local yet.
    pub fn absent_bytes(&self) -> u64 {
        self.absent_bytes.load(Ordering::Relaxed)
    }

    /// Chunks not local yet (being fetched included).
    pub fn missing_chunks(&self) -> u64 {
        self.states.missing()
    }

    /// Whether live file `slot` needs nothing more.
    pub fn is_done(&self, slot: u32) -> bool {
        self.done.get(slot)
    }

    /// Live file `slot`, unless it is done.
    pub fn live(&self, slot: u32) -> std::io::Result<Option<Arc<LiveFile>>> {
        if slot >= self.table.head.files || self.done.get(slot) {
            return Ok(None);
        }
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = active.map.get(&slot).and_then(Weak::upgrade) {
            return Ok(Some(f));
        }
        let rec = self.table.file(slot)?;
        let f = Arc::new(LiveFile {
            slot,
            path: String::from_utf8_lossy(&rec.path).into_owned(),
            handle: rec.handle,
            extent: rec.extent,
            chunk_size: self.chunk_size,
            states: Arc::clone(&self.states),
            inner: Mutex::default(),
            changed: Condvar::new(),
            gate: RwLock::new(()),
        });
        active.map.insert(slot, Arc::downgrade(&f));
        if active.map.len() >= active.prune_at {
            active.map.retain(|_, w| w.strong_count() > 0);
            active.prune_at = (active.map.len() * 2).max(1024);
        }
        Ok(Some(f))
    }

    /// The live file `file` (a backing file just opened) is, if it is one:
    /// its mark names it, and it is not done.
    pub fn live_of(&self, file: &File) -> std::io::Result<Option<Arc<LiveFile>>> {
        if self.files_left() == 0 {
            return Ok(None);
        }
        match xattr::FileExt::get_xattr(file, MARK) {
            Ok(Some(v)) => match <[u8; 8]>::try_from(v.as_slice()) {
                Ok(b) => match u32::try_from(u64::from_le_bytes(b)) {
                    Ok(slot) => self.live(slot),
                    Err(_) => Ok(None),
                },
                Err(_) => Ok(None),
            },
            Ok(None) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The chunks `chunks` of `f` (in order) as the store wants them
    /// (holes have no hash and are never wanted). Their records are read a
    /// run at a time: chunks a terabyte apart cost two small reads.
    pub fn wanted(&self, f: &LiveFile, chunks: &[u64]) -> std::io::Result<Vec<Option<Wanted>>> {
        /// Records this close are read together.
        const GAP: u64 = 64;
        let mut out = Vec::with_capacity(chunks.len());
        let mut i = 0;
        while i < chunks.len() {
            let lo = chunks[i];
            let mut j = i + 1;
            while j < chunks.len() && chunks[j] > chunks[j - 1] && chunks[j] - chunks[j - 1] <= GAP
            {
                j += 1;
            }
            let hi = chunks[j - 1];
            let hashes = self
                .table
                .hashes(f.extent.first + lo..f.extent.first + hi + 1)?;
            out.extend(chunks[i..j].iter().map(|&c| {
                hashes[(c - lo) as usize].map(|hash| Wanted {
                    hash,
                    raw_len: f.extent.chunk_len(self.chunk_size, c),
                })
            }));
            i = j;
        }
        Ok(out)
    }

    /// Chunks `made` of `f` became present: count them, and keep them for
    /// the next checkpoint.
    fn made_present(&self, f: &LiveFile, made: impl IntoIterator<Item = u64>) {
        let mut bytes = 0;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for i in made {
            bytes += f.extent.chunk_len(self.chunk_size, i);
            let g = f.extent.first + i;
            match pending.last_mut() {
                Some((s, r)) if *s == f.slot && r.end == g => r.end += 1,
                _ => pending.push((f.slot, g..g + 1)),
            }
        }
        drop(pending);
        self.absent_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The backing file of `f` is gone (its inode was deleted): nothing of
    /// it is wanted any more.
    fn gone(&self, f: &LiveFile) {
        {
            let (_g, c) = f.lock();
            let mut lost = 0;
            c.abandon(|i| lost += f.extent.chunk_len(self.chunk_size, i));
            self.absent_bytes.fetch_sub(lost, Ordering::Relaxed);
        }
        f.changed.notify_all();
        self.marked.clear(f.slot);
        if self.done.set(f.slot) {
            self.files_left.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether nothing but the node's own opens keeps `f`'s inode: no name
    /// is left, so hydrating it is pointless.
    pub fn unlinked(&self, f: &LiveFile) -> bool {
        match self.backing.file(f.slot, &f.handle) {
            Ok(file) => match nix::sys::stat::fstat(&*file) {
                // Not cached: a deleted file's space is freed once the node
                // closes it.
                Ok(st) if st.st_nlink == 0 => {
                    self.backing.forget_inode(st.st_ino);
                    true
                }
                _ => false,
            },
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                self.gone(f);
                true
            }
            Err(_) => false,
        }
    }

    /// Write chunk `i` of `f`, claimed by the caller, from `data`, and
    /// settle it. A file that is gone takes nothing and fails nothing.
    pub fn fill(&self, f: &LiveFile, i: u64, data: &[u8]) -> std::io::Result<()> {
        let file = match self.backing.file(f.slot, &f.handle) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                self.gone(f);
                f.lock().1.settle(i, true);
                f.changed.notify_all();
                return Ok(());
            }
            Err(e) => {
                f.release(&[i]);
                return Err(e);
            }
        };
        let result = {
            let _gate = f.gate.write().unwrap_or_else(|p| p.into_inner());
            let (mut g, c) = f.lock();
            let mtime = match g.mtime {
                Some(t) => Ok(t),
                None => nix::sys::stat::fstat(&*file)
                    .map(|st| TimeSpec::new(st.st_mtime, st.st_mtime_nsec))
                    .map_err(std::io::Error::from),
            };
            // The backing file has a hole there: zeros need not be
            // written. The node's modification time is put back even after
            // a write that failed part-way.
            let result = mtime.and_then(|mtime| {
                g.mtime = Some(mtime);
                let written = write_sparse(&file, i * self.chunk_size, data, 0);
                let omit = TimeSpec::UTIME_OMIT;
                let kept =
                    nix::sys::stat::futimens(&*file, &omit, &mtime).map_err(std::io::Error::from);
                written.and(kept).map(|_| ())
            });
            if c.settle(i, result.is_ok()) {
                drop(g);
                self.made_present(f, [i]);
            }
            result
        };
        f.changed.notify_all();
        result
    }

    /// Make bytes `off..off+len` of `f` local, fetching what is absent
    /// ahead of hydration. `EIO` if the store cannot deliver in time or
    /// delivers wrong bytes: never a wrong byte served.
    pub fn ensure(self: &Arc<Self>, f: &Arc<LiveFile>, off: u64, len: u64) -> Result<(), Errno> {
        let range = touched(off, len, f.chunk_size);
        let range = range.start..range.end.min(f.chunks());
        self.ensure_chunks(f, range)
    }

    fn ensure_chunks(self: &Arc<Self>, f: &Arc<LiveFile>, range: Range<u64>) -> Result<(), Errno> {
        let deadline = Instant::now() + self.read_timeout;
        let failed: Arc<Mutex<Option<bool>>> = Arc::default();
        loop {
            // What our last fetch said: a chunk that is corrupt or missing
            // will not get better; a store that failed, or a disk that was
            // full, may.
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
        let wanted: Vec<(u64, Wanted)> = mine
            .iter()
            .zip(self.wanted(f, mine).map_err(SourceError::Write)?)
            .filter_map(|(&i, w)| Some((i, w?)))
            .collect();
        let just: Vec<Wanted> = wanted.iter().map(|(_, w)| *w).collect();
        let mut attempt = 0;
        let reads = loop {
            // Not capped in chunks: they are all the node's to wait for,
            // and more reads would only add round trips to its wait.
            match self
                .source
                .plan(&just, DEMAND_GAP, DEMAND_MAX_READ, usize::MAX)
            {
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
            self.source.get_until(read, &mut buf, Some(deadline))?;
            bytes += buf.len() as u64;
            for c in &read.chunks {
                let (i, w) = &wanted[c.slot];
                self.source
                    .open(w, frame(&buf, read, c), &mut dctx, &mut out)?;
                self.fill(f, *i, &out).map_err(SourceError::Write)?;
            }
        }
        Ok(bytes)
    }

    /// The node changes bytes `off..off+len` of `f` (a write, a hole
    /// punched, zeros) through `file` with `change`: the chunks it covers
    /// in part are made local first, those it covers whole become the
    /// node's, recorded once its bytes are there (and given back to the
    /// backup if the change failed: a failed write never leaves a hole
    /// that reads as data).
    pub fn node_write<T>(
        self: &Arc<Self>,
        f: &Arc<LiveFile>,
        file: &File,
        off: u64,
        len: u64,
        change: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T, Errno> {
        let plan = plan_write(off, len, f.extent.size, f.chunk_size);
        for &e in &plan.edges {
            if e < f.chunks() {
                self.ensure_chunks(f, e..e + 1)?;
            }
        }
        self.covering(f, file, plan.covered, change)
    }

    /// The node truncates `f` to `new` bytes through `file` with `change`.
    pub fn node_truncate(
        self: &Arc<Self>,
        f: &Arc<LiveFile>,
        file: &File,
        new: u64,
        change: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<(), Errno> {
        let plan = plan_truncate(new, f.chunks(), f.chunk_size);
        if let Some(e) = plan.edge {
            self.ensure_chunks(f, e..e + 1)?;
        }
        self.covering(f, file, plan.dropped, change)
    }

    /// The node changes `f` in a way that cannot be planned per chunk
    /// (collapsing or inserting ranges): all of it is made local first.
    pub fn node_rewrite<T>(
        self: &Arc<Self>,
        f: &Arc<LiveFile>,
        file: &File,
        change: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T, Errno> {
        self.ensure_chunks(f, 0..f.chunks())?;
        self.covering(f, file, 0..0, change)
    }

    /// Take chunks `range` of `f` for the node, run `change`, and record
    /// them if it succeeded (or give them back if it failed).
    fn covering<T>(
        &self,
        f: &LiveFile,
        file: &File,
        range: Range<u64>,
        change: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T, Errno> {
        let made = self.cover(f, range)?;
        let out = f.node_change(file, change);
        match out {
            Ok(v) => {
                self.made_present(f, made);
                Ok(v)
            }
            Err(e) => {
                let (_g, c) = f.lock();
                for &i in &made {
                    c.uncover(i);
                }
                Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            }
        }
    }

    /// Make chunks `range` of `f` present for the node, waiting while one
    /// of them is being fetched; the chunks that were not present.
    fn cover(&self, f: &LiveFile, range: Range<u64>) -> Result<Vec<u64>, Errno> {
        f.decide(Instant::now() + self.read_timeout, |c| {
            c.cover(range.clone())
        })
    }

    fn take_pending(&self, slot: Option<u32>) -> Vec<(u32, Range<u64>)> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match slot {
            None => std::mem::take(&mut *pending),
            Some(s) => {
                let (mine, rest) = pending.drain(..).partition(|(p, _)| *p == s);
                *pending = rest;
                mine
            }
        }
    }

    fn restore_pending(&self, taken: Vec<(u32, Range<u64>)>) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(taken);
    }

    /// Record chunks `taken` (their bytes durable already) as durably
    /// local; the files whose every chunk now is are done.
    fn record(&self, taken: &[(u32, Range<u64>)]) -> Result<(), LiveError> {
        let ranges: Vec<Range<u64>> = taken.iter().map(|(_, r)| r.clone()).collect();
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        durable.record(&ranges)?;
        let mut slots: Vec<u32> = taken.iter().map(|(s, _)| *s).collect();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots.into_iter().filter(|&s| !self.done.get(s)) {
            let ext = self
                .table
                .extent(slot)
                .map_err(|e| LiveError::state("reading the live files' table", e))?;
            if durable.all(ext.range(self.chunk_size)) && self.done.set(slot) {
                self.files_left.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The node asked for `f`'s data to be durable (`file`, its open
    /// descriptor): sync the file, then record its chunks made present.
    pub fn sync_file(&self, f: &LiveFile, file: &File, data_only: bool) -> Result<(), LiveError> {
        let taken = self.take_pending(Some(f.slot));
        let synced = if data_only {
            file.sync_data()
        } else {
            file.sync_all()
        };
        let recorded = synced
            .map_err(|e| LiveError::state("syncing a file", e))
            .and_then(|()| self.record(&taken));
        if recorded.is_err() {
            self.restore_pending(taken);
        }
        recorded
    }

    /// Make everything written so far durable, record it, and let go of
    /// the files that are now wholly and durably local (their marks
    /// removed). Returns how many files remain.
    pub fn checkpoint(&self) -> Result<u64, LiveError> {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        let taken = self.take_pending(None);
        let recorded = nix::unistd::syncfs(self.backing.root())
            .map_err(|e| LiveError::state("syncing the backing file system", e.into()))
            .and_then(|()| self.record(&taken));
        if let Err(e) = recorded {
            self.restore_pending(taken);
            return Err(e);
        }
        self.unmark();
        if self.files_left() == 0 {
            self.backing.forget_files();
        }
        Ok(self.files_left())
    }

    /// Remove the marks of the files that are done. A mark left behind
    /// (the removal failed) costs a look at the table on open, nothing
    /// more, and is tried again at the next checkpoint.
    fn unmark(&self) {
        for slot in self.done.both(&self.marked, self.table.head.files) {
            let removed = self.table.file(slot).and_then(|rec| {
                let fd = self
                    .backing
                    .open(&rec.handle, nix::fcntl::OFlag::O_RDONLY)?;
                match xattr::FileExt::remove_xattr(&File::from(fd), MARK) {
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
                    r => r,
                }
            });
            match removed {
                Err(e) if e.raw_os_error() != Some(libc::ESTALE) => {
                    tracing::warn!(slot, error = %e, "cannot remove a live file's mark yet");
                }
                _ => self.marked.clear(slot),
            }
        }
    }
}
