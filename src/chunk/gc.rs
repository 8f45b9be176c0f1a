//! Garbage collection: deleting chunks that no index references, safely
//! while other nodes back up into the same store.
//!
//! Two phases, each run by every `btm gc`:
//!
//! 1. **Sweep** (under a sweep lease, see [`super::lease`]): for each mark
//!    older than the grace period by the store's clock, delete the chunks
//!    it lists that no index present *now* references, then delete the
//!    mark. If any backup holds a live lease the sweep is deferred.
//! 2. **Mark**: chunks referenced by no index and not already in a mark are
//!    written to a new mark, `gc/marks/<time>-<host>-<pid>`.
//!
//! A chunk is therefore deleted only after it has been unreferenced for a
//! whole grace period, was re-checked against the indexes at deletion
//! time, and no backup was running. Every step is idempotent, so a GC that
//! dies half-way leaves a valid store and the next run finishes the job.
//! The split between the pure decision ([`plan_sweep`], [`plan_mark`]) and
//! the store calls follows the rest of the engine.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::backup::with_retry;
use super::index::{ChunkHash, EntryKind};
use super::lease::{self, LeaseError, LeaseKind};
use super::{read_index, ChunkError};
use crate::store::{Marker, Store};

/// Default grace period between marking a chunk and deleting it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

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
    /// Indexes read.
    pub indexes: u64,
    /// Chunks in the store.
    pub chunks: u64,
    /// Distinct chunks referenced by an index.
    pub referenced: u64,
    /// Chunks deleted (or, dry run, that would be).
    pub deleted: u64,
    /// Marks whose grace period ended and were processed.
    pub marks_swept: u64,
    /// Chunks newly marked as unreferenced.
    pub marked: u64,
    /// Chunks in marks still within their grace period.
    pub pending: u64,
    /// Why the sweep was skipped, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
}

/// The body of a mark: unreferenced chunks seen at one time.
#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    version: u32,
    created: DateTime<Utc>,
    chunks: Vec<ChunkHash>,
}

const MARKS: &str = "gc/marks";

/// Every chunk referenced by every index in the store, and how many
/// indexes there are. An unreadable index is an error: GC cannot know what
/// it references.
pub fn referenced_chunks(store: &dyn Store) -> Result<(HashSet<ChunkHash>, u64), ChunkError> {
    let mut refs = HashSet::new();
    let names = with_retry(|| store.list_indexes())?;
    for name in &names {
        let idx = read_index(store, name)?;
        for e in &idx.entries {
            if let EntryKind::File { chunks, .. } = &e.kind {
                refs.extend(chunks.iter().filter_map(|c| c.hash));
            }
        }
    }
    Ok((refs, names.len() as u64))
}

/// Marks whose grace period has ended at store time `now`.
pub fn plan_sweep(marks: &[Marker], now: DateTime<Utc>, grace: Duration) -> Vec<&Marker> {
    marks
        .iter()
        .filter(|m| (now - m.modified).to_std().is_ok_and(|age| age >= grace))
        .collect()
}

/// Chunks to mark: present, unreferenced, and not already marked.
pub fn plan_mark(
    present: &[ChunkHash],
    referenced: &HashSet<ChunkHash>,
    already_marked: &HashSet<ChunkHash>,
) -> Vec<ChunkHash> {
    let mut out: Vec<ChunkHash> = present
        .iter()
        .filter(|h| !referenced.contains(h) && !already_marked.contains(h))
        .copied()
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn read_mark(store: &dyn Store, name: &str) -> Result<Mark, ChunkError> {
    let bad = |detail: String| ChunkError::Invalid(format!("GC mark {name}: {detail}"));
    let data = with_retry(|| store.get_marker(name))?;
    let raw = zstd::stream::decode_all(&data[..]).map_err(|e| bad(e.to_string()))?;
    let mark: Mark = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    if mark.version != 1 {
        return Err(bad(format!("unknown version {}", mark.version)));
    }
    Ok(mark)
}

/// Run both phases (see the module documentation).
pub fn gc(store: &dyn Store, opts: &GcOptions) -> Result<GcReport, ChunkError> {
    let mut report = GcReport::default();
    let marks = with_retry(|| store.list_markers(MARKS))?;
    let mut swept = Swept::default();
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

    // Mark phase. The sweep's view of the indexes, if it read them, is
    // reused: an index written since can only make us mark too much, which
    // the next sweep's own re-check makes harmless.
    let (referenced, indexes) = match swept.referenced {
        Some(r) => r,
        None => referenced_chunks(store)?,
    };
    let present = with_retry(|| store.list_chunks())?;
    let mut already = HashSet::new();
    for m in marks.iter().filter(|m| !swept.marks.contains(&m.name)) {
        let mark = match read_mark(store, &m.name) {
            // Another GC's sweep processed it meanwhile.
            Err(ChunkError::Store {
                source: crate::store::StoreError::NotFound(_),
                ..
            }) => continue,
            r => r?,
        };
        report.pending += mark.chunks.len() as u64;
        already.extend(mark.chunks);
    }
    let new = plan_mark(&present, &referenced, &already);
    report.indexes = indexes;
    report.chunks = present.len() as u64;
    report.referenced = referenced.len() as u64;
    report.marked = new.len() as u64;
    if !new.is_empty() && !opts.dry_run {
        let created = Utc::now();
        let mark = Mark {
            version: 1,
            created,
            chunks: new,
        };
        let json = serde_json::to_vec(&mark).map_err(|e| ChunkError::Invalid(e.to_string()))?;
        let data = zstd::stream::encode_all(&json[..], 3)
            .map_err(|e| ChunkError::Compress(e.to_string()))?;
        let name = format!(
            "{MARKS}/{}-{}-{}",
            created.format("%Y%m%dT%H%M%S%.9fZ"),
            lease::host_name(),
            std::process::id()
        );
        with_retry(|| store.put_marker(&name, &data))?;
    }
    Ok(report)
}

/// What the sweep did that the mark phase builds on.
#[derive(Default)]
struct Swept {
    /// Names of the marks processed (and deleted).
    marks: HashSet<String>,
    /// The indexes' references as read under the lease, with the index
    /// count, if the sweep read them.
    referenced: Option<(HashSet<ChunkHash>, u64)>,
}

/// The sweep phase over `marks` (listed by the caller: marks only ever
/// appear with a fresh time, so one listed later cannot be due).
fn sweep(
    store: &dyn Store,
    opts: &GcOptions,
    marks: &[Marker],
    report: &mut GcReport,
) -> Result<Swept, ChunkError> {
    // A sweep never waits, so there is nothing to cancel.
    let never = std::sync::atomic::AtomicBool::new(false);
    lease::with_lease(store, LeaseKind::Sweep, None, &never, |lease| {
        // "Now" on the store's clock: our lease marker's listed time.
        let now = lease.store_now().unwrap_or_else(Utc::now);
        let due = plan_sweep(marks, now, opts.grace);
        let mut swept = Swept::default();
        if due.is_empty() {
            return Ok(swept);
        }
        // Read the indexes only now, under the lease: any backup that
        // finished before we took it has its index here.
        let (referenced, count) = referenced_chunks(store)?;
        for m in due {
            let mark = read_mark(store, &m.name)?;
            for h in mark.chunks.iter().filter(|h| !referenced.contains(h)) {
                lease.check()?;
                if !opts.dry_run {
                    with_retry(|| store.delete_chunk(h))?;
                }
                report.deleted += 1;
            }
            if !opts.dry_run {
                with_retry(|| store.delete_marker(&m.name))?;
            }
            report.marks_swept += 1;
            swept.marks.insert(m.name.clone());
        }
        swept.referenced = Some((referenced, count));
        Ok(swept)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(i: u32) -> ChunkHash {
        ChunkHash::of(&i.to_le_bytes())
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

    proptest! {
        /// A mark never contains a referenced chunk, a chunk already
        /// marked, or a chunk not in the store.
        #[test]
        fn marks_are_exactly_the_new_unreferenced_chunks(
            present in prop::collection::vec(0u32..60, 0..60),
            referenced in prop::collection::hash_set(0u32..60, 0..40),
            marked in prop::collection::hash_set(0u32..60, 0..20),
        ) {
            let present: Vec<ChunkHash> = present.into_iter().map(h).collect();
            let referenced: HashSet<ChunkHash> = referenced.into_iter().map(h).collect();
            let marked: HashSet<ChunkHash> = marked.into_iter().map(h).collect();
            let out = plan_mark(&present, &referenced, &marked);
            for c in &out {
                prop_assert!(present.contains(c));
                prop_assert!(!referenced.contains(c));
                prop_assert!(!marked.contains(c));
            }
            for c in &present {
                if !referenced.contains(c) && !marked.contains(c) {
                    prop_assert!(out.contains(c));
                }
            }
        }
    }
}
