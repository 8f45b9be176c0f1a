//! The verify stage: a chunk that may already be right locally is read
//! and hashed; only one that differs goes on to be fetched.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crossbeam_channel::Sender;

use super::fetch::{BatchMsg, Want};
use super::Shared;
use crate::store::Id;
use crate::ChunkError;

/// Check `w` against the local bytes (`buf` is the worker's): done if
/// they match, else on to the batcher.
pub(super) fn verify<'a>(
    shared: &Shared<'a>,
    buf: &mut Vec<u8>,
    w: Want<'a>,
    tx: &Sender<BatchMsg<'a>>,
) {
    let c = w.chunk;
    // Only the part that existed before the resize can match.
    let local_len = c.len.min(w.job.local_size.saturating_sub(c.off));
    buf.resize(c.len as usize, 0);
    if let Err(e) = w
        .job
        .file
        .read_exact_at(&mut buf[..local_len as usize], c.off)
    {
        shared
            .pipeline
            .fail(ChunkError::io(Path::new(&*w.job.entry.display()), e));
        return;
    }
    buf[local_len as usize..].fill(0);
    shared.counters.bytes_verified.add(local_len);
    if c.hash == Some(Id::of(buf)) {
        shared.counters.chunks_reused.add(1);
        shared.chunk_done(&w.job, w.index, c.len);
    } else {
        // A closed batcher means the pipeline is stopping.
        let _ = tx.send(BatchMsg::Want(w));
    }
}
