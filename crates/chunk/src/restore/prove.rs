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

use std::collections::HashSet;

use super::super::format::head::Decoded;
use super::super::format::tree::Item;
use super::super::inventory::Entries;
use super::super::map::ChunkMap;
use super::super::{with_retry, ChunkError};
use crate::store::{Id, Kind, Store};

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
