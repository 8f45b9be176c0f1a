//! Exporting a snapshot off the machine through the chunk engine: the step
//! that lets a destroyed node be rebuilt from a store at a known height.
//!
//! An export always reads a snapshot, never the live volume: the btrfs
//! snapshot subvolume, or ZFS's `.zfs/snapshot/<h>` (a temporary read-only
//! clone where that directory does not exist). The snapshot is pinned
//! ([`btm::pin`]) while it is read, so retention cannot destroy it, and
//! only one export per volume runs at a time. After a successful export the
//! tag's backups beyond `keep` are deleted ([`btm_chunk::keep`]) and, if
//! enabled, garbage collection runs ([`btm_chunk::gc`]).
//!
//! The daemon and `btm export` both call [`export`]; the daemon decides
//! *when* with the pure [`export_due`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::height::identity::ChainIdentity;
use crate::height::NodeRpc;
use btm::lock::VolumeLock;
use btm::pin::Pin;
use btm::Ops;
use btm_chunk::backup::{BackupOptions, BackupSummary};
use btm_chunk::cache::Cache;
use btm_chunk::format::head::Decoded;
use btm_chunk::gc::{GcOptions, GcReport};
use btm_chunk::public::{Publishing, SigningKey};
use btm_chunk::store::{Store, StoreError};
use btm_chunk::{ChunkError, Progress, Repo};

/// Default number of backups kept per tag.
pub const DEFAULT_KEEP: u64 = 7;

/// How and where exports go (`[export]` in btm.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSettings {
    /// Where the store is (a path, `file://`, `s3://`, `gs://`, `az://`).
    pub store: btm_chunk::store::Location,
    /// Export when the height enters a new multiple of this many blocks.
    pub every: u64,
    /// Backup tag; the host name by default.
    pub tag: String,
    /// Backups of this tag kept after each export.
    pub keep: u64,
    /// Local metadata cache directory (default: see [`Cache::default_dir`]).
    pub cache: Option<PathBuf>,
    /// Worker threads.
    pub concurrency: usize,
    /// Store requests in flight; `None` for the store's default.
    pub connections: Option<usize>,
    /// Pack size; `None` for the default.
    pub pack_size: Option<usize>,
    /// Most bytes read per second.
    pub max_rate: Option<u64>,
    /// Relative paths of append-only files (block logs).
    pub append_only: Vec<String>,
    /// Globs left out besides validator key material.
    pub exclude: Vec<String>,
    /// Export validator key material too.
    pub include_secrets: bool,
    /// Run garbage collection after retention.
    pub gc: bool,
    /// Publish after each export, signing with this key file
    /// (docs/publishing.md); `None`: do not publish.
    pub publish: Option<PathBuf>,
    /// How long each published catalog stays valid (`publish_expires`).
    pub publish_expires: Option<Duration>,
    /// The GC grace period.
    pub gc_grace: Duration,
    /// The node RPC asked for the chain's identity at the exported height
    /// (recorded as `meta.chain`); `None` when no RPC is configured.
    pub chain: Option<NodeRpc>,
}

/// Whether a snapshot at `height` should be exported, given the height of
/// the last successful export and the last attempt (failed or not).
///
/// Heights fall in buckets `floor(h / every)`. A snapshot is due when it
/// is in a later bucket than both: so an export happens once per bucket,
/// and a failed one is retried at the next bucket, not at every snapshot.
pub fn export_due(
    height: u64,
    every: u64,
    last_exported: Option<u64>,
    last_attempted: Option<u64>,
) -> bool {
    let bucket = |h: u64| h / every.max(1);
    let after = |last: Option<u64>| last.is_none_or(|l| bucket(height) > bucket(l));
    after(last_exported) && after(last_attempted)
}

/// Errors of an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Another export of the volume is running.
    #[error("another export of volume '{0}' is running")]
    Busy(String),
    /// No snapshot to export.
    #[error("{0}")]
    NoSnapshot(String),
    /// The volume failed.
    #[error(transparent)]
    Volume(#[from] btm::Error),
    /// Pinning failed.
    #[error(transparent)]
    Pin(#[from] btm::pin::Error),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backup failed (no index was written).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The signing key of publishing cannot be used.
    #[error(transparent)]
    Key(#[from] btm_chunk::public::KeyError),
}

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The snapshot's height.
    pub height: u64,
    /// `<volume>@<height>`.
    pub snapshot: String,
    /// The backup; `None` when this height's bucket was already exported.
    pub backup: Option<BackupSummary>,
    /// The existing backup that made this one unnecessary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub already_exported: Option<String>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// Backups deleted by retention.
    pub pruned: Vec<String>,
    /// Garbage collection, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcReport>,
    /// Garbage collection ran after the backup and failed (the failure is
    /// among the warnings).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gc_failed: bool,
    /// The chain's identity at the height, when the node's RPC told it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainIdentity>,
    /// The store's catalog was written with this export (publishing).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub published: bool,
    /// Failures after the backup was safely written (retention, GC,
    /// removing the view): logged, not fatal.
    pub warnings: Vec<String>,
}

/// The heights an export request means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The newest snapshot.
    Newest,
    /// Exactly this height.
    Height(u64),
    /// This height, unless the store already has a backup of the tag in the
    /// same `every` bucket (the daemon's rule after a restart).
    DueHeight(u64),
}

/// Export one snapshot of the volume of `ops` to `store` (opened from
/// `s.store` by the caller). `progress` shows how far it
/// is and cancels it; `lock_wait` bounds the wait for the volume lock
/// (held only while picking and pinning the snapshot).
pub fn export(
    ops: &Ops,
    store: Arc<dyn Store>,
    which: Which,
    s: &ExportSettings,
    progress: Arc<Progress>,
    lock_wait: Duration,
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let vol = ops.volume().as_ref();
    let _one_at_a_time = VolumeLock::acquire(
        ops.dirs(),
        &format!("{}#export", vol.name()),
        Duration::ZERO,
    )
    .map_err(|_| ExportError::Busy(vol.name().to_owned()))?;
    let (height, _pin) = pick_and_pin(ops, which, lock_wait)?;
    let snapshot = format!("{}@{height}", vol.name());
    let mut report = ExportReport {
        height,
        snapshot: snapshot.clone(),
        backup: None,
        already_exported: None,
        duration_ms: 0,
        pruned: Vec::new(),
        gc: None,
        gc_failed: false,
        chain: None,
        published: false,
        warnings: Vec::new(),
    };
    // Loaded before anything is written: a publishing export with an
    // unusable key fails whole rather than leave an unpublished backup.
    let key = s.publish.as_deref().map(SigningKey::load).transpose()?;
    let publishing = key
        .as_ref()
        .map(|k| Publishing::new(Arc::clone(&store), k).with_expiry(s.publish_expires))
        .map(Arc::new);
    let store: Arc<dyn Store> = match &publishing {
        Some(p) => Arc::clone(p) as Arc<dyn Store>,
        None => store,
    };

    // Read here only to decide whether to export and which snapshot to
    // compare with. The backup reads the parent index again on purpose:
    // it relies on the parent's chunks, which is safe only for an index
    // read under its lease (see btm_chunk::lease).
    let parent = btm_chunk::inventory::latest(store.as_ref(), &s.tag, None)?;
    if let Some(name) = already_exported(parent.as_ref(), which, s.every, height) {
        tracing::info!(height, backup = %name, "already exported; skipping");
        report.already_exported = Some(name);
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    let meta = export_meta(ops, height, s.chain.as_ref(), &mut report);
    let opts = backup_options(s, meta, progress);
    let repo = repo_of(store, s);
    let summary = back_up_snapshot(ops, &repo, s, height, parent.as_ref(), opts, &mut report);
    report.backup = Some(summary?);
    maintain_and_publish(&repo, s, publishing.as_deref(), &mut report);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Back up the snapshot at `height` through a view of it.
fn back_up_snapshot(
    ops: &Ops,
    repo: &Repo,
    s: &ExportSettings,
    height: u64,
    parent: Option<&(String, Decoded)>,
    mut opts: BackupOptions,
    report: &mut ExportReport,
) -> Result<BackupSummary, ExportError> {
    let vol = ops.volume().as_ref();
    // On btrfs the previous export's snapshot, if still there, lets changed
    // files be compared extent by extent instead of read whole. Pinned so
    // it stays while we compare; any doubt about it only costs reads.
    let parent_view = parent
        .and_then(|(_, idx)| parent_snapshot(idx, vol.name()))
        .filter(|&h| h != height && vol.mode() == btm::volume::SnapMode::Btrfs)
        .and_then(|h| {
            let pin = Pin::acquire(ops.dirs(), vol.name(), h).ok()?;
            let view = vol.view(h).ok()?;
            Some((pin, view))
        });
    opts.parent = parent_view.as_ref().map(|(_, v)| v.path().to_owned());

    let view = vol.view(height).map_err(btm::Error::from)?;
    let snapshot = format!("{}@{height}", vol.name());
    tracing::info!(height, snapshot = %snapshot, path = %view.path().display(), store = %s.store, "export started");
    let summary = repo.backup(view.path(), &opts);
    if let Err(e) = view.close() {
        report
            .warnings
            .push(format!("could not remove the snapshot view: {e}"));
    }
    drop(parent_view);
    Ok(summary?)
}

/// After the backup: retention and garbage collection (unless the store is
/// someone's published store and this export does not publish), then the
/// catalog.
fn maintain_and_publish(
    repo: &Repo,
    s: &ExportSettings,
    publishing: Option<&Publishing>,
    report: &mut ExportReport,
) {
    // Deleting from a store someone published, without the key, would
    // leave its catalog naming what is gone: skip the deletions instead.
    let unkept = publishing.is_none()
        && btm_chunk::public::writer::is_published(repo.store()).unwrap_or(false);
    if unkept {
        report.warnings.push(
            "the store is published (it has a catalog) but this export does not publish: retention and garbage collection skipped so the catalog never names a deleted backup; set [export] publish = true and signing_key".into(),
        );
    } else {
        maintain(repo, s, report);
    }
    if let Some(p) = publishing {
        // The new head and its pack indexes, in one read and one write of
        // the catalog (retention may already have written it).
        match p.commit() {
            Ok(_) => report.published = true,
            Err(e) => report.warnings.push(format!(
                "publishing failed: {e}; the backup is safe, and `btm publish` or the next export publishes it"
            )),
        }
    }
}

/// The snapshot `which` names, pinned so pruning keeps it while it is read.
/// The volume lock is held only while picking and pinning.
fn pick_and_pin(ops: &Ops, which: Which, lock_wait: Duration) -> Result<(u64, Pin), ExportError> {
    let vol = ops.volume();
    let _lock = ops.lock(lock_wait)?;
    let heights = vol.heights().map_err(btm::Error::from)?;
    let height = match which {
        Which::Newest => *heights.first().ok_or_else(|| {
            ExportError::NoSnapshot(format!("volume '{}' has no btm snapshots", vol.name()))
        })?,
        Which::Height(h) | Which::DueHeight(h) => {
            if !heights.contains(&h) {
                return Err(ExportError::NoSnapshot(format!(
                    "volume '{}' has no snapshot at height {h}",
                    vol.name()
                )));
            }
            h
        }
    };
    Ok((height, Pin::acquire(ops.dirs(), vol.name(), height)?))
}

/// The name of the tag's newest backup when it makes exporting `height`
/// unnecessary: the same height, or with [`Which::DueHeight`] the same
/// `every` bucket or a later one.
fn already_exported(
    parent: Option<&(String, Decoded)>,
    which: Which,
    every: u64,
    height: u64,
) -> Option<String> {
    let (name, idx) = parent?;
    let prev = idx.height();
    let done = match which {
        Which::DueHeight(_) => prev.is_some_and(|p| p / every.max(1) >= height / every.max(1)),
        _ => prev == Some(height),
    };
    done.then(|| name.clone())
}

/// The index metadata of an export of `height`, with the chain's identity
/// when `chain` answers (a failure to ask is a warning in `report`).
fn export_meta(
    ops: &Ops,
    height: u64,
    chain: Option<&NodeRpc>,
    report: &mut ExportReport,
) -> serde_json::Map<String, serde_json::Value> {
    let mut meta = serde_json::Map::new();
    let vol = ops.volume();
    meta.insert("height".into(), height.into());
    let record = btm::window::records(ops.dirs(), vol.name())
        .get(&height)
        .copied()
        .unwrap_or_default();
    if let Some(after) = record.after {
        meta.insert("height_after".into(), after.into());
    }
    if let Some(durable) = record.durable {
        meta.insert("durable_height".into(), durable.into());
        if durable != height {
            tracing::warn!(
                height,
                durable,
                "the exported snapshot holds the node's state at another height than its label"
            );
            report.warnings.push(format!(
                "snapshot {height} holds the node's state at height {durable}: a node rebuilt from this export starts at {durable}"
            ));
        }
    }
    meta.insert("volume".into(), vol.name().into());
    meta.insert("mode".into(), vol.mode().to_string().into());
    meta.insert("snapshot".into(), report.snapshot.clone().into());
    meta.insert("host".into(), btm::host::name().into());
    meta.insert("btm_version".into(), env!("CARGO_PKG_VERSION").into());
    // Asked before the backup, while the node surely still has the block.
    // An export without it is still a good export; `verify` says so.
    if let Some(rpc) = chain {
        match rpc.identity(height) {
            Ok(id) => {
                tracing::info!(height, block_hash = %id.block_hash, state_hash = id.state_hash.as_deref().unwrap_or("-"), "chain identity recorded");
                if let Ok(v) = serde_json::to_value(&id) {
                    meta.insert("chain".into(), v);
                }
                report.chain = Some(id);
            }
            Err(e) => {
                tracing::warn!(height, error = %e, "chain identity not recorded");
                report.warnings.push(format!(
                    "the chain's identity at height {height} was not recorded: {e}"
                ));
            }
        }
    }
    meta
}

/// The backup options an export's settings mean.
fn backup_options(
    s: &ExportSettings,
    meta: serde_json::Map<String, serde_json::Value>,
    progress: Arc<Progress>,
) -> BackupOptions {
    let mut opts = BackupOptions::new(&s.tag, crate::node_policy());
    opts.meta = meta;
    opts.append_only = s.append_only.clone();
    opts.exclude = s
        .exclude
        .iter()
        .map(|g| (g.clone(), "exclude in [export]".to_owned()))
        .collect();
    opts.include_secrets = s.include_secrets;
    opts.workers = s.concurrency.max(1);
    if let Some(p) = s.pack_size {
        opts.pack_size = p;
    }
    opts.max_rate = s.max_rate;
    opts.progress = progress;
    opts
}

/// The export store as its settings open it: their cache (else the
/// default one) and their connections.
fn repo_of(store: Arc<dyn Store>, s: &ExportSettings) -> Repo {
    let repo = Repo::new(store).with_connections(s.connections);
    match &s.cache {
        Some(dir) => repo.with_cache(Some(Cache::new(dir.clone()))),
        None => repo,
    }
}

/// After a written backup: the tag's retention, then garbage collection.
/// Both failures are warnings; the backup is safe either way.
fn maintain(repo: &Repo, s: &ExportSettings, report: &mut ExportReport) {
    match repo.prune(&s.tag, s.keep, false) {
        Ok(pruned) => report.pruned = pruned,
        Err(e) => report
            .warnings
            .push(format!("backup retention failed: {e}")),
    }
    if s.gc {
        let opts = GcOptions {
            grace: s.gc_grace,
            dry_run: false,
        };
        match repo.gc(&opts) {
            Ok(g) => report.gc = Some(g),
            Err(e) => {
                report.gc_failed = true;
                report
                    .warnings
                    .push(format!("garbage collection failed: {e}"));
            }
        }
    }
}

/// The height of the snapshot of `volume` that the backup `idx` was made
/// from, according to its metadata.
fn parent_snapshot(idx: &Decoded, volume: &str) -> Option<u64> {
    let h = idx.height()?;
    let made_from = idx.meta().get("snapshot")?.as_str()?;
    (made_from == format!("{volume}@{h}")).then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn due_once_per_bucket_and_failures_wait_for_the_next() {
        assert!(export_due(1000, 1000, None, None));
        assert!(!export_due(1010, 1000, Some(1000), Some(1000)));
        assert!(export_due(2000, 1000, Some(1000), Some(1000)));
        // A failure at 2000: not retried at 2010, but at 3000.
        assert!(!export_due(2010, 1000, Some(1000), Some(2000)));
        assert!(export_due(3000, 1000, Some(1000), Some(2000)));
        // Polled heights are not exact multiples; buckets still rule.
        assert!(export_due(2003, 1000, Some(1007), None));
    }

    proptest! {
        /// Replaying snapshots in height order with every export
        /// succeeding, exports happen exactly at the first snapshot of each
        /// new bucket.
        #[test]
        fn one_export_per_bucket(every in 1u64..500, steps in prop::collection::vec(1u64..300, 1..200)) {
            let mut h = 0;
            let mut last = None;
            let mut buckets = std::collections::BTreeSet::new();
            for step in steps {
                h += step;
                if export_due(h, every, last, last) {
                    prop_assert!(buckets.insert(h / every), "bucket {} twice", h / every);
                    last = Some(h);
                } else {
                    prop_assert!(buckets.contains(&(h / every)));
                }
            }
        }
    }
}
