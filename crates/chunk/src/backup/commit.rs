//! The last step of a backup: writing its head, and only a head whose
//! every chunk and segment is in the store.
//!
//! The pipeline relied on its lease to keep garbage collection away from
//! the chunks it took as known. If that lease was lost meanwhile (a paused
//! process, a suspended machine, a marker removed), a sweep may have
//! deleted some of them; a head written anyway would be a backup that
//! cannot be restored. So the head goes out only under a lease taken again
//! and after proof that nothing it references is gone (`docs/format.md`,
//! "Backup lease").

use std::collections::HashSet;

use super::Shared;
use crate::format::head::{Decoded, Head};
use crate::format::tree::Item;
use crate::inventory;
use crate::lease::LeaseError;
use crate::map::ChunkMap;
use crate::pipeline::pool;
use crate::store::{Id, Kind, Store, StoreError};
use crate::{with_retry, BackupInfo, ChunkError};

/// Write the head, relying on a lease that kept sweeps away the whole
/// time, so that every chunk taken as known is still stored.
///
/// A lease lost meanwhile (the process paused or the machine suspended for
/// half the TTL, or the marker removed by another party) is taken again,
/// and every segment and chunk the head references is proven present
/// before the head is written. A loss noticed only once the head is
/// written (a pause inside the request) is handled the same way, and a
/// head that then references what is gone is deleted again.
/// `confirmed` is what [`crate::lease::Lease::confirm`] found once every pack was
/// uploaded.
pub(super) fn commit(
    shared: &Shared<'_>,
    name: &str,
    head: &Head,
    confirmed: Result<(), LeaseError>,
) -> Result<(), ChunkError> {
    let (store, lease) = (shared.repo.store(), shared.lease);
    let cancel = &shared.opts.progress.cancel;
    let encoded = head.encode()?;
    if let Err(lost) = confirmed {
        tracing::warn!(error = %lost, "checking that every chunk the backup references is still stored");
        lease.renew(cancel)?;
        verify_references(shared, name, head, &lost)?;
    }
    put_head(store, name, &encoded)?;
    if let Err(lost) = lease.check() {
        tracing::warn!(error = %lost, "the lease was lost while the head was written; checking every chunk it references");
        let verified = lease
            .renew(cancel)
            .map_err(ChunkError::from)
            .and_then(|()| verify_references(shared, name, head, &lost));
        if let Err(e) = verified {
            let _ = with_retry(store, || store.delete_index(name));
            return Err(e);
        }
    }
    Ok(())
}

/// Create head `name`. A retried put that finds the head already there
/// succeeded before its answer was lost: the store compares the bytes
/// (see [`Store::put_index`]). Other bytes there are another backup, which
/// the error describes.
fn put_head(store: &dyn Store, name: &str, encoded: &[u8]) -> Result<(), ChunkError> {
    match with_retry(store, || store.put_index(name, encoded)) {
        Ok(()) => Ok(()),
        Err(e @ StoreError::Conflict { .. }) => {
            let there = match inventory::read_index(store, name) {
                Ok(idx) => {
                    let info = BackupInfo::of(name, &idx);
                    format!(
                        "a backup of tag {} created {}, {} files",
                        info.tag,
                        idx.created().to_rfc3339(),
                        info.files
                    )
                }
                Err(_) => "an index that cannot be read".to_owned(),
            };
            Err(ChunkError::store(
                format!("writing backup {name} (the store holds {there} under that name; it was left as it is)"),
                e,
            ))
        }
        Err(e) => Err(ChunkError::store(format!("writing backup {name}"), e)),
    }
}

/// Prove that every tree segment `head` lists and every chunk its entries
/// reference is in the store now: segments by their size, chunks by a
/// fresh chunk map and a listing of the packs it points to (a sweep that
/// ran while the lease was lost may have deleted a pack after this backup
/// indexed it). `lost` is why this is needed, for the error.
fn verify_references(
    shared: &Shared<'_>,
    name: &str,
    head: &Head,
    lost: &LeaseError,
) -> Result<(), ChunkError> {
    let store = shared.repo.store();
    let connections = shared.repo.metadata_connections();
    let gone = |(missing, example): (u64, String)| ChunkError::LeaseLost {
        cause: lost.to_string(),
        missing,
        example,
    };
    if let Some(found) = missing_segments(store, &head.trees, connections)? {
        return Err(gone(found));
    }
    if let Some(found) = missing_chunks(shared, name, head, connections)? {
        return Err(gone(found));
    }
    tracing::info!(backup = %name, "every chunk the backup references is stored");
    Ok(())
}

/// How many of `trees` the store lacks, and the first, if any.
fn missing_segments(
    store: &dyn Store,
    trees: &[Id],
    connections: usize,
) -> Result<Option<(u64, String)>, ChunkError> {
    let sizes = pool::map(trees, connections, |id| {
        with_retry(store, || store.size(Kind::Tree, id))
    });
    let mut missing = Vec::new();
    for (id, r) in trees.iter().zip(sizes) {
        match r {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => missing.push(*id),
            Err(e) => return Err(ChunkError::store(format!("checking tree segment {id}"), e)),
        }
    }
    Ok(missing
        .first()
        .map(|first| (missing.len() as u64, format!("tree segment {first}"))))
}

/// How many chunks the entries of `head` reference that no stored pack
/// holds, and the first with its file, if any.
fn missing_chunks(
    shared: &Shared<'_>,
    name: &str,
    head: &Head,
    connections: usize,
) -> Result<Option<(u64, String)>, ChunkError> {
    let (store, cache) = (shared.repo.store(), shared.repo.cache());
    let map = ChunkMap::load(store, cache, connections)?;
    let packs: HashSet<Id> = with_retry(store, || store.list(Kind::Pack))
        .map_err(|e| ChunkError::store("listing packs", e))?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let stored = |hash: &Id| {
        map.find(hash)
            .is_some_and(|l| packs.contains(&map.packs()[l.pack as usize].id))
    };
    let decoded = Decoded::V2(head.clone());
    let mut entries = inventory::entries(store, cache, name, &decoded, connections);
    let (mut path, mut missing, mut example) = (Vec::new(), 0u64, None);
    while let Some(item) = entries.next_item()? {
        match item {
            Item::Entry(e) => path = e.path,
            Item::Chunks(chunks) => {
                for c in chunks
                    .iter()
                    .filter(|c| c.hash.is_some_and(|h| !stored(&h)))
                {
                    missing += 1;
                    example.get_or_insert_with(|| {
                        format!(
                            "chunk {} of {} at offset {}",
                            c.hash.map(|h| h.to_string()).unwrap_or_default(),
                            String::from_utf8_lossy(&path),
                            c.off
                        )
                    });
                }
            }
        }
    }
    Ok(example.map(|e| (missing, e)))
}
