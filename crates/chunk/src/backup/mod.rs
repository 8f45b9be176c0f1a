//! Backing up a directory tree into a store.
//!
//! Threads and what flows between them:
//!
//! ```text
//! planner ──read tasks──▶ workers ──new chunks──▶ packer ──sealed packs──▶ uploaders
//!    │ entries, reused chunks        │ chunk results                            │ pack indexes
//!    └──────────────▶ writer ◀───────┘                                          ▼
//!                      │ tree segments                                       store
//! ```
//!
//! - The **planner** (the calling thread) walks the tree in walk order
//!   beside the previous backup of the tag ([`walk`]), decides per chunk
//!   what to do ([`crate::plan::backup_step`]), and hands chunks to
//!   read to the workers, in batches (a large chunk alone, the chunks of
//!   up to 64 small files at once). Files unchanged since the previous
//!   backup are not even opened.
//! - **Workers** (`workers`, CPU-bound) read a chunk with `pread`, skip it
//!   if all zeros, hash it, and unless the store has it compress it, check
//!   the round trip, and pass a batch's new chunks on in one buffer.
//! - The **packer** drops chunks already packed in this backup and fills
//!   packs; **uploaders** (`connections`, requests in flight, independent
//!   of cores) list each pack in the lease's `pending`, put it, and every
//!   64 packs (or 65,536 chunks) put a pack index naming them.
//! - The **writer** ([`writer`]) writes entries in walk order into tree
//!   segments, re-reading files that changed while read.
//!
//! Memory is bounded by configuration: `(connections + 1) × pack_size` for
//! packs, `workers × 3 × (chunk_size + 256 KiB)` for the batches' chunk
//! buffers, the known-chunk set (32 bytes per chunk in the store), and a
//! bounded look-ahead of files.
//! The head is written last, after every pack, pack index and segment it
//! depends on, by `commit`, which proves them all still stored if the
//! lease was lost meanwhile.
//!
//! Each stage is one file: `walk.rs` and `planner.rs`, `workers.rs`,
//! `upload.rs` (packer and uploaders), `writer.rs`, `commit.rs`, and
//! `adopt.rs` for the packs of dead writers. What they share (the stop and
//! first error, budgets, worker pools, counters) is [`crate::pipeline`].

mod adopt;
mod commit;
mod links;
mod planner;
mod upload;
pub mod walk;
mod workers;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

use super::buffers::Buffers;
use super::format::head::{format_for, validate_tag, Decoded, Head, IndexName};
use super::format::pack::DEFAULT_TARGET;
use super::format::packidx::PackEntry;
use super::format::tree::MAX_CHUNK;
use super::inventory::{self, Entries};
use super::lease::{Lease, LeaseKind};
use super::map::KnownSet;
use super::pipeline::{counters, Budget, Pipeline};
use super::throttle::Throttle;
use super::{with_retry, ChunkError, Policy, Progress, Repo};
use crate::store::Id;
use planner::Planner;
use walk::Parent;

/// Default chunk size; see `docs/format.md`, "Choosing the sizes".
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Packs written before a pack index names them.
const PACKS_PER_INDEX: usize = 64;
/// Chunks in those packs that trigger a pack index sooner: the entries are
/// held in memory until then (tiny files make small chunks, many per pack).
const BLOBS_PER_INDEX: usize = 65_536;
/// Files the planner may be ahead of the writer.
const LOOKAHEAD_FILES: usize = 4096;

/// How a backup is made.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The tag (exact match when finding the previous backup).
    pub tag: String,
    /// Free-form metadata stored in the head.
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Only paths matching this are backed up (directories leading to them
    /// are kept).
    pub filter: Option<regex::bytes::Regex>,
    /// Globs left out, each with where it came from ("--exclude", …), on
    /// top of the policy's key material ([`super::exclude`]).
    pub exclude: Vec<(String, String)>,
    /// What is key material, left out unless `include_secrets`.
    pub policy: Policy,
    /// Back up key material too.
    pub include_secrets: bool,
    /// Relative paths of append-only files (block logs).
    pub append_only: Vec<String>,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Pack target size in bytes.
    pub pack_size: usize,
    /// CPU worker threads.
    pub workers: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// Read every file even if unchanged since the previous backup.
    pub force_read: bool,
    /// Most bytes read from disk per second, so a backup never starves the
    /// node; `None` for no limit.
    pub max_rate: Option<u64>,
    /// The directory the previous backup of this tag was made from, if it
    /// is still there unchanged (a read-only snapshot). A changed file is
    /// then compared with its previous version extent by extent (FIEMAP):
    /// chunks whose bytes are shared on disk are reused without reading.
    /// Only files whose inode, size, mtime and ctime there match the
    /// previous index are compared, so a wrong directory costs reads, never
    /// correctness.
    pub parent: Option<PathBuf>,
    /// Updated as chunks are planned and processed.
    pub progress: Arc<Progress>,
}

impl BackupOptions {
    /// Defaults under `policy`: tag as given, 1 MiB chunks, 16 MiB packs,
    /// workers by cores, zstd level 1.
    pub fn new(tag: &str, policy: Policy) -> Self {
        BackupOptions {
            tag: tag.to_owned(),
            meta: serde_json::Map::new(),
            filter: None,
            exclude: Vec::new(),
            policy,
            include_secrets: false,
            append_only: Vec::new(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_TARGET,
            workers: super::default_workers(),
            zstd_level: 1,
            force_read: false,
            max_rate: None,
            parent: None,
            progress: Arc::default(),
        }
    }
}

/// What a backup did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BackupSummary {
    /// The new backup's name.
    pub name: String,
    /// Regular files recorded.
    pub files: u64,
    /// Directories recorded.
    pub dirs: u64,
    /// Symlinks recorded.
    pub symlinks: u64,
    /// Hard links recorded: other names of files recorded once.
    pub links: u64,
    /// Files reused whole from the previous backup without reading.
    pub files_unchanged: u64,
    /// Files read again because they changed while they were read.
    pub files_changed: u64,
    /// Logical bytes of all files.
    pub bytes_scanned: u64,
    /// Bytes read from disk.
    pub bytes_read: u64,
    /// Bytes hashed (read minus all-zero chunks).
    pub bytes_hashed: u64,
    /// Compressed bytes uploaded in packs.
    pub bytes_uploaded: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Chunks the store already had, or reused from the previous backup.
    pub chunks_reused: u64,
    /// Empty chunks (holes and zeros), never stored.
    pub chunks_empty: u64,
    /// Packs uploaded.
    pub packs_uploaded: u64,
    /// Tree segments the backup's index is made of.
    pub trees: u64,
    /// Of those, segments uploaded (the others the previous backup stored).
    pub trees_uploaded: u64,
    /// What was left out on purpose, by pattern.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<super::format::head::Excluded>,
}

counters! {
    /// What a backup counts, as its summary reports it. A chunk the store
    /// had and one reused from the previous backup both count as reused.
    struct Counters for BackupSummary {
        bytes_read,
        bytes_hashed,
        bytes_uploaded,
        chunks_uploaded,
        chunks_reused,
        chunks_empty,
        packs_uploaded,
    }
}

/// What every thread of one backup shares.
pub struct Shared<'a> {
    repo: &'a Repo,
    opts: &'a BackupOptions,
    lease: &'a Lease<'a>,
    pipeline: Pipeline,
    counters: Counters,
    /// How far the planner may run ahead of the writer: one token per
    /// file, taken by the planner and given back when the writer is done
    /// with the file. A channel, so that the planner can wait for a token
    /// and for reads to retry at once.
    lookahead: Receiver<()>,
    /// Where the writer gives the planner's tokens back.
    lookahead_back: Sender<()>,
    throttle: Option<Throttle>,
    /// Packs uploaded that no pack index names yet.
    unindexed: Mutex<Vec<PackEntry>>,
    /// Files being read, by the planner's number: what a retry reopens,
    /// and whether hard links name it.
    reading: Mutex<HashMap<u64, (Vec<u8>, bool)>>,
    /// Bytes of packs in memory, being filled or uploaded
    /// ([`upload::upload_budget`]).
    packs_in_memory: Arc<Budget>,
    /// Compressed frames' buffers, back from the packer
    /// ([`crate::buffers`]).
    frames: Buffers,
    /// Packs' buffers, back from the uploaders.
    pack_buffers: Buffers,
}

impl<'a> Shared<'a> {
    fn new(repo: &'a Repo, opts: &'a BackupOptions, lease: &'a Lease<'a>) -> Self {
        let upload_budget = upload::upload_budget(opts.pack_size, repo.upload_connections());
        let pipeline = Pipeline::new(&opts.progress.cancel);
        let (lookahead_back, lookahead) = crossbeam_channel::bounded(LOOKAHEAD_FILES);
        for _ in 0..LOOKAHEAD_FILES {
            let _ = lookahead_back.send(());
        }
        Shared {
            repo,
            opts,
            lease,
            counters: Counters::default(),
            lookahead,
            lookahead_back,
            throttle: opts.max_rate.map(Throttle::new),
            unindexed: Mutex::new(Vec::new()),
            reading: Mutex::new(HashMap::new()),
            packs_in_memory: pipeline.budget(upload_budget),
            pipeline,
            // A batch's frames each; as many as are in flight at once: on
            // the channel to the packer and in the workers' hands.
            frames: Buffers::new(
                opts.workers * 3,
                0,
                workers::frames_capacity(opts.chunk_size),
            ),
            // As many as the budget lets exist. A sealed pack is larger
            // than the target by its trailer (40 bytes a chunk before
            // compression): room for it up front, so that sealing does not
            // reallocate, and copy, the pack.
            pack_buffers: Buffers::new(
                (upload_budget / opts.pack_size as u64) as usize,
                opts.pack_size + opts.pack_size / 8,
                opts.pack_size * 2,
            ),
        }
    }

    /// A file left the writer: the planner may run one further ahead.
    fn file_written(&self) {
        let _ = self.lookahead_back.send(());
    }
}

/// Back up `root` into `store`. Returns once the head is written.
pub fn backup(repo: &Repo, root: &Path, opts: &BackupOptions) -> Result<BackupSummary, ChunkError> {
    validate_tag(&opts.tag).map_err(|e| ChunkError::Invalid(e.to_string()))?;
    if !(4096..=MAX_CHUNK).contains(&opts.chunk_size) {
        return Err(ChunkError::Invalid(format!(
            "chunk size {} must be between 4 KiB and 256 MiB",
            opts.chunk_size
        )));
    }
    if opts.pack_size < opts.chunk_size as usize || opts.pack_size > 1 << 30 {
        return Err(ChunkError::Invalid(format!(
            "pack size {} must be at least the chunk size and at most 1 GiB",
            opts.pack_size
        )));
    }
    let root_meta = std::fs::metadata(root).map_err(|e| ChunkError::io(root, e))?;
    if !root_meta.is_dir() {
        return Err(ChunkError::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let store = repo.store();
    if let Some(store_dir) = store.local_root() {
        let (s, r) = (
            std::fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_owned()),
            std::fs::canonicalize(root).map_err(|e| ChunkError::io(root, e))?,
        );
        if s.starts_with(&r) {
            return Err(ChunkError::StoreInsideSource { store: s, dir: r });
        }
    }
    // Listing the tag's backups does not depend on the lease, so it runs
    // while the lease is taken: one round trip fewer to a remote store.
    // The previous head itself is read under the lease (see `run`).
    std::thread::scope(|s| {
        let listing = s.spawn(|| inventory::list_backups(store, Some(&opts.tag)));
        super::lease::with_lease(
            store,
            LeaseKind::Backup,
            Some(&opts.tag),
            &opts.progress.cancel,
            |lease| {
                let names = listing
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
                run(repo, root, opts, lease, names)
            },
        )
    })
    .map_err(|e| match e {
        ChunkError::Lease(super::lease::LeaseError::Cancelled) => ChunkError::Cancelled,
        e => e,
    })
}

/// The backup proper, under a backup lease so that no GC sweep runs until
/// the head is written (see [`super::lease`]). `names` lists the tag's
/// backups, newest first.
fn run(
    repo: &Repo,
    root: &Path,
    opts: &BackupOptions,
    lease: &Lease<'_>,
    names: Vec<crate::IndexName>,
) -> Result<BackupSummary, ChunkError> {
    let started = Utc::now();
    let name = IndexName::new(started, &opts.tag).to_string();
    let start = starting_point(repo, opts, lease, names)?;
    let shared = Shared::new(repo, opts, lease);
    let mut summary = BackupSummary {
        name: name.clone(),
        ..BackupSummary::default()
    };
    let parent = start.parent.map(Parent::new);
    let (known, stored) = (&start.known, &start.stored_trees);
    let written = run_pipeline(&shared, root, known, stored, parent, &mut summary);
    shared.pipeline.outcome()?;
    let written = written.ok_or(ChunkError::Aborted)?;
    finish(&shared, &name, started, written, summary)
}

/// Run the stages of the header's diagram until the writer has written
/// every entry, or the pipeline stopped (then `None`).
fn run_pipeline<'a>(
    shared: &'a Shared<'a>,
    root: &Path,
    known: &KnownSet,
    stored_trees: &HashSet<Id>,
    parent: Option<Parent<'_>>,
    summary: &mut BackupSummary,
) -> Option<writer::Written> {
    let opts = shared.opts;
    // Batches of chunks (see `planner`), so a chunk each when they are
    // large.
    let (work_tx, work_rx) = crossbeam_channel::bounded(opts.workers * 2);
    // Second reads (few): never blocking the planner, taken first.
    let (urgent_tx, urgent_rx) = crossbeam_channel::unbounded();
    let (blob_tx, blob_rx) = crossbeam_channel::bounded(opts.workers * 2);
    let (pack_tx, pack_rx) = crossbeam_channel::bounded(0);
    let (msg_tx, msg_rx) = crossbeam_channel::unbounded();
    let (retry_tx, retry_rx) = crossbeam_channel::unbounded();
    std::thread::scope(|s| {
        let writer = s.spawn(move || {
            writer::run(shared, msg_rx, retry_tx, stored_trees)
                .map_err(|e| shared.pipeline.fail(e))
                .ok()
        });
        let (msgs, blobs) = (msg_tx.clone(), blob_tx.clone());
        shared.pipeline.spawn_workers_urgent(
            s,
            opts.workers,
            &urgent_rx,
            &work_rx,
            || workers::Scratch::new(opts.zstd_level),
            move |scratch, task| workers::work(shared, known, scratch, task, &blobs, &msgs),
        );
        drop((work_rx, urgent_rx));
        s.spawn(move || upload::packer(shared, blob_rx, pack_tx));
        shared.pipeline.spawn_workers(
            s,
            shared.repo.upload_connections(),
            &pack_rx,
            || Ok(()),
            move |(), packed| upload::uploader(shared, packed),
        );
        drop(pack_rx);
        let planned = Planner {
            shared,
            root,
            parent,
            work: work_tx,
            urgent: urgent_tx,
            msgs: msg_tx,
            known,
            blobs: blob_tx,
            scratch: None,
            batch: planner::Batch::default(),
            retries: retry_rx,
            next_id: 0,
            links: links::Links::default(),
            summary,
        }
        .run();
        if let Err(e) = planned {
            shared.pipeline.fail(e);
        }
        writer.join().ok().flatten()
    })
}

/// What a backup builds on.
struct Start<'r> {
    /// The previous backup's entries, their first segments fetched.
    parent: Option<Entries<'r>>,
    /// The previous backup's segments, which the store holds already.
    stored_trees: HashSet<Id>,
    /// The chunks the store has.
    known: KnownSet,
}

/// What a backup builds on: the previous backup of its tag (one with the
/// same chunk size) and the chunks the store has, after adopting the packs
/// of dead writers.
///
/// The previous head is read under the lease, so its chunks are safe to
/// rely on: a sweep that ran before the lease was taken read the heads
/// before this read, when this head was already there (heads are never
/// re-created), so it kept them; a later one sees the lease. The head, then
/// its first segments, load beside the chunk map.
fn starting_point<'r>(
    repo: &'r Repo,
    opts: &BackupOptions,
    lease: &Lease<'_>,
    names: Vec<crate::IndexName>,
) -> Result<Start<'r>, ChunkError> {
    let (store, cache, connections) = (repo.store(), repo.cache(), repo.metadata_connections());
    let (previous, known) = std::thread::scope(|s| {
        let previous = s.spawn(|| {
            let found = inventory::newest_readable(store, names, None)?.filter(
                |(_, idx)| matches!(idx, Decoded::V2(h) if h.chunk_size == opts.chunk_size),
            );
            Ok::<_, ChunkError>(found.map(|(name, decoded)| {
                let mut entries = repo.entries(&name, &decoded);
                entries.prefetch();
                (decoded, entries)
            }))
        });
        adopt::adopt_orphans(repo, lease);
        let known = KnownSet::load(store, cache, connections);
        let previous = previous
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (previous, known)
    });
    let (stored_trees, parent) = match previous? {
        Some((Decoded::V2(h), entries)) => (h.trees.iter().copied().collect(), Some(entries)),
        _ => (HashSet::new(), None),
    };
    Ok(Start {
        parent,
        stored_trees,
        known: known?,
    })
}

/// After the pipeline: index the last packs, make the upload durable,
/// then write the head, last, under a lease that is still ours.
fn finish(
    shared: &Shared<'_>,
    name: &str,
    started: chrono::DateTime<Utc>,
    written: writer::Written,
    mut summary: BackupSummary,
) -> Result<BackupSummary, ChunkError> {
    let (store, opts) = (shared.repo.store(), shared.opts);
    // Every pack durable, then named by a pack index, before the head.
    // The lease is read back meanwhile (one round trip fewer): a loss
    // after this reading is caught by the check after the head's put.
    let rest = std::mem::take(&mut *shared.unindexed.lock().unwrap_or_else(|p| p.into_inner()));
    let confirmed = std::thread::scope(|s| {
        let confirming = s.spawn(|| shared.lease.confirm());
        upload::write_pack_index(shared, rest)?;
        with_retry(store, || store.flush())
            .map_err(|e| ChunkError::store("making the upload durable", e))?;
        Ok::<_, ChunkError>(
            confirming
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        )
    })?;

    shared.counters.fill(&mut summary);
    summary.files_changed = written.changed;
    summary.trees = written.trees.len() as u64;
    summary.trees_uploaded = written.trees_uploaded;

    let head = Head {
        format: format_for(&written.totals),
        created: started,
        tag: opts.tag.clone(),
        chunk_size: opts.chunk_size,
        meta: opts.meta.clone(),
        trees: written.trees,
        totals: written.totals,
        excluded: summary.excluded.clone(),
    };
    commit::commit(shared, name, &head, confirmed)?;
    Ok(summary)
}
