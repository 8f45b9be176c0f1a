//! The chunk map: the union of the store's pack indexes, which says what
//! the store holds and where. A backup needs only the set of chunk hashes
//! ([`KnownSet`], 32 bytes a chunk); a restore, check and GC need each
//! chunk's pack and byte range ([`ChunkMap`], 48 bytes a chunk). Both are
//! sorted arrays, not hash maps: at two million chunks that is the
//! difference between 64 MiB and several hundred.
//!
//! A lookup first reads a fan-out table (`Fanout`) by the hash's first
//! bits, then searches the few entries under it: a binary search of the
//! whole array would miss the cache at each of its last dozen steps, and
//! a restore looks up every chunk twice (proof, then reads).
//!
//! Pack indexes are listed (one object per backup or GC, never one per
//! chunk or pack), read from the local cache when there, fetched
//! `connections` at a time otherwise, and decoded one batch at a time.

use std::collections::HashMap;

use super::cache::Cache;
use super::format::packidx::{self, PackEntry};
use super::{with_retry, ChunkError};
use crate::store::{Id, Kind, Store};

/// A pack the map knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackInfo {
    /// Its id.
    pub id: Id,
    /// Its length in bytes.
    pub len: u64,
}

/// Where a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The chunk's hash.
    pub hash: Id,
    /// Its pack: an index into [`ChunkMap::packs`].
    pub pack: u32,
    /// Offset of its frame in the pack.
    pub offset: u32,
    /// Length of the frame.
    pub stored_len: u32,
    /// Length of the chunk.
    pub raw_len: u32,
}

/// Every chunk in the store with one location each (any location of a
/// chunk stored twice is valid), and the pack indexes it came from.
#[derive(Debug, Default)]
pub struct ChunkMap {
    packs: Vec<PackInfo>,
    entries: Vec<Located>,
    fanout: Fanout,
    files: Vec<(Id, Vec<u32>)>,
    numbers: HashMap<Id, u32>,
}

/// The hashes of every chunk in the store.
#[derive(Debug, Default)]
pub struct KnownSet {
    hashes: Vec<Id>,
    fanout: Fanout,
}

impl KnownSet {
    /// Whether the store holds `hash`.
    pub fn contains(&self, hash: &Id) -> bool {
        self.hashes
            .get(self.fanout.bucket(hash))
            .is_some_and(|b| b.binary_search_by(|h| h.cmp_fast(hash)).is_ok())
    }

    /// How many chunks.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// Where the entries of a sorted array of hashes begin for each value of
/// the hashes' first `bits` bits: bucket `b` is `starts[b]..starts[b + 1]`.
/// Hashes are uniform, so a bucket holds about eight entries; the table is
/// at most 2^17 buckets (1 MiB), beside the map's 48 bytes a chunk.
#[derive(Debug, Default)]
struct Fanout {
    /// 64 minus the bits used: a hash's bucket is its prefix shifted by it.
    shift: u32,
    /// One more than the buckets; empty for an empty array.
    starts: Vec<usize>,
}

impl Fanout {
    /// The table for `n` sorted hashes whose `i`th prefix
    /// ([`Id::prefix`]) is `prefix(i)`.
    fn new(n: usize, prefix: impl Fn(usize) -> u64) -> Fanout {
        if n == 0 {
            return Fanout::default();
        }
        let bits = (usize::BITS - n.leading_zeros()).saturating_sub(3).min(17);
        let shift = 64 - bits;
        let mut starts = vec![0usize; (1 << bits) + 1];
        for i in 0..n {
            starts[Self::index(shift, prefix(i)) + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        Fanout { shift, starts }
    }

    /// The bucket of a prefix (`u64 >> 64` would overflow: no bits, one
    /// bucket).
    fn index(shift: u32, prefix: u64) -> usize {
        prefix.checked_shr(shift).unwrap_or(0) as usize
    }

    /// The range of the array where `hash` is, if anywhere.
    fn bucket(&self, hash: &Id) -> std::ops::Range<usize> {
        let b = Self::index(self.shift, hash.prefix());
        match (self.starts.get(b), self.starts.get(b + 1)) {
            (Some(&start), Some(&end)) => start..end,
            _ => 0..0,
        }
    }
}

/// Call `f` with every pack index in the store, `connections` fetches at a
/// time, in batches so that only one batch is in memory at once.
fn each_pack_index(
    store: &dyn Store,
    cache: Option<&Cache>,
    connections: usize,
    f: impl FnMut(Id, Vec<PackEntry>),
) -> Result<(), ChunkError> {
    let ids = list_pack_indexes(store)?;
    each_listed_pack_index(store, cache, connections, ids, f, |_, e| Err(e))
}

/// The ids of every pack index in `store`, sorted.
pub fn list_pack_indexes(store: &dyn Store) -> Result<Vec<Id>, ChunkError> {
    let mut ids: Vec<Id> = with_retry(store, || store.list(Kind::PackIndex))
        .map_err(|e| ChunkError::store("listing pack indexes", e))?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// [`each_pack_index`] over the pack indexes `ids`, listed earlier, with
/// `bad` deciding what an unreadable pack index means: `Ok(())` to go on
/// without it, or the error.
fn each_listed_pack_index(
    store: &dyn Store,
    cache: Option<&Cache>,
    connections: usize,
    ids: Vec<Id>,
    mut f: impl FnMut(Id, Vec<PackEntry>),
    mut bad: impl FnMut(Id, ChunkError) -> Result<(), ChunkError>,
) -> Result<(), ChunkError> {
    let batch = connections.max(1) * 4;
    for part in ids.chunks(batch) {
        let fetched = crate::pipeline::pool::map(
            part,
            connections,
            |id| -> Result<crate::store::Bytes, ChunkError> {
                if let Some(data) = cache.and_then(|c| c.get(Kind::PackIndex, id)) {
                    return Ok(data);
                }
                let data = with_retry(store, || store.get(Kind::PackIndex, id))
                    .map_err(|e| ChunkError::store(format!("reading pack index {id}"), e))?;
                if Id::of(&data) != *id {
                    return Err(ChunkError::Format(super::format::FormatError::new(
                        format!("pack index {id}"),
                        "content does not match its name",
                    )));
                }
                if let Some(c) = cache {
                    c.put(Kind::PackIndex, id, &data);
                }
                Ok(data)
            },
        );
        for (id, data) in part.iter().zip(fetched) {
            let decoded = data.and_then(|d| Ok(packidx::decode(&d, &format!("pack index {id}"))?));
            match decoded {
                Ok(packs) => f(*id, packs),
                Err(e @ (ChunkError::Format(_) | ChunkError::Store { .. })) => bad(*id, e)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl ChunkMap {
    /// Load the map from every pack index in `store`.
    pub fn load(
        store: &dyn Store,
        cache: Option<&Cache>,
        connections: usize,
    ) -> Result<ChunkMap, ChunkError> {
        Self::load_or(store, cache, connections, |_, e| Err(e))
    }

    /// [`ChunkMap::load`], with `bad` deciding about an unreadable pack
    /// index (`check` reports it and goes on).
    pub fn load_or(
        store: &dyn Store,
        cache: Option<&Cache>,
        connections: usize,
        bad: impl FnMut(Id, ChunkError) -> Result<(), ChunkError>,
    ) -> Result<ChunkMap, ChunkError> {
        Self::load_listed_or(store, cache, connections, list_pack_indexes(store)?, bad)
    }

    /// [`ChunkMap::load_or`] from the pack indexes `ids`, listed earlier
    /// ([`list_pack_indexes`]): what a listing that old can miss is the
    /// caller's to judge.
    pub fn load_listed_or(
        store: &dyn Store,
        cache: Option<&Cache>,
        connections: usize,
        ids: Vec<Id>,
        bad: impl FnMut(Id, ChunkError) -> Result<(), ChunkError>,
    ) -> Result<ChunkMap, ChunkError> {
        let mut map = ChunkMap::default();
        each_listed_pack_index(
            store,
            cache,
            connections,
            ids,
            |file, packs| map.add(file, packs),
            bad,
        )?;
        map.seal();
        Ok(map)
    }

    /// A map of the given pack indexes (`(id, packs)` each), as if loaded
    /// from a store holding them.
    pub fn from_pack_indexes(files: Vec<(Id, Vec<PackEntry>)>) -> ChunkMap {
        let mut map = ChunkMap::default();
        for (id, packs) in files {
            map.add(id, packs);
        }
        map.seal();
        map
    }

    fn add(&mut self, file: Id, packs: Vec<PackEntry>) {
        let mut listed = Vec::with_capacity(packs.len());
        for p in packs {
            let n = self.number(p.id, p.len);
            listed.push(n);
            self.entries.extend(p.blobs.iter().map(|b| Located {
                hash: b.hash,
                pack: n,
                offset: b.offset,
                stored_len: b.stored_len,
                raw_len: b.raw_len,
            }));
        }
        self.files.push((file, listed));
    }

    /// Sort by hash and keep one location per chunk: the lowest pack
    /// number and offset, so the choice depends only on the input. (An
    /// unstable sort: a stable one would allocate half the array again.)
    fn seal(&mut self) {
        self.entries
            .sort_unstable_by_key(|e| (e.hash, e.pack, e.offset));
        self.entries.dedup_by_key(|e| e.hash);
        self.entries.shrink_to_fit();
        self.fanout = Fanout::new(self.entries.len(), |i| self.entries[i].hash.prefix());
    }

    fn number(&mut self, id: Id, len: u64) -> u32 {
        if let Some(&n) = self.numbers.get(&id) {
            return n;
        }
        let n = self.packs.len() as u32;
        self.packs.push(PackInfo { id, len });
        self.numbers.insert(id, n);
        n
    }

    /// Where `hash` is, if the store has it.
    pub fn find(&self, hash: &Id) -> Option<&Located> {
        self.position(hash).map(|i| &self.entries[i])
    }

    /// The index of `hash` in [`ChunkMap::entries`].
    pub fn position(&self, hash: &Id) -> Option<usize> {
        let bucket = self.fanout.bucket(hash);
        let base = bucket.start;
        let within = self.entries.get(bucket)?;
        within
            .binary_search_by(|e| e.hash.cmp_fast(hash))
            .ok()
            .map(|i| base + i)
    }

    /// Every chunk, sorted by hash.
    pub fn entries(&self) -> &[Located] {
        &self.entries
    }

    /// Every pack, by number.
    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// The number of the pack with `id`.
    pub fn pack_number(&self, id: &Id) -> Option<u32> {
        self.numbers.get(id).copied()
    }

    /// The pack indexes loaded, each with the numbers of the packs it lists.
    pub fn files(&self) -> &[(Id, Vec<u32>)] {
        &self.files
    }
}

impl KnownSet {
    /// Load the hashes of every chunk in `store`.
    pub fn load(
        store: &dyn Store,
        cache: Option<&Cache>,
        connections: usize,
    ) -> Result<KnownSet, ChunkError> {
        let mut hashes = Vec::new();
        each_pack_index(store, cache, connections, |_, packs| {
            for p in packs {
                hashes.extend(p.blobs.iter().map(|b| b.hash));
            }
        })?;
        hashes.sort_unstable();
        hashes.dedup();
        hashes.shrink_to_fit();
        let fanout = Fanout::new(hashes.len(), |i| hashes[i].prefix());
        Ok(KnownSet { hashes, fanout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Through the fan-out, every hash in the array is found where it
        /// is and no other is, at every size (none, one, uneven buckets).
        #[test]
        fn the_fanout_finds_what_a_search_of_the_whole_array_finds(
            seeds in prop::collection::vec(any::<u64>(), 0..300),
            others in prop::collection::vec(any::<u64>(), 0..50),
            clustered in any::<bool>(),
        ) {
            // Clustered hashes share their first bytes: most buckets empty.
            let id = |s: u64| {
                let mut id = Id::of(&s.to_le_bytes());
                if clustered {
                    id.0[..2].copy_from_slice(&[0x7f, 0xff]);
                }
                id
            };
            let mut hashes: Vec<Id> = seeds.iter().map(|&s| id(s)).collect();
            hashes.sort_unstable();
            hashes.dedup();
            let fanout = Fanout::new(hashes.len(), |i| hashes[i].prefix());
            let set = KnownSet { hashes: hashes.clone(), fanout };
            let located = |h: &Id| Located { hash: *h, pack: 0, offset: 0, stored_len: 1, raw_len: 1 };
            let map = ChunkMap::from_pack_indexes(vec![(
                Id::of(b"index"),
                vec![PackEntry {
                    id: Id::of(b"pack"),
                    len: 1,
                    blobs: hashes.iter().map(|h| crate::format::pack::Blob { hash: *h, offset: 0, stored_len: 1, raw_len: 1 }).collect(),
                }],
            )]);
            for (i, h) in hashes.iter().enumerate() {
                prop_assert!(set.contains(h));
                prop_assert_eq!(map.position(h), Some(i));
                prop_assert_eq!(map.find(h), Some(&located(h)));
            }
            for h in others.iter().map(|&s| id(s ^ 0x5555)) {
                let there = hashes.binary_search(&h).ok();
                prop_assert_eq!(set.contains(&h), there.is_some());
                prop_assert_eq!(map.position(&h), there);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A map of pack indexes given directly.
    pub fn map_of(files: Vec<Vec<PackEntry>>) -> ChunkMap {
        ChunkMap::from_pack_indexes(
            files
                .into_iter()
                .enumerate()
                .map(|(i, p)| (Id::of(&(i as u64).to_le_bytes()), p))
                .collect(),
        )
    }
}
