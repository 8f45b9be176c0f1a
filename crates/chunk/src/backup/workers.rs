//! The worker stage: read a chunk, skip it if all zeros, hash it, and
//! unless the store has it, compress it, check the round trip and pass it
//! to the packer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;

use super::planner::ReadTask;
use super::writer::{ChunkFail, Msg};
use super::Shared;
use crate::format::tree::ChunkRef;
use crate::map::KnownSet;
use crate::store::Id;
use crate::ChunkError;

/// A new chunk for the packer.
pub(super) struct Blob {
    pub(super) hash: Id,
    pub(super) raw_len: u32,
    pub(super) frame: Vec<u8>,
}

/// A worker's reusable buffers and zstd contexts: allocating a
/// chunk-sized buffer or a zstd context per chunk costs page faults and,
/// with the allocator set to return freed pages at once, an madvise and the
/// TLB shootdown that follows it, for every chunk. On a tree of 100,000
/// small files that was a third of the backup's CPU time.
pub(super) struct Scratch {
    read: Vec<u8>,
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
            check: Vec::new(),
            compressor,
            decompressor,
        })
    }
}

/// Work one chunk and tell the writer how it went.
pub(super) fn work(
    shared: &Shared<'_>,
    known: &KnownSet,
    scratch: &mut Scratch,
    task: ReadTask,
    blobs: &Sender<Blob>,
    msgs: &Sender<Msg>,
) {
    if let Some(t) = &shared.throttle {
        t.take(task.len);
    }
    let result = process(shared, known, &task, scratch, blobs);
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
    let _ = msgs.send(Msg::Chunk {
        id: task.id,
        attempt: task.attempt,
        index: task.index,
        result,
    });
}

fn process(
    shared: &Shared<'_>,
    known: &KnownSet,
    task: &ReadTask,
    scratch: &mut Scratch,
    blobs: &Sender<Blob>,
) -> Result<ChunkRef, ChunkFail> {
    let c = &shared.counters;
    let buf = &mut scratch.read;
    buf.resize(task.len as usize, 0);
    if let Err(e) = task.file.read_exact_at(buf, task.off) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ChunkFail::Shrank
        } else {
            ChunkFail::Error(ChunkError::io(Path::new(OsStr::from_bytes(&task.path)), e))
        });
    }
    c.bytes_read.add(task.len);
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
    let mut frame = shared.frames.take();
    frame.reserve(zstd::zstd_safe::compress_bound(buf.len()));
    scratch
        .compressor
        .compress_to_buffer(&buf[..], &mut frame)
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
    blobs
        .send(Blob {
            hash,
            raw_len: task.len as u32,
            frame,
        })
        .map_err(|_| ChunkFail::Error(ChunkError::Aborted))?;
    Ok(chunk(Some(hash)))
}
