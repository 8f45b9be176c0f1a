//! The sweep: under a sweep lease, delete (or repack) what the due marks
//! named and is still dead by the backups present now, then the marks.

use std::collections::{HashMap, HashSet};

use chrono::Utc;

use super::plan::{liveness, plan, plan_sweep, Holdings, Liveness};
use super::{read_mark, write_mark, GcOptions, GcReport, Mark, ENTRIES_PER_INDEX, MERGE_ABOVE};
use crate::format::pack::PackBuilder;
use crate::format::packidx::{self, PackEntry};
use crate::lease::{self, Lease, LeaseError, LeaseKind};
use crate::map::ChunkMap;
use crate::store::{Id, Kind, Marker, Store};
use crate::{with_retry, ChunkError, Repo};

/// The sweep phase over `marks`; returns the names of the marks it
/// processed (and deleted).
pub(super) fn sweep(
    repo: &Repo,
    opts: &GcOptions,
    marks: &[Marker],
    report: &mut GcReport,
) -> Result<HashSet<String>, ChunkError> {
    let store = repo.store();
    // A sweep never waits, so there is nothing to cancel.
    let never = crate::pipeline::Cancel::new();
    lease::with_lease(store, LeaseKind::Sweep, None, &never, |lease| {
        let result = sweep_under(repo, opts, marks, report, lease);
        if result.is_err() {
            hand_over(store, lease);
        }
        result
    })
}

/// A sweep failed with packs written that no pack index may name (it was
/// repacking): list them in a mark as orphans, so that GC deals with them
/// and this lease need not stay to block backups and restores until it
/// expires. (An orphan that a pack index does name is kept.)
fn hand_over(store: &dyn Store, lease: &Lease<'_>) {
    let pending = lease.pending();
    if pending.is_empty() {
        return;
    }
    let mark = Mark {
        version: 2,
        created: Some(Utc::now()),
        orphans: pending.clone(),
        ..Mark::default()
    };
    if write_mark(store, &mark).is_ok() {
        lease.settle(&pending);
    }
}

fn sweep_under(
    repo: &Repo,
    opts: &GcOptions,
    marks: &[Marker],
    report: &mut GcReport,
    lease: &Lease<'_>,
) -> Result<HashSet<String>, ChunkError> {
    let store = repo.store();
    let now = lease.store_now().unwrap_or_else(Utc::now);
    let due = plan_sweep(marks, now, opts.grace);
    if due.is_empty() {
        return Ok(HashSet::new());
    }
    let cache = repo.cache();
    // Read everything only now, under the lease: any backup that
    // finished before we took it has its head here.
    let map = ChunkMap::load(store, cache, repo.metadata_connections())?;
    let l = liveness(store, cache, &map, repo.metadata_connections())?;
    if let Some(first) = l.unreadable.first() {
        return Err(ChunkError::Lease(LeaseError::Conflict(format!(
            "{} backup index(es) cannot be read, so nothing can be deleted safely (first: {first}); fix them or forget them with `btm forget NAME`",
            l.unreadable.len()
        ))));
    }
    let due_marks = read_due_marks(store, &due)?;
    let v = StillDead::of(&due_marks, &map, &l);
    let mut doomed: HashSet<Id> = v.dead.iter().chain(&v.repack).copied().collect();
    if !opts.dry_run {
        let new_packs = repack_live(repo, opts, lease, &map, &l, &v.repack)?;
        // Packs are named by their bytes: a pack written just now can be
        // one that was about to go (an orphan of a failed attempt at
        // this very repack, or a pack holding the same chunk). Its
        // bytes are needed: it stays.
        for p in &new_packs {
            doomed.remove(&p.id);
        }
        rewrite_pack_indexes(repo, lease, &map, &doomed, new_packs)?;
    }
    // Packs no pack index names are unreachable: orphans of dead
    // writers, and marked packs whose index an interrupted sweep
    // already rewrote. (Not one this sweep just wrote and indexed.)
    let indexed: HashSet<Id> = lease.written();
    let unindexed_marked = v
        .marked_packs
        .iter()
        .chain(&v.marked_repack)
        .filter(|id| map.pack_number(id).is_none());
    doomed.extend(
        v.now_dead
            .orphans
            .iter()
            .chain(unindexed_marked)
            .filter(|id| !indexed.contains(id))
            .copied(),
    );
    delete_packs(repo, opts, lease, &map, &doomed, report)?;
    report.packs_deleted = (doomed.len() - v.repack.len().min(doomed.len())) as u64;
    report.packs_repacked = v.repack.len() as u64;
    delete_dead_objects(repo, opts, lease, &v.now_dead, report)?;
    let mut swept = HashSet::new();
    for (name, _) in &due_marks {
        if !opts.dry_run {
            with_retry(store, || store.delete_marker(name))
                .map_err(|e| ChunkError::store(format!("deleting GC mark {name}"), e))?;
        }
        report.marks_swept += 1;
        swept.insert(name.clone());
    }
    Ok(swept)
}

/// The due marks that still exist (a concurrent sweep may have taken some).
fn read_due_marks(store: &dyn Store, due: &[&Marker]) -> Result<Vec<(String, Mark)>, ChunkError> {
    let mut out = Vec::new();
    for m in due {
        match read_mark(store, &m.name) {
            Ok(mark) => out.push((m.name.clone(), mark)),
            Err(ChunkError::Store {
                cause: crate::store::StoreError::NotFound(_),
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What a sweep may delete: what the due marks named and is still dead
/// (or still sparse, for repacking) by the indexes read now.
struct StillDead {
    /// The plan of what is dead now, among what the marks held.
    now_dead: Mark,
    /// Packs the marks named for deletion.
    marked_packs: HashSet<Id>,
    /// Packs the marks named for repacking.
    marked_repack: HashSet<Id>,
    /// Marked and still wholly dead.
    dead: Vec<Id>,
    /// Marked for repacking and still sparse (or dead by now).
    repack: Vec<Id>,
}

impl StillDead {
    fn of(due_marks: &[(String, Mark)], map: &ChunkMap, l: &Liveness) -> StillDead {
        let all = |f: fn(&Mark) -> &Vec<Id>| -> Vec<Id> {
            due_marks
                .iter()
                .flat_map(|(_, m)| f(m).iter().copied())
                .collect()
        };
        let (all_trees, all_chunks, orphans) =
            (all(|m| &m.trees), all(|m| &m.chunks), all(|m| &m.orphans));
        let now_dead = plan(
            &Holdings {
                map,
                trees: &all_trees,
                v1_chunks: &all_chunks,
                pending_of_dead: &orphans,
            },
            l,
        );
        let still_dead: HashSet<Id> = now_dead.packs.iter().copied().collect();
        let still_sparse: HashSet<Id> = now_dead.repack.iter().copied().collect();
        let marked_packs: HashSet<Id> = all(|m| &m.packs).into_iter().collect();
        let marked_repack: HashSet<Id> = all(|m| &m.repack).into_iter().collect();
        let dead = marked_packs.intersection(&still_dead).copied().collect();
        let repack = marked_repack
            .iter()
            .filter(|p| still_sparse.contains(p) || still_dead.contains(p))
            .copied()
            .collect();
        StillDead {
            now_dead,
            marked_packs,
            marked_repack,
            dead,
            repack,
        }
    }
}

/// Delete `doomed` packs (counting their bytes), checking the lease first
/// each time.
fn delete_packs(
    repo: &Repo,
    opts: &GcOptions,
    lease: &Lease<'_>,
    map: &ChunkMap,
    doomed: &HashSet<Id>,
    report: &mut GcReport,
) -> Result<(), ChunkError> {
    let store = repo.store();
    let sizes: HashMap<Id, u64> = map.packs().iter().map(|p| (p.id, p.len)).collect();
    for id in doomed {
        lease.check()?;
        if !opts.dry_run {
            with_retry(store, || store.delete(Kind::Pack, id))
                .map_err(|e| ChunkError::store(format!("deleting pack {id}"), e))?;
        }
        report.bytes_freed += sizes.get(id).copied().unwrap_or(0);
    }
    Ok(())
}

/// Delete dead tree segments and version 1 chunks.
fn delete_dead_objects(
    repo: &Repo,
    opts: &GcOptions,
    lease: &Lease<'_>,
    now_dead: &Mark,
    report: &mut GcReport,
) -> Result<(), ChunkError> {
    let store = repo.store();
    for (kind, ids, count) in [
        (Kind::Tree, &now_dead.trees, &mut report.trees_deleted),
        (Kind::Chunk, &now_dead.chunks, &mut report.chunks_deleted),
    ] {
        for id in ids {
            lease.check()?;
            if !opts.dry_run {
                with_retry(store, || store.delete(kind, id))
                    .map_err(|e| ChunkError::store(format!("deleting {}", kind.describe(id)), e))?;
                if let (Kind::Tree, Some(c)) = (kind, repo.cache()) {
                    c.forget(Kind::Tree, id);
                }
            }
            *count += 1;
        }
    }
    Ok(())
}

/// Read the live chunks of `packs` and write them into new packs; returns
/// the new packs for a pack index.
fn repack_live(
    repo: &Repo,
    opts: &GcOptions,
    lease: &Lease<'_>,
    map: &ChunkMap,
    l: &Liveness,
    packs: &[Id],
) -> Result<Vec<PackEntry>, ChunkError> {
    let store = repo.store();
    let wanted: HashSet<u32> = packs.iter().filter_map(|p| map.pack_number(p)).collect();
    let mut by_pack: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, e) in map.entries().iter().enumerate() {
        if l.live[i] && wanted.contains(&e.pack) {
            by_pack.entry(e.pack).or_default().push(i);
        }
    }
    let mut written = Vec::new();
    let mut pack = PackBuilder::with_capacity(crate::format::pack::DEFAULT_TARGET);
    let flush = |pack: PackBuilder, written: &mut Vec<PackEntry>| -> Result<(), ChunkError> {
        let sealed = pack.seal()?;
        lease
            .add_pending(sealed.id)
            .map_err(|e| ChunkError::store("recording a repacked pack in the lease", e))?;
        with_retry(store, || {
            store.put(Kind::Pack, &sealed.id, sealed.data.clone())
        })
        .map_err(|e| ChunkError::store(format!("writing pack {}", sealed.id), e))?;
        written.push(PackEntry {
            id: sealed.id,
            len: sealed.data.len() as u64,
            blobs: sealed.blobs,
        });
        Ok(())
    };
    for (n, entries) in by_pack {
        let info = map.packs()[n as usize];
        let data = with_retry(store, || store.get(Kind::Pack, &info.id))
            .map_err(|e| ChunkError::store(format!("reading pack {} to repack it", info.id), e))?;
        for i in entries {
            let e = map.entries()[i];
            let frame = data
                .get(e.offset as usize..(e.offset + e.stored_len) as usize)
                .ok_or_else(|| {
                    ChunkError::Invalid(format!("pack {} is shorter than its index says", info.id))
                })?;
            if !pack.is_empty() && pack.len() + frame.len() > crate::format::pack::DEFAULT_TARGET {
                let full = std::mem::replace(
                    &mut pack,
                    PackBuilder::with_capacity(crate::format::pack::DEFAULT_TARGET),
                );
                flush(full, &mut written)?;
            }
            pack.push(e.hash, e.raw_len, frame);
        }
    }
    if !pack.is_empty() {
        flush(pack, &mut written)?;
    }
    let _ = opts;
    Ok(written)
}

/// Replace every pack index that names a doomed pack with one that does
/// not (merging small indexes on the way), add one for `new_packs`, then
/// delete the old ones. Old and new may coexist after a crash: a chunk
/// listed twice is fine.
fn rewrite_pack_indexes(
    repo: &Repo,
    lease: &Lease<'_>,
    map: &ChunkMap,
    doomed: &HashSet<Id>,
    new_packs: Vec<PackEntry>,
) -> Result<(), ChunkError> {
    let store = repo.store();
    let merge_small = map.files().len() > MERGE_ABOVE;
    let affected: Vec<Id> = map
        .files()
        .iter()
        .filter(|(_, packs)| {
            packs
                .iter()
                .any(|n| doomed.contains(&map.packs()[*n as usize].id))
                || (merge_small && packs.len() < ENTRIES_PER_INDEX / 100)
        })
        .map(|(id, _)| *id)
        .collect();
    let mut keep: Vec<PackEntry> = new_packs;
    for id in &affected {
        let data = match repo.cache().and_then(|c| c.get(Kind::PackIndex, id)) {
            Some(d) => d,
            None => with_retry(store, || store.get(Kind::PackIndex, id))
                .map_err(|e| ChunkError::store(format!("reading pack index {id}"), e))?,
        };
        let packs = packidx::decode(&data, &format!("pack index {id}"))?;
        keep.extend(packs.into_iter().filter(|p| !doomed.contains(&p.id)));
    }
    with_retry(store, || store.flush())
        .map_err(|e| ChunkError::store("making packs durable", e))?;
    let mut batch = Vec::new();
    let mut count = 0;
    let put_batch = |batch: &mut Vec<PackEntry>| -> Result<(), ChunkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let data = crate::store::Bytes::from(packidx::encode(batch)?);
        let id = Id::of(&data);
        with_retry(store, || store.put(Kind::PackIndex, &id, data.clone()))
            .map_err(|e| ChunkError::store(format!("writing pack index {id}"), e))?;
        if let Some(c) = repo.cache() {
            c.put(Kind::PackIndex, &id, &data);
        }
        let ids: Vec<Id> = batch.iter().map(|p| p.id).collect();
        lease.settle(&ids);
        batch.clear();
        Ok(())
    };
    for p in keep {
        count += p.blobs.len();
        batch.push(p);
        if count >= ENTRIES_PER_INDEX {
            put_batch(&mut batch)?;
            count = 0;
        }
    }
    put_batch(&mut batch)?;
    for id in &affected {
        lease.check()?;
        with_retry(store, || store.delete(Kind::PackIndex, id))
            .map_err(|e| ChunkError::store(format!("deleting pack index {id}"), e))?;
        if let Some(c) = repo.cache() {
            c.forget(Kind::PackIndex, id);
        }
    }
    Ok(())
}
