//! The fetch stage: the batcher groups wanted chunks into ranged reads of
//! packs, and fetchers read them, check every chunk's hash and hand it to
//! the write stage. A pack that vanished under the restore (a GC moved its
//! chunks) is looked up again in a reloaded chunk map.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::write::{write_fetched, FileJob, Unwritten};
use super::{Shared, MAX_GAP, MAX_RANGE, MAX_READ_CHUNKS, WINDOW};
use crate::format::tree::ChunkRef;
use crate::map::ChunkMap;
use crate::plan::{coalesce, Need, ReadRange};
use crate::store::{Id, Kind, StoreError};
use crate::{with_retry, ChunkError};

/// A chunk some file needs from the store.
pub(super) struct Want<'a> {
    pub(super) job: Arc<FileJob<'a>>,
    pub(super) index: u64,
    pub(super) chunk: ChunkRef,
}

/// What the batcher receives.
pub(super) enum BatchMsg<'a> {
    Want(Want<'a>),
    Done,
}

/// One read for a fetcher: where, and who wants each chunk in it.
pub(super) struct Fetch<'a> {
    source: Source,
    chunks: Vec<FetchChunk<'a>>,
}

/// One chunk of a read, and everyone who wants it.
pub(super) struct FetchChunk<'a> {
    pub(super) hash: Id,
    /// Its length before compression.
    pub(super) raw_len: u64,
    /// Where its frame starts in the read.
    pub(super) at: u64,
    /// Its frame's length.
    pub(super) len: u64,
    pub(super) wants: Vec<Want<'a>>,
}

enum Source {
    /// A range of a pack (format 2).
    Range { pack: Id, start: u64, len: u64 },
    /// A whole chunk object (format 1).
    Object(Id),
}

/// Collect wanted chunks into windows and turn each into reads.
pub(super) fn batcher<'a>(shared: &Shared<'a>, rx: Receiver<BatchMsg<'a>>, tx: Sender<Fetch<'a>>) {
    let mut window: HashMap<Id, Vec<Want<'a>>> = HashMap::new();
    let (mut bytes, mut wants) = (0u64, 0usize);
    loop {
        let msg = rx.recv_timeout(Duration::from_millis(5));
        let flush = match msg {
            Ok(BatchMsg::Want(w)) => {
                if let Some(h) = w.chunk.hash {
                    bytes += w.chunk.len;
                    wants += 1;
                    window.entry(h).or_default().push(w);
                }
                bytes >= WINDOW || wants >= shared.window_wants
            }
            Err(RecvTimeoutError::Timeout) => !window.is_empty(),
            Ok(BatchMsg::Done) | Err(RecvTimeoutError::Disconnected) => {
                // Verifiers may still send: wait for them to hang up.
                if matches!(msg, Ok(BatchMsg::Done)) {
                    continue;
                }
                dispatch(shared, std::mem::take(&mut window), &tx);
                return;
            }
        };
        if flush {
            (bytes, wants) = (0, 0);
            if !dispatch(shared, std::mem::take(&mut window), &tx) {
                return;
            }
        }
    }
}

/// Turn a window of wanted chunks into reads. `false` if the fetchers are
/// gone.
fn dispatch<'a>(
    shared: &Shared<'a>,
    window: HashMap<Id, Vec<Want<'a>>>,
    tx: &Sender<Fetch<'a>>,
) -> bool {
    if window.is_empty() || shared.pipeline.aborted() {
        return !shared.pipeline.aborted();
    }
    let fetches = if shared.v1 {
        Ok(objects(window))
    } else {
        ranges(shared, window)
    };
    match fetches {
        Ok(fetches) => fetches.into_iter().all(|f| {
            shared.reads_left.fetch_add(1, Ordering::Relaxed);
            tx.send(f).is_ok()
        }),
        Err(e) => {
            shared.pipeline.fail(e);
            false
        }
    }
}

/// Format 1: one read per chunk object.
fn objects(window: HashMap<Id, Vec<Want<'_>>>) -> Vec<Fetch<'_>> {
    window
        .into_iter()
        .map(|(hash, wants)| Fetch {
            source: Source::Object(hash),
            chunks: vec![FetchChunk {
                hash,
                raw_len: wants[0].chunk.len,
                at: 0,
                len: 0,
                wants,
            }],
        })
        .collect()
}

/// Format 2: the chunks looked up in the chunk map and grouped into
/// ranged reads of their packs ([`coalesce`]).
fn ranges<'a>(
    shared: &Shared<'a>,
    window: HashMap<Id, Vec<Want<'a>>>,
) -> Result<Vec<Fetch<'a>>, ChunkError> {
    let guard = shared.map.read().unwrap_or_else(|p| p.into_inner());
    let map = &guard.map;
    let mut slots: Vec<Option<(Id, Vec<Want<'a>>)>> = Vec::with_capacity(window.len());
    let mut needs = Vec::with_capacity(window.len());
    for (hash, wants) in window {
        let Some(loc) = map.find(&hash) else {
            let w = &wants[0];
            return Err(ChunkError::Corrupt {
                path: w.job.entry.display().into_owned(),
                hash,
                off: w.chunk.off,
                detail: "missing from the store".into(),
            });
        };
        needs.push(Need {
            pack: loc.pack,
            offset: loc.offset,
            len: loc.stored_len,
            slot: slots.len(),
        });
        slots.push(Some((hash, wants)));
    }
    let reads: Vec<ReadRange> = coalesce(needs, MAX_GAP, MAX_RANGE, MAX_READ_CHUNKS);
    let packs: Vec<Id> = reads
        .iter()
        .map(|r| map.packs()[r.pack as usize].id)
        .collect();
    drop(guard);
    let fetches = reads.into_iter().zip(packs).map(|(r, pack)| {
        let chunks = r
            .needs
            .iter()
            .filter_map(|n| {
                let (hash, wants) = slots[n.slot].take()?;
                Some(FetchChunk {
                    hash,
                    raw_len: wants[0].chunk.len,
                    at: u64::from(n.offset) - r.start,
                    len: u64::from(n.len),
                    wants,
                })
            })
            .collect();
        Fetch {
            source: Source::Range {
                pack,
                start: r.start,
                len: r.end - r.start,
            },
            chunks,
        }
    });
    Ok(fetches.collect())
}

/// A fetcher's own decompression context and output buffer.
pub(super) struct Fetcher {
    dctx: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
}

impl Fetcher {
    pub(super) fn new() -> Result<Self, ChunkError> {
        let dctx = zstd::bulk::Decompressor::new()
            .map_err(|e| ChunkError::Invalid(format!("cannot start zstd: {e}")))?;
        Ok(Fetcher {
            dctx,
            out: Vec::new(),
        })
    }

    /// Make read `f` and write what it brings.
    pub(super) fn fetch<'a>(&mut self, shared: &Shared<'a>, f: Fetch<'a>) {
        if let Err(e) = fetch_one(shared, f, Missing::Relocate, &mut self.dctx, &mut self.out) {
            shared.pipeline.fail(e);
        }
        if shared.reads_left.fetch_sub(1, Ordering::Relaxed) == 1 {
            shared.checkpoint_now.notify_one();
        }
    }
}

/// Read `source` into `buf`, and write the chunks of `f` that it brings:
/// bytes that fail a chunk's hash are read again from another place where
/// the store has several ([`crate::store::Store::get_range_checked`]). A
/// store error is returned as such (`Ok(Err)`); a chunk that could not be
/// written, or whose bytes were wrong in every place, as the chunk error.
fn get_and_write<'a>(
    shared: &Shared<'a>,
    source: &Source,
    chunks: &mut VecDeque<FetchChunk<'a>>,
    buf: &mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<Result<(), StoreError>, ChunkError> {
    let store = shared.repo.store();
    let _req = shared.opts.progress.request();
    if let (Some(t), Source::Range { len, .. }) = (&shared.throttle, source) {
        t.take(*len);
    }
    // The first failure to write, and whether it was the bytes' fault.
    let mut unwritten: Option<Unwritten> = None;
    shared.counters.requests.add(1);
    let read = with_retry(store, || {
        match *source {
            Source::Range { pack, start, len } => {
                let mut check = |data: &[u8]| {
                    shared.counters.bytes_downloaded.add(data.len() as u64);
                    match write_fetched(shared, chunks, false, data, dctx, out) {
                        Ok(()) => Ok(()),
                        Err(Unwritten::Bytes(e)) => {
                            let why = e.to_string();
                            unwritten = Some(Unwritten::Bytes(e));
                            Err(why)
                        }
                        // Not the bytes' fault: no other copy helps.
                        Err(Unwritten::Local(e)) => {
                            unwritten = Some(Unwritten::Local(e));
                            Ok(())
                        }
                    }
                };
                store.get_range_checked(Kind::Pack, &pack, start, len, buf, &mut check)
            }
            Source::Object(id) => store.get(Kind::Chunk, &id).map(|data| {
                buf.clear();
                buf.extend_from_slice(&data);
            }),
        }
    });
    if let Source::Object(_) = source {
        if read.is_ok() {
            shared.counters.bytes_downloaded.add(buf.len() as u64);
            if let Err(Unwritten::Bytes(e) | Unwritten::Local(e)) =
                write_fetched(shared, chunks, true, buf, dctx, out)
            {
                return Err(e);
            }
        }
    }
    match (read, unwritten) {
        (_, Some(Unwritten::Local(e))) => Err(e),
        (Err(StoreError::Refused { .. }), Some(Unwritten::Bytes(e))) => Err(e),
        (read, _) => Ok(read),
    }
}

/// What a read does when its object is gone from the store.
#[derive(Clone, Copy)]
enum Missing {
    /// Reload the chunk map and read each chunk from wherever it now is
    /// (a GC repacked it); format 1 objects never move, so they fail.
    Relocate,
    /// Fail, saying this.
    Fail(&'static str),
}

fn fetch_one<'a>(
    shared: &Shared<'a>,
    f: Fetch<'a>,
    missing: Missing,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let want = match f.source {
        Source::Range { len, .. } => len,
        Source::Object(_) => shared.chunk_size,
    };
    let Some(permit) = shared.in_flight.take(want) else {
        return Err(ChunkError::Aborted);
    };
    let mut data = shared.buffers.take();
    let mut chunks: VecDeque<FetchChunk<'a>> = f.chunks.into();
    let read = get_and_write(shared, &f.source, &mut chunks, &mut data, dctx, out);
    shared.buffers.give(data);
    let e = match read? {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let Some(FetchChunk { hash, wants, .. }) = chunks.front() else {
        return Ok(());
    };
    match (e, missing) {
        (StoreError::NotFound(_), Missing::Relocate) if !shared.v1 => {
            // Its own reads take from the budget again.
            drop(permit);
            let rest = Fetch {
                source: f.source,
                chunks: chunks.into(),
            };
            refetch(shared, rest, dctx, out)
        }
        (StoreError::NotFound(_), missing) => Err(ChunkError::Corrupt {
            path: wants[0].job.entry.display().into_owned(),
            hash: *hash,
            off: wants[0].chunk.off,
            detail: match missing {
                Missing::Fail(detail) => detail.into(),
                Missing::Relocate => "missing from the store".into(),
            },
        }),
        (e, _) => Err(ChunkError::store(
            format!(
                "file {}: fetching chunk {hash}",
                wants[0].job.entry.display()
            ),
            e,
        )),
    }
}

/// A pack vanished under the restore (a GC moved its chunks; a restore
/// without a lease cannot prevent that): reload the chunk map once, and
/// fetch each chunk from wherever it is now.
fn refetch<'a>(
    shared: &Shared<'a>,
    f: Fetch<'a>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    {
        let before = shared
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        let mut m = shared.map.write().unwrap_or_else(|p| p.into_inner());
        if m.generation == before {
            let repo = shared.repo;
            m.map = ChunkMap::load(repo.store(), repo.cache(), repo.metadata_connections())?;
            m.generation += 1;
        }
    }
    for chunk in f.chunks {
        let place = {
            let m = shared.map.read().unwrap_or_else(|p| p.into_inner());
            m.map
                .find(&chunk.hash)
                .map(|l| (m.map.packs()[l.pack as usize].id, l.offset, l.stored_len))
        };
        let Some((pack, offset, len)) = place else {
            let w = &chunk.wants[0];
            return Err(ChunkError::Corrupt {
                path: w.job.entry.display().into_owned(),
                hash: chunk.hash,
                off: w.chunk.off,
                detail: "missing from the store".into(),
            });
        };
        let single = Fetch {
            source: Source::Range {
                pack,
                start: u64::from(offset),
                len: u64::from(len),
            },
            chunks: vec![FetchChunk {
                at: 0,
                len: u64::from(len),
                ..chunk
            }],
        };
        fetch_one(
            shared,
            single,
            Missing::Fail("missing from the store (its pack disappeared twice)"),
            dctx,
            out,
        )?;
    }
    Ok(())
}
