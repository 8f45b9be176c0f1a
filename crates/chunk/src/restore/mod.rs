//! Restoring a backup into a directory, in place.
//!
//! ```text
//! planner ──local chunks──▶ verifiers ──differ──┐
//!    │ chunks to fetch                          ▼
//!    └─────────────────────────────────────▶ batcher ──ranged reads──▶ fetchers ──pwrite──▶ files
//!                                                                                 │ complete
//!                                                          checkpointer ◀─────────┘ (syncfs, journal)
//! ```
//!
//! - The **planner** (the calling thread) streams the backup's validated
//!   entries, creates directories and symlinks relative to their parent's
//!   descriptor without following symlinks, opens each file the same way,
//!   resizes it, and decides per chunk ([`crate::plan::restore_step`])
//!   what to do: keep (journal or trusted prefix), verify (hash the local
//!   bytes), fetch, or punch a hole.
//! - **Verifiers** (`workers`) hash local chunks; those that differ join the
//!   fetches.
//! - The **batcher** collects fetches from many files, looks each chunk up
//!   in the chunk map, and groups them into ranged reads, one per run of
//!   nearby frames in a pack ([`crate::plan::coalesce`]), so a
//!   thousand small files come in a handful of requests.
//! - **Fetchers** (`connections` requests in flight, independent of cores)
//!   read a range, decompress and verify each chunk, and write it where it
//!   belongs, leaving zero blocks unallocated.
//! - A file whose last chunk is written gets its owner, mode and times; the
//!   **checkpointer** then, every 256 MiB, 131,072 files or 10 s, syncs the
//!   filesystem and journals what that made durable ([`journal`]). The
//!   restore reports success only after the last sync, with the journal
//!   removed.

pub mod delete;
pub mod journal;
pub mod prove;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use serde::Serialize;

use super::budget::{Budget, Permit};
use super::buffers::Buffers;
use super::cache::Cache;
use super::format::head::Decoded;
use super::format::pack::{open_frame, FrameError};
use super::format::tree::{ChunkRef, Entry, EntryKind, Item};
use super::lease::{LeaseError, LeaseKind};
use super::map::ChunkMap;
use super::plan::{append_trusted_end, coalesce, restore_step, Need, ReadRange, RestoreStep};
use super::spool::Spool;
use super::{catalog, with_retry, ChunkError, Progress};
use crate::store::{Id, Kind, Store, StoreError};
use journal::{Journal, Prior, Record, Stamp};

/// Frames of one pack closer than this are fetched in one read.
const MAX_GAP: u64 = 256 << 10;
/// The longest ranged read.
const MAX_RANGE: u64 = 4 << 20;
/// Stored bytes being fetched or written at once, whatever the number of
/// connections: a restore's memory does not grow with its parallelism.
const IN_FLIGHT_BYTES: u64 = 40 << 20;
/// Read buffers kept for reuse: as many ranged reads of [`MAX_RANGE`] as
/// the in-flight budget allows at once, so pooling adds nothing to the
/// peak.
const POOLED_BUFFERS: usize = (IN_FLIGHT_BYTES / MAX_RANGE) as usize;
/// Stored bytes of fetches collected before they are grouped into reads.
const WINDOW: u64 = 64 << 20;
/// How often, at most, progress is made durable and journalled.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// Bytes written that trigger a checkpoint sooner.
const CHECKPOINT_BYTES: u64 = 256 << 20;
/// Files completed that trigger a checkpoint sooner. Their journal records
/// wait in memory for the sync (about 80 bytes each): without this a tree
/// of tiny files on a fast disk completes hundreds of thousands of them in
/// ten seconds, and the restore's memory would follow the disk's speed.
const CHECKPOINT_FILES: usize = 128 << 10;
/// Files with at least this many chunks get prefix records in the journal.
const BIG_FILE_CHUNKS: u64 = 64;

/// How a restore is done.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Only entries whose path matches are restored (directories always).
    pub filter: Option<regex::bytes::Regex>,
    /// Remove local entries that are not in the backup.
    pub delete: bool,
    /// The local metadata cache.
    pub cache: Option<Cache>,
    /// Verifier threads.
    pub workers: usize,
    /// Store requests in flight; `None` for the store's default.
    pub connections: Option<usize>,
    /// Updated as chunks are planned and processed.
    pub progress: Arc<Progress>,
    /// Overwrite validator signing state that exists locally
    /// ([`btm::validator::signing_state`]). Off by default: a restore
    /// never lowers a validator's record of what it signed.
    pub overwrite_signing_state: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            filter: None,
            delete: false,
            cache: Cache::default_dir().map(Cache::new),
            workers: super::default_workers(),
            connections: None,
            progress: Arc::default(),
            overwrite_signing_state: false,
        }
    }
}

/// Default requests in flight for a restore: reads are small and cheap
/// to have in flight, so more than for uploads.
pub fn default_connections(store: &dyn Store) -> usize {
    if store.local_root().is_some() {
        4
    } else {
        16
    }
}

/// What a restore did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RestoreSummary {
    /// Files restored (checked or written).
    pub files: u64,
    /// Files an earlier, interrupted run had already completed (not read).
    pub files_trusted: u64,
    /// Logical bytes of those files.
    pub bytes_scanned: u64,
    /// Local bytes read to compare.
    pub bytes_verified: u64,
    /// Chunks already correct locally.
    pub chunks_reused: u64,
    /// Chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Bytes downloaded from the store.
    pub bytes_downloaded: u64,
    /// Ranged reads made.
    pub requests: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Empty chunks made holes.
    pub holes: u64,
    /// Local entries removed (`--delete`).
    pub deleted: u64,
    /// Local entries `--delete` kept although the backup lacks them: what
    /// the backup left out on purpose (key material, its `--exclude`
    /// patterns) and validator signing state.
    pub not_deleted: u64,
    /// The first hundred of those, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_deleted_named: Vec<delete::Kept>,
    /// Local validator signing-state files kept as they were, whatever the
    /// backup holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signing_state_kept: Vec<String>,
}

#[derive(Default)]
struct Counters {
    verified: AtomicU64,
    reused: AtomicU64,
    fetched: AtomicU64,
    downloaded: AtomicU64,
    requests: AtomicU64,
    written: AtomicU64,
    holes: AtomicU64,
    trusted: AtomicU64,
}

impl Counters {
    /// Copy the counts into the summary.
    fn fill(&self, summary: &mut RestoreSummary) {
        summary.files_trusted = self.trusted.load(Ordering::Relaxed);
        summary.bytes_verified = self.verified.load(Ordering::Relaxed);
        summary.chunks_reused = self.reused.load(Ordering::Relaxed);
        summary.chunks_fetched = self.fetched.load(Ordering::Relaxed);
        summary.bytes_downloaded = self.downloaded.load(Ordering::Relaxed);
        summary.requests = self.requests.load(Ordering::Relaxed);
        summary.bytes_written = self.written.load(Ordering::Relaxed);
        summary.holes = self.holes.load(Ordering::Relaxed);
    }
}

/// One file being restored, shared by everyone working on its chunks.
struct FileJob<'a> {
    entry: Entry,
    file: File,
    size: u64,
    /// Its size before it was resized: bytes beyond are holes already.
    local_size: u64,
    chunk_size: u64,
    /// Owner and mode when it was opened.
    found: Found,
    /// Chunks not done yet, plus one held by the planner while it plans.
    remaining: AtomicU64,
    /// Chunks done from the start, and those done further on.
    prefix: Mutex<(u64, std::collections::BTreeSet<u64>)>,
    _slot: Permit<'a>,
}

impl FileJob<'_> {
    /// Bytes from the start known written.
    fn prefix_bytes(&self) -> u64 {
        let p = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
        (p.0 * self.chunk_size).min(self.size)
    }
}

/// What every thread of one restore shares.
struct Shared<'a> {
    store: &'a dyn Store,
    opts: &'a RestoreOptions,
    v1: bool,
    /// The backup's chunk size: chunk lengths never exceed it, and
    /// journal prefixes are in whole chunks of it.
    chunk_size: u64,
    map: RwLock<(u64, ChunkMap)>,
    abort: AtomicBool,
    first_error: Mutex<Option<ChunkError>>,
    counters: Counters,
    /// Files complete since the last checkpoint, as they were then.
    completed: Mutex<Vec<(Vec<u8>, Record)>>,
    /// Files large enough for prefix records.
    big: Mutex<Vec<Weak<FileJob<'a>>>>,
    since_checkpoint: AtomicU64,
    checkpoint_now: Condvar,
    checkpoint_lock: Mutex<bool>,
    /// Bytes of ranged reads in memory, see [`IN_FLIGHT_BYTES`].
    in_flight: Budget,
    /// Read buffers to reuse, at most [`POOLED_BUFFERS`] (see
    /// [`crate::buffers`]). Each has room for any ranged read: growing one
    /// would fault in fresh pages again.
    buffers: Buffers,
}

impl<'a> Shared<'a> {
    /// The first failure, if any, taken out.
    fn take_error(&self) -> Option<ChunkError> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Tell the checkpointer the restore is over (it returns without
    /// another checkpoint; the end syncs once more itself).
    fn stop_checkpoints(&self) {
        *self
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = true;
        self.checkpoint_now.notify_one();
    }

    fn new(
        store: &'a dyn Store,
        opts: &'a RestoreOptions,
        v1: bool,
        chunk_size: u64,
        map: ChunkMap,
    ) -> Self {
        Shared {
            store,
            opts,
            v1,
            chunk_size,
            map: RwLock::new((0, map)),
            abort: AtomicBool::new(false),
            first_error: Mutex::new(None),
            counters: Counters::default(),
            completed: Mutex::new(Vec::new()),
            big: Mutex::new(Vec::new()),
            since_checkpoint: AtomicU64::new(0),
            checkpoint_now: Condvar::new(),
            checkpoint_lock: Mutex::new(false),
            in_flight: Budget::new(IN_FLIGHT_BYTES),
            buffers: Buffers::new(POOLED_BUFFERS, MAX_RANGE as usize, MAX_RANGE as usize),
        }
    }
}

impl<'a> Shared<'a> {
    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.opts.progress.cancelled()
    }

    fn fail(&self, e: ChunkError) {
        if !matches!(e, ChunkError::Aborted) {
            self.first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
        self.abort.store(true, Ordering::Relaxed);
    }

    /// Chunk `index` of `job` is right on disk now (not yet durable).
    fn chunk_done(&self, job: &Arc<FileJob<'a>>, index: u64, len: u64) {
        {
            let mut p = job.prefix.lock().unwrap_or_else(|p| p.into_inner());
            if index == p.0 {
                let mut next = index + 1;
                while p.1.remove(&next) {
                    next += 1;
                }
                p.0 = next;
            } else {
                p.1.insert(index);
            }
        }
        self.opts.progress.done.fetch_add(len, Ordering::Relaxed);
        self.release(job);
    }

    /// One of `job`'s pending counts is done; the last one finishes it.
    fn release(&self, job: &Arc<FileJob<'a>>) {
        if job.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let stamp = apply_file_metadata(&job.file, &job.entry, Some(job.found)).and_then(|()| {
            nix::sys::stat::fstat(&job.file)
                .map(|st| Stamp::of(&st))
                .map_err(std::io::Error::from)
        });
        let stamp = match stamp {
            Ok(s) => s,
            Err(e) => {
                self.fail(ChunkError::io(Path::new(&*job.entry.display()), e));
                return;
            }
        };
        let record = Record {
            stamp,
            prefix: job.size,
        };
        let pending = {
            let mut completed = self.completed.lock().unwrap_or_else(|p| p.into_inner());
            completed.push((job.entry.path.clone(), record));
            completed.len()
        };
        if pending == CHECKPOINT_FILES {
            self.checkpoint_now.notify_one();
        }
    }

    /// Whether a checkpoint is due, the last one having been at `last`.
    fn checkpoint_due(&self, last: Instant) -> bool {
        last.elapsed() >= CHECKPOINT_EVERY
            || self.since_checkpoint.load(Ordering::Relaxed) >= CHECKPOINT_BYTES
            || self
                .completed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len()
                >= CHECKPOINT_FILES
    }

    fn wrote(&self, n: u64) {
        self.counters.written.fetch_add(n, Ordering::Relaxed);
        if self.since_checkpoint.fetch_add(n, Ordering::Relaxed) + n >= CHECKPOINT_BYTES {
            self.checkpoint_now.notify_one();
        }
    }
}

/// Owner and mode of a file as found when it was opened.
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    uid: u32,
    gid: u32,
    mode: u32,
}

impl Found {
    fn of(st: &nix::sys::stat::FileStat) -> Self {
        Found {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }
}

/// Owner, mode and times of a restored file, through its descriptor (the
/// mode after the owner: a chown clears setuid bits). `found` saves the
/// calls that would change nothing, which is most of them in a tree of
/// small files created by this restore. Setuid, setgid and sticky modes are
/// always set again: writing to a file clears them.
fn apply_file_metadata(file: &File, e: &Entry, found: Option<Found>) -> std::io::Result<()> {
    let owned = found.is_some_and(|f| f.uid == e.uid && f.gid == e.gid);
    if !owned {
        std::os::unix::fs::fchown(file, Some(e.uid), Some(e.gid))?;
    }
    let mode = e.mode & 0o7777;
    let moded = owned && mode & 0o7000 == 0 && found.is_some_and(|f| f.mode == mode);
    if !moded {
        nix::sys::stat::fchmod(file, Mode::from_bits_truncate(e.mode))
            .map_err(std::io::Error::from)?;
    }
    let ts = timespec(e.mtime_ns);
    nix::sys::stat::futimens(file, &ts, &ts).map_err(std::io::Error::from)
}

fn timespec(ns: i64) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// A chunk some file needs from the store.
struct Want<'a> {
    job: Arc<FileJob<'a>>,
    index: u64,
    chunk: ChunkRef,
}

enum BatchMsg<'a> {
    Want(Want<'a>),
    Done,
}

/// One read for a fetcher: where, and who wants each chunk in it.
struct Fetch<'a> {
    source: Source,
    chunks: FetchChunks<'a>,
}

/// Per chunk of a read: hash, raw length, frame place (offset and length
/// in the read), targets.
type FetchChunks<'a> = Vec<(Id, u64, u64, u64, Vec<Want<'a>>)>;

enum Source {
    /// A range of a pack (format 2).
    Range { pack: Id, start: u64, len: u64 },
    /// A whole chunk object (format 1).
    Object(Id),
}

/// Restore backup `name` (`index`) from `store` into `dest`.
pub fn restore(
    store: &dyn Store,
    name: &str,
    index: &Decoded,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, ChunkError> {
    let result = super::lease::with_lease(
        store,
        LeaseKind::Restore,
        None,
        &opts.progress.cancel,
        |_| run(store, name, index, dest, opts),
    );
    match result {
        // The store cannot be written (read-only credentials): go on
        // without a lease, as the format allows.
        Err(ChunkError::Lease(LeaseError::Store(e))) => {
            tracing::warn!(error = %e, "cannot take a restore lease; restoring without one");
            run(store, name, index, dest, opts)
        }
        Err(ChunkError::Lease(LeaseError::Cancelled)) => Err(ChunkError::Cancelled),
        r => r,
    }
}

/// Let this process open as many files as its hard limit allows, and
/// return how many the restore may keep open at once.
fn open_file_budget() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    ((soft / 2) as usize).clamp(64, 4096)
}

/// The destination, opened without following symlinks, and a descriptor
/// of it for `syncfs` and the journal.
fn open_dest(dest: &Path) -> Result<(btm::confined::Tree, OwnedFd), ChunkError> {
    let tree = btm::confined::Tree::open(dest).map_err(|e| ChunkError::Invalid(e.to_string()))?;
    let fd = tree
        .fd()
        .try_clone_to_owned()
        .map_err(|e| ChunkError::io(dest, e))?;
    Ok((tree, fd))
}

fn run(
    store: &dyn Store,
    name: &str,
    index: &Decoded,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, ChunkError> {
    let connections = opts
        .connections
        .unwrap_or_else(|| default_connections(store))
        .max(1);
    // The backup's segments are read twice (see `prove`): the second time
    // from a cache, a temporary one if there is no other.
    let scratch_cache;
    let cache = match &opts.cache {
        Some(c) => Some(c),
        None => {
            let dir = tempfile::tempdir()
                .map_err(|e| ChunkError::io(Path::new("(temporary cache)"), e))?;
            scratch_cache = (Cache::new(dir.path()), dir);
            Some(&scratch_cache.0)
        }
    };
    let v1 = matches!(index, Decoded::V1(_));
    // A version 1 backup names its chunks as objects: no map to load.
    // A pack index that cannot be read may hold nothing this backup needs:
    // the proof says which chunk is missing if it does.
    let mut unreadable = None;
    let map = match v1 {
        true => ChunkMap::default(),
        false => ChunkMap::load_or(store, cache, connections, |id, e| {
            tracing::debug!(pack_index = %id, error = %e, "a pack index cannot be read");
            unreadable.get_or_insert_with(|| e.to_string());
            Ok(())
        })?,
    };
    prove::prove(store, cache, name, index, &map, connections)
        .map_err(|e| prove::with_hint(e, unreadable.as_deref()))?;
    std::fs::create_dir_all(dest).map_err(|e| ChunkError::io(dest, e))?;
    let (tree, dest_fd) = open_dest(dest)?;
    let (journal, prior) = Journal::open(dest, &dest_fd, name)?;
    let slots = Budget::new(open_file_budget() as u64);
    let shared = Shared::new(store, opts, v1, index.chunk_size().max(1), map);
    let mut summary = RestoreSummary::default();
    let mut dirs: Vec<Entry> = Vec::new();
    let journal = Mutex::new(journal);

    std::thread::scope(|s| {
        let shared = &shared;
        let (verify_tx, verify_rx) = mpsc::sync_channel::<Want<'_>>(opts.workers * 16);
        let verify_rx = Arc::new(Mutex::new(verify_rx));
        let (batch_tx, batch_rx) = mpsc::channel::<BatchMsg<'_>>();
        let (fetch_tx, fetch_rx) = mpsc::sync_channel::<Fetch<'_>>(connections);
        let fetch_rx = Arc::new(Mutex::new(fetch_rx));
        for _ in 0..opts.workers {
            let (rx, tx) = (Arc::clone(&verify_rx), batch_tx.clone());
            s.spawn(move || verifier(shared, &rx, &tx));
        }
        drop(verify_rx);
        let batcher = s.spawn(move || batcher(shared, batch_rx, fetch_tx));
        for _ in 0..connections {
            let rx = Arc::clone(&fetch_rx);
            s.spawn(move || fetcher(shared, &rx));
        }
        drop(fetch_rx);
        let (journal, dest_fd) = (&journal, &dest_fd);
        let checkpointer = s.spawn(move || checkpointer(shared, journal, dest_fd));

        let mut planner = Planner {
            shared,
            tree: &tree,
            dest,
            prior: &prior,
            slots: &slots,
            verify: verify_tx,
            batch: batch_tx.clone(),
            stack: Vec::new(),
            dirs: &mut dirs,
            summary: &mut summary,
        };
        let planned = planner.run(catalog::entries(store, cache, name, index, connections));
        drop(planner);
        if let Err(e) = planned {
            shared.fail(e);
        }
        let _ = batch_tx.send(BatchMsg::Done);
        drop(batch_tx);
        let _ = batcher.join();
        shared.stop_checkpoints();
        if let Ok(Err(e)) = checkpointer.join() {
            shared.fail(e);
        }
    });
    if let Some(e) = shared.take_error() {
        return Err(e);
    }
    if opts.progress.cancelled() {
        return Err(ChunkError::Cancelled);
    }
    // Directories last, deepest first: creating children changes mtimes.
    dirs.sort_by_key(|e| std::cmp::Reverse(e.path.iter().filter(|&&c| c == b'/').count()));
    dirs.iter().try_for_each(|e| apply_dir_metadata(&tree, e))?;
    if opts.delete {
        let entries = catalog::entries(store, cache, name, index, connections);
        let scope = delete::Scope {
            filter: opts.filter.as_ref(),
            keep_signing_state: !opts.overwrite_signing_state,
        };
        let done = delete::delete_extra(dest, index, entries, &scope)?;
        summary.deleted = done.removed;
        summary.not_deleted = done.kept;
        summary.not_deleted_named = done.kept_named;
    }
    nix::unistd::syncfs(&dest_fd).map_err(|e| ChunkError::io(dest, e.into()))?;
    journal
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .finish(&dest_fd)?;
    shared.counters.fill(&mut summary);
    Ok(summary)
}

fn apply_dir_metadata(tree: &btm::confined::Tree, e: &Entry) -> Result<(), ChunkError> {
    let rel = Path::new(OsStr::from_bytes(&e.path));
    let comps = btm::confined::components(rel).map_err(|x| ChunkError::Invalid(x.to_string()))?;
    let fd = tree
        .dir(&comps, false)
        .map_err(|x| ChunkError::Invalid(x.to_string()))?;
    let f = File::from(fd);
    apply_file_metadata(&f, e, None).map_err(|x| ChunkError::io(&tree.root().join(rel), x))
}

struct Planner<'p, 'a> {
    shared: &'p Shared<'a>,
    tree: &'p btm::confined::Tree,
    dest: &'p Path,
    prior: &'p Prior,
    slots: &'a Budget,
    verify: SyncSender<Want<'a>>,
    batch: Sender<BatchMsg<'a>>,
    /// The directories on the path to the current entry, open.
    stack: Vec<(Vec<u8>, Arc<OwnedFd>)>,
    dirs: &'p mut Vec<Entry>,
    summary: &'p mut RestoreSummary,
}

fn split_name(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl<'a> Planner<'_, 'a> {
    fn refused(&self, e: &Entry, detail: impl Into<String>) -> ChunkError {
        ChunkError::Refused {
            path: e.display().into_owned(),
            detail: detail.into(),
        }
    }

    fn io(&self, e: &Entry, err: impl Into<std::io::Error>) -> ChunkError {
        ChunkError::io(&self.dest.join(OsStr::from_bytes(&e.path)), err.into())
    }

    /// The open directory that holds `path`.
    fn parent(&mut self, e: &Entry) -> Result<Arc<OwnedFd>, ChunkError> {
        let (parent, _) = split_name(&e.path);
        if parent.is_empty() {
            self.stack.clear();
            return Ok(Arc::new(
                self.tree
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|x| self.io(e, x))?,
            ));
        }
        while let Some((p, _)) = self.stack.last() {
            if p == parent || parent.starts_with(&[&p[..], b"/"].concat()) {
                break;
            }
            self.stack.pop();
        }
        if let Some((p, fd)) = self.stack.last() {
            if p == parent {
                return Ok(Arc::clone(fd));
            }
        }
        // Not on the way (format 1 lists entries in any parent-first
        // order): open it component by component.
        let rel = Path::new(OsStr::from_bytes(parent));
        let comps = btm::confined::components(rel).map_err(|x| self.refused(e, x.to_string()))?;
        let fd = self
            .tree
            .dir(&comps, false)
            .map_err(|x| self.refused(e, x.to_string()))?;
        Ok(Arc::new(fd))
    }

    fn run(&mut self, mut entries: catalog::Entries<'_>) -> Result<(), ChunkError> {
        let mut current: Option<(Arc<FileJob<'a>>, u64, u64)> = None;
        let mut append: Option<AppendCheck> = None;
        loop {
            if self.shared.aborted() {
                return Err(ChunkError::Aborted);
            }
            let Some(item) = entries.next_item()? else {
                break;
            };
            match item {
                Item::Chunks(chunks) => {
                    if let Some((job, index, trusted)) = current.as_mut() {
                        for c in chunks {
                            self.chunk(job, *index, c, *trusted, &mut append)?;
                            *index += 1;
                        }
                    }
                }
                Item::Entry(e) => {
                    self.finish_file(current.take(), &mut append)?;
                    let selected =
                        self.shared.opts.filter.as_ref().is_none_or(|re| {
                            re.is_match(&e.path) || matches!(e.kind, EntryKind::Dir)
                        });
                    if !selected {
                        continue;
                    }
                    match &e.kind {
                        EntryKind::Dir => self.dir(e)?,
                        EntryKind::Symlink { target } => self.symlink(&e, target)?,
                        EntryKind::File { size } => {
                            let size = *size;
                            current = self.file(e, size, &mut append)?;
                        }
                    }
                }
            }
        }
        self.finish_file(current.take(), &mut append)
    }

    fn dir(&mut self, e: Entry) -> Result<(), ChunkError> {
        let parent = self.parent(&e)?;
        let (_, name) = split_name(&e.path);
        let name = OsStr::from_bytes(name);
        match fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(st.st_mode) == SFlag::S_IFDIR => {}
            Ok(_) => {
                // A file or symlink where the backup has a directory: the
                // link itself goes, never what it points to.
                nix::unistd::unlinkat(
                    parent.as_fd(),
                    name,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|x| self.io(&e, x))?;
                nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700))
                    .map_err(|x| self.io(&e, x))?;
            }
            Err(nix::errno::Errno::ENOENT) => {
                nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700))
                    .map_err(|x| self.io(&e, x))?
            }
            Err(x) => return Err(self.io(&e, x)),
        }
        let fd = openat(parent.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(|x| match x {
            nix::errno::Errno::ELOOP => self.refused(&e, "a symlink appeared in its place"),
            x => self.io(&e, x),
        })?;
        self.stack.push((e.path.clone(), Arc::new(fd)));
        self.dirs.push(e);
        Ok(())
    }

    fn symlink(&mut self, e: &Entry, target: &[u8]) -> Result<(), ChunkError> {
        let parent = self.parent(e)?;
        let (_, name) = split_name(&e.path);
        let name = OsStr::from_bytes(name);
        let current = nix::fcntl::readlinkat(parent.as_fd(), name).ok();
        if current.as_deref().map(|t| t.as_bytes()) != Some(target) {
            match fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if kind(st.st_mode) == SFlag::S_IFDIR => {
                    return Err(self.refused(
                        e,
                        "the backup has a symlink here, but a directory exists; remove it first",
                    ))
                }
                Ok(_) => nix::unistd::unlinkat(
                    parent.as_fd(),
                    name,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|x| self.io(e, x))?,
                Err(_) => {}
            }
            nix::unistd::symlinkat(OsStr::from_bytes(target), parent.as_fd(), name)
                .map_err(|x| self.io(e, x))?;
        }
        nix::unistd::fchownat(
            parent.as_fd(),
            name,
            Some(e.uid.into()),
            Some(e.gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|x| self.io(e, x))?;
        let ts = timespec(e.mtime_ns);
        nix::sys::stat::utimensat(
            parent.as_fd(),
            name,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|x| self.io(e, x))?;
        Ok(())
    }

    /// Clear the way for a regular file at `name`: refuse a directory,
    /// remove anything else that is not a regular file. `false`: a local
    /// validator signing state is there and is kept as it is.
    fn make_room(
        &mut self,
        parent: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        e: &Entry,
    ) -> Result<bool, ChunkError> {
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(st.st_mode) == SFlag::S_IFDIR => Err(self.refused(
                e,
                "the backup has a file here, but a directory exists; remove it first",
            )),
            Ok(st)
                if kind(st.st_mode) == SFlag::S_IFREG
                    && !self.shared.opts.overwrite_signing_state
                    && btm::validator::is_signing_state(&e.path).is_some() =>
            {
                // The local file knows what this validator signed; the
                // backup's copy may be older.
                self.summary
                    .signing_state_kept
                    .push(e.display().into_owned());
                Ok(false)
            }
            Ok(st) if kind(st.st_mode) != SFlag::S_IFREG => {
                nix::unistd::unlinkat(parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                    .map_err(|x| self.io(e, x))?;
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Open (or create) a file and decide what can be trusted; its chunks
    /// come next.
    fn file(
        &mut self,
        e: Entry,
        size: u64,
        append: &mut Option<AppendCheck>,
    ) -> Result<Option<(Arc<FileJob<'a>>, u64, u64)>, ChunkError> {
        self.summary.files += 1;
        self.summary.bytes_scanned += size;
        self.shared
            .opts
            .progress
            .total
            .fetch_add(size, Ordering::Relaxed);
        let parent = self.parent(&e)?;
        let (_, name) = split_name(&e.path);
        let name = OsStr::from_bytes(name);
        if !self.make_room(parent.as_fd(), name, &e)? {
            return Ok(None);
        }
        let Some(slot) = self.slots.take(1, &self.shared.abort) else {
            return Err(ChunkError::Aborted);
        };
        let fd = openat(
            parent.as_fd(),
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            // Its final permission bits, less the umask: usually no chmod.
            Mode::from_bits_truncate(e.mode & 0o777),
        )
        .map_err(|x| match x {
            nix::errno::Errno::ELOOP => self.refused(&e, "a symlink appeared in its place"),
            x => self.io(&e, x),
        })?;
        let file = File::from(fd);
        let st = nix::sys::stat::fstat(&file).map_err(|x| self.io(&e, x))?;
        let (local_size, found) = (st.st_size as u64, Found::of(&st));
        let chunk_size = self.shared.chunk_size;
        let journalled = self.prior.trusted(&e.path, &Stamp::of(&st), size);
        if journalled == size && local_size == size {
            // Complete, durable and untouched since an earlier run
            // recorded it, metadata included: not even read.
            self.shared.counters.trusted.fetch_add(1, Ordering::Relaxed);
            self.shared
                .opts
                .progress
                .done
                .fetch_add(size, Ordering::Relaxed);
            return Ok(None);
        }
        let mut trusted = if local_size == size { journalled } else { 0 };
        if trusted == 0 && !self.prior.existed && e.append_only {
            // The node's own block log: trusted to its first hole, once the
            // last trusted chunk checks out (see `AppendCheck`).
            let hole = first_hole(&file, local_size);
            let end = append_trusted_end(local_size, hole, size, chunk_size);
            if end > 0 {
                *append = Some(AppendCheck {
                    end,
                    spool: Spool::new(),
                    decided: None,
                });
                trusted = end;
            }
        }
        if local_size != size {
            file.set_len(size).map_err(|x| self.io(&e, x))?;
        }
        let job = Arc::new(FileJob {
            entry: e,
            file,
            size,
            local_size,
            chunk_size,
            found,
            remaining: AtomicU64::new(1),
            prefix: Mutex::new((0, Default::default())),
            _slot: slot,
        });
        if size.div_ceil(chunk_size) >= BIG_FILE_CHUNKS {
            self.shared
                .big
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::downgrade(&job));
        }
        Ok(Some((job, 0, trusted)))
    }

    /// Act on chunk `index` of `job`.
    fn chunk(
        &mut self,
        job: &Arc<FileJob<'a>>,
        index: u64,
        c: ChunkRef,
        trusted: u64,
        append: &mut Option<AppendCheck>,
    ) -> Result<(), ChunkError> {
        if let Some(check) = append.as_mut().filter(|a| a.decided.is_none()) {
            if c.off + c.len <= check.end {
                check
                    .spool
                    .push(&c)
                    .map_err(|x| ChunkError::io(Path::new("(chunk spool)"), x))?;
                if c.off + c.len == check.end {
                    let ok = local_matches(job, &c);
                    check.decided = Some(ok);
                    self.settle_append(job, append)?;
                }
                return Ok(());
            }
        }
        let trusted = match append {
            Some(AppendCheck {
                decided: Some(false),
                ..
            }) => 0,
            _ => trusted,
        };
        let step = restore_step(&c, job.local_size, trusted);
        self.step(job, index, step)
    }

    /// The append-only check is decided: keep or verify the spooled prefix.
    fn settle_append(
        &mut self,
        job: &Arc<FileJob<'a>>,
        append: &mut Option<AppendCheck>,
    ) -> Result<(), ChunkError> {
        let Some(check) = append.as_mut() else {
            return Ok(());
        };
        let ok = check.decided.unwrap_or(false);
        if !ok {
            tracing::warn!(path = %job.entry.display(), "the local append-only file is not a prefix of the backup's; comparing every chunk");
        }
        let spool = std::mem::take(&mut check.spool);
        let mut index = 0u64;
        spool.replay(
            |x| ChunkError::io(Path::new("(chunk spool)"), x),
            |run| {
                for c in run {
                    let step = if ok {
                        RestoreStep::Keep(*c)
                    } else {
                        restore_step(c, job.local_size, 0)
                    };
                    self.step(job, index, step)?;
                    index += 1;
                }
                Ok(())
            },
        )
    }

    fn step(
        &mut self,
        job: &Arc<FileJob<'a>>,
        index: u64,
        step: RestoreStep,
    ) -> Result<(), ChunkError> {
        let shared = self.shared;
        match step {
            RestoreStep::Keep(c) => {
                shared.counters.reused.fetch_add(1, Ordering::Relaxed);
                job.remaining.fetch_add(1, Ordering::Relaxed);
                shared.chunk_done(job, index, c.len);
            }
            RestoreStep::Empty(c) => {
                shared.counters.holes.fetch_add(1, Ordering::Relaxed);
                if c.off < job.local_size {
                    make_hole(job, &c).map_err(|x| self.io(&job.entry, x))?;
                }
                job.remaining.fetch_add(1, Ordering::Relaxed);
                shared.chunk_done(job, index, c.len);
            }
            RestoreStep::Verify(chunk) => {
                job.remaining.fetch_add(1, Ordering::Relaxed);
                let want = Want {
                    job: Arc::clone(job),
                    index,
                    chunk,
                };
                self.verify.send(want).map_err(|_| ChunkError::Aborted)?;
            }
            RestoreStep::Fetch(chunk) => {
                job.remaining.fetch_add(1, Ordering::Relaxed);
                let want = Want {
                    job: Arc::clone(job),
                    index,
                    chunk,
                };
                self.batch
                    .send(BatchMsg::Want(want))
                    .map_err(|_| ChunkError::Aborted)?;
            }
        }
        Ok(())
    }

    /// All of a file's chunks are planned: drop the planner's hold.
    fn finish_file(
        &mut self,
        current: Option<(Arc<FileJob<'a>>, u64, u64)>,
        append: &mut Option<AppendCheck>,
    ) -> Result<(), ChunkError> {
        if let Some((job, _, _)) = current {
            if append.as_ref().is_some_and(|a| a.decided.is_none()) {
                // The stream ended before the trusted end (cannot happen
                // with a valid stream): verify what was spooled.
                if let Some(a) = append.as_mut() {
                    a.decided = Some(false);
                }
                self.settle_append(&job, append)?;
            }
            self.shared.release(&job);
        }
        *append = None;
        Ok(())
    }
}

/// An append-only file's candidate trusted prefix, waiting for its last
/// chunk to be checked; the prefix's chunks wait in the spool meanwhile.
struct AppendCheck {
    end: u64,
    spool: Spool,
    decided: Option<bool>,
}

fn kind(mode: u32) -> SFlag {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits())
}

/// Where the first hole of `file` starts (its size if none).
fn first_hole(file: &File, size: u64) -> u64 {
    match nix::unistd::lseek(file.as_fd(), 0, nix::unistd::Whence::SeekHole) {
        Ok(h) if h >= 0 => (h as u64).min(size),
        _ => 0,
    }
}

/// Whether the local bytes of chunk `c` of `job` are the backup's.
fn local_matches(job: &FileJob<'_>, c: &ChunkRef) -> bool {
    let mut buf = vec![0u8; c.len as usize];
    if job.file.read_exact_at(&mut buf, c.off).is_err() {
        return false;
    }
    match c.hash {
        Some(h) => Id::of(&buf) == h,
        None => buf.iter().all(|&b| b == 0),
    }
}

/// Make chunk `c` of `job` a hole (or zeros where holes are unsupported).
fn make_hole(job: &FileJob<'_>, c: &ChunkRef) -> std::io::Result<()> {
    let len = c.len.min(job.local_size - c.off);
    if super::sparse::punch_hole(&job.file, c.off, len) {
        return Ok(());
    }
    let mut buf = vec![0u8; len as usize];
    job.file.read_exact_at(&mut buf, c.off)?;
    if buf.iter().any(|&b| b != 0) {
        buf.fill(0);
        job.file.write_all_at(&buf, c.off)?;
    }
    Ok(())
}

fn verifier<'a>(shared: &Shared<'a>, rx: &Mutex<Receiver<Want<'a>>>, tx: &Sender<BatchMsg<'a>>) {
    let mut buf = Vec::new();
    loop {
        let w = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(w) = w else { return };
        if shared.aborted() {
            continue;
        }
        let c = w.chunk;
        // Only the part that existed before the resize can match.
        let local_len = c.len.min(w.job.local_size.saturating_sub(c.off));
        buf.resize(c.len as usize, 0);
        if let Err(e) = w
            .job
            .file
            .read_exact_at(&mut buf[..local_len as usize], c.off)
        {
            shared.fail(ChunkError::io(Path::new(&*w.job.entry.display()), e));
            continue;
        }
        buf[local_len as usize..].fill(0);
        shared
            .counters
            .verified
            .fetch_add(local_len, Ordering::Relaxed);
        if c.hash == Some(Id::of(&buf)) {
            shared.counters.reused.fetch_add(1, Ordering::Relaxed);
            shared.chunk_done(&w.job, w.index, c.len);
        } else if tx.send(BatchMsg::Want(w)).is_err() {
            return;
        }
    }
}

fn batcher<'a>(shared: &Shared<'a>, rx: Receiver<BatchMsg<'a>>, tx: SyncSender<Fetch<'a>>) {
    let mut window: HashMap<Id, Vec<Want<'a>>> = HashMap::new();
    let mut bytes = 0u64;
    loop {
        let msg = rx.recv_timeout(Duration::from_millis(5));
        let flush = match msg {
            Ok(BatchMsg::Want(w)) => {
                if let Some(h) = w.chunk.hash {
                    bytes += w.chunk.len;
                    window.entry(h).or_default().push(w);
                }
                bytes >= WINDOW
            }
            Err(RecvTimeoutError::Timeout) => !window.is_empty(),
            Ok(BatchMsg::Done) | Err(RecvTimeoutError::Disconnected) => {
                // Verifiers may still send: wait for them to hang up.
                if matches!(msg, Ok(BatchMsg::Done)) {
                    continue;
                }
                dispatch(shared, std::mem::take(&mut window), &tx);
                return;
            }
        };
        if flush {
            bytes = 0;
            if !dispatch(shared, std::mem::take(&mut window), &tx) {
                return;
            }
        }
    }
}

/// Turn a window of wanted chunks into reads. `false` if the fetchers are
/// gone.
fn dispatch<'a>(
    shared: &Shared<'a>,
    window: HashMap<Id, Vec<Want<'a>>>,
    tx: &SyncSender<Fetch<'a>>,
) -> bool {
    if window.is_empty() || shared.aborted() {
        return !shared.aborted();
    }
    if shared.v1 {
        for (hash, wants) in window {
            let raw = wants[0].chunk.len;
            let fetch = Fetch {
                source: Source::Object(hash),
                chunks: vec![(hash, raw, 0, 0, wants)],
            };
            if tx.send(fetch).is_err() {
                return false;
            }
        }
        return true;
    }
    let guard = shared.map.read().unwrap_or_else(|p| p.into_inner());
    let map = &guard.1;
    let mut slots: Vec<(Id, Vec<Want<'a>>)> = Vec::with_capacity(window.len());
    let mut needs = Vec::with_capacity(window.len());
    for (hash, wants) in window {
        let Some(loc) = map.find(&hash) else {
            let w = &wants[0];
            shared.fail(ChunkError::Corrupt {
                path: w.job.entry.display().into_owned(),
                hash,
                off: w.chunk.off,
                detail: "missing from the store".into(),
            });
            return false;
        };
        needs.push(Need {
            pack: loc.pack,
            offset: loc.offset,
            len: loc.stored_len,
            slot: slots.len(),
        });
        slots.push((hash, wants));
    }
    let reads: Vec<ReadRange> = coalesce(needs, MAX_GAP, MAX_RANGE);
    let packs: Vec<Id> = reads
        .iter()
        .map(|r| map.packs()[r.pack as usize].id)
        .collect();
    drop(guard);
    let mut slots: Vec<Option<(Id, Vec<Want<'a>>)>> = slots.into_iter().map(Some).collect();
    for (r, pack) in reads.into_iter().zip(packs) {
        let chunks = r
            .needs
            .iter()
            .filter_map(|n| {
                let (hash, wants) = slots[n.slot].take()?;
                let raw = wants[0].chunk.len;
                Some((
                    hash,
                    raw,
                    u64::from(n.offset) - r.start,
                    u64::from(n.len),
                    wants,
                ))
            })
            .collect();
        let fetch = Fetch {
            source: Source::Range {
                pack,
                start: r.start,
                len: r.end - r.start,
            },
            chunks,
        };
        if tx.send(fetch).is_err() {
            return false;
        }
    }
    true
}

fn fetcher<'a>(shared: &Shared<'a>, rx: &Mutex<Receiver<Fetch<'a>>>) {
    let mut dctx = match zstd::bulk::Decompressor::new() {
        Ok(d) => d,
        Err(e) => {
            shared.fail(ChunkError::Invalid(format!("cannot start zstd: {e}")));
            return;
        }
    };
    let mut out = Vec::new();
    loop {
        let f = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(f) = f else { return };
        if shared.aborted() {
            continue;
        }
        if let Err(e) = fetch_one(shared, f, Missing::Relocate, &mut dctx, &mut out) {
            shared.fail(e);
        }
    }
}

/// Read `source` into `buf`.
fn get(shared: &Shared<'_>, source: &Source, buf: &mut Vec<u8>) -> Result<(), StoreError> {
    let store = shared.store;
    let _req = shared.opts.progress.request();
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    with_retry(|| match *source {
        Source::Range { pack, start, len } => {
            store.get_range_into(Kind::Pack, &pack, start, len, buf)
        }
        Source::Object(id) => store.get(Kind::Chunk, &id).map(|data| {
            buf.clear();
            buf.extend_from_slice(&data);
        }),
    })
}

/// What a read does when its object is gone from the store.
#[derive(Clone, Copy)]
enum Missing {
    /// Reload the chunk map and read each chunk from wherever it now is
    /// (a GC repacked it); format 1 objects never move, so they fail.
    Relocate,
    /// Fail, saying this.
    Fail(&'static str),
}

fn fetch_one<'a>(
    shared: &Shared<'a>,
    f: Fetch<'a>,
    missing: Missing,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let want = match f.source {
        Source::Range { len, .. } => len,
        Source::Object(_) => shared.chunk_size,
    };
    let Some(permit) = shared.in_flight.take(want, &shared.abort) else {
        return Err(ChunkError::Aborted);
    };
    let mut data = shared.buffers.take();
    if let Err(e) = get(shared, &f.source, &mut data) {
        shared.buffers.give(data);
        let (hash, _, _, _, wants) = &f.chunks[0];
        return match (e, missing) {
            (StoreError::NotFound(_), Missing::Relocate) if !shared.v1 => {
                // Its own reads take from the budget again.
                drop(permit);
                refetch(shared, f, dctx, out)
            }
            (StoreError::NotFound(_), missing) => Err(ChunkError::Corrupt {
                path: wants[0].job.entry.display().into_owned(),
                hash: *hash,
                off: wants[0].chunk.off,
                detail: match missing {
                    Missing::Fail(detail) => detail.into(),
                    Missing::Relocate => "missing from the store".into(),
                },
            }),
            (e, _) => Err(ChunkError::store(
                format!(
                    "file {}: fetching chunk {hash}",
                    wants[0].job.entry.display()
                ),
                e,
            )),
        };
    }
    shared
        .counters
        .downloaded
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    let whole = matches!(f.source, Source::Object(_));
    let written = write_fetched(shared, f.chunks, whole, &data, dctx, out);
    shared.buffers.give(data);
    written
}

/// Open each chunk of a read (`whole`: the read is the one chunk's object,
/// not a range of frames) and write it where it is wanted.
fn write_fetched<'a>(
    shared: &Shared<'a>,
    chunks: FetchChunks<'a>,
    whole: bool,
    data: &[u8],
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    for (hash, raw, at, len, wants) in chunks {
        let frame = if whole {
            data
        } else {
            data.get(at as usize..(at + len) as usize).unwrap_or(&[])
        };
        if let Err(e) = open_frame(frame, &hash, raw, dctx, out) {
            let w = &wants[0];
            let detail = match e {
                FrameError::Mismatch => "corrupt (content does not match its hash)".to_owned(),
                FrameError::Decompress(d) => format!("corrupt (cannot decompress: {d})"),
            };
            return Err(ChunkError::Corrupt {
                path: w.job.entry.display().into_owned(),
                hash,
                off: w.chunk.off,
                detail,
            });
        }
        shared.counters.fetched.fetch_add(1, Ordering::Relaxed);
        for w in wants {
            let n = write_sparse(&w.job.file, w.chunk.off, out, w.job.local_size)
                .map_err(|e| ChunkError::io(Path::new(&*w.job.entry.display()), e))?;
            shared.wrote(n);
            shared.chunk_done(&w.job, w.index, w.chunk.len);
        }
    }
    Ok(())
}

/// A pack vanished under the restore (a GC moved its chunks; a restore
/// without a lease cannot prevent that): reload the chunk map once, and
/// fetch each chunk from wherever it is now.
fn refetch<'a>(
    shared: &Shared<'a>,
    f: Fetch<'a>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    {
        let before = shared.map.read().unwrap_or_else(|p| p.into_inner()).0;
        let mut m = shared.map.write().unwrap_or_else(|p| p.into_inner());
        if m.0 == before {
            let connections = shared
                .opts
                .connections
                .unwrap_or_else(|| default_connections(shared.store));
            m.1 = ChunkMap::load(shared.store, shared.opts.cache.as_ref(), connections)?;
            m.0 += 1;
        }
    }
    for (hash, raw, _, _, wants) in f.chunks {
        let loc = shared
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .find(&hash)
            .map(|l| (l.pack, l.offset, l.stored_len));
        let Some((pack, offset, len)) = loc else {
            let w = &wants[0];
            return Err(ChunkError::Corrupt {
                path: w.job.entry.display().into_owned(),
                hash,
                off: w.chunk.off,
                detail: "missing from the store".into(),
            });
        };
        let pack = shared
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .packs()[pack as usize]
            .id;
        let single = Fetch {
            source: Source::Range {
                pack,
                start: u64::from(offset),
                len: u64::from(len),
            },
            chunks: vec![(hash, raw, 0, u64::from(len), wants)],
        };
        fetch_one(
            shared,
            single,
            Missing::Fail("missing from the store (its pack disappeared twice)"),
            dctx,
            out,
        )?;
    }
    Ok(())
}

/// Block size for keeping restored files as sparse as their originals.
const SPARSE_BLOCK: usize = 4096;

/// Write `data` at `off`, leaving all-zero 4 KiB blocks unallocated: they
/// are skipped past the file's old end (already a hole after `set_len`) and
/// punched below it (zeros written where punching is unsupported). Returns
/// the bytes actually written.
fn write_sparse(file: &File, off: u64, data: &[u8], local_size: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut i = 0;
    while i < data.len() {
        let zero = |j: usize| {
            data[j..(j + SPARSE_BLOCK).min(data.len())]
                .iter()
                .all(|&b| b == 0)
        };
        let is_zero = zero(i);
        let mut j = i;
        while j < data.len() && zero(j) == is_zero {
            j += SPARSE_BLOCK;
        }
        let j = j.min(data.len());
        let (run_off, run) = (off + i as u64, &data[i..j]);
        if !is_zero {
            file.write_all_at(run, run_off)?;
            written += run.len() as u64;
        } else if run_off < local_size {
            let len = (run.len() as u64).min(local_size - run_off);
            if !super::sparse::punch_hole(file, run_off, len) {
                file.write_all_at(&run[..len as usize], run_off)?;
                written += len;
            }
        }
        i = j;
    }
    Ok(written)
}

/// Every 10 s, or 256 MiB: sync the filesystem, then journal the files
/// (and prefixes of large files) that the sync made durable.
fn checkpointer(
    shared: &Shared<'_>,
    journal: &Mutex<Journal>,
    dest: &OwnedFd,
) -> Result<(), ChunkError> {
    let mut last = Instant::now();
    loop {
        let stop = {
            let guard = shared
                .checkpoint_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // The stop flag is read under the lock before waiting: a stop
            // set during the previous checkpoint's sync is not missed (it
            // cost every such restore up to ten idle seconds).
            if *guard {
                true
            } else if shared.checkpoint_due(last) {
                // Its trigger may have fired during the previous sync,
                // when nobody waited.
                false
            } else {
                let (guard, _) = shared
                    .checkpoint_now
                    .wait_timeout(guard, CHECKPOINT_EVERY.saturating_sub(last.elapsed()))
                    .unwrap_or_else(|p| p.into_inner());
                *guard
            }
        };
        if stop || shared.aborted() {
            // The end of the restore syncs once more and drops the journal;
            // an aborted one leaves what the last checkpoint recorded.
            return Ok(());
        }
        if !shared.checkpoint_due(last) {
            continue;
        }
        last = Instant::now();
        shared.since_checkpoint.store(0, Ordering::Relaxed);
        // What is claimed is taken before the sync: it is all on disk once
        // the sync returns.
        let mut records =
            std::mem::take(&mut *shared.completed.lock().unwrap_or_else(|p| p.into_inner()));
        {
            let mut big = shared.big.lock().unwrap_or_else(|p| p.into_inner());
            big.retain(|w| w.strong_count() > 0);
            for job in big.iter().filter_map(Weak::upgrade) {
                let prefix = job.prefix_bytes();
                // Stamped before the sync: a write after it moves the
                // change time, and the record is then not trusted.
                let stamp = nix::sys::stat::fstat(&job.file).map(|st| Stamp::of(&st));
                if let (Ok(stamp), true) = (stamp, prefix > 0 && prefix < job.size) {
                    records.push((job.entry.path.clone(), Record { stamp, prefix }));
                }
            }
        }
        nix::unistd::syncfs(dest)
            .map_err(|e| ChunkError::io(Path::new("(restore destination)"), e.into()))?;
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&records)?;
    }
}
