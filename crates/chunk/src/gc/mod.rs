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
//! The decisions ([`plan()`], [`plan_sweep`]) are pure, in `gc/plan.rs`
//! beside [`liveness`], which reads what they decide on; `gc/sweep.rs`
//! and this module carry them out.
//! Every step is idempotent, and the mark is deleted last, so a GC that
//! dies half-way leaves a valid store and the next one finishes the job.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

mod plan;
mod sweep;

use crate::lease::{self, LeaseError};
use crate::map::ChunkMap;
use crate::store::{Id, Kind, Marker, Store};
use crate::{with_retry, ChunkError, Repo};
pub use plan::{liveness, plan, plan_sweep, Holdings, Liveness};
use sweep::sweep;

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
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: DEFAULT_GRACE,
            dry_run: false,
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

pub(super) fn read_mark(store: &dyn Store, name: &str) -> Result<Mark, ChunkError> {
    let bad = |detail: String| ChunkError::Invalid(format!("GC mark {name}: {detail}"));
    let data = with_retry(store, || store.get_marker(name))
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
    let now = with_retry(store, || store.list_markers("locks"))
        .map_err(|e| ChunkError::store("listing leases", e))?;
    for (m, _) in dead {
        if now.iter().any(|n| n == m) {
            let _ = with_retry(store, || store.delete_marker(&m.name));
        } else {
            tracing::info!(lease = %m.name, "an expired lease was refreshed since; kept");
        }
    }
    Ok(())
}

/// Run both phases (see the module documentation).
pub fn gc(repo: &Repo, opts: &GcOptions) -> Result<GcReport, ChunkError> {
    let store = repo.store();
    let mut report = GcReport::default();
    let marks = with_retry(store, || store.list_markers(MARKS))
        .map_err(|e| ChunkError::store("listing GC marks", e))?;
    let mut swept = HashSet::new();
    if !marks.is_empty() {
        match sweep(repo, opts, &marks, &mut report) {
            Ok(s) => swept = s,
            Err(ChunkError::Lease(LeaseError::Conflict(why))) => {
                tracing::info!(reason = %why, "GC sweep deferred");
                report.deferred = Some(why);
            }
            Err(e) => return Err(e),
        }
    }
    mark(repo, opts, &marks, &swept, &mut report)?;
    Ok(report)
}

/// The mark phase.
fn mark(
    repo: &Repo,
    opts: &GcOptions,
    marks: &[Marker],
    swept: &HashSet<String>,
    report: &mut GcReport,
) -> Result<(), ChunkError> {
    let store = repo.store();
    let cache = repo.cache();
    let map = ChunkMap::load(store, cache, repo.metadata_connections())?;
    let l = liveness(store, cache, &map, repo.metadata_connections())?;
    let trees: Vec<Id> = list_ids(store, Kind::Tree)?;
    let v1_chunks: Vec<Id> = list_ids(store, Kind::Chunk)?;
    let locks = with_retry(store, || store.list_markers("locks"))
        .map_err(|e| ChunkError::store("listing leases", e))?;
    let now = if locks.is_empty() {
        Utc::now()
    } else {
        with_retry(store, || lease::store_now(store))
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
    Ok(with_retry(store, || store.list(kind))
        .map_err(|e| ChunkError::store(format!("listing {}", kind.dir()), e))?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

pub(super) fn write_mark(store: &dyn Store, mark: &Mark) -> Result<(), ChunkError> {
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
    with_retry(store, || store.put_marker(&name, &data))
        .map_err(|e| ChunkError::store("writing a GC mark", e))
}

static MARK_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::Blob;
    use crate::format::packidx::PackEntry;
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
        let repo = Repo::new(std::sync::Arc::new(store.clone())).with_cache(None);
        let report = gc(&repo, &GcOptions::default()).expect("gc");
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
