//! The planner stage (the calling thread): it walks the tree beside the
//! previous backup, reuses what is unchanged without opening it, and
//! hands the chunks to read to the workers ([`crate::plan::backup_step`]).
//!
//! It hands them over in batches, and its messages to the writer too: on a
//! tree of small files a hand-off per file woke a sleeping thread per file
//! (2.5 context switches and 3.6 `sched_yield` a file, measured on 150,000
//! files), which cost more than reading and hashing them. A batch goes
//! out when it holds [`BATCH_TASKS`] chunks or [`BATCH_BYTES`], and always
//! before the planner may wait for the writer, which may be waiting for
//! what the batch holds.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{select, Receiver, Sender, TryRecvError};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use super::links::{Links, Name};
use super::walk::{Parent, Walked, Walker};
use super::workers::{work, Blobs, Scratch};
use super::writer::{Msg, Retry, Signature};
use super::{BackupSummary, Shared};
use crate::exclude::Exclusions;
use crate::format::tree::{ChunkRef, Entry, EntryKind};
use crate::map::KnownSet;
use crate::plan::{backup_step, BackupStep, FileRule};
use crate::ChunkError;

/// Most chunks in a batch for the workers.
pub(super) const BATCH_TASKS: usize = 64;
/// Bytes to read that close a batch: a large chunk goes alone, so that
/// every worker has work, and small files go many at once.
pub(super) const BATCH_BYTES: u64 = 256 << 10;
/// Most messages for the writer held back.
const BATCH_MSGS: usize = 256;

/// One chunk for a worker to read.
pub(super) struct ReadTask {
    pub(super) id: u64,
    pub(super) attempt: u32,
    pub(super) index: u64,
    pub(super) opened: Arc<Opened>,
    pub(super) off: u64,
    pub(super) len: u64,
    /// The planner paid the rate limit for this read before it opened the
    /// file ([`Planner::reread`]); the worker reads at once.
    pub(super) paid: bool,
}

/// A file opened to be read, shared by the reads of its chunks. Whichever
/// read ends last checks at once that the file did not change since it
/// was opened, so the check spans the reading and nothing after it: a
/// check made when the writer got to the file would also span the queues
/// behind it, and a file rewritten every few hundred milliseconds (a
/// validator's state, a log) would then seem to change at every read.
pub(super) struct Opened {
    pub(super) file: File,
    pub(super) path: Box<[u8]>,
    /// The file's signature when it was opened, which its entry records.
    before: Signature,
    /// Reads not yet ended, plus one the planner holds until it has queued
    /// them all (so that reads done early do not end it early).
    pending: AtomicU64,
}

impl Opened {
    fn new(file: File, path: &[u8], before: Signature) -> Self {
        Opened {
            file,
            path: path.into(),
            before,
            pending: AtomicU64::new(1),
        }
    }

    /// One more read of a chunk is queued.
    fn begin(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// A read (or the planner's hold) ended. If it was the last, whether
    /// the file changed since it was opened (it did, if it cannot be
    /// stat'ed).
    pub(super) fn end(&self) -> Option<bool> {
        // AcqRel: the last to end comes after every other read.
        (self.pending.fetch_sub(1, Ordering::AcqRel) == 1).then(|| {
            nix::sys::stat::fstat(&self.file)
                .map(|st| Signature::of(&st) != self.before)
                .unwrap_or(true)
        })
    }
}

pub(super) struct Planner<'s, 'a> {
    pub(super) shared: &'s Shared<'a>,
    pub(super) root: &'s Path,
    pub(super) parent: Option<Parent<'s>>,
    pub(super) work: Sender<Vec<ReadTask>>,
    /// Second reads of files that changed while read: workers take these
    /// before anything in `work`, so a file is read again at once, not
    /// after the queue (when it may well have changed again).
    pub(super) urgent: Sender<Vec<ReadTask>>,
    pub(super) msgs: Sender<Msg>,
    /// The store's chunks and the packer's queue, for the second reads the
    /// planner makes itself ([`Route::Inline`]).
    pub(super) known: &'s KnownSet,
    pub(super) blobs: Sender<Blobs>,
    /// Made at the first such read.
    pub(super) scratch: Option<Scratch>,
    /// What goes to the writer and to the workers next ([`Planner::flush`]).
    pub(super) batch: Batch,
    /// Files to read again; disconnected once the writer is done.
    pub(super) retries: Receiver<Retry>,
    pub(super) next_id: u64,
    /// Inodes whose other names may come later.
    pub(super) links: Links,
    pub(super) summary: &'s mut BackupSummary,
}

/// Messages for the writer and chunks for the workers, held back to go
/// out at once.
#[derive(Default)]
pub(super) struct Batch {
    msgs: Vec<Msg>,
    tasks: Vec<ReadTask>,
    bytes: u64,
    route: Route,
}

/// Where a batch's tasks go.
#[derive(Clone, Copy, Default)]
enum Route {
    /// To the workers, in walk order.
    #[default]
    Work,
    /// A large file's second read: to the workers, ahead of the queue.
    Urgent,
    /// A small file's second read: the planner reads it itself, at once
    /// ([`Planner::reread`]), having paid the rate limit for its first
    /// `paid` bytes (all of them, unless it grew since).
    Inline { paid: u64 },
}

/// One read of a file: the planner's number for it, which attempt, and
/// what the previous backup recorded of it (its chunks then come from the
/// parent stream).
struct FileRead {
    id: u64,
    attempt: u32,
    append_only: bool,
    /// Hard links later in the backup may name it.
    linked: bool,
    prev: Option<Recorded>,
}

/// What the previous backup recorded of a file.
#[derive(Clone, Copy)]
struct Recorded {
    size: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// A directory whose entry waits for a descendant that passes the filter.
struct HeldDir {
    entry: Entry,
    depth: usize,
    sent: bool,
}

fn entry_of(rel: Vec<u8>, kind: EntryKind, st: &FileStat) -> Entry {
    Entry {
        path: rel,
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
        ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        ino: st.st_ino,
        append_only: false,
        linked: false,
    }
}

/// Open a file for reading without following a symlink or updating its
/// access time (where permitted).
fn open_at(dir: &impl AsFd, name: &[u8]) -> nix::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let name = OsStr::from_bytes(name);
    match openat(dir.as_fd(), name, flags | OFlag::O_NOATIME, Mode::empty()) {
        Err(nix::errno::Errno::EPERM) => openat(dir.as_fd(), name, flags, Mode::empty()),
        r => r,
    }
    .map(File::from)
}

impl Planner<'_, '_> {
    pub(super) fn run(mut self) -> Result<(), ChunkError> {
        let walked = self.walk().and_then(|()| self.flush());
        if walked.is_err() {
            // Stop the other stages now; the caller records the error.
            self.shared.pipeline.stop().cancel();
        }
        let _ = self.msgs.send(Msg::WalkDone);
        // Files may still need another read until the writer is done.
        while let Ok(r) = self.retries.recv() {
            if let Err(e) = self.reread(r) {
                self.shared.pipeline.fail(e);
            }
        }
        walked
    }

    fn walk(&mut self) -> Result<(), ChunkError> {
        let mut walker = Walker::new(self.root)?;
        let opts = self.shared.opts;
        let secrets = if opts.include_secrets {
            &[]
        } else {
            opts.policy.secrets
        };
        let mut exclusions = Exclusions::new(secrets, &opts.exclude)?;
        let mut held: Vec<HeldDir> = Vec::new();
        while let Some(w) = walker.next() {
            let w = w?;
            self.serve_retries()?;
            if self.shared.pipeline.aborted() {
                return Err(ChunkError::Aborted);
            }
            held.retain(|d| d.depth < w.depth);
            let kind = w.kind();
            if exclusions.excludes(&w.rel) {
                if kind == SFlag::S_IFDIR {
                    walker.skip_children(&w.rel);
                }
                continue;
            }
            let matches = self
                .shared
                .opts
                .filter
                .as_ref()
                .is_none_or(|re| re.is_match(&w.rel));
            match kind {
                SFlag::S_IFDIR => {
                    let entry = entry_of(w.rel.clone(), EntryKind::Dir, &w.stat);
                    if self.shared.opts.filter.is_none() {
                        self.send_entry(entry);
                    } else {
                        held.push(HeldDir {
                            entry,
                            depth: w.depth,
                            sent: false,
                        });
                        if matches {
                            self.release(&mut held);
                        }
                    }
                }
                SFlag::S_IFLNK | SFlag::S_IFREG if matches => {
                    self.release(&mut held);
                    if kind == SFlag::S_IFLNK {
                        self.symlink(&w)?;
                    } else {
                        self.file(&w)?;
                    }
                }
                SFlag::S_IFLNK | SFlag::S_IFREG => {}
                _ => {
                    tracing::warn!(path = %String::from_utf8_lossy(&w.rel), "skipping special file (socket, fifo or device)");
                }
            }
        }
        self.summary.excluded = exclusions.report();
        Ok(())
    }

    /// Send the held directories that lead to an entry being sent.
    fn release(&mut self, held: &mut [HeldDir]) {
        for d in held.iter_mut().filter(|d| !d.sent) {
            d.sent = true;
            self.send_entry(d.entry.clone());
        }
    }

    fn send_entry(&mut self, e: Entry) {
        match e.kind {
            EntryKind::Dir => self.summary.dirs += 1,
            EntryKind::Symlink { .. } => self.summary.symlinks += 1,
            EntryKind::Link { .. } => self.summary.links += 1,
            EntryKind::File { .. } => {}
        }
        self.send(Msg::Entry(e));
    }

    /// Queue a message for the writer.
    fn send(&mut self, m: Msg) {
        self.batch.msgs.push(m);
        if self.batch.msgs.len() >= BATCH_MSGS {
            let _ = self.flush();
        }
    }

    /// Queue a chunk for the workers.
    fn queue(&mut self, task: ReadTask) -> Result<(), ChunkError> {
        self.batch.bytes += task.len;
        self.batch.tasks.push(task);
        if self.batch.tasks.len() >= BATCH_TASKS || self.batch.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Send what is held back: the messages first, so that the writer
    /// knows each file before any result of its chunks.
    fn flush(&mut self) -> Result<(), ChunkError> {
        let mut msgs = std::mem::take(&mut self.batch.msgs);
        if !msgs.is_empty() {
            let m = match msgs.len() {
                1 => msgs.remove(0),
                _ => Msg::Batch(msgs),
            };
            let _ = self.msgs.send(m);
        }
        self.batch.bytes = 0;
        let tasks = std::mem::take(&mut self.batch.tasks);
        if tasks.is_empty() {
            return Ok(());
        }
        let to = match self.batch.route {
            Route::Work => &self.work,
            Route::Urgent => &self.urgent,
            Route::Inline { .. } => {
                let scratch = match &mut self.scratch {
                    Some(s) => s,
                    None => self
                        .scratch
                        .insert(Scratch::new(self.shared.opts.zstd_level)?),
                };
                work(
                    self.shared,
                    self.known,
                    scratch,
                    tasks,
                    &self.blobs,
                    &self.msgs,
                );
                return Ok(());
            }
        };
        to.send(tasks).map_err(|_| ChunkError::Aborted)
    }

    fn serve_retries(&mut self) -> Result<(), ChunkError> {
        loop {
            match self.retries.try_recv() {
                Ok(r) => self.reread(r)?,
                Err(TryRecvError::Empty) => return Ok(()),
                // The writer ended before the walk did: it failed.
                Err(TryRecvError::Disconnected) => return Err(ChunkError::Aborted),
            }
        }
    }

    /// Wait for room to run ahead, serving retries meanwhile (the file the
    /// writer waits for may be one that needs another read).
    fn take_slot(&mut self) -> Result<(), ChunkError> {
        let (tokens, stop) = (
            &self.shared.lookahead,
            self.shared.pipeline.stop().receiver(),
        );
        if tokens.try_recv().is_ok() {
            return Ok(());
        }
        loop {
            // The writer may be waiting for what the batch holds.
            self.flush()?;
            select! {
                recv(tokens) -> t => return t.map_err(|_| ChunkError::Aborted),
                recv(self.retries) -> r => match r {
                    Ok(r) => self.reread(r)?,
                    Err(_) => return Err(ChunkError::Aborted),
                },
                recv(stop) -> _ => return Err(ChunkError::Aborted),
            }
        }
    }

    fn symlink(&mut self, w: &Walked) -> Result<(), ChunkError> {
        let target = nix::fcntl::readlinkat(w.dir.as_fd(), OsStr::from_bytes(&w.name))
            .map_err(|e| ChunkError::io(&self.root.join(OsStr::from_bytes(&w.rel)), e.into()))?;
        let entry = entry_of(
            w.rel.clone(),
            EntryKind::Symlink {
                target: target.as_bytes().to_vec(),
            },
            &w.stat,
        );
        self.send_entry(entry);
        Ok(())
    }

    fn file(&mut self, w: &Walked) -> Result<(), ChunkError> {
        let linked = match self.links.see(&w.rel, &w.stat) {
            Name::LinkTo(target) => {
                let entry = entry_of(w.rel.clone(), EntryKind::Link { target }, &w.stat);
                self.send_entry(entry);
                return Ok(());
            }
            Name::First => true,
            Name::Only => false,
        };
        self.take_slot()?;
        let id = self.next_id;
        self.next_id += 1;
        let opts = self.shared.opts;
        let append_only = opts.append_only.iter().any(|a| a.as_bytes() == &w.rel[..]);
        let prev = match &mut self.parent {
            Some(p) => p
                .seek(&w.rel)?
                .filter(|e| matches!(e.kind, EntryKind::File { .. })),
            None => None,
        };
        let size = w.stat.st_size as u64;
        self.summary.files += 1;
        self.summary.bytes_scanned += size;
        let unchanged = prev.as_ref().is_some_and(|p| {
            !opts.force_read
                && p.size() == size
                && p.mtime_ns == w.stat.st_mtime * 1_000_000_000 + w.stat.st_mtime_nsec
                && p.ctime_ns == w.stat.st_ctime * 1_000_000_000 + w.stat.st_ctime_nsec
                && p.ino == w.stat.st_ino
        });
        if unchanged {
            let mut entry = entry_of(w.rel.clone(), EntryKind::File { size }, &w.stat);
            entry.append_only = append_only;
            entry.linked = linked;
            return self.reuse_whole(id, entry, &w.rel);
        }
        let file = match open_at(&w.dir, &w.name) {
            Ok(f) => f,
            // Gone since the walk saw it.
            Err(nix::errno::Errno::ENOENT) => {
                self.links.gone(&w.rel, &w.stat);
                self.summary.files -= 1;
                self.summary.bytes_scanned -= size;
                self.shared.file_written();
                return Ok(());
            }
            Err(e) => {
                return Err(ChunkError::io(
                    &self.root.join(OsStr::from_bytes(&w.rel)),
                    e.into(),
                ))
            }
        };
        let prev = prev.map(|p| Recorded {
            size: p.size(),
            ino: p.ino,
            mtime_ns: p.mtime_ns,
            ctime_ns: p.ctime_ns,
        });
        let read = FileRead {
            id,
            attempt: 1,
            append_only,
            linked,
            prev,
        };
        self.read_file(read, w.rel.clone(), file)
    }

    /// File `id` at `rel`, unchanged since the previous backup: reused
    /// whole, with that backup's chunks, without opening it.
    fn reuse_whole(&mut self, id: u64, entry: Entry, rel: &[u8]) -> Result<(), ChunkError> {
        self.summary.files_unchanged += 1;
        let n = entry.size().div_ceil(self.shared.opts.chunk_size);
        self.send(Msg::File {
            id,
            attempt: 1,
            entry,
            chunks: n,
            checked: false,
        });
        for index in 0..n {
            let c = self.parent_chunk()?.ok_or_else(|| {
                ChunkError::Invalid(format!(
                    "the previous backup's record of {} is shorter than the file",
                    String::from_utf8_lossy(rel)
                ))
            })?;
            self.reused(id, 1, index, c);
        }
        Ok(())
    }

    fn parent_chunk(&mut self) -> Result<Option<ChunkRef>, ChunkError> {
        match &mut self.parent {
            Some(p) => p.next_chunk(),
            None => Ok(None),
        }
    }

    fn reused(&mut self, id: u64, attempt: u32, index: u64, c: ChunkRef) {
        let counters = &self.shared.counters;
        if c.hash.is_some() {
            counters.chunks_reused.add(1);
        } else {
            counters.chunks_empty.add(1);
        }
        self.send(Msg::Chunk {
            id,
            attempt,
            index,
            result: Ok(c),
        });
    }

    /// Plan and queue the reads of an open file, whose previous record's
    /// chunks (`read.prev`) come from the parent stream.
    fn read_file(&mut self, read: FileRead, rel: Vec<u8>, file: File) -> Result<(), ChunkError> {
        let opts = self.shared.opts;
        let full = self.root.join(OsStr::from_bytes(&rel));
        let st = nix::sys::stat::fstat(&file).map_err(|e| ChunkError::io(&full, e.into()))?;
        let size = st.st_size as u64;
        let cs = opts.chunk_size;
        let regions = (size > cs)
            .then(|| crate::sparse::data_regions(&file, size))
            .flatten();
        let same = match (read.prev, &opts.parent) {
            (Some(p), Some(parent_dir)) if !opts.force_read => {
                shared_ranges(parent_dir, &rel, p, &file, size)
            }
            _ => Vec::new(),
        };
        let rule = FileRule {
            size,
            chunk_size: cs,
            previous: read.prev.map(|p| (p.size, false)),
            append_only: read.append_only,
            same: &same,
            regions: regions.as_deref(),
        };
        let mut entry = entry_of(rel.clone(), EntryKind::File { size }, &st);
        entry.append_only = read.append_only;
        entry.linked = read.linked;
        let opened = Arc::new(Opened::new(file, &rel, Signature::of(&st)));
        self.shared
            .reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(read.id, (rel, read.linked));
        self.send(Msg::File {
            id: read.id,
            attempt: read.attempt,
            entry,
            chunks: size.div_ceil(cs),
            checked: true,
        });
        self.queue_chunks(&read, &rule, &opened)?;
        // Every read already ended, or none was needed: the check is the
        // planner's.
        if let Some(changed) = opened.end() {
            self.send(Msg::Checked {
                id: read.id,
                attempt: read.attempt,
                changed,
            });
        }
        Ok(())
    }

    /// Decide each chunk of a file being read: reuse, hole, or read.
    fn queue_chunks(
        &mut self,
        read: &FileRead,
        rule: &FileRule<'_>,
        opened: &Arc<Opened>,
    ) -> Result<(), ChunkError> {
        let (id, attempt) = (read.id, read.attempt);
        let mut off = 0;
        for index in 0..rule.size.div_ceil(rule.chunk_size) {
            let len = rule.chunk_size.min(rule.size - off);
            let prev_chunk = match read.prev {
                Some(_) => self.parent_chunk()?,
                None => None,
            };
            match backup_step(rule, off, len, prev_chunk.as_ref()) {
                BackupStep::Reuse(c) => self.reused(id, attempt, index, c),
                BackupStep::Hole { off, len } => {
                    let hole = ChunkRef {
                        off,
                        len,
                        hash: None,
                    };
                    self.reused(id, attempt, index, hole)
                }
                BackupStep::Read { off, len } => {
                    self.shared
                        .opts
                        .progress
                        .total
                        .fetch_add(len, Ordering::Relaxed);
                    opened.begin();
                    let task = ReadTask {
                        id,
                        attempt,
                        index,
                        opened: Arc::clone(opened),
                        off,
                        len,
                        paid: matches!(self.batch.route, Route::Inline { paid } if off + len <= paid),
                    };
                    self.queue(task)?;
                }
            }
            off += len;
        }
        Ok(())
    }

    /// Read a file again, whole, as the writer asks.
    ///
    /// It changed while it was read, so it is read again with as short a
    /// window as can be between its signature and the check after its
    /// read: a small one (up to [`BATCH_BYTES`]) is read by the planner
    /// itself, its rate-limit slot paid before it is opened, rather than
    /// waiting behind a worker's batch, or its slot, after it was opened.
    /// A file rewritten every few hundred milliseconds is then caught
    /// between two writes, not across one. A larger file's chunks go to
    /// the workers ahead of their queue.
    fn reread(&mut self, r: Retry) -> Result<(), ChunkError> {
        let Retry { id, attempt } = r;
        let (rel, linked) = self
            .shared
            .reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or(ChunkError::Aborted)?;
        // What is held back goes first, on the ordinary queue, before the
        // file is opened: sending may wait for the workers.
        self.flush()?;
        let tree =
            btm::confined::Tree::open(self.root).map_err(|e| ChunkError::Invalid(e.to_string()))?;
        let file = tree
            .open_file(Path::new(OsStr::from_bytes(&rel)))
            .map_err(|e| {
                ChunkError::Invalid(format!(
                    "reading {} again: {e}",
                    String::from_utf8_lossy(&rel)
                ))
            })?;
        // The signature is taken in `read_file`, after this wait.
        let size = nix::sys::stat::fstat(&file).map_or(u64::MAX, |st| st.st_size as u64);
        let route = if size <= BATCH_BYTES {
            if let Some(t) = &self.shared.throttle {
                t.take(size);
            }
            Route::Inline { paid: size }
        } else {
            Route::Urgent
        };
        let append_only = self
            .shared
            .opts
            .append_only
            .iter()
            .any(|a| a.as_bytes() == &rel[..]);
        let read = FileRead {
            id,
            attempt,
            append_only,
            linked,
            prev: None,
        };
        self.batch.route = route;
        let queued = self.read_file(read, rel, file).and_then(|()| self.flush());
        self.batch.route = Route::Work;
        queued
    }
}

/// Byte ranges of `file` (now `size` bytes) that hold the same bytes as
/// `rel` under `parent`, the file the previous index recorded as
/// (size, inode, mtime, ctime). Empty when anything does not match or
/// FIEMAP is unavailable (ZFS): the caller then reads, as it would have.
fn shared_ranges(
    parent: &Path,
    rel: &[u8],
    prev: Recorded,
    file: &File,
    size: u64,
) -> Vec<(u64, u64)> {
    let Ok(tree) = btm::confined::Tree::open(parent) else {
        return Vec::new();
    };
    let Ok(old) = tree.open_file(Path::new(OsStr::from_bytes(rel))) else {
        return Vec::new();
    };
    let Ok(om) = nix::sys::stat::fstat(&old) else {
        return Vec::new();
    };
    let recorded = om.st_ino == prev.ino
        && om.st_size as u64 == prev.size
        && om.st_mtime * 1_000_000_000 + om.st_mtime_nsec == prev.mtime_ns
        && om.st_ctime * 1_000_000_000 + om.st_ctime_nsec == prev.ctime_ns;
    if !recorded {
        return Vec::new();
    }
    match (btm::sys::fiemap(&old), btm::sys::fiemap(file)) {
        (Ok(a), Ok(b)) => crate::plan::identical_ranges(&a, &b, prev.size.min(size)),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn opened(dir: &Path) -> (Opened, File) {
        let path = dir.join("f");
        let mut w = File::create(&path).expect("create");
        w.write_all(b"first").expect("write");
        let file = File::open(&path).expect("open");
        let st = nix::sys::stat::fstat(&file).expect("fstat");
        (Opened::new(file, b"f", Signature::of(&st)), w)
    }

    #[test]
    fn only_the_last_read_to_end_checks_and_the_planner_holds_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let (o, _w) = opened(dir.path());
        o.begin();
        o.begin();
        // Both reads end before the planner has queued them all: neither
        // is the last.
        assert_eq!(o.end(), None);
        assert_eq!(o.end(), None);
        assert_eq!(o.end(), Some(false), "the planner's hold is the last");
    }

    #[test]
    fn a_change_before_the_last_read_ends_is_seen() {
        let dir = tempfile::tempdir().expect("tmp");
        let (o, mut w) = opened(dir.path());
        o.begin();
        assert_eq!(o.end(), None);
        // Between the first read's end and the last's.
        w.write_all(b" and more").expect("write");
        o.begin();
        assert_eq!(o.end(), None);
        assert_eq!(o.end(), Some(true), "it grew before its check");
    }
}
