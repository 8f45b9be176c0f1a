//! Where chunks come from: the store, through the chunk map, in ranged
//! reads of packs, every chunk checked against its hash before a byte of it
//! is used.
//!
//! On-demand reads and background hydration both come here. They differ
//! only in how reads are grouped (a reader wants its few chunks now; the
//! hydrator wants many in few requests) and in how long they may wait.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use btm_chunk::format::pack::{open_frame, FrameError};
use btm_chunk::map::ChunkMap;
use btm_chunk::plan::{coalesce, Need};
use btm_chunk::store::{Id, Kind, RetryPolicy, Store, StoreError};
use btm_chunk::Repo;

/// A chunk wanted from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// Its hash.
    pub hash: Id,
    /// Its length before compression.
    pub raw_len: u64,
}

/// One request to the store and the chunks it brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// What is read.
    pub object: Object,
    /// The chunks in it: the caller's index, where its frame starts in
    /// the read, and the frame's length.
    pub chunks: Vec<InRead>,
}

/// The object a read reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    /// `len` bytes of a pack from `start` (format 2).
    Range {
        /// The pack.
        pack: Id,
        /// First byte.
        start: u64,
        /// Bytes.
        len: u64,
    },
    /// One chunk object (format 1).
    Chunk(Id),
}

/// One chunk of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InRead {
    /// Index into the caller's list of wanted chunks.
    pub slot: usize,
    /// Where its frame starts in the read (0 for a chunk object).
    pub at: u64,
    /// The frame's length (the whole read for a chunk object).
    pub len: u64,
}

/// Why a chunk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The store failed (and retrying may help).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store does not hold it.
    #[error("chunk {0} is missing from the store")]
    Missing(Id),
    /// Its bytes do not match its hash.
    #[error("chunk {hash} is corrupt: {why}")]
    Corrupt {
        /// The chunk.
        hash: Id,
        /// What is wrong.
        why: FrameError,
    },
    /// The chunk map could not be loaded again.
    #[error("cannot reload the chunk map")]
    Reload(#[source] btm_chunk::ChunkError),
    /// The fetched chunk could not be written to its backing file.
    #[error("cannot write the backing file")]
    Write(#[source] std::io::Error),
    /// No decompression context.
    #[error("cannot start zstd")]
    Zstd(#[source] std::io::Error),
    /// Waited as long as allowed.
    #[error("the store did not deliver within {0:?}")]
    TimedOut(Duration),
}

/// The store and where each chunk is in it.
pub struct Source {
    repo: Repo,
    map: RwLock<ChunkMap>,
    v1: bool,
}

impl Source {
    /// Chunks of `repo`, located by `map`; `v1` for a format 1 backup
    /// (one object per chunk, no map).
    pub fn new(repo: Repo, map: ChunkMap, v1: bool) -> Self {
        Source {
            repo,
            map: RwLock::new(map),
            v1,
        }
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.repo.store()
    }

    /// Ranged reads that bring `wanted`, frames of one pack at most
    /// `max_gap` apart sharing a read of at most `max_len` bytes and at
    /// most `max_chunks` chunks ([`coalesce`]).
    pub fn plan(
        &self,
        wanted: &[Wanted],
        max_gap: u64,
        max_len: u64,
        max_chunks: usize,
    ) -> Result<Vec<Read>, SourceError> {
        if self.v1 {
            return Ok(wanted
                .iter()
                .enumerate()
                .map(|(slot, w)| Read {
                    object: Object::Chunk(w.hash),
                    chunks: vec![InRead {
                        slot,
                        at: 0,
                        len: 0,
                    }],
                })
                .collect());
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut needs = Vec::with_capacity(wanted.len());
        for (slot, w) in wanted.iter().enumerate() {
            let loc = map.find(&w.hash).ok_or(SourceError::Missing(w.hash))?;
            needs.push(Need {
                pack: loc.pack,
                offset: loc.offset,
                len: loc.stored_len,
                slot,
            });
        }
        Ok(coalesce(needs, max_gap, max_len, max_chunks)
            .into_iter()
            .map(|r| Read {
                object: Object::Range {
                    pack: map.packs()[r.pack as usize].id,
                    start: r.start,
                    len: r.end - r.start,
                },
                chunks: r
                    .needs
                    .iter()
                    .map(|n| InRead {
                        slot: n.slot,
                        at: u64::from(n.offset) - r.start,
                        len: u64::from(n.len),
                    })
                    .collect(),
            })
            .collect())
    }

    /// Make `read` once into `buf`.
    pub fn get(&self, read: &Read, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let store = self.repo.store();
        match read.object {
            Object::Range { pack, start, len } => {
                store.get_range_into(Kind::Pack, &pack, start, len, buf)
            }
            Object::Chunk(id) => store.get(Kind::Chunk, &id).map(|data| {
                buf.clear();
                buf.extend_from_slice(&data);
            }),
        }
    }

    /// Make `read` into `buf` under the store's one retry policy, giving
    /// up early rather than wait past `deadline` (a node waiting on it).
    /// A pack that is gone (a GC repacked its chunks) reloads the map once
    /// and fails with [`SourceError::Missing`]: the caller plans again.
    pub fn get_until(
        &self,
        read: &Read,
        buf: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(), SourceError> {
        let policy = self.repo.store().retry_policy();
        match policy.run_until(deadline, || self.get(read, buf)) {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound(_)) => {
                self.reload()?;
                let hash = match read.object {
                    Object::Chunk(h) => h,
                    Object::Range { pack, .. } => pack,
                };
                Err(SourceError::Missing(hash))
            }
            Err(e) => Err(SourceError::Store(e)),
        }
    }

    /// Load the chunk map again (chunks moved under us).
    pub fn reload(&self) -> Result<(), SourceError> {
        if self.v1 {
            return Ok(());
        }
        let repo = &self.repo;
        let map = ChunkMap::load(repo.store(), repo.cache(), repo.metadata_connections())
            .map_err(SourceError::Reload)?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// The chunk `w` from `frame` (a whole chunk object for format 1),
    /// decompressed into `out` and checked.
    pub fn open(
        &self,
        w: &Wanted,
        frame: &[u8],
        dctx: &mut zstd::bulk::Decompressor<'static>,
        out: &mut Vec<u8>,
    ) -> Result<(), SourceError> {
        open_frame(frame, &w.hash, w.raw_len, dctx, out)
            .map_err(|why| SourceError::Corrupt { hash: w.hash, why })
    }

    /// How calls to the store are tried again.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.repo.store().retry_policy()
    }

    /// Read connections for background hydration.
    pub fn connections(&self) -> usize {
        self.repo.read_connections()
    }
}

/// The frame of `c` in the bytes of its read.
pub fn frame<'d>(data: &'d [u8], read: &Read, c: &InRead) -> &'d [u8] {
    match read.object {
        Object::Chunk(_) => data,
        Object::Range { .. } => data
            .get(c.at as usize..(c.at + c.len) as usize)
            .unwrap_or(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use btm_chunk::store::{Fault, MemStore, Request};

    /// A read the store keeps failing: through hydration (no deadline) it
    /// makes the policy's attempts, once; for a node waiting on it, no
    /// more than its deadline allows.
    #[test]
    fn a_failing_read_makes_the_policys_attempts_once() {
        let store = MemStore::new();
        let repo = Repo::new(std::sync::Arc::new(store.clone())).with_cache(None);
        let map = ChunkMap::load(&store, None, 1).expect("empty map");
        let source = Source::new(repo, map, false);
        let read = Read {
            object: Object::Range {
                pack: Id::of(b"a pack"),
                start: 0,
                len: 10,
            },
            chunks: Vec::new(),
        };
        store.inject(Request::Get(Kind::Pack), 1, u64::MAX, Fault::Fail);
        let mut buf = Vec::new();
        let e = source
            .get_until(&read, &mut buf, None)
            .expect_err("must fail");
        assert!(
            matches!(e, SourceError::Store(StoreError::Temporary { .. })),
            "{e}"
        );
        let attempts = u64::from(RetryPolicy::ATTEMPTS);
        assert_eq!(store.faulted(), attempts);
        let soon = Instant::now() + Duration::from_micros(1);
        source
            .get_until(&read, &mut buf, Some(soon))
            .expect_err("must fail");
        assert_eq!(store.faulted(), attempts + 1);
    }
}
