//! Garbage collection: removing what no backup references, safely while
//! other nodes back up into and restore from the same store
//! (`docs/format.md`, "Garbage collection").
//!
//! Two phases, each run by every `btm gc`:
//!
//! 1. **Sweep** (under a sweep lease, see [`super::lease`]): for each mark
//!    older than the grace period by the store's clock, recompute liveness
//!    from the backups present *now*; repack mostly-dead packs, rewrite the
//!    pack indexes that name doomed packs, delete the packs, segments and
//!    version 1 chunks still dead, then the mark. Deferred while any other
//!    lease is live; refused while any backup index is unreadable.
//! 2. **Mark**: what is dead now (packs, segments, v1 chunks, orphans of
//!    dead writers), or worth repacking, and not yet marked, goes into a
//!    new mark.
//!
//! The decisions ([`plan`]) are pure; everything else carries them out.
//! Every step is idempotent, and the mark is deleted last, so a GC that
//! dies half-way leaves a valid store and the next one finishes the job.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::cache::Cache;
use super::format::head::Decoded;
use super::format::pack::PackBuilder;
use super::format::packidx::{self, PackEntry};
use super::format::tree::Item;
use super::lease::{self, Lease, LeaseError, LeaseKind};
use super::map::ChunkMap;
use super::{catalog, with_retry, ChunkError};
use crate::store::{Id, Kind, Marker, Store};

/// Default grace period between marking and deleting.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// A pack is repacked when its live frames are less than this fraction of
/// its bytes.
pub const REPACK_BELOW: f64 = 0.5;
/// Pack entries per pack index GC writes.
const ENTRIES_PER_INDEX: usize = 100_000;
/// More pack indexes than this, and GC merges the small ones.
const MERGE_ABOVE: usize = 256;

/// How a GC runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Time between marking and deleting.
    pub grace: Duration,
    /// Report only; write and delete nothing.
    pub dry_run: bool,
    /// Store requests in flight.
    pub connections: usize,
    /// The local metadata cache.
    pub cache: Option<Cache>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: DEFAULT_GRACE,
            dry_run: false,
            connections: 4,
            cache: Cache::default_dir().map(Cache::new),
        }
    }
}

/// What a GC did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    /// Backup indexes read.
    pub indexes: u64,
    /// Backup indexes that could not be read (each stops every sweep).
    pub unreadable: Vec<String>,
    /// Packs in the store.
    pub packs: u64,
    /// Chunks in the store (packed).
    pub chunks: u64,
    /// Distinct chunks referenced by a backup.
    pub referenced: u64,
    /// Packs deleted (or, dry run, that would be).
    pub packs_deleted: u64,
    /// Packs rewritten without their dead chunks.
    pub packs_repacked: u64,
    /// Tree segments deleted.
    pub trees_deleted: u64,
    /// Version 1 chunks deleted.
    pub chunks_deleted: u64,
    /// Bytes freed in the store.
    pub bytes_freed: u64,
    /// Marks whose grace period ended and were processed.
    pub marks_swept: u64,
    /// Objects newly marked (packs, repack candidates, orphans, segments,
    /// v1 chunks).
    pub marked: u64,
    /// Objects in marks still within their grace period.
    pub pending: u64,
    /// Why the sweep was skipped, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
}

/// The body of a mark: what was found dead at one time.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// 2 (version 1 marks listed only `chunks`).
    pub version: u32,
    /// When it was made (informational; the store's time decides).
    pub created: Option<DateTime<Utc>>,
    /// Packs with no live chunk.
    #[serde(default)]
    pub packs: Vec<Id>,
    /// Packs mostly dead: to be repacked.
    #[serde(default)]
    pub repack: Vec<Id>,
    /// Packs of dead writers that no pack index names.
    #[serde(default)]
    pub orphans: Vec<Id>,
    /// Tree segments no backup lists.
    #[serde(default)]
    pub trees: Vec<Id>,
    /// Version 1 chunks no v1 index references.
    #[serde(default)]
    pub chunks: Vec<Id>,
}

impl Mark {
    fn len(&self) -> u64 {
        (self.packs.len()
            + self.repack.len()
            + self.orphans.len()
            + self.trees.len()
            + self.chunks.len()) as u64
    }

    fn all(&self) -> impl Iterator<Item = &Id> {
        self.packs
            .iter()
            .chain(&self.repack)
            .chain(&self.orphans)
            .chain(&self.trees)
            .chain(&self.chunks)
    }
}

const MARKS: &str = "gc/marks";

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
    for name in catalog::list_backups(store, None)? {
        let name = name.to_string();
        let idx = match catalog::read_index(store, &name) {
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
        let mut entries = catalog::entries(store, cache, &name, &idx, connections);
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

fn read_mark(store: &dyn Store, name: &str) -> Result<Mark, ChunkError> {
    let bad = |detail: String| ChunkError::Invalid(format!("GC mark {name}: {detail}"));
    let data = with_retry(|| store.get_marker(name))
        .map_err(|e| ChunkError::store(format!("reading GC mark {name}"), e))?;
    let raw = zstd::stream::decode_all(&data[..]).map_err(|e| bad(e.to_string()))?;
    let mark: Mark = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    if !(1..=2).contains(&mark.version) {
        return Err(bad(format!("unknown version {}", mark.version)));
    }
    Ok(mark)
}

/// Expired leases (their holders died, or stopped refreshing long ago)
/// as listed, with the packs they left pending.
fn dead_leases(
    store: &dyn Store,
    markers: &[Marker],
    now: DateTime<Utc>,
) -> Vec<(Marker, Vec<Id>)> {
    lease::judge(store, markers, Some(now), lease::holder::here())
        .into_iter()
        .filter(|j| j.state == lease::State::Expired)
        .map(|j| (j.marker, j.info.map(|i| i.pending).unwrap_or_default()))
        .collect()
}

/// Delete the expired leases `dead` whose pending packs are now in a mark,
/// each only if its marker is still as it was listed: a holder that was
/// only paused may have resumed and rewritten it since, and its marker is
/// then the only record of its pending packs.
fn delete_dead_leases(store: &dyn Store, dead: &[(Marker, Vec<Id>)]) -> Result<(), ChunkError> {
    if dead.is_empty() {
        return Ok(());
    }
    let now = with_retry(|| store.list_markers("locks"))
        .map_err(|e| ChunkError::store("listing leases", e))?;
    for (m, _) in dead {
        if now.iter().any(|n| n == m) {
            let _ = with_retry(|| store.delete_marker(&m.name));
        } else {
            tracing::info!(lease = %m.name, "an expired lease was refreshed since; kept");
        }
    }
    Ok(())
}

/// Run both phases (see the module documentation).
pub fn gc(store: &dyn Store, opts: &GcOptions) -> Result<GcReport, ChunkError> {
    let mut report = GcReport::default();
    let marks = with_retry(|| store.list_markers(MARKS))
        .map_err(|e| ChunkError::store("listing GC marks", e))?;
    let mut swept = HashSet::new();
    if !marks.is_empty() {
        match sweep(store, opts, &marks, &mut report) {
            Ok(s) => swept = s,
            Err(ChunkError::Lease(LeaseError::Conflict(why))) => {
                tracing::info!(reason = %why, "GC sweep deferred");
                report.deferred = Some(why);
            }
            Err(e) => return Err(e),
        }
    }
    mark(store, opts, &marks, &swept, &mut report)?;
    Ok(report)
}

/// The mark phase.
fn mark(
    store: &dyn Store,
    opts: &GcOptions,
    marks: &[Marker],
    swept: &HashSet<String>,
    report: &mut GcReport,
) -> Result<(), ChunkError> {
    let cache = opts.cache.as_ref();
    let map = ChunkMap::load(store, cache, opts.connections)?;
    let l = liveness(store, cache, &map, opts.connections)?;
    let trees: Vec<Id> = list_ids(store, Kind::Tree)?;
    let v1_chunks: Vec<Id> = list_ids(store, Kind::Chunk)?;
    let locks = with_retry(|| store.list_markers("locks"))
        .map_err(|e| ChunkError::store("listing leases", e))?;
    let now = if locks.is_empty() {
        Utc::now()
    } else {
        with_retry(|| lease::store_now(store))
            .map_err(|e| ChunkError::store("reading the store's clock", e))?
    };
    let dead = dead_leases(store, &locks, now);
    let pending_of_dead: Vec<Id> = dead.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let mut found = plan(
        &Holdings {
            map: &map,
            trees: &trees,
            v1_chunks: &v1_chunks,
            pending_of_dead: &pending_of_dead,
        },
        &l,
    );
    let mut already = HashSet::new();
    for m in marks.iter().filter(|m| !swept.contains(&m.name)) {
        let mark = match read_mark(store, &m.name) {
            // Another GC's sweep processed it meanwhile.
            Err(ChunkError::Store {
                cause: crate::store::StoreError::NotFound(_),
                ..
            }) => continue,
            r => r?,
        };
        report.pending += mark.len();
        already.extend(mark.all().copied());
    }
    for v in [
        &mut found.packs,
        &mut found.repack,
        &mut found.orphans,
        &mut found.trees,
        &mut found.chunks,
    ] {
        v.retain(|id| !already.contains(id));
    }
    report.indexes = l.indexes;
    report.unreadable = l.unreadable;
    report.packs = map.packs().len() as u64;
    report.chunks = map.entries().len() as u64;
    report.referenced = l.live.iter().filter(|&&x| x).count() as u64 + l.v1.len() as u64;
    report.marked = found.len();
    if opts.dry_run {
        return Ok(());
    }
    if found.len() > 0 {
        found.created = Some(Utc::now());
        write_mark(store, &found)?;
    }
    // The orphans are in a mark now (or were already): the dead leases
    // have told what they had to.
    delete_dead_leases(store, &dead)
}

fn list_ids(store: &dyn Store, kind: Kind) -> Result<Vec<Id>, ChunkError> {
    Ok(with_retry(|| store.list(kind))
        .map_err(|e| ChunkError::store(format!("listing {}", kind.dir()), e))?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// The sweep phase over `marks`; returns the names of the marks it
/// processed (and deleted).
fn sweep(
    store: &dyn Store,
    opts: &GcOptions,
    marks: &[Marker],
    report: &mut GcReport,
) -> Result<HashSet<String>, ChunkError> {
    // A sweep never waits, so there is nothing to cancel.
    let never = std::sync::atomic::AtomicBool::new(false);
    lease::with_lease(store, LeaseKind::Sweep, None, &never, |lease| {
        let result = sweep_under(store, opts, marks, report, lease);
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

fn write_mark(store: &dyn Store, mark: &Mark) -> Result<(), ChunkError> {
    let created = mark.created.unwrap_or_else(Utc::now);
    let json = serde_json::to_vec(mark).map_err(|e| ChunkError::Invalid(e.to_string()))?;
    let data = zstd::stream::encode_all(&json[..], 3)
        .map_err(|e| ChunkError::Invalid(format!("compressing a GC mark: {e}")))?;
    let name = format!(
        "{MARKS}/{}-{}-{}-{}",
        created.format("%Y%m%dT%H%M%S%.9fZ"),
        btm::host::name(),
        std::process::id(),
        MARK_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    with_retry(|| store.put_marker(&name, &data))
        .map_err(|e| ChunkError::store("writing a GC mark", e))
}

static MARK_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn sweep_under(
    store: &dyn Store,
    opts: &GcOptions,
    marks: &[Marker],
    report: &mut GcReport,
    lease: &Lease<'_>,
) -> Result<HashSet<String>, ChunkError> {
    let now = lease.store_now().unwrap_or_else(Utc::now);
    let due = plan_sweep(marks, now, opts.grace);
    if due.is_empty() {
        return Ok(HashSet::new());
    }
    let cache = opts.cache.as_ref();
    // Read everything only now, under the lease: any backup that
    // finished before we took it has its head here.
    let map = ChunkMap::load(store, cache, opts.connections)?;
    let l = liveness(store, cache, &map, opts.connections)?;
    if let Some(first) = l.unreadable.first() {
        return Err(ChunkError::Lease(LeaseError::Conflict(format!(
            "{} backup index(es) cannot be read, so nothing can be deleted safely (first: {first}); fix them or forget them with `btm forget NAME`",
            l.unreadable.len()
        ))));
    }
    let due_marks = read_due_marks(store, &due)?;
    let v = Verdict::of(&due_marks, &map, &l);
    let mut doomed: HashSet<Id> = v.dead.iter().chain(&v.repack).copied().collect();
    if !opts.dry_run {
        let new_packs = repack_live(store, opts, lease, &map, &l, &v.repack)?;
        // Packs are named by their bytes: a pack written just now can be
        // one that was about to go (an orphan of a failed attempt at
        // this very repack, or a pack holding the same chunk). Its
        // bytes are needed: it stays.
        for p in &new_packs {
            doomed.remove(&p.id);
        }
        rewrite_pack_indexes(store, opts, lease, &map, &doomed, new_packs)?;
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
    delete_packs(store, opts, lease, &map, &doomed, report)?;
    report.packs_deleted = (doomed.len() - v.repack.len().min(doomed.len())) as u64;
    report.packs_repacked = v.repack.len() as u64;
    delete_dead_objects(store, opts, lease, &v.now_dead, report)?;
    let mut swept = HashSet::new();
    for (name, _) in &due_marks {
        if !opts.dry_run {
            with_retry(|| store.delete_marker(name))
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
struct Verdict {
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

impl Verdict {
    fn of(due_marks: &[(String, Mark)], map: &ChunkMap, l: &Liveness) -> Verdict {
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
        Verdict {
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
    store: &dyn Store,
    opts: &GcOptions,
    lease: &Lease<'_>,
    map: &ChunkMap,
    doomed: &HashSet<Id>,
    report: &mut GcReport,
) -> Result<(), ChunkError> {
    let sizes: HashMap<Id, u64> = map.packs().iter().map(|p| (p.id, p.len)).collect();
    for id in doomed {
        lease.check()?;
        if !opts.dry_run {
            with_retry(|| store.delete(Kind::Pack, id))
                .map_err(|e| ChunkError::store(format!("deleting pack {id}"), e))?;
        }
        report.bytes_freed += sizes.get(id).copied().unwrap_or(0);
    }
    Ok(())
}

/// Delete dead tree segments and version 1 chunks.
fn delete_dead_objects(
    store: &dyn Store,
    opts: &GcOptions,
    lease: &Lease<'_>,
    now_dead: &Mark,
    report: &mut GcReport,
) -> Result<(), ChunkError> {
    for (kind, ids, count) in [
        (Kind::Tree, &now_dead.trees, &mut report.trees_deleted),
        (Kind::Chunk, &now_dead.chunks, &mut report.chunks_deleted),
    ] {
        for id in ids {
            lease.check()?;
            if !opts.dry_run {
                with_retry(|| store.delete(kind, id))
                    .map_err(|e| ChunkError::store(format!("deleting {}", kind.describe(id)), e))?;
                if let (Kind::Tree, Some(c)) = (kind, opts.cache.as_ref()) {
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
    store: &dyn Store,
    opts: &GcOptions,
    lease: &Lease<'_>,
    map: &ChunkMap,
    l: &Liveness,
    packs: &[Id],
) -> Result<Vec<PackEntry>, ChunkError> {
    let wanted: HashSet<u32> = packs.iter().filter_map(|p| map.pack_number(p)).collect();
    let mut by_pack: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, e) in map.entries().iter().enumerate() {
        if l.live[i] && wanted.contains(&e.pack) {
            by_pack.entry(e.pack).or_default().push(i);
        }
    }
    let mut written = Vec::new();
    let mut pack = PackBuilder::with_capacity(super::format::pack::DEFAULT_TARGET);
    let flush = |pack: PackBuilder, written: &mut Vec<PackEntry>| -> Result<(), ChunkError> {
        let sealed = pack.seal()?;
        lease
            .add_pending(sealed.id)
            .map_err(|e| ChunkError::store("recording a repacked pack in the lease", e))?;
        with_retry(|| store.put(Kind::Pack, &sealed.id, sealed.data.clone()))
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
        let data = with_retry(|| store.get(Kind::Pack, &info.id))
            .map_err(|e| ChunkError::store(format!("reading pack {} to repack it", info.id), e))?;
        for i in entries {
            let e = map.entries()[i];
            let frame = data
                .get(e.offset as usize..(e.offset + e.stored_len) as usize)
                .ok_or_else(|| {
                    ChunkError::Invalid(format!("pack {} is shorter than its index says", info.id))
                })?;
            if !pack.is_empty() && pack.len() + frame.len() > super::format::pack::DEFAULT_TARGET {
                let full = std::mem::replace(
                    &mut pack,
                    PackBuilder::with_capacity(super::format::pack::DEFAULT_TARGET),
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
    store: &dyn Store,
    opts: &GcOptions,
    lease: &Lease<'_>,
    map: &ChunkMap,
    doomed: &HashSet<Id>,
    new_packs: Vec<PackEntry>,
) -> Result<(), ChunkError> {
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
        let data = match opts.cache.as_ref().and_then(|c| c.get(Kind::PackIndex, id)) {
            Some(d) => d,
            None => with_retry(|| store.get(Kind::PackIndex, id))
                .map_err(|e| ChunkError::store(format!("reading pack index {id}"), e))?,
        };
        let packs = packidx::decode(&data, &format!("pack index {id}"))?;
        keep.extend(packs.into_iter().filter(|p| !doomed.contains(&p.id)));
    }
    with_retry(|| store.flush()).map_err(|e| ChunkError::store("making packs durable", e))?;
    let mut batch = Vec::new();
    let mut count = 0;
    let put_batch = |batch: &mut Vec<PackEntry>| -> Result<(), ChunkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let data = crate::store::Bytes::from(packidx::encode(batch)?);
        let id = Id::of(&data);
        with_retry(|| store.put(Kind::PackIndex, &id, data.clone()))
            .map_err(|e| ChunkError::store(format!("writing pack index {id}"), e))?;
        if let Some(c) = &opts.cache {
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
        with_retry(|| store.delete(Kind::PackIndex, id))
            .map_err(|e| ChunkError::store(format!("deleting pack index {id}"), e))?;
        if let Some(c) = &opts.cache {
            c.forget(Kind::PackIndex, id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::Blob;
    use proptest::prelude::*;

    fn id(i: u32) -> Id {
        Id::of(&i.to_le_bytes())
    }

    #[test]
    fn only_marks_past_the_grace_period_are_swept() {
        let now = Utc::now();
        let m = |name: &str, hours: i64| Marker {
            name: name.into(),
            modified: now - chrono::Duration::hours(hours),
        };
        let marks = [
            m("gc/marks/old", 25),
            m("gc/marks/new", 23),
            m("gc/marks/future", -1),
        ];
        let due: Vec<&str> = plan_sweep(&marks, now, DEFAULT_GRACE)
            .into_iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(due, ["gc/marks/old"]);
    }

    /// The mark phase deletes an expired lease only if
    /// it is still as listed. A holder that was only paused, and refreshed
    /// its lease while GC marked, keeps its marker: the only record of the
    /// packs it has not indexed yet.
    #[test]
    fn a_lease_refreshed_while_gc_marks_is_not_deleted() {
        let store = crate::store::MemStore::new();
        let pending = vec![id(77)];
        let body = serde_json::json!({
            "kind": "backup", "host": "far", "pid": 1,
            "started": Utc::now(), "pending": pending,
        })
        .to_string();
        let paused = "locks/backup-far-1-1-0";
        let expired = "locks/backup-far-2-1-0";
        for name in [paused, expired] {
            store.put_marker(name, body.as_bytes()).expect("put");
            store.age_marker(name, lease::LEASE_TTL + Duration::from_secs(60));
        }
        // The paused holder resumes while GC writes its mark, and
        // refreshes its lease.
        let refreshed = body.clone();
        store.before_marker_put("gc/marks/", move |s| {
            s.put_marker(paused, refreshed.as_bytes()).expect("refresh");
        });
        let opts = GcOptions {
            cache: None,
            ..GcOptions::default()
        };
        let report = gc(&store, &opts).expect("gc");
        assert_eq!(
            report.marked, 1,
            "the pending pack is an orphan: {report:?}"
        );
        let left: Vec<String> = store
            .list_markers("locks")
            .expect("list")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(left, [paused], "only the lease still expired goes");
    }

    proptest! {
        /// A pack with a live chunk is never dead; a dead pack holds no
        /// live chunk; a repack candidate is less than half live; dead
        /// segments and v1 chunks are exactly the unreferenced ones; an
        /// orphan is never an indexed pack.
        #[test]
        fn plans_are_exactly_their_rules(
            packs in prop::collection::vec(prop::collection::vec((0u32..40, 1u32..100), 1..6), 1..8),
            live in prop::collection::hash_set(0u32..40, 0..30),
            trees in prop::collection::vec(0u32..20, 0..10),
            tree_refs in prop::collection::hash_set(0u32..20, 0..10),
            pending in prop::collection::vec(0u32..12, 0..6),
        ) {
            let entries: Vec<PackEntry> = packs.iter().enumerate().map(|(n, blobs)| {
                let mut off = 0;
                let blobs: Vec<Blob> = blobs.iter().map(|&(c, len)| {
                    let b = Blob { hash: id(c), offset: off, stored_len: len, raw_len: len };
                    off += len;
                    b
                }).collect();
                PackEntry { id: id(1000 + n as u32), len: u64::from(off) + 16, blobs }
            }).collect();
            let map = crate::map::tests_support::map_of(vec![entries]);
            let l = Liveness {
                live: map.entries().iter().map(|e| live.iter().any(|&c| id(c) == e.hash)).collect(),
                trees: tree_refs.iter().map(|&t| id(500 + t)).collect(),
                v1: HashSet::new(),
                unreadable: Vec::new(),
                indexes: 0,
            };
            let trees: Vec<Id> = trees.iter().map(|&t| id(500 + t)).collect();
            let pending: Vec<Id> = pending.iter().map(|&p| id(1000 + p)).collect();
            let mark = plan(&Holdings { map: &map, trees: &trees, v1_chunks: &[], pending_of_dead: &pending }, &l);
            for (n, p) in map.packs().iter().enumerate() {
                let live_bytes: u64 = map.entries().iter().zip(&l.live).filter(|(e, &lv)| lv && e.pack as usize == n).map(|(e, _)| u64::from(e.stored_len)).sum();
                prop_assert_eq!(mark.packs.contains(&p.id), live_bytes == 0);
                if mark.repack.contains(&p.id) {
                    prop_assert!(live_bytes > 0 && (live_bytes as f64) < REPACK_BELOW * p.len as f64);
                }
            }
            for t in &trees {
                prop_assert_eq!(mark.trees.contains(t), !l.trees.contains(t));
            }
            for o in &mark.orphans {
                prop_assert!(map.pack_number(o).is_none());
            }
        }
    }
}
