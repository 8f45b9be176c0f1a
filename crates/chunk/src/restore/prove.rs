//! Before a restore changes anything: prove that the backup can be
//! restored whole.
//!
//! `docs/format.md` promises that a reader refuses a damaged backup before
//! anything is written. A restore streams the backup's entries in bounded
//! memory, fetching tree segments a few ahead, so without this pass a
//! segment missing near the end was found only after thousands of files
//! had been updated: the node's directory was left half at one height and
//! half at another, and running the restore again could never finish it.
//!
//! So the entries are read twice. First here: every tree segment fetched
//! (and so cached) and validated as one stream, the totals checked against
//! the head, and every chunk the entries reference looked up where the
//! restore will fetch it from. Then again by the restore itself, from the
//! cache. What it costs is decoding the tree once more; the chunks are
//! never read here.
//!
//! The chunk map the proof looks chunks up in is loaded here too
//! ([`load_and_prove`]), for a restore from the pack indexes it listed
//! beside its lease: the proof is also what says whether that listing
//! can be trusted.

use std::collections::HashSet;

use super::super::format::head::Decoded;
use super::super::format::tree::Item;
use super::super::inventory::{self, Entries};
use super::super::map::ChunkMap;
use super::super::{with_retry, ChunkError, Repo};
use crate::store::{Id, Kind, Store};

/// The chunk map, and proof that the store holds everything the backup
/// needs, before anything local is touched. A live restore calls it before
/// it mounts anything; a restore calls it before it writes anything.
pub fn load_and_prove(repo: &Repo, name: &str, index: &Decoded) -> Result<ChunkMap, ChunkError> {
    load_and_prove_listed(repo, name, index, None)
}

/// [`load_and_prove`], the map loaded from the pack indexes `listed`
/// before the lease was taken, if given. That listing may miss what a
/// sweep ending meanwhile wrote (`docs/format.md`, "Restore lease"), so a
/// backup it does not prove restorable is proved again from a new listing,
/// and only that second answer counts.
pub(super) fn load_and_prove_listed(
    repo: &Repo,
    name: &str,
    index: &Decoded,
    listed: Option<Vec<Id>>,
) -> Result<ChunkMap, ChunkError> {
    if let Some(ids) = listed {
        match load_and_prove_from(repo, name, index, Some(ids)) {
            Err(e @ ChunkError::Unrestorable { .. }) => {
                tracing::debug!(error = %e, "not proved from the early listing; listing again");
            }
            r => return r,
        }
    }
    load_and_prove_from(repo, name, index, None)
}

/// [`load_and_prove`] from `listed`, or from a listing made now.
fn load_and_prove_from(
    repo: &Repo,
    name: &str,
    index: &Decoded,
    listed: Option<Vec<Id>>,
) -> Result<ChunkMap, ChunkError> {
    let (store, cache, connections) = (repo.store(), repo.cache(), repo.metadata_connections());
    let mut entries = inventory::entries(store, cache, name, index, connections);
    // A version 1 backup names its chunks as objects: no map to load.
    // A pack index that cannot be read may hold nothing this backup needs:
    // the proof says which chunk is missing if it does.
    let mut unreadable = None;
    let (map, entries) = std::thread::scope(|s| {
        // The first tree segments are fetched while the map loads: one
        // round trip fewer before the first write.
        let prefetching = s.spawn(move || {
            entries.prefetch();
            entries
        });
        let map = match index {
            Decoded::V1(_) => Ok(ChunkMap::default()),
            Decoded::V2(_) => {
                let bad = |id: Id, e: ChunkError| {
                    tracing::debug!(pack_index = %id, error = %e, "a pack index cannot be read");
                    unreadable.get_or_insert_with(|| e.to_string());
                    Ok(())
                };
                match listed {
                    Some(ids) => ChunkMap::load_listed_or(store, cache, connections, ids, bad),
                    None => ChunkMap::load_or(store, cache, connections, bad),
                }
            }
        };
        let entries = prefetching
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (map, entries)
    });
    let map = map?;
    prove(store, entries, name, index, &map).map_err(|e| with_hint(e, unreadable.as_deref()))?;
    Ok(map)
}

/// `e`, with `unreadable` (a pack index that could not be read, which may
/// have held what is missing) added to a refusal's detail.
pub fn with_hint(e: ChunkError, unreadable: Option<&str>) -> ChunkError {
    match (e, unreadable) {
        (ChunkError::Unrestorable { name, detail }, Some(u)) => ChunkError::Unrestorable {
            name,
            detail: format!("{detail} (a pack index could not be read: {u})"),
        },
        (e, _) => e,
    }
}

/// Read backup `name` (`index`) through the validator, as `entries`
/// streams it, and check that every chunk it references is in `map`
/// (format 2) or stored as an object (format 1). Any failure is
/// [`ChunkError::Unrestorable`].
pub fn prove(
    store: &dyn Store,
    mut entries: Entries<'_>,
    name: &str,
    index: &Decoded,
    map: &ChunkMap,
) -> Result<(), ChunkError> {
    let refuse = |detail: String| ChunkError::Unrestorable {
        name: name.to_owned(),
        detail,
    };
    let objects: Option<HashSet<Id>> = match index {
        Decoded::V1(_) => Some(
            with_retry(store, || store.list(Kind::Chunk))
                .map_err(|e| ChunkError::store("listing version 1 chunks", e))?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        ),
        Decoded::V2(_) => None,
    };
    let stored = |hash: &Id| match &objects {
        Some(set) => set.contains(hash),
        None => map.find(hash).is_some(),
    };
    let mut path = Vec::new();
    loop {
        let item = match entries.next_item() {
            Ok(Some(item)) => item,
            Ok(None) => return Ok(()),
            Err(e @ (ChunkError::Index(_) | ChunkError::Format(_))) => {
                return Err(refuse(e.to_string()))
            }
            Err(ChunkError::Store { context, cause })
                if matches!(cause, crate::store::StoreError::NotFound(_)) =>
            {
                return Err(refuse(format!("{context}: {cause}")))
            }
            Err(e) => return Err(e),
        };
        match item {
            Item::Entry(e) => path = e.path,
            Item::Chunks(chunks) => {
                let missing = chunks
                    .iter()
                    .find(|c| c.hash.as_ref().is_some_and(|h| !stored(h)));
                if let Some(c) = missing {
                    return Err(refuse(format!(
                        "file {}: chunk {} at offset {} is missing from the store",
                        String::from_utf8_lossy(&path),
                        c.hash.map(|h| h.to_string()).unwrap_or_default(),
                        c.off
                    )));
                }
            }
        }
    }
}
