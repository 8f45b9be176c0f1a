//! The upload stage: the packer fills packs with new chunks, uploaders
//! put them (each listed in the lease's `pending` first), and every so
//! many packs a pack index names them.

use std::collections::HashSet;

use crossbeam_channel::{Receiver, Sender};

use super::workers::Blobs;
use super::{Shared, BLOBS_PER_INDEX, PACKS_PER_INDEX};
use crate::format::pack::{PackBuilder, SealedPack};
use crate::format::packidx::{self, PackEntry};
use crate::pipeline::Permit;
use crate::store::{Id, Kind};
use crate::{with_retry, ChunkError};

/// A sealed pack on its way to an uploader, with the bytes it holds in
/// the upload budget.
pub(super) struct Packed<'a> {
    sealed: SealedPack,
    _permit: Permit<'a>,
}

/// Hashes packed by this backup, exactly: a sorted array plus a small set
/// of recent ones merged into it now and then (32 bytes a chunk, not the
/// several times that of a hash set).
struct PackedSet {
    sorted: Vec<Id>,
    recent: HashSet<Id>,
}

impl PackedSet {
    /// Add `id`; `false` if it was there already.
    fn insert(&mut self, id: Id) -> bool {
        if self.sorted.binary_search(&id).is_ok() || !self.recent.insert(id) {
            return false;
        }
        if self.recent.len() >= 1 << 16 {
            self.sorted.extend(self.recent.drain());
            self.sorted.sort_unstable();
        }
        true
    }
}

/// Bytes of packs a backup keeps in memory: the one being filled and those
/// being uploaded. Enough for a few uploads in flight, whatever the number
/// of connections, so that memory stays bounded when many are configured.
pub(super) fn upload_budget(pack_size: usize, connections: usize) -> u64 {
    let packs = connections.clamp(1, 3) as u64 + 1;
    packs * pack_size as u64
}

/// Fill packs with the chunks not packed yet, and seal each full one.
pub(super) fn packer<'a>(shared: &'a Shared<'_>, rx: Receiver<Blobs>, tx: Sender<Packed<'a>>) {
    let target = shared.opts.pack_size;
    let mut packed = PackedSet {
        sorted: Vec::new(),
        recent: HashSet::new(),
    };
    // A pack is built only with its bytes taken from the budget; the
    // permit travels with it and is returned once it is uploaded.
    let start = || {
        let permit = shared.packs_in_memory.take(target as u64)?;
        Some((PackBuilder::in_buffer(shared.pack_buffers.take()), permit))
    };
    let seal = |(pack, permit): (PackBuilder, Permit<'a>)| -> bool {
        match pack.seal() {
            Ok(sealed) => tx
                .send(Packed {
                    sealed,
                    _permit: permit,
                })
                .is_ok(),
            Err(e) => {
                shared.pipeline.fail(e.into());
                false
            }
        }
    };
    let mut current: Option<(PackBuilder, Permit<'a>)> = None;
    for blobs in rx {
        if shared.pipeline.aborted() {
            continue;
        }
        for (hash, raw_len, frame) in blobs.iter() {
            if !packed.insert(hash) {
                continue;
            }
            if let Some((pack, _)) = &current {
                if pack.len() + frame.len() > target {
                    let full = current.take().filter(|(p, _)| !p.is_empty());
                    if full.is_some_and(|full| !seal(full)) {
                        return;
                    }
                }
            }
            if current.is_none() {
                current = start();
            }
            let Some((pack, _)) = &mut current else {
                return;
            };
            pack.push(hash, raw_len, frame);
        }
        shared.frames.give(blobs.frames);
    }
    if let Some(last) = current.filter(|(p, _)| !p.is_empty()) {
        if !shared.pipeline.aborted() {
            seal(last);
        }
    }
}

/// Upload one sealed pack; its budget is returned once it is stored.
pub(super) fn uploader(shared: &Shared<'_>, packed: Packed<'_>) {
    if let Err(e) = upload(shared, packed.sealed) {
        shared.pipeline.fail(e);
    }
}

fn upload(shared: &Shared<'_>, sealed: SealedPack) -> Result<(), ChunkError> {
    let store = shared.repo.store();
    let progress = &shared.opts.progress;
    let what = format!("uploading pack {}", sealed.id);
    {
        let _req = progress.request();
        shared.lease.add_pending(sealed.id).map_err(|e| {
            ChunkError::store(format!("recording pack {} in the lease", sealed.id), e)
        })?;
    }
    {
        let _req = progress.request();
        with_retry(store, || {
            store.put(Kind::Pack, &sealed.id, sealed.data.clone())
        })
        .map_err(|e| ChunkError::store(what, e))?;
    }
    let c = &shared.counters;
    let bytes = sealed.data.len() as u64;
    let SealedPack { id, data, blobs } = sealed;
    // The store is done with the bytes: their buffer carries the next pack.
    if let Ok(data) = data.try_into_mut() {
        shared.pack_buffers.give(Vec::from(data));
    }
    c.bytes_uploaded.add(bytes);
    progress
        .uploaded
        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    c.chunks_uploaded.add(blobs.len() as u64);
    c.packs_uploaded.add(1);
    let batch = {
        let mut un = shared.unindexed.lock().unwrap_or_else(|p| p.into_inner());
        un.push(PackEntry {
            id,
            len: bytes,
            blobs,
        });
        let blobs: usize = un.iter().map(|p| p.blobs.len()).sum();
        if un.len() >= PACKS_PER_INDEX || blobs >= BLOBS_PER_INDEX {
            std::mem::take(&mut *un)
        } else {
            Vec::new()
        }
    };
    write_pack_index(shared, batch)
}

/// Put a pack index naming `packs` (after making them durable), and drop
/// them from the lease's pending list.
pub(super) fn write_pack_index(
    shared: &Shared<'_>,
    packs: Vec<PackEntry>,
) -> Result<(), ChunkError> {
    if packs.is_empty() {
        return Ok(());
    }
    let store = shared.repo.store();
    let _req = shared.opts.progress.request();
    with_retry(store, || store.flush())
        .map_err(|e| ChunkError::store("making packs durable", e))?;
    let data = crate::store::Bytes::from(packidx::encode(&packs)?);
    let id = Id::of(&data);
    with_retry(store, || store.put(Kind::PackIndex, &id, data.clone()))
        .map_err(|e| ChunkError::store(format!("writing pack index {id}"), e))?;
    if let Some(c) = shared.repo.cache() {
        c.put(Kind::PackIndex, &id, &data);
    }
    let ids: Vec<Id> = packs.iter().map(|p| p.id).collect();
    shared.lease.settle(&ids);
    Ok(())
}
