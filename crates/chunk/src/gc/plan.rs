//! The pure half of GC: from what the backups present reference and what
//! the store holds, what is dead, what is worth repacking, and which marks
//! are due. Decisions with their inputs, no store calls, no clock.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Mark, REPACK_BELOW};
use crate::cache::Cache;
use crate::format::head::Decoded;
use crate::format::tree::Item;
use crate::map::ChunkMap;
use crate::store::{Id, Marker, Store};
use crate::{inventory, ChunkError};

/// Which chunks, segments and v1 chunks the backups present reference.
pub struct Liveness {
    /// Per chunk map entry: referenced.
    pub live: Vec<bool>,
    /// Segments listed by a head.
    pub trees: HashSet<Id>,
    /// Version 1 chunks referenced.
    pub v1: HashSet<Id>,
    /// Indexes that could not be read.
    pub unreadable: Vec<String>,
    /// Indexes read.
    pub indexes: u64,
}

/// Read every backup and mark what it references.
pub fn liveness(
    store: &dyn Store,
    cache: Option<&Cache>,
    map: &ChunkMap,
    connections: usize,
) -> Result<Liveness, ChunkError> {
    let mut l = Liveness {
        live: vec![false; map.entries().len()],
        trees: HashSet::new(),
        v1: HashSet::new(),
        unreadable: Vec::new(),
        indexes: 0,
    };
    for name in inventory::list_backups(store, None)? {
        let name = name.to_string();
        let idx = match inventory::read_index(store, &name) {
            Ok(i) => i,
            // Forgotten since the listing (a retention prune beside us):
            // it references nothing any more.
            Err(ChunkError::NoBackup(_)) => continue,
            Err(e @ ChunkError::Index(_)) => {
                l.indexes += 1;
                l.unreadable.push(e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        l.indexes += 1;
        if let Decoded::V2(h) = &idx {
            l.trees.extend(h.trees.iter().copied());
        }
        let v1 = matches!(idx, Decoded::V1(_));
        let mut entries = inventory::entries(store, cache, &name, &idx, connections);
        loop {
            match entries.next_item() {
                Ok(Some(Item::Chunks(chunks))) => {
                    for h in chunks.iter().filter_map(|c| c.hash) {
                        if v1 {
                            l.v1.insert(h);
                        } else if let Some(i) = map.position(&h) {
                            l.live[i] = true;
                        }
                    }
                }
                Ok(Some(Item::Entry(_))) => {}
                Ok(None) => break,
                Err(e @ (ChunkError::Index(_) | ChunkError::Format(_))) => {
                    l.unreadable.push(e.to_string());
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(l)
}

/// What the store holds, for [`plan`].
pub struct Holdings<'a> {
    /// The chunk map.
    pub map: &'a ChunkMap,
    /// Tree segments in the store.
    pub trees: &'a [Id],
    /// Version 1 chunks in the store.
    pub v1_chunks: &'a [Id],
    /// Packs named in the pending list of an expired lease.
    pub pending_of_dead: &'a [Id],
}

/// What is dead, or worth repacking, given what the backups reference.
pub fn plan(h: &Holdings<'_>, l: &Liveness) -> Mark {
    let packs = h.map.packs();
    let mut live_bytes = vec![0u64; packs.len()];
    let mut any = vec![false; packs.len()];
    for (e, &live) in h.map.entries().iter().zip(&l.live) {
        any[e.pack as usize] = true;
        if live {
            live_bytes[e.pack as usize] += u64::from(e.stored_len);
        }
    }
    let mut mark = Mark {
        version: 2,
        ..Mark::default()
    };
    for (n, p) in packs.iter().enumerate() {
        if live_bytes[n] == 0 {
            mark.packs.push(p.id);
        } else if any[n] && (live_bytes[n] as f64) < REPACK_BELOW * p.len as f64 {
            mark.repack.push(p.id);
        }
    }
    mark.orphans = h
        .pending_of_dead
        .iter()
        .filter(|id| h.map.pack_number(id).is_none())
        .copied()
        .collect();
    mark.trees = h
        .trees
        .iter()
        .filter(|t| !l.trees.contains(t))
        .copied()
        .collect();
    mark.chunks = h
        .v1_chunks
        .iter()
        .filter(|c| !l.v1.contains(c))
        .copied()
        .collect();
    for v in [
        &mut mark.packs,
        &mut mark.repack,
        &mut mark.orphans,
        &mut mark.trees,
        &mut mark.chunks,
    ] {
        v.sort_unstable();
        v.dedup();
    }
    mark
}

/// Marks whose grace period has ended at store time `now`.
pub fn plan_sweep(marks: &[Marker], now: DateTime<Utc>, grace: Duration) -> Vec<&Marker> {
    marks
        .iter()
        .filter(|m| (now - m.modified).to_std().is_ok_and(|age| age >= grace))
        .collect()
}
