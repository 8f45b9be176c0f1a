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
//!   read to the workers. Files unchanged since the previous backup are not
//!   even opened.
//! - **Workers** (`workers`, CPU-bound) read a chunk with `pread`, skip it
//!   if all zeros, hash it, and unless the store has it compress it, check
//!   the round trip, and pass it on.
//! - The **packer** drops chunks already packed in this backup and fills
//!   packs; **uploaders** (`connections`, requests in flight, independent
//!   of cores) list each pack in the lease's `pending`, put it, and every
//!   64 packs (or 65,536 chunks) put a pack index naming them.
//! - The **writer** ([`writer`]) writes entries in walk order into tree
//!   segments, re-reading files that changed while read.
//!
//! Memory is bounded by configuration: `(connections + 1) × pack_size` for
//! packs, `workers × 3 × chunk_size` for chunk buffers, the known-chunk set
//! (32 bytes per chunk in the store), and a bounded look-ahead of files.
//! The head is written last, after every pack, pack index and segment it
//! depends on, by `commit`, which proves them all still stored if the
//! lease was lost meanwhile.

mod commit;
pub mod walk;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::Utc;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use serde::Serialize;

use super::budget::{Budget, Permit};
use super::buffers::Buffers;
use super::cache::Cache;
use super::exclude::Exclusions;
use super::format::head::{validate_tag, Decoded, Head, IndexName, FORMAT_VERSION};
use super::format::pack::{PackBuilder, SealedPack, DEFAULT_TARGET};
use super::format::packidx::{self, PackEntry};
use super::format::tree::{ChunkRef, Entry, EntryKind, MAX_CHUNK};
use super::lease::{Lease, LeaseKind};
use super::map::KnownSet;
use super::plan::{backup_step, BackupStep, FileRule};
use super::throttle::Throttle;
use super::{catalog, with_retry, ChunkError, Progress};
use crate::store::{Id, Kind, Store};
use walk::{Parent, Walked, Walker};
use writer::{ChunkFail, Msg, Signature};

/// Default chunk size; see `docs/format.md`, "Choosing the sizes".
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Packs written before a pack index names them.
const PACKS_PER_INDEX: usize = 64;
/// Chunks in those packs that trigger a pack index sooner: the entries are
/// held in memory until then (tiny files make small chunks, many per pack).
const BLOBS_PER_INDEX: usize = 65_536;
/// Files the planner may be ahead of the writer.
const LOOKAHEAD_FILES: usize = 4096;

/// Default requests in flight for a store: a local directory gains little
/// from more than a couple; a bucket far away needs several to keep the
/// link busy. See `docs/performance.md` for the measurements.
pub fn default_connections(store: &dyn Store) -> usize {
    if store.local_root().is_some() {
        2
    } else {
        4
    }
}

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
    /// top of validator key material ([`super::exclude`]).
    pub exclude: Vec<(String, String)>,
    /// Back up validator key material too.
    pub include_secrets: bool,
    /// Relative paths of append-only files (block logs).
    pub append_only: Vec<String>,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Pack target size in bytes.
    pub pack_size: usize,
    /// CPU worker threads.
    pub workers: usize,
    /// Store requests in flight (pack uploads); `None` for the store's
    /// default.
    pub connections: Option<usize>,
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
    /// The local metadata cache.
    pub cache: Option<Cache>,
    /// Updated as chunks are planned and processed.
    pub progress: Arc<Progress>,
}

impl BackupOptions {
    /// Defaults: tag as given, 1 MiB chunks, 16 MiB packs, workers by
    /// cores, connections by store, zstd level 1, the default cache.
    pub fn new(tag: &str) -> Self {
        BackupOptions {
            tag: tag.to_owned(),
            meta: serde_json::Map::new(),
            filter: None,
            exclude: Vec::new(),
            include_secrets: false,
            append_only: Vec::new(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_TARGET,
            workers: super::default_workers(),
            connections: None,
            zstd_level: 1,
            force_read: false,
            max_rate: None,
            parent: None,
            cache: Cache::default_dir().map(Cache::new),
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

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    hashed: AtomicU64,
    uploaded: AtomicU64,
    chunks_uploaded: AtomicU64,
    known: AtomicU64,
    reused: AtomicU64,
    empty: AtomicU64,
    packs: AtomicU64,
}

/// A counting limit on how far the planner may run ahead.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn try_take(&self, wait: Duration) -> bool {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if *free == 0 {
            free = self
                .freed
                .wait_timeout(free, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if *free > 0 {
            *free -= 1;
            true
        } else {
            false
        }
    }

    fn give(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.freed.notify_one();
    }
}

/// What every thread of one backup shares.
pub struct Shared<'a> {
    store: &'a dyn Store,
    opts: &'a BackupOptions,
    lease: &'a Lease<'a>,
    abort: AtomicBool,
    first_error: Mutex<Option<ChunkError>>,
    counters: Counters,
    slots: Slots,
    throttle: Option<Throttle>,
    /// Packs uploaded that no pack index names yet.
    unindexed: Mutex<Vec<PackEntry>>,
    /// Files being read, by the planner's number: what a retry reopens.
    reading: Mutex<HashMap<u64, Vec<u8>>>,
    /// Bytes of packs in memory, being filled or uploaded
    /// ([`upload_budget`]).
    packs_in_memory: Budget,
    /// Compressed frames' buffers, back from the packer
    /// ([`crate::buffers`]).
    frames: Buffers,
    /// Packs' buffers, back from the uploaders.
    pack_buffers: Buffers,
}

impl<'a> Shared<'a> {
    fn new(
        store: &'a dyn Store,
        opts: &'a BackupOptions,
        lease: &'a Lease<'a>,
        connections: usize,
    ) -> Self {
        let upload_budget = upload_budget(opts.pack_size, connections);
        Shared {
            store,
            opts,
            lease,
            abort: AtomicBool::new(false),
            first_error: Mutex::new(None),
            counters: Counters::default(),
            slots: Slots {
                free: Mutex::new(LOOKAHEAD_FILES),
                freed: Condvar::new(),
            },
            throttle: opts.max_rate.map(Throttle::new),
            unindexed: Mutex::new(Vec::new()),
            reading: Mutex::new(HashMap::new()),
            packs_in_memory: Budget::new(upload_budget),
            // As many as are in flight at once: on the channel to the
            // packer and in the workers' hands.
            frames: Buffers::new(
                opts.workers * 3,
                0,
                zstd::zstd_safe::compress_bound(opts.chunk_size as usize),
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
}

impl Shared<'_> {
    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.opts.progress.cancelled()
    }

    /// Record the first real error and stop everything.
    fn fail(&self, e: ChunkError) {
        if !matches!(e, ChunkError::Aborted) {
            self.first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
        self.abort.store(true, Ordering::Relaxed);
    }

    /// A file left the writer: the planner may run one further ahead.
    fn file_written(&self) {
        self.slots.give();
    }
}

/// Back up `root` into `store`. Returns once the head is written.
pub fn backup(
    store: &dyn Store,
    root: &Path,
    opts: &BackupOptions,
) -> Result<BackupSummary, ChunkError> {
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
        let listing = s.spawn(|| catalog::list_backups(store, Some(&opts.tag)));
        super::lease::with_lease(
            store,
            LeaseKind::Backup,
            Some(&opts.tag),
            &opts.progress.cancel,
            |lease| {
                let names = listing
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
                run(store, root, opts, lease, names)
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
    store: &dyn Store,
    root: &Path,
    opts: &BackupOptions,
    lease: &Lease<'_>,
    names: Vec<crate::IndexName>,
) -> Result<BackupSummary, ChunkError> {
    let started = Utc::now();
    let name = IndexName::new(started, &opts.tag).to_string();
    let connections = opts
        .connections
        .unwrap_or_else(|| default_connections(store))
        .max(1);
    let cache = opts.cache.as_ref();
    let (previous, known) = starting_point(store, opts, lease, names, connections)?;
    let stored_trees: HashSet<Id> = match &previous {
        Some((_, Decoded::V2(h))) => h.trees.iter().copied().collect(),
        _ => HashSet::new(),
    };
    let shared = Shared::new(store, opts, lease, connections);
    let mut summary = BackupSummary {
        name: name.clone(),
        ..BackupSummary::default()
    };

    let (work_tx, work_rx) = mpsc::sync_channel::<ReadTask>(opts.workers * 4);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (blob_tx, blob_rx) = mpsc::sync_channel::<Blob>(opts.workers * 2);
    let (pack_tx, pack_rx) = mpsc::sync_channel::<(SealedPack, Permit<'_>)>(0);
    let pack_rx = Arc::new(Mutex::new(pack_rx));
    let (msg_tx, msg_rx) = mpsc::channel::<Msg>();
    let (retry_tx, retry_rx) = mpsc::channel::<Option<(u64, u32)>>();

    let written = std::thread::scope(|s| {
        let shared = &shared;
        let known = &known;
        let stored = &stored_trees;
        let writer = s.spawn(
            move || match writer::run(shared, msg_rx, retry_tx, stored) {
                Ok(w) => Some(w),
                Err(e) => {
                    shared.fail(e);
                    None
                }
            },
        );
        for _ in 0..opts.workers {
            let (rx, blobs, msgs) = (Arc::clone(&work_rx), blob_tx.clone(), msg_tx.clone());
            s.spawn(move || worker(shared, known, &rx, &blobs, &msgs));
        }
        drop(blob_tx);
        drop(work_rx);
        s.spawn(move || packer(shared, blob_rx, pack_tx));
        for _ in 0..connections {
            let rx = Arc::clone(&pack_rx);
            s.spawn(move || uploader(shared, &rx));
        }
        drop(pack_rx);

        let parent = previous.as_ref().map(|(pname, idx)| {
            Parent::new(catalog::entries(store, cache, pname, idx, connections))
        });
        let planned = Planner {
            shared,
            root,
            parent,
            work: work_tx,
            msgs: msg_tx,
            retries: retry_rx,
            next_id: 0,
            summary: &mut summary,
        }
        .run();
        if let Err(e) = planned {
            shared.fail(e);
        }
        writer.join().ok().flatten()
    });
    if let Some(e) = shared
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
    }
    if opts.progress.cancelled() {
        return Err(ChunkError::Cancelled);
    }
    let written = written.ok_or(ChunkError::Aborted)?;
    finish(&shared, &name, started, written, summary)
}

/// What a backup builds on: the previous backup of its tag (one with the
/// same chunk size) and the chunks the store has, after adopting the packs
/// of dead writers.
///
/// The previous head is read under the lease, so its chunks are safe to
/// rely on: a sweep that ran before the lease was taken read the heads
/// before this read, when this head was already there (heads are never
/// re-created), so it kept them; a later one sees the lease. The head and
/// the chunk map load side by side.
fn starting_point(
    store: &dyn Store,
    opts: &BackupOptions,
    lease: &Lease<'_>,
    names: Vec<crate::IndexName>,
    connections: usize,
) -> Result<(Option<(String, Decoded)>, KnownSet), ChunkError> {
    let cache = opts.cache.as_ref();
    let (previous, known) = std::thread::scope(|s| {
        let previous = s.spawn(|| catalog::newest_readable(store, names, None));
        adopt_orphans(store, lease, cache, connections);
        let known = KnownSet::load(store, cache, connections);
        let previous = previous
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (previous, known)
    });
    let previous = previous?
        .filter(|(_, idx)| matches!(idx, Decoded::V2(h) if h.chunk_size == opts.chunk_size));
    Ok((previous, known?))
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
    let (store, opts) = (shared.store, shared.opts);
    // Every pack durable, then named by a pack index, before the head.
    let rest = std::mem::take(&mut *shared.unindexed.lock().unwrap_or_else(|p| p.into_inner()));
    write_pack_index(shared, rest)?;
    with_retry(|| store.flush()).map_err(|e| ChunkError::store("making the upload durable", e))?;

    let c = &shared.counters;
    summary.files_changed = written.changed;
    summary.bytes_read = c.read.load(Ordering::Relaxed);
    summary.bytes_hashed = c.hashed.load(Ordering::Relaxed);
    summary.bytes_uploaded = c.uploaded.load(Ordering::Relaxed);
    summary.chunks_uploaded = c.chunks_uploaded.load(Ordering::Relaxed);
    summary.chunks_reused = c.reused.load(Ordering::Relaxed) + c.known.load(Ordering::Relaxed);
    summary.chunks_empty = c.empty.load(Ordering::Relaxed);
    summary.packs_uploaded = c.packs.load(Ordering::Relaxed);
    summary.trees = written.trees.len() as u64;
    summary.trees_uploaded = written.trees_uploaded;

    let head = Head {
        format: FORMAT_VERSION,
        created: started,
        tag: opts.tag.clone(),
        chunk_size: opts.chunk_size,
        meta: opts.meta.clone(),
        trees: written.trees,
        totals: written.totals,
        excluded: summary.excluded.clone(),
    };
    commit::commit(shared, name, &head)?;
    Ok(summary)
}

/// Index the packs a dead writer uploaded but never indexed, so that this
/// backup reuses them instead of uploading their chunks again: a killed
/// export resumes. A writer is dead when its lease expired, or when it is
/// proven gone ([`super::lease::holder`]). Each pack is checked
/// (footer and trailer) before a pack index names it; adopting the pack of
/// a writer that is in fact alive only lists its chunks twice, which the
/// format allows. Failures only cost re-uploads, so they are logged.
fn adopt_orphans(store: &dyn Store, lease: &Lease<'_>, cache: Option<&Cache>, connections: usize) {
    let dead = super::lease::dead_holders(store, &lease.others_listed(), lease.store_now());
    let mut adopted = Vec::new();
    let mut done_leases = Vec::new();
    for (name, info) in dead {
        let found = super::pool::map(&info.pending, connections, |id| {
            read_trailer(store, id).ok()
        });
        let all = found.iter().all(Option::is_some);
        adopted.extend(found.into_iter().flatten());
        if all {
            done_leases.push(name);
        }
    }
    if adopted.is_empty() {
        return;
    }
    let ids: Vec<Id> = adopted.iter().map(|p| p.id).collect();
    let result = packidx::encode(&adopted)
        .map_err(ChunkError::from)
        .and_then(|data| {
            let data = crate::store::Bytes::from(data);
            let id = Id::of(&data);
            with_retry(|| store.put(Kind::PackIndex, &id, data.clone()))
                .map_err(|e| ChunkError::store("indexing packs of an interrupted backup", e))?;
            if let Some(c) = cache {
                c.put(Kind::PackIndex, &id, &data);
            }
            Ok(())
        });
    match result {
        Ok(()) => {
            tracing::info!(
                packs = ids.len(),
                "reusing packs uploaded by an interrupted backup"
            );
            for name in done_leases {
                let _ = store.delete_marker(&name);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not index the packs of an interrupted backup; uploading again")
        }
    }
}

/// A pack's size and contents from its footer and trailer (two ranged
/// reads, not the whole pack).
fn read_trailer(store: &dyn Store, id: &Id) -> Result<PackEntry, ChunkError> {
    use super::format::pack::{parse_footer, parse_trailer, FOOTER_LEN};
    let what = format!("pack {id}");
    let len = with_retry(|| store.size(Kind::Pack, id))?;
    let foot_at = len
        .checked_sub(FOOTER_LEN as u64)
        .ok_or_else(|| ChunkError::Invalid(format!("{what} is too short")))?;
    let footer = with_retry(|| store.get_range(Kind::Pack, id, foot_at, FOOTER_LEN as u64))?;
    let (tlen, count) = parse_footer(&footer, &what)?;
    let frames = foot_at
        .checked_sub(u64::from(tlen))
        .ok_or_else(|| ChunkError::Invalid(format!("{what}: trailer longer than the pack")))?;
    let trailer = with_retry(|| store.get_range(Kind::Pack, id, frames, u64::from(tlen)))?;
    let blobs = parse_trailer(&trailer, count, frames, &what)?;
    Ok(PackEntry {
        id: *id,
        len,
        blobs,
    })
}

/// One chunk for a worker to read.
struct ReadTask {
    id: u64,
    attempt: u32,
    index: u64,
    file: Arc<File>,
    path: Arc<[u8]>,
    off: u64,
    len: u64,
}

/// A new chunk for the packer.
struct Blob {
    hash: Id,
    raw_len: u32,
    frame: Vec<u8>,
}

struct Planner<'s, 'a> {
    shared: &'s Shared<'a>,
    root: &'s Path,
    parent: Option<Parent<'a>>,
    work: SyncSender<ReadTask>,
    msgs: Sender<Msg>,
    retries: Receiver<Option<(u64, u32)>>,
    next_id: u64,
    summary: &'s mut BackupSummary,
}

/// A directory whose entry waits for a descendant that passes the filter.
struct HeldDir {
    entry: Entry,
    depth: usize,
    sent: bool,
}

fn entry_of(rel: Vec<u8>, kind: EntryKind, st: &FileStat) -> Entry {
    Entry {
        path: rel,
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
        ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        ino: st.st_ino,
        append_only: false,
    }
}

/// Open a file for reading without following a symlink or updating its
/// access time (where permitted).
fn open_at(dir: &impl AsFd, name: &[u8]) -> nix::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let name = OsStr::from_bytes(name);
    match openat(dir.as_fd(), name, flags | OFlag::O_NOATIME, Mode::empty()) {
        Err(nix::errno::Errno::EPERM) => openat(dir.as_fd(), name, flags, Mode::empty()),
        r => r,
    }
    .map(File::from)
}

impl Planner<'_, '_> {
    fn run(mut self) -> Result<(), ChunkError> {
        let walked = self.walk();
        if walked.is_err() {
            self.shared.abort.store(true, Ordering::Relaxed);
        }
        let _ = self.msgs.send(Msg::WalkDone);
        // Files may still need another read until the writer is done.
        while let Ok(Some((id, attempt))) = self.retries.recv() {
            if let Err(e) = self.reread(id, attempt) {
                self.shared.fail(e);
            }
        }
        walked
    }

    fn walk(&mut self) -> Result<(), ChunkError> {
        let mut walker = Walker::new(self.root)?;
        let mut exclusions =
            Exclusions::new(&self.shared.opts.exclude, self.shared.opts.include_secrets)?;
        let mut held: Vec<HeldDir> = Vec::new();
        while let Some(w) = walker.next() {
            let w = w?;
            self.serve_retries()?;
            if self.shared.aborted() {
                return Err(ChunkError::Aborted);
            }
            held.retain(|d| d.depth < w.depth);
            let kind = w.kind();
            if exclusions.excludes(&w.rel) {
                if kind == SFlag::S_IFDIR {
                    walker.skip_children(&w.rel);
                }
                continue;
            }
            let matches = self
                .shared
                .opts
                .filter
                .as_ref()
                .is_none_or(|re| re.is_match(&w.rel));
            match kind {
                SFlag::S_IFDIR => {
                    let entry = entry_of(w.rel.clone(), EntryKind::Dir, &w.stat);
                    if self.shared.opts.filter.is_none() {
                        self.send_entry(entry);
                    } else {
                        held.push(HeldDir {
                            entry,
                            depth: w.depth,
                            sent: false,
                        });
                        if matches {
                            self.release(&mut held);
                        }
                    }
                }
                SFlag::S_IFLNK | SFlag::S_IFREG if matches => {
                    self.release(&mut held);
                    if kind == SFlag::S_IFLNK {
                        self.symlink(&w)?;
                    } else {
                        self.file(&w)?;
                    }
                }
                SFlag::S_IFLNK | SFlag::S_IFREG => {}
                _ => {
                    tracing::warn!(path = %String::from_utf8_lossy(&w.rel), "skipping special file (socket, fifo or device)");
                }
            }
        }
        self.summary.excluded = exclusions.report();
        Ok(())
    }

    /// Send the held directories that lead to an entry being sent.
    fn release(&mut self, held: &mut [HeldDir]) {
        for d in held.iter_mut().filter(|d| !d.sent) {
            d.sent = true;
            self.send_entry(d.entry.clone());
        }
    }

    fn send_entry(&mut self, e: Entry) {
        match e.kind {
            EntryKind::Dir => self.summary.dirs += 1,
            EntryKind::Symlink { .. } => self.summary.symlinks += 1,
            EntryKind::File { .. } => {}
        }
        let _ = self.msgs.send(Msg::Entry(e));
    }

    fn serve_retries(&mut self) -> Result<(), ChunkError> {
        while let Ok(r) = self.retries.try_recv() {
            match r {
                Some((id, attempt)) => self.reread(id, attempt)?,
                None => return Err(ChunkError::Aborted),
            }
        }
        Ok(())
    }

    /// Wait for room to run ahead, serving retries meanwhile (the file the
    /// writer waits for may be one that needs another read).
    fn take_slot(&mut self) -> Result<(), ChunkError> {
        while !self.shared.slots.try_take(Duration::from_millis(20)) {
            self.serve_retries()?;
            if self.shared.aborted() {
                return Err(ChunkError::Aborted);
            }
        }
        Ok(())
    }

    fn symlink(&mut self, w: &Walked) -> Result<(), ChunkError> {
        let target = nix::fcntl::readlinkat(w.dir.as_fd(), OsStr::from_bytes(&w.name))
            .map_err(|e| ChunkError::io(&self.root.join(OsStr::from_bytes(&w.rel)), e.into()))?;
        let entry = entry_of(
            w.rel.clone(),
            EntryKind::Symlink {
                target: target.as_bytes().to_vec(),
            },
            &w.stat,
        );
        self.send_entry(entry);
        Ok(())
    }

    fn file(&mut self, w: &Walked) -> Result<(), ChunkError> {
        self.take_slot()?;
        let id = self.next_id;
        self.next_id += 1;
        let opts = self.shared.opts;
        let append_only = opts.append_only.iter().any(|a| a.as_bytes() == &w.rel[..]);
        let prev = match &mut self.parent {
            Some(p) => p
                .seek(&w.rel)?
                .filter(|e| matches!(e.kind, EntryKind::File { .. })),
            None => None,
        };
        let size = w.stat.st_size as u64;
        self.summary.files += 1;
        self.summary.bytes_scanned += size;
        let unchanged = prev.as_ref().is_some_and(|p| {
            !opts.force_read
                && p.size() == size
                && p.mtime_ns == w.stat.st_mtime * 1_000_000_000 + w.stat.st_mtime_nsec
                && p.ctime_ns == w.stat.st_ctime * 1_000_000_000 + w.stat.st_ctime_nsec
                && p.ino == w.stat.st_ino
        });
        if unchanged {
            // Reused whole, without opening the file.
            self.summary.files_unchanged += 1;
            let mut entry = entry_of(w.rel.clone(), EntryKind::File { size }, &w.stat);
            entry.append_only = append_only;
            let n = size.div_ceil(opts.chunk_size);
            let _ = self.msgs.send(Msg::File {
                id,
                attempt: 1,
                entry,
                chunks: n,
                read: None,
            });
            for index in 0..n {
                let c = self.parent_chunk()?.ok_or_else(|| {
                    ChunkError::Invalid(format!(
                        "the previous backup's record of {} is shorter than the file",
                        String::from_utf8_lossy(&w.rel)
                    ))
                })?;
                self.reused(id, 1, index, c);
            }
            return Ok(());
        }
        let file = match open_at(&w.dir, &w.name) {
            Ok(f) => f,
            // Gone since the walk saw it.
            Err(nix::errno::Errno::ENOENT) => {
                self.summary.files -= 1;
                self.summary.bytes_scanned -= size;
                self.shared.file_written();
                return Ok(());
            }
            Err(e) => {
                return Err(ChunkError::io(
                    &self.root.join(OsStr::from_bytes(&w.rel)),
                    e.into(),
                ))
            }
        };
        let prev = prev.map(|p| (p.size(), p.ino, p.mtime_ns, p.ctime_ns));
        self.read_file(id, 1, w.rel.clone(), file, append_only, prev)
    }

    fn parent_chunk(&mut self) -> Result<Option<ChunkRef>, ChunkError> {
        match &mut self.parent {
            Some(p) => p.next_chunk(),
            None => Ok(None),
        }
    }

    fn reused(&mut self, id: u64, attempt: u32, index: u64, c: ChunkRef) {
        let counters = &self.shared.counters;
        if c.hash.is_some() {
            counters.reused.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.empty.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.msgs.send(Msg::Chunk {
            id,
            attempt,
            index,
            result: Ok(c),
        });
    }

    /// Plan and queue the reads of an open file. `prev` is the previous
    /// record (size, inode, mtime, ctime), whose chunks come from the
    /// parent stream.
    fn read_file(
        &mut self,
        id: u64,
        attempt: u32,
        rel: Vec<u8>,
        file: File,
        append_only: bool,
        prev: Option<(u64, u64, i64, i64)>,
    ) -> Result<(), ChunkError> {
        let opts = self.shared.opts;
        let full = self.root.join(OsStr::from_bytes(&rel));
        let st = nix::sys::stat::fstat(&file).map_err(|e| ChunkError::io(&full, e.into()))?;
        let size = st.st_size as u64;
        let cs = opts.chunk_size;
        let regions = (size > cs)
            .then(|| super::sparse::data_regions(&file, size))
            .flatten();
        let same = match (prev, &opts.parent) {
            (Some(p), Some(parent_dir)) if !opts.force_read => {
                shared_ranges(parent_dir, &rel, p, &file, size)
            }
            _ => Vec::new(),
        };
        let rule = FileRule {
            size,
            chunk_size: cs,
            previous: prev.map(|p| (p.0, false)),
            append_only,
            same: &same,
            regions: regions.as_deref(),
        };
        let mut entry = entry_of(rel.clone(), EntryKind::File { size }, &st);
        entry.append_only = append_only;
        let n = size.div_ceil(cs);
        let file = Arc::new(file);
        self.shared
            .reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, rel.clone());
        let _ = self.msgs.send(Msg::File {
            id,
            attempt,
            entry,
            chunks: n,
            read: Some((Arc::clone(&file), Signature::of(&st))),
        });
        let path: Arc<[u8]> = Arc::from(rel);
        let mut off = 0;
        for index in 0..n {
            let len = cs.min(size - off);
            let prev_chunk = if prev.is_some() {
                self.parent_chunk()?
            } else {
                None
            };
            match backup_step(&rule, off, len, prev_chunk.as_ref()) {
                BackupStep::Reuse(c) => self.reused(id, attempt, index, c),
                BackupStep::Hole { off, len } => self.reused(
                    id,
                    attempt,
                    index,
                    ChunkRef {
                        off,
                        len,
                        hash: None,
                    },
                ),
                BackupStep::Read { off, len } => {
                    opts.progress.total.fetch_add(len, Ordering::Relaxed);
                    let task = ReadTask {
                        id,
                        attempt,
                        index,
                        file: Arc::clone(&file),
                        path: Arc::clone(&path),
                        off,
                        len,
                    };
                    if self.work.send(task).is_err() {
                        return Err(ChunkError::Aborted);
                    }
                }
            }
            off += len;
        }
        Ok(())
    }

    /// Read file `id` again, whole, as attempt `attempt`.
    fn reread(&mut self, id: u64, attempt: u32) -> Result<(), ChunkError> {
        let rel = self
            .shared
            .reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or(ChunkError::Aborted)?;
        let tree =
            btm::confined::Tree::open(self.root).map_err(|e| ChunkError::Invalid(e.to_string()))?;
        let file = tree
            .open_file(Path::new(OsStr::from_bytes(&rel)))
            .map_err(|e| {
                ChunkError::Invalid(format!(
                    "reading {} again: {e}",
                    String::from_utf8_lossy(&rel)
                ))
            })?;
        let append_only = self
            .shared
            .opts
            .append_only
            .iter()
            .any(|a| a.as_bytes() == &rel[..]);
        self.read_file(id, attempt, rel, file, append_only, None)
    }
}

/// Byte ranges of `file` (now `size` bytes) that hold the same bytes as
/// `rel` under `parent`, the file the previous index recorded as
/// (size, inode, mtime, ctime). Empty when anything does not match or
/// FIEMAP is unavailable (ZFS): the caller then reads, as it would have.
fn shared_ranges(
    parent: &Path,
    rel: &[u8],
    (psize, pino, pmtime, pctime): (u64, u64, i64, i64),
    file: &File,
    size: u64,
) -> Vec<(u64, u64)> {
    let Ok(tree) = btm::confined::Tree::open(parent) else {
        return Vec::new();
    };
    let Ok(old) = tree.open_file(Path::new(OsStr::from_bytes(rel))) else {
        return Vec::new();
    };
    let Ok(om) = nix::sys::stat::fstat(&old) else {
        return Vec::new();
    };
    let recorded = om.st_ino == pino
        && om.st_size as u64 == psize
        && om.st_mtime * 1_000_000_000 + om.st_mtime_nsec == pmtime
        && om.st_ctime * 1_000_000_000 + om.st_ctime_nsec == pctime;
    if !recorded {
        return Vec::new();
    }
    match (btm::sys::fiemap(&old), btm::sys::fiemap(file)) {
        (Ok(a), Ok(b)) => super::plan::identical_ranges(&a, &b, psize.min(size)),
        _ => Vec::new(),
    }
}

/// A worker's reusable buffers and zstd contexts: allocating a
/// chunk-sized buffer or a zstd context per chunk costs page faults and,
/// with the allocator set to return freed pages at once, an madvise and the
/// TLB shootdown that follows it, for every chunk. On a tree of 100,000
/// small files that was a third of the backup's CPU time.
struct Scratch {
    read: Vec<u8>,
    /// The round trip's output, compared with `read`.
    check: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

fn worker(
    shared: &Shared<'_>,
    known: &KnownSet,
    rx: &Mutex<Receiver<ReadTask>>,
    blobs: &SyncSender<Blob>,
    msgs: &Sender<Msg>,
) {
    let contexts = zstd::bulk::Compressor::new(shared.opts.zstd_level)
        .and_then(|c| Ok((c, zstd::bulk::Decompressor::new()?)));
    let mut scratch = match contexts {
        Ok((compressor, decompressor)) => Scratch {
            read: Vec::new(),
            check: Vec::new(),
            compressor,
            decompressor,
        },
        Err(e) => {
            shared.fail(ChunkError::Invalid(format!("cannot start zstd: {e}")));
            return;
        }
    };
    loop {
        let task = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(task) = task else { return };
        if shared.aborted() {
            continue;
        }
        if let Some(t) = &shared.throttle {
            t.take(task.len);
        }
        let result = process(shared, known, &task, &mut scratch, blobs);
        shared
            .opts
            .progress
            .done
            .fetch_add(task.len, Ordering::Relaxed);
        let result = match result {
            Err(ChunkFail::Error(e)) => {
                // Recorded here; the writer only learns that it must stop.
                shared.fail(e);
                Err(ChunkFail::Error(ChunkError::Aborted))
            }
            r => r,
        };
        let _ = msgs.send(Msg::Chunk {
            id: task.id,
            attempt: task.attempt,
            index: task.index,
            result,
        });
    }
}

fn process(
    shared: &Shared<'_>,
    known: &KnownSet,
    task: &ReadTask,
    scratch: &mut Scratch,
    blobs: &SyncSender<Blob>,
) -> Result<ChunkRef, ChunkFail> {
    let c = &shared.counters;
    let buf = &mut scratch.read;
    buf.resize(task.len as usize, 0);
    if let Err(e) = task.file.read_exact_at(buf, task.off) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ChunkFail::Shrank
        } else {
            ChunkFail::Error(ChunkError::io(Path::new(OsStr::from_bytes(&task.path)), e))
        });
    }
    c.read.fetch_add(task.len, Ordering::Relaxed);
    let chunk = |hash| ChunkRef {
        off: task.off,
        len: task.len,
        hash,
    };
    if buf.iter().all(|&b| b == 0) {
        c.empty.fetch_add(1, Ordering::Relaxed);
        return Ok(chunk(None));
    }
    c.hashed.fetch_add(task.len, Ordering::Relaxed);
    let hash = Id::of(buf);
    if known.contains(&hash) {
        c.known.fetch_add(1, Ordering::Relaxed);
        return Ok(chunk(Some(hash)));
    }
    let mut frame = shared.frames.take();
    frame.reserve(zstd::zstd_safe::compress_bound(buf.len()));
    scratch
        .compressor
        .compress_to_buffer(&buf[..], &mut frame)
        .map_err(|e| ChunkFail::Error(ChunkError::Invalid(format!("compression failed: {e}"))))?;
    // Round trip before upload: a compressor bug must not become a backup
    // that cannot be restored. Comparing the bytes is cheaper than hashing
    // them again.
    let check = &mut scratch.check;
    check.clear();
    check.reserve(buf.len());
    scratch
        .decompressor
        .decompress_to_buffer(&frame[..], check)
        .map_err(|e| ChunkFail::Error(ChunkError::Invalid(format!("compression failed: {e}"))))?;
    if check[..] != buf[..] {
        return Err(ChunkFail::Error(ChunkError::Invalid(format!(
            "compression failed: the round trip of chunk {hash} differs"
        ))));
    }
    blobs
        .send(Blob {
            hash,
            raw_len: task.len as u32,
            frame,
        })
        .map_err(|_| ChunkFail::Error(ChunkError::Aborted))?;
    Ok(chunk(Some(hash)))
}

/// Hashes packed by this backup, exactly: a sorted array plus a small set
/// of recent ones merged into it now and then (32 bytes a chunk, not the
/// several times that of a hash set).
struct Packed {
    sorted: Vec<Id>,
    recent: HashSet<Id>,
}

impl Packed {
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
fn upload_budget(pack_size: usize, connections: usize) -> u64 {
    let packs = connections.clamp(1, 3) as u64 + 1;
    packs * pack_size as u64
}

fn packer<'a>(
    shared: &'a Shared<'_>,
    rx: Receiver<Blob>,
    tx: SyncSender<(SealedPack, Permit<'a>)>,
) {
    let target = shared.opts.pack_size;
    let mut packed = Packed {
        sorted: Vec::new(),
        recent: HashSet::new(),
    };
    // A pack is built only with its bytes taken from the budget; the
    // permit travels with it and is returned once it is uploaded.
    let start = || {
        let permit = shared.packs_in_memory.take(target as u64, &shared.abort)?;
        Some((PackBuilder::in_buffer(shared.pack_buffers.take()), permit))
    };
    let seal = |(pack, permit): (PackBuilder, Permit<'a>)| -> bool {
        match pack.seal() {
            Ok(sealed) => tx.send((sealed, permit)).is_ok(),
            Err(e) => {
                shared.fail(e.into());
                false
            }
        }
    };
    let mut current: Option<(PackBuilder, Permit<'a>)> = None;
    for blob in rx {
        if shared.aborted() {
            continue;
        }
        if !packed.insert(blob.hash) {
            shared.frames.give(blob.frame);
            continue;
        }
        if let Some((pack, _)) = &current {
            if pack.len() + blob.frame.len() > target {
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
        pack.push(blob.hash, blob.raw_len, &blob.frame);
        shared.frames.give(blob.frame);
    }
    if let Some(last) = current.filter(|(p, _)| !p.is_empty()) {
        if !shared.aborted() {
            seal(last);
        }
    }
}

fn uploader<'a>(shared: &Shared<'_>, rx: &Mutex<Receiver<(SealedPack, Permit<'a>)>>) {
    loop {
        let sealed = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((sealed, _permit)) = sealed else {
            return;
        };
        if shared.aborted() {
            continue;
        }
        if let Err(e) = upload(shared, sealed) {
            shared.fail(e);
        }
    }
}

fn upload(shared: &Shared<'_>, sealed: SealedPack) -> Result<(), ChunkError> {
    let store = shared.store;
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
        with_retry(|| store.put(Kind::Pack, &sealed.id, sealed.data.clone()))
            .map_err(|e| ChunkError::store(what, e))?;
    }
    let c = &shared.counters;
    let bytes = sealed.data.len() as u64;
    let SealedPack { id, data, blobs } = sealed;
    // The store is done with the bytes: their buffer carries the next pack.
    if let Ok(data) = data.try_into_mut() {
        shared.pack_buffers.give(Vec::from(data));
    }
    c.uploaded.fetch_add(bytes, Ordering::Relaxed);
    progress.uploaded.fetch_add(bytes, Ordering::Relaxed);
    c.chunks_uploaded
        .fetch_add(blobs.len() as u64, Ordering::Relaxed);
    c.packs.fetch_add(1, Ordering::Relaxed);
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
fn write_pack_index(shared: &Shared<'_>, packs: Vec<PackEntry>) -> Result<(), ChunkError> {
    if packs.is_empty() {
        return Ok(());
    }
    let store = shared.store;
    let _req = shared.opts.progress.request();
    with_retry(|| store.flush()).map_err(|e| ChunkError::store("making packs durable", e))?;
    let data = crate::store::Bytes::from(packidx::encode(&packs)?);
    let id = Id::of(&data);
    with_retry(|| store.put(Kind::PackIndex, &id, data.clone()))
        .map_err(|e| ChunkError::store(format!("writing pack index {id}"), e))?;
    if let Some(c) = &shared.opts.cache {
        c.put(Kind::PackIndex, &id, &data);
    }
    let ids: Vec<Id> = packs.iter().map(|p| p.id).collect();
    shared.lease.settle(&ids);
    Ok(())
}
