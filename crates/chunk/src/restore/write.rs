//! The write stage: fetched chunks land in their files, sparse where
//! they are zeros, and a file whose last chunk is right gets its metadata
//! and joins the completed files the next checkpoint journals.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::fetch::FetchChunk;
use super::journal::{Durable, Record, Stamp};
use super::{Shared, CHECKPOINT_BYTES, CHECKPOINT_FILES};
use crate::format::pack::{open_frame, FrameError};
use crate::format::tree::{ChunkRef, Entry};
use crate::localfs::{apply_file_metadata, timespec, Found, Owners};
use crate::pipeline::Permit;
use crate::ChunkError;

/// One file being restored, shared by everyone working on its chunks.
pub(super) struct FileJob<'a> {
    pub(super) entry: Entry,
    pub(super) file: File,
    pub(super) size: u64,
    /// Its size before it was resized: bytes beyond are holes already.
    pub(super) local_size: u64,
    pub(super) chunk_size: u64,
    /// Whether it was there or this restore created it.
    pub(super) origin: Origin,
    /// Chunks not done yet, plus one held by the planner while it plans.
    pub(super) remaining: AtomicU64,
    /// Which chunks are written.
    pub(super) prefix: Mutex<Prefix>,
    /// All its chunks, once the planner has seen them: journalled with
    /// the complete file, so the next restore knows what it holds.
    pub(super) chunks: std::sync::OnceLock<Arc<[ChunkRef]>>,
    pub(super) _open: Permit<'a>,
}

/// Where a file being restored came from.
#[derive(Clone, Copy)]
pub(super) enum Origin {
    /// It was there: its owner and mode when it was opened, so that
    /// calls that would change nothing are saved.
    Found(Found),
    /// This restore created it (`O_EXCL`, so nothing was there): see
    /// [`finish_created`].
    Created,
}

/// Which chunks of a file are written: all of the first `done`, and
/// those in `beyond`.
#[derive(Default)]
pub(super) struct Prefix {
    pub(super) done: u64,
    pub(super) beyond: BTreeSet<u64>,
}

impl FileJob<'_> {
    /// Bytes from the start known written.
    pub(super) fn prefix_bytes(&self) -> u64 {
        let p = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
        (p.done * self.chunk_size).min(self.size)
    }
}

impl<'a> Shared<'a> {
    /// Chunk `index` of `job` is right on disk now (not yet durable).
    pub(super) fn chunk_done(&self, job: &Arc<FileJob<'a>>, index: u64, len: u64) {
        {
            let mut p = job.prefix.lock().unwrap_or_else(|p| p.into_inner());
            if index == p.done {
                let mut next = index + 1;
                while p.beyond.remove(&next) {
                    next += 1;
                }
                p.done = next;
            } else {
                p.beyond.insert(index);
            }
        }
        self.opts.progress.done.fetch_add(len, Ordering::Relaxed);
        self.release(job);
    }

    /// One of `job`'s pending counts is done; the last one finishes it.
    pub(super) fn release(&self, job: &Arc<FileJob<'a>>) {
        if job.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let owners = self.opts.owners;
        let stamp = match job.origin {
            Origin::Found(found) => apply_file_metadata(&job.file, &job.entry, Some(found), owners)
                .and_then(|()| stamp_of(&job.file)),
            Origin::Created => finish_created(&job.file, &job.entry, job.size, owners),
        };
        let stamp = match stamp {
            Ok(s) => s,
            Err(e) => {
                self.pipeline
                    .fail(ChunkError::io(Path::new(&*job.entry.display()), e));
                return;
            }
        };
        let record = Record {
            stamp,
            prefix: job.size,
        };
        let durable = Durable {
            path: job.entry.path.clone(),
            record,
            chunks: job.chunks.get().cloned(),
        };
        if job.entry.linked && self.opts.records.is_some() {
            // Its links may be made after this stamp (see `restamp_linked`);
            // only a kept restore record needs it stamped again.
            self.linked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(durable.clone());
        }
        let pending = {
            let mut completed = self.completed.lock().unwrap_or_else(|p| p.into_inner());
            completed.push(durable);
            completed.len()
        };
        if pending == CHECKPOINT_FILES {
            self.checkpoint_now.notify_one();
        }
    }

    pub(super) fn wrote(&self, n: u64) {
        self.counters.bytes_written.add(n);
        if self.since_checkpoint.fetch_add(n, Ordering::Relaxed) + n >= CHECKPOINT_BYTES {
            self.checkpoint_now.notify_one();
        }
    }
}

fn stamp_of(file: &File) -> std::io::Result<Stamp> {
    nix::sys::stat::fstat(file)
        .map(|st| Stamp::of(&st))
        .map_err(std::io::Error::from)
}

/// Finish a file this restore created: its times, then the one `fstat`
/// the journal needs anyway, which also says whether anything else is
/// left. Usually nothing is: the file was created with its permission
/// bits by this process, which is its owner under [`Owners::Restorer`]
/// and usually the recorded one as root. Where a umask, a default ACL, a
/// setgid directory, a recorded owner or a special mode made it differ,
/// or where its last bytes are zeros (never written, so the file is
/// short), that is set, and it is stamped again: exact either way, and
/// as few calls as tar makes in the common case.
fn finish_created(file: &File, e: &Entry, size: u64, owners: Owners) -> std::io::Result<Stamp> {
    let ts = timespec(e.mtime_ns);
    nix::sys::stat::futimens(file, &ts, &ts).map_err(std::io::Error::from)?;
    let st = nix::sys::stat::fstat(file).map_err(std::io::Error::from)?;
    let found = Found::of(&st);
    if st.st_size as u64 == size && found.matches(e, owners) {
        return Ok(Stamp::of(&st));
    }
    if (st.st_size as u64) < size {
        file.set_len(size)?;
    }
    // Sets the times again: resizing moved them.
    apply_file_metadata(file, e, Some(found), owners)?;
    stamp_of(file)
}

/// Why the chunks of a read were not all written.
pub(super) enum Unwritten {
    /// The bytes read are wrong (a chunk fails its hash or does not
    /// decompress): another copy of them may be right.
    Bytes(ChunkError),
    /// Writing them failed here.
    Local(ChunkError),
}

/// Open each chunk of a read (`whole`: the read is the one chunk's object,
/// not a range of frames) and write it where it is wanted, taking each
/// from the front of `chunks` once it is written: after a failure,
/// `chunks` holds the chunk that failed and those after it.
pub(super) fn write_fetched<'a>(
    shared: &Shared<'a>,
    chunks: &mut VecDeque<FetchChunk<'a>>,
    whole: bool,
    data: &[u8],
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), Unwritten> {
    while let Some(c) = chunks.front() {
        let frame = if whole {
            data
        } else {
            data.get(c.at as usize..(c.at + c.len) as usize)
                .unwrap_or(&[])
        };
        if let Err(e) = open_frame(frame, &c.hash, c.raw_len, dctx, out) {
            let w = &c.wants[0];
            let detail = match e {
                FrameError::Mismatch => "corrupt (content does not match its hash)".to_owned(),
                FrameError::Decompress(d) => format!("corrupt (cannot decompress: {d})"),
            };
            return Err(Unwritten::Bytes(ChunkError::Corrupt {
                path: w.job.entry.display().into_owned(),
                hash: c.hash,
                off: w.chunk.off,
                detail,
            }));
        }
        let Some(FetchChunk { wants, .. }) = chunks.pop_front() else {
            break;
        };
        shared.counters.chunks_fetched.add(1);
        for w in wants {
            let n = write_sparse(&w.job.file, w.chunk.off, out, w.job.local_size).map_err(|e| {
                Unwritten::Local(ChunkError::io(Path::new(&*w.job.entry.display()), e))
            })?;
            shared.wrote(n);
            shared.chunk_done(&w.job, w.index, w.chunk.len);
        }
    }
    Ok(())
}

/// Block size for keeping restored files as sparse as their originals.
const SPARSE_BLOCK: usize = 4096;

/// Write `data` at `off`, leaving all-zero 4 KiB blocks unallocated: they
/// are skipped past the file's old end (already a hole after `set_len`) and
/// punched below it (zeros written where punching is unsupported). Returns
/// the bytes actually written.
pub fn write_sparse(file: &File, off: u64, data: &[u8], local_size: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut i = 0;
    while i < data.len() {
        let zero = |j: usize| {
            data[j..(j + SPARSE_BLOCK).min(data.len())]
                .iter()
                .all(|&b| b == 0)
        };
        let is_zero = zero(i);
        let mut j = i;
        while j < data.len() && zero(j) == is_zero {
            j += SPARSE_BLOCK;
        }
        let j = j.min(data.len());
        let (run_off, run) = (off + i as u64, &data[i..j]);
        if !is_zero {
            file.write_all_at(run, run_off)?;
            written += run.len() as u64;
        } else if run_off < local_size {
            let len = (run.len() as u64).min(local_size - run_off);
            if !crate::sparse::punch_hole(file, run_off, len) {
                file.write_all_at(&run[..len as usize], run_off)?;
                written += len;
            }
        }
        i = j;
    }
    Ok(written)
}
