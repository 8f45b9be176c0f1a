//! The backup's index writer: it receives entries in walk order from the
//! planner and chunk results in any order from the workers, and writes the
//! tree segments in walk order.
//!
//! A file read for this backup is written only once all its chunks are in
//! *and* a second `fstat`, made as soon as the last of its reads ended,
//! shows that it did not change while it was read (size, mtime, ctime). If
//! it did (or it shrank under a read), its chunks are thrown away and the
//! planner reads it again, up to [`MAX_ATTEMPTS`] times; then the backup
//! fails, naming it. So a backup of a live directory never records a state
//! of a file that never existed.
//!
//! A file's chunk list is kept in memory up to
//! [`SPOOL_MEMORY`](crate::spool::SPOOL_MEMORY) bytes and
//! on disk beyond, so a multi-terabyte file does not grow the writer.

use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use nix::sys::stat::FileStat;

use super::super::format::head::Totals;
use super::super::format::tree::{ChunkRef, Entry, Segment, TreeWriter};
use super::super::spool::Spool;
use super::Shared;
use crate::store::{Id, Kind};
use crate::{with_retry, ChunkError};

fn spool_err(e: std::io::Error) -> ChunkError {
    ChunkError::io(std::path::Path::new("(chunk spool)"), e)
}

/// Reads of one file before a backup gives up on it.
pub const MAX_ATTEMPTS: u32 = 3;

/// What identifies a version of a file for the change check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Signature {
    /// The signature in `st`.
    pub fn of(st: &FileStat) -> Self {
        Signature {
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// Why a chunk has no result.
#[derive(Debug)]
pub enum ChunkFail {
    /// The file ended before the chunk did: it shrank while being read.
    Shrank,
    /// Anything else: the backup fails.
    Error(ChunkError),
}

/// What the planner and the workers tell the writer.
pub enum Msg {
    /// A directory or symlink, complete.
    Entry(Entry),
    /// A file whose `chunks` results follow (attempt `attempt`), and a
    /// [`Msg::Checked`] if `checked`: a file reused whole is not read, so
    /// not checked.
    File {
        /// The planner's number for the file.
        id: u64,
        /// Which read of the file this is (1 first).
        attempt: u32,
        /// The entry (its size and metadata as read).
        entry: Entry,
        /// How many chunk results to expect.
        chunks: u64,
        /// Whether a [`Msg::Checked`] follows.
        checked: bool,
    },
    /// Whether file `id` changed while read `attempt` of it went on,
    /// found when the last of its chunks' reads ended (before or after
    /// their results).
    Checked {
        /// The file.
        id: u64,
        /// The read it checked.
        attempt: u32,
        /// Its size, mtime or ctime is not what it was when opened.
        changed: bool,
    },
    /// The result of chunk `index` of file `id`.
    Chunk {
        /// The file.
        id: u64,
        /// The attempt it belongs to.
        attempt: u32,
        /// The chunk's position in the file.
        index: u64,
        /// Its record, or why there is none.
        result: Result<ChunkRef, ChunkFail>,
    },
    /// The walk is over; retried files may still come.
    WalkDone,
    /// Several of the above, in order: one hand-off for many small files
    /// (a message each would wake the writer per file, and waking threads
    /// cost more than the writer's work on a file of a few KiB).
    Batch(Vec<Msg>),
}

struct FileState {
    attempt: u32,
    entry: Entry,
    expected: u64,
    next: u64,
    early: BTreeMap<u64, ChunkRef>,
    spool: Spool,
    check: Check,
    received: u64,
    shrank: bool,
    complete: bool,
}

/// What is known of whether a file changed while it was read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing of it is read (reused whole): nothing to check.
    None,
    /// Its [`Msg::Checked`] has not come yet.
    Awaited,
    Unchanged,
    Changed,
}

enum Slot {
    Ready(Entry),
    File(u64),
}

/// The writer's result: the segments' ids and the stream's totals.
pub struct Written {
    /// Tree segment ids, in order.
    pub trees: Vec<Id>,
    /// How many of them were uploaded (not already stored).
    pub trees_uploaded: u64,
    /// Counts over the entries.
    pub totals: Totals,
    /// Files read again because they changed while read.
    pub changed: u64,
}

/// A file the planner must read again, as attempt `attempt`.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The planner's number for the file.
    pub id: u64,
    /// Which read this is (the first is 1).
    pub attempt: u32,
}

/// Run the writer until the walk and every file are done. `retry` asks the
/// planner to read a file again; it is dropped when the writer ends, which
/// releases the planner. `stored` are segments the store already
/// holds (the previous backup's): segments are cut by content, so those of
/// an unchanged part of the tree come out identical and are not uploaded
/// again.
pub fn run(
    shared: &Shared<'_>,
    rx: Receiver<Msg>,
    retry: Sender<Retry>,
    stored: &HashSet<Id>,
) -> Result<Written, ChunkError> {
    std::thread::scope(|s| {
        // Segments upload on their own thread, so that a store's round
        // trip per segment does not hold up the writer (and with it the
        // whole pipeline); one waits while another uploads.
        let (segments, to_upload) = crossbeam_channel::bounded::<Segment>(1);
        let uploader = s.spawn(move || upload_segments(shared, to_upload));
        let mut w = Writer {
            shared,
            tree: TreeWriter::new(3),
            order: VecDeque::new(),
            files: HashMap::new(),
            trees: Vec::new(),
            trees_uploaded: 0,
            changed: 0,
            segments,
            stored,
        };
        let result = w.receive(rx, &retry);
        // Whatever happened, release the planner.
        drop(retry);
        let written = result.and_then(|()| {
            let tree = std::mem::replace(&mut w.tree, TreeWriter::new(3));
            let (last, totals) = tree.finish()?;
            if let Some(seg) = last {
                w.upload(seg)?;
            }
            Ok(Written {
                trees: std::mem::take(&mut w.trees),
                trees_uploaded: w.trees_uploaded,
                totals,
                changed: w.changed,
            })
        });
        drop(w);
        // An upload failure is recorded in `shared`; the caller reports it.
        let _ = uploader.join();
        written
    })
}

/// Put each segment (and cache it), until the writer hangs up or a put
/// fails.
fn upload_segments(shared: &Shared<'_>, segments: Receiver<Segment>) {
    let store = shared.repo.store();
    for seg in segments {
        let data = crate::store::Bytes::from(seg.data);
        let put = {
            let _req = shared.opts.progress.request();
            with_retry(store, || store.put(Kind::Tree, &seg.id, data.clone()))
        };
        if let Err(e) = put {
            shared.pipeline.fail(ChunkError::store(
                format!("uploading tree segment {}", seg.id),
                e,
            ));
            return;
        }
        if let Some(c) = shared.repo.cache() {
            c.put(Kind::Tree, &seg.id, &data);
        }
    }
}

struct Writer<'s, 'a> {
    shared: &'s Shared<'a>,
    tree: TreeWriter,
    order: VecDeque<Slot>,
    files: HashMap<u64, FileState>,
    trees: Vec<Id>,
    trees_uploaded: u64,
    changed: u64,
    segments: Sender<Segment>,
    stored: &'s HashSet<Id>,
}

impl Writer<'_, '_> {
    fn receive(&mut self, rx: Receiver<Msg>, retry: &Sender<Retry>) -> Result<(), ChunkError> {
        let mut walk_done = false;
        for msg in rx {
            if self.shared.pipeline.aborted() {
                return Err(ChunkError::Aborted);
            }
            walk_done |= self.take(msg, retry)?;
            self.drain()?;
            if walk_done && self.order.is_empty() {
                return Ok(());
            }
        }
        // Every sender is gone before the walk finished: the pipeline
        // stopped.
        Err(ChunkError::Aborted)
    }

    /// Take in one message; `true` if it says the walk is over.
    fn take(&mut self, msg: Msg, retry: &Sender<Retry>) -> Result<bool, ChunkError> {
        match msg {
            Msg::Entry(e) => self.order.push_back(Slot::Ready(e)),
            Msg::File {
                id,
                attempt,
                entry,
                chunks,
                checked,
            } => {
                if attempt == 1 {
                    self.order.push_back(Slot::File(id));
                }
                self.files.insert(
                    id,
                    FileState {
                        attempt,
                        entry,
                        expected: chunks,
                        next: 0,
                        early: BTreeMap::new(),
                        spool: Spool::new(),
                        check: if checked { Check::Awaited } else { Check::None },
                        received: 0,
                        shrank: false,
                        complete: false,
                    },
                );
                self.settle(id, retry)?;
            }
            Msg::Chunk {
                id,
                attempt,
                index,
                result,
            } => {
                if self.chunk(id, attempt, index, result)? {
                    self.settle(id, retry)?;
                }
            }
            Msg::Checked {
                id,
                attempt,
                changed,
            } => {
                if let Some(f) = self.files.get_mut(&id).filter(|f| f.attempt == attempt) {
                    f.check = if changed {
                        Check::Changed
                    } else {
                        Check::Unchanged
                    };
                    self.settle(id, retry)?;
                }
            }
            Msg::WalkDone => return Ok(true),
            Msg::Batch(msgs) => {
                let mut done = false;
                for m in msgs {
                    done |= self.take(m, retry)?;
                }
                return Ok(done);
            }
        }
        Ok(false)
    }

    /// Take in chunk `index` of read `attempt` of file `id`. `false` if it
    /// belongs to no current read (a superseded attempt's).
    fn chunk(
        &mut self,
        id: u64,
        attempt: u32,
        index: u64,
        result: Result<ChunkRef, ChunkFail>,
    ) -> Result<bool, ChunkError> {
        let Some(f) = self.files.get_mut(&id).filter(|f| f.attempt == attempt) else {
            return Ok(false);
        };
        f.received += 1;
        match result {
            Ok(c) if index == f.next => {
                f.spool.push(&c).map_err(spool_err)?;
                f.next += 1;
                while let Some(c) = f.early.remove(&f.next) {
                    f.spool.push(&c).map_err(spool_err)?;
                    f.next += 1;
                }
            }
            Ok(c) => {
                f.early.insert(index, c);
            }
            // The whole read is redone; its chunks are dropped.
            Err(ChunkFail::Shrank) => f.shrank = true,
            Err(ChunkFail::Error(e)) => return Err(e),
        }
        Ok(true)
    }

    /// If every chunk of file `id` is in and its check too, either mark it
    /// complete or, if it changed, ask for another read.
    fn settle(&mut self, id: u64, retry: &Sender<Retry>) -> Result<(), ChunkError> {
        let Some(f) = self.files.get_mut(&id) else {
            return Ok(());
        };
        if f.complete || f.received < f.expected || f.check == Check::Awaited {
            return Ok(());
        }
        if !f.shrank && f.check != Check::Changed {
            f.complete = true;
            return Ok(());
        }
        self.changed += 1;
        if f.attempt >= MAX_ATTEMPTS {
            return Err(ChunkError::Changing {
                path: f.entry.display().into_owned(),
                attempts: f.attempt,
            });
        }
        tracing::info!(path = %f.entry.display(), attempt = f.attempt, "file changed while it was read; reading it again");
        let next = f.attempt + 1;
        f.attempt = next;
        f.complete = false;
        let _ = retry.send(Retry { id, attempt: next });
        Ok(())
    }

    /// Write what is complete at the head of the order.
    fn drain(&mut self) -> Result<(), ChunkError> {
        while let Some(front) = self.order.front() {
            match front {
                Slot::Ready(_) => {
                    let Some(Slot::Ready(e)) = self.order.pop_front() else {
                        break;
                    };
                    if let Some(seg) = self.tree.entry(&e)? {
                        self.upload(seg)?;
                    }
                }
                Slot::File(id) => {
                    let id = *id;
                    if !self.files.get(&id).is_some_and(|f| f.complete) {
                        break;
                    }
                    self.order.pop_front();
                    let Some(f) = self.files.remove(&id) else {
                        break;
                    };
                    if let Some(seg) = self.tree.entry(&f.entry)? {
                        self.upload(seg)?;
                    }
                    let mut sealed = Vec::new();
                    let tree = &mut self.tree;
                    f.spool.replay(spool_err, |run| {
                        if let Some(seg) = tree.chunks(run)? {
                            sealed.push(seg);
                        }
                        Ok(())
                    })?;
                    for seg in sealed {
                        self.upload(seg)?;
                    }
                    self.shared
                        .reading
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    self.shared.file_written();
                }
            }
        }
        Ok(())
    }

    /// Record segment `seg` in the tree and have it uploaded, unless the
    /// store has it.
    fn upload(&mut self, seg: Segment) -> Result<(), ChunkError> {
        self.trees.push(seg.id);
        if self.stored.contains(&seg.id) {
            return Ok(());
        }
        self.trees_uploaded += 1;
        self.segments.send(seg).map_err(|_| ChunkError::Aborted)
    }
}
