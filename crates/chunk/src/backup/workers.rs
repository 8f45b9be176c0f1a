//! The worker stage: read a chunk, skip it if all zeros, hash it, and
//! unless the store has it, compress it, check the round trip and pass it
//! to the packer. Chunks come in batches ([`super::planner`]), and leave
//! in batches.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;

use super::planner::{ReadTask, BATCH_BYTES, BATCH_TASKS};
use super::writer::{ChunkFail, Msg};
use super::Shared;
use crate::format::tree::ChunkRef;
use crate::map::KnownSet;
use crate::store::Id;
use crate::ChunkError;

/// The new chunks of one batch, for the packer: their frames back to back
/// in one buffer (one buffer from the pool a batch, not one a chunk).
pub(super) struct Blobs {
    pub(super) frames: Vec<u8>,
    /// Each chunk's hash, length before compression, and where its frame
    /// ends in `frames` (it starts where the one before ends).
    pub(super) list: Vec<(Id, u32, usize)>,
}

/// The most a batch's frames can take: a batch closes once it holds
/// [`BATCH_BYTES`] to read, so it holds less than that plus a chunk, and
/// each frame may exceed its chunk by zstd's bound.
pub(super) fn frames_capacity(chunk_size: u64) -> usize {
    let raw = (BATCH_BYTES + chunk_size) as usize;
    zstd::zstd_safe::compress_bound(raw) + BATCH_TASKS * 128
}

impl Blobs {
    /// Each chunk's hash, length before compression and frame.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Id, u32, &[u8])> {
        let mut start = 0;
        self.list.iter().map(move |&(hash, raw_len, end)| {
            let frame = &self.frames[start..end];
            start = end;
            (hash, raw_len, frame)
        })
    }
}

/// A worker's reusable buffers and zstd contexts: allocating a
/// chunk-sized buffer or a zstd context per chunk costs page faults and,
/// with the allocator set to return freed pages at once, an madvise and the
/// TLB shootdown that follows it, for every chunk. On a tree of 100,000
/// small files that was a third of the backup's CPU time.
pub(super) struct Scratch {
    read: Vec<u8>,
    /// The compressed frame.
    frame: Vec<u8>,
    /// The round trip's output, compared with `read`.
    check: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Scratch {
    pub(super) fn new(zstd_level: i32) -> Result<Self, ChunkError> {
        let contexts = zstd::bulk::Compressor::new(zstd_level)
            .and_then(|c| Ok((c, zstd::bulk::Decompressor::new()?)));
        let (compressor, decompressor) =
            contexts.map_err(|e| ChunkError::Invalid(format!("cannot start zstd: {e}")))?;
        Ok(Scratch {
            read: Vec::new(),
            frame: Vec::new(),
            check: Vec::new(),
            compressor,
            decompressor,
        })
    }
}

/// Work a batch of chunks (one large chunk, or the chunks of many small
/// files), then hand the new ones to the packer and every result to the
/// writer, one message each.
pub(super) fn work(
    shared: &Shared<'_>,
    known: &KnownSet,
    scratch: &mut Scratch,
    tasks: Vec<ReadTask>,
    blobs: &Sender<Blobs>,
    msgs: &Sender<Msg>,
) {
    let mut new = Blobs {
        frames: shared.frames.take(),
        list: Vec::new(),
    };
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let (Some(t), false) = (&shared.throttle, task.paid) {
            t.take(task.len);
        }
        let read = read(shared, &task, scratch);
        // At once: a check made later would span more than the reading.
        if let Some(changed) = task.opened.end() {
            results.push(Msg::Checked {
                id: task.id,
                attempt: task.attempt,
                changed,
            });
        }
        let result = read.and_then(|()| process(shared, known, &task, scratch, &mut new));
        shared
            .opts
            .progress
            .done
            .fetch_add(task.len, Ordering::Relaxed);
        let result = match result {
            Err(ChunkFail::Error(e)) => {
                // Recorded here; the writer only learns that it must stop.
                shared.pipeline.fail(e);
                Err(ChunkFail::Error(ChunkError::Aborted))
            }
            r => r,
        };
        results.push(Msg::Chunk {
            id: task.id,
            attempt: task.attempt,
            index: task.index,
            result,
        });
    }
    // The new chunks reach the packer before the writer hears of them.
    if new.list.is_empty() {
        shared.frames.give(new.frames);
    } else if blobs.send(new).is_err() {
        // The packer is gone: the pipeline stopped.
        shared.pipeline.fail(ChunkError::Aborted);
        return;
    }
    let _ = msgs.send(match results.len() {
        1 => results.remove(0),
        _ => Msg::Batch(results),
    });
}

/// Read the task's chunk into `scratch.read`.
fn read(shared: &Shared<'_>, task: &ReadTask, scratch: &mut Scratch) -> Result<(), ChunkFail> {
    let buf = &mut scratch.read;
    buf.resize(task.len as usize, 0);
    let opened = &task.opened;
    if let Err(e) = opened.file.read_exact_at(buf, task.off) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ChunkFail::Shrank
        } else {
            ChunkFail::Error(ChunkError::io(
                Path::new(OsStr::from_bytes(&opened.path)),
                e,
            ))
        });
    }
    shared.counters.bytes_read.add(task.len);
    Ok(())
}

/// Hash the chunk read and, unless the store has it, compress it into
/// `new`.
fn process(
    shared: &Shared<'_>,
    known: &KnownSet,
    task: &ReadTask,
    scratch: &mut Scratch,
    new: &mut Blobs,
) -> Result<ChunkRef, ChunkFail> {
    let c = &shared.counters;
    let buf = &scratch.read;
    let chunk = |hash| ChunkRef {
        off: task.off,
        len: task.len,
        hash,
    };
    if buf.iter().all(|&b| b == 0) {
        c.chunks_empty.add(1);
        return Ok(chunk(None));
    }
    c.bytes_hashed.add(task.len);
    let hash = Id::of(buf);
    if known.contains(&hash) {
        c.chunks_reused.add(1);
        return Ok(chunk(Some(hash)));
    }
    let frame = &mut scratch.frame;
    frame.clear();
    frame.reserve(zstd::zstd_safe::compress_bound(buf.len()));
    scratch
        .compressor
        .compress_to_buffer(&buf[..], frame)
        .map_err(|e| ChunkFail::Error(ChunkError::Invalid(format!("compression failed: {e}"))))?;
    // Round trip before upload: a compressor bug must not become a backup
    // that cannot be restored. Comparing the bytes is cheaper than hashing
    // them again.
    let check = &mut scratch.check;
    check.clear();
    check.reserve(buf.len());
    scratch
        .decompressor
        .decompress_to_buffer(&frame[..], check)
        .map_err(|e| ChunkFail::Error(ChunkError::Invalid(format!("compression failed: {e}"))))?;
    if check[..] != buf[..] {
        return Err(ChunkFail::Error(ChunkError::Invalid(format!(
            "compression failed: the round trip of chunk {hash} differs"
        ))));
    }
    // A batch's first frame is moved, not copied: a large chunk goes
    // alone.
    if new.frames.is_empty() {
        std::mem::swap(&mut new.frames, frame);
    } else {
        new.frames.extend_from_slice(frame);
    }
    new.list.push((hash, task.len as u32, new.frames.len()));
    Ok(chunk(Some(hash)))
}
