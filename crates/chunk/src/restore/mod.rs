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
//!   **checkpointer** then, every 64 MiB, 65,536 files or 10 s, syncs the
//!   filesystem and journals what that made durable ([`journal`]); once
//!   every read is handed out, it syncs each 4 MiB the last reads write,
//!   so that the restore's own last sync has little left. The restore
//!   reports success only after that last sync, with the journal removed;
//!   its lease is given up beside it.
//!
//! Each stage is one file: `planner.rs`, `verify.rs`, `fetch.rs` (batcher
//! and fetchers), `write.rs`, `checkpoint.rs` (owners, modes and times: [`crate::localfs`]) with
//! [`journal`], and [`delete`] for `--delete`; [`prove`] runs before any of
//! them. What they share (the stop and first error, budgets, worker pools,
//! counters) is [`crate::pipeline`].

mod checkpoint;
pub mod delete;
mod fetch;
pub mod journal;
mod planner;
pub mod prove;
mod verify;
mod write;

pub use prove::load_and_prove;
pub use write::write_sparse;

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use serde::Serialize;

use super::buffers::Buffers;
use super::cache::Cache;
use super::format::head::Decoded;
use super::format::tree::Entry;
use super::lease::{Lease, LeaseError, LeaseKind};
use super::map::ChunkMap;
use super::pipeline::{counters, Budget, Pipeline};
use super::store::Id;
use super::{inventory, ChunkError, Policy, Progress, Repo};
use journal::{Durable, Journal};

/// Frames of one pack closer than this are fetched in one read.
const MAX_GAP: u64 = 256 << 10;
/// The longest ranged read.
const MAX_RANGE: u64 = 4 << 20;
/// The most chunks one ranged read serves. Not capped: a cap of 256 let
/// meta's last reads share their files between both cores (3.60-3.87 s
/// against 3.48-4.18 s), but at a million files of 170 bytes it turned
/// each 4 MiB read into a hundred of 44 KiB and the restore's peak RSS
/// rose from 125 to 129-134 MiB, over the 128 MiB bound
/// (`docs/performance.md`, stop 48).
const MAX_READ_CHUNKS: usize = usize::MAX;
/// Stored bytes being fetched or written at once, whatever the number of
/// connections: a restore's memory does not grow with its parallelism
/// (live restore's hydration keeps to it too), nor with its mirrors.
pub const IN_FLIGHT_BYTES: u64 = 40 << 20;
/// Read buffers kept for reuse: as many ranged reads of [`MAX_RANGE`] as
/// the in-flight budget allows at once, so pooling adds nothing to the
/// peak.
const POOLED_BUFFERS: usize = (IN_FLIGHT_BYTES / MAX_RANGE) as usize;
/// Stored bytes of fetches collected before they are grouped into reads.
const WINDOW: u64 = 64 << 20;
/// How often, at most, progress is made durable and journalled.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// Bytes written that trigger a checkpoint sooner. Each sync starts the
/// disk on what the restore wrote while it is still fetching, rather than
/// leaving it all to the end: at 256 MiB, 100,000 files of 2.4 KiB (meta,
/// S3 behind 20 ms) waited on the disk at the end, and took 3.91-4.67 s
/// at a 105-109 MiB peak, against 3.64-4.08 s at 77-88 MiB at 64 MiB (four
/// rounds each, interleaved); node and churn were unchanged. A million
/// files of 16-256 bytes reach [`CHECKPOINT_FILES`] first, as before.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Files completed that trigger a checkpoint sooner. Their journal records
/// wait in memory for the sync (about 180 bytes each, with the file's
/// chunk list for the restore record): without this a tree of tiny files
/// on a fast disk completes hundreds of thousands of them in ten seconds,
/// and the restore's memory would follow the disk's speed. At 131,072 a
/// million-file restore peaked at 125 MiB, a 150,000-file one at 129.
const CHECKPOINT_FILES: usize = 64 << 10;
/// Files with at least this many chunks get prefix records in the journal.
const BIG_FILE_CHUNKS: u64 = 64;

/// How a restore is done.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Only entries whose path matches are restored (directories always).
    pub filter: Option<regex::bytes::Regex>,
    /// Remove local entries that are not in the backup.
    pub delete: bool,
    /// Verifier threads.
    pub workers: usize,
    /// Updated as chunks are planned and processed.
    pub progress: Arc<Progress>,
    /// Which local files are key material (never deleted) and signing
    /// state (never replaced or deleted, unless told below).
    pub policy: Policy,
    /// Overwrite signing state that exists locally. Off by default: a
    /// restore never lowers a validator's record of what it signed.
    pub overwrite_signing_state: bool,
    /// Download at most this many bytes per second (`--max-rate`).
    pub max_rate: Option<u64>,
    /// Where restore records are kept (one per destination, outside it):
    /// what the last completed restore into a directory wrote, so that
    /// the next need not read files unchanged since. `None`: none kept.
    pub records: Option<std::path::PathBuf>,
    /// Whose files it makes (tar's convention by default: the backup's
    /// owners for root, the restoring user's for anyone else).
    pub owners: crate::localfs::Owners,
}

impl RestoreOptions {
    /// Defaults under `policy`: the whole backup, nothing deleted,
    /// workers by cores.
    pub fn new(policy: Policy) -> Self {
        RestoreOptions {
            filter: None,
            delete: false,
            workers: super::default_workers(),
            progress: Arc::default(),
            policy,
            overwrite_signing_state: false,
            max_rate: None,
            records: None,
            owners: crate::localfs::Owners::for_this_process(),
        }
    }
}

/// What a restore did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RestoreSummary {
    /// Files restored (checked or written).
    pub files: u64,
    /// Hard links made or found in place: other names of files restored
    /// once.
    pub links: u64,
    /// Files an earlier, interrupted run had already completed (not read).
    pub files_trusted: u64,
    /// Files unchanged since the last restore into the destination
    /// recorded what they hold: their chunks compared with the record,
    /// not read.
    pub files_known: u64,
    /// Logical bytes of all files.
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
    /// Whose files it made.
    pub owners: crate::localfs::Owners,
}

counters! {
    /// What a restore counts, as its summary reports it.
    struct Counters for RestoreSummary {
        files_trusted,
        files_known,
        bytes_verified,
        chunks_reused,
        chunks_fetched,
        bytes_downloaded,
        requests,
        bytes_written,
        holes,
    }
}

/// The chunk map, and how many times it was loaded: a fetcher that finds
/// a pack gone reloads it only if nobody did since it looked.
struct LoadedMap {
    generation: u64,
    map: ChunkMap,
}

/// What every thread of one restore shares.
struct Shared<'a> {
    repo: &'a Repo,
    opts: &'a RestoreOptions,
    pipeline: Pipeline,
    v1: bool,
    /// The backup's chunk size: chunk lengths never exceed it, and
    /// journal prefixes are in whole chunks of it.
    chunk_size: u64,
    map: RwLock<LoadedMap>,
    counters: Counters,
    /// Files complete since the last checkpoint.
    completed: Mutex<Vec<Durable>>,
    /// Files complete with other names (hard links), as recorded: see
    /// [`restamp_linked`].
    linked: Mutex<Vec<Durable>>,
    /// Files large enough for prefix records.
    big: Mutex<Vec<Weak<write::FileJob<'a>>>>,
    since_checkpoint: AtomicU64,
    /// Reads handed to the fetchers and not yet finished: once every read
    /// is handed out, the checkpointer syncs while this is above zero.
    reads_left: AtomicUsize,
    checkpoint_now: Condvar,
    checkpoint_lock: Mutex<bool>,
    /// Bytes of ranged reads in memory, see [`IN_FLIGHT_BYTES`].
    in_flight: Arc<Budget>,
    /// Files open at once (see [`open_file_budget`]).
    open_files: Arc<Budget>,
    /// Wanted chunks a window is sent at, whatever its bytes: half the
    /// files that may be open, so that the planner, which waits for a
    /// file to close before it opens another, never waits on a window
    /// that waits for it (many small files came in bursts, a window per
    /// budget of files after a 5 ms lull).
    window_wants: usize,
    /// Read buffers to reuse, at most [`POOLED_BUFFERS`] (see
    /// [`crate::buffers`]). Each has room for any ranged read: growing one
    /// would fault in fresh pages again.
    buffers: Buffers,
    /// The download limit, if any.
    throttle: Option<crate::throttle::Throttle>,
}

impl<'a> Shared<'a> {
    fn new(repo: &'a Repo, opts: &'a RestoreOptions, index: &Decoded, map: ChunkMap) -> Self {
        let pipeline = Pipeline::new(&opts.progress.cancel);
        let open_files = open_file_budget();
        Shared {
            repo,
            opts,
            v1: matches!(index, Decoded::V1(_)),
            chunk_size: index.chunk_size().max(1),
            map: RwLock::new(LoadedMap { generation: 0, map }),
            counters: Counters::default(),
            completed: Mutex::new(Vec::new()),
            linked: Mutex::new(Vec::new()),
            big: Mutex::new(Vec::new()),
            since_checkpoint: AtomicU64::new(0),
            reads_left: AtomicUsize::new(0),
            checkpoint_now: Condvar::new(),
            checkpoint_lock: Mutex::new(false),
            in_flight: pipeline.budget(IN_FLIGHT_BYTES),
            open_files: pipeline.budget(open_files as u64),
            window_wants: open_files / 2,
            buffers: Buffers::new(POOLED_BUFFERS, MAX_RANGE as usize, MAX_RANGE as usize),
            throttle: opts.max_rate.map(crate::throttle::Throttle::new),
            pipeline,
        }
    }
}

/// Restore backup `name` (`index`) from `repo` into `dest`.
pub fn restore(
    repo: &Repo,
    name: &str,
    index: &Decoded,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, ChunkError> {
    restore_with(repo, || Ok((name, index)), dest, opts)
}

/// What [`restore_found`] found and did.
pub struct Found {
    /// The backup `find` found, if it got that far: its name and index.
    pub backup: Option<(String, Decoded)>,
    /// How the restore went (a lookup failure included).
    pub result: Result<RestoreSummary, ChunkError>,
}

/// Restore into `dest` the backup `find` looks up (`latest`, a name), the
/// lookup made while the restore's lease is taken: both are round trips
/// to a remote store (a listing and a head's read; a marker's write and a
/// listing), and the lookup needs no lease, because heads are never
/// re-created (`docs/format.md`, "Restore lease"). `find` runs before
/// anything is written, so it may also refuse the backup it found.
pub fn restore_found(
    repo: &Repo,
    find: impl FnOnce() -> Result<(String, Decoded), ChunkError> + Send,
    dest: &Path,
    opts: &RestoreOptions,
) -> Found {
    std::thread::scope(|s| {
        let lookup = Lookup {
            pending: Mutex::new(Some(s.spawn(find))),
            found: std::sync::OnceLock::new(),
        };
        let result = restore_with(repo, || lookup.get(), dest, opts);
        // Finished even if the lease could not be waited for.
        let _ = lookup.get();
        Found {
            backup: lookup.found.into_inner(),
            result,
        }
    })
}

/// A lookup running on a thread of its own, joined once.
struct Lookup<'scope> {
    pending: Mutex<Option<ScopedLookup<'scope>>>,
    found: std::sync::OnceLock<(String, Decoded)>,
}

type ScopedLookup<'scope> =
    std::thread::ScopedJoinHandle<'scope, Result<(String, Decoded), ChunkError>>;

impl Lookup<'_> {
    /// What the lookup found, waiting for it the first time; its error
    /// only the first time (then [`ChunkError::Aborted`]).
    fn get(&self) -> Result<(&str, &Decoded), ChunkError> {
        let handle = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let found = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            let _ = self.found.set(found);
        }
        let (name, index) = self.found.get().ok_or(ChunkError::Aborted)?;
        Ok((name, index))
    }
}

/// [`restore`] of the backup `found` gives, asked for once the lease is
/// taken (or found not to be needed). The pack indexes are listed while
/// the lease is being taken (`docs/format.md`, "Restore lease"): one round
/// trip fewer before the first pack read.
fn restore_with<'a>(
    repo: &Repo,
    found: impl Fn() -> Result<(&'a str, &'a Decoded), ChunkError>,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, ChunkError> {
    std::thread::scope(|s| {
        let early = EarlyListing(Mutex::new(Some(
            s.spawn(|| crate::map::list_pack_indexes(repo.store())),
        )));
        let run_found = |lease: Option<&Lease<'_>>| {
            let (name, index) = found()?;
            // A sweep it waited for may have changed what was listed.
            let listed = early.take().filter(|_| !lease.is_some_and(Lease::waited));
            run(repo, name, index, dest, opts, lease, listed)
        };
        with_restore_lease(repo, opts, &run_found)
    })
}

/// Run `run_found` under a restore lease, or without one where the store
/// cannot hold one.
fn with_restore_lease(
    repo: &Repo,
    opts: &RestoreOptions,
    run_found: &dyn Fn(Option<&Lease<'_>>) -> Result<RestoreSummary, ChunkError>,
) -> Result<RestoreSummary, ChunkError> {
    let result = super::lease::with_lease(
        repo.store(),
        LeaseKind::Restore,
        None,
        &opts.progress.cancel,
        |lease| run_found(Some(lease)),
    );
    match result {
        // A published store read by URL or anonymously: no lease to take.
        Err(ChunkError::Lease(LeaseError::Store(crate::store::StoreError::ReadOnly {
            ..
        }))) => run_found(None),
        // The store cannot be written (read-only credentials): go on
        // without a lease, as the format allows.
        Err(ChunkError::Lease(LeaseError::Store(e))) => {
            tracing::warn!(error = %e, "cannot take a restore lease; restoring without one");
            run_found(None)
        }
        Err(ChunkError::Lease(LeaseError::Cancelled)) => Err(ChunkError::Cancelled),
        r => r,
    }
}

/// The pack indexes, listed on a thread of their own while the lease is
/// taken; taken once.
struct EarlyListing<'scope>(Mutex<Option<ScopedListing<'scope>>>);

type ScopedListing<'scope> = std::thread::ScopedJoinHandle<'scope, Result<Vec<Id>, ChunkError>>;

impl EarlyListing<'_> {
    /// The listing, or `None` if it failed (the map is then listed again,
    /// and that listing's error reported) or was taken before.
    fn take(&self) -> Option<Vec<Id>> {
        let handle = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        match handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        {
            Ok(ids) => Some(ids),
            Err(e) => {
                tracing::debug!(error = %e, "listing the pack indexes early failed; listing them again");
                None
            }
        }
    }
}

/// Let this process open as many files as its hard limit allows (raise
/// the soft limit to the hard one), and return the soft limit now.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    soft
}

/// How many files the restore may keep open at once, the limit raised
/// first.
fn open_file_budget() -> usize {
    ((raise_open_file_limit() / 2) as usize).clamp(64, 4096)
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

/// [`restore`] under `lease`, if one was taken: it is given up once the
/// last read is done.
fn run(
    repo: &Repo,
    name: &str,
    index: &Decoded,
    dest: &Path,
    opts: &RestoreOptions,
    lease: Option<&Lease<'_>>,
    listed: Option<Vec<Id>>,
) -> Result<RestoreSummary, ChunkError> {
    // The backup's segments are read twice (see `prove`): the second time
    // from a cache, a temporary one if there is no other.
    let scratch;
    let repo = match repo.cache() {
        Some(_) => repo.clone(),
        None => {
            scratch = tempfile::tempdir()
                .map_err(|e| ChunkError::io(Path::new("(temporary cache)"), e))?;
            repo.clone().with_cache(Some(Cache::new(scratch.path())))
        }
    };
    let map = prove::load_and_prove_listed(&repo, name, index, listed)?;
    std::fs::create_dir_all(dest).map_err(|e| ChunkError::io(dest, e))?;
    let (tree, dest_fd) = open_dest(dest)?;
    // Read before the journal is made in it.
    let fresh = holds_nothing(dest);
    let record = opts
        .records
        .as_deref()
        .and_then(|dir| record_path(dir, dest, &dest_fd));
    let (journal, prior) = Journal::open(dest, &dest_fd, name, record.as_deref(), !fresh)?;
    let journal = Mutex::new(journal);
    let shared = Shared::new(&repo, opts, index, map);
    let mut summary = RestoreSummary {
        owners: opts.owners,
        ..RestoreSummary::default()
    };
    let mut dirs: Vec<Entry> = Vec::new();
    let entries = repo.entries(name, index);
    let dest = Dest {
        tree: &tree,
        fd: &dest_fd,
        path: dest,
        fresh,
    };
    run_pipeline(
        &shared,
        &dest,
        &prior,
        &journal,
        entries,
        &mut dirs,
        &mut summary,
    );
    shared.pipeline.outcome()?;
    std::thread::scope(|s| {
        // Every read is done: the lease's round trip runs beside the last
        // sync instead of after it. What follows reads only tree segments,
        // which no sweep removes while their head exists.
        if let Some(lease) = lease {
            s.spawn(|| lease.release());
        }
        stamp_dirs(&tree, &mut dirs, opts.owners)?;
        if opts.delete {
            delete_extra(&repo, name, index, dest.path, opts, &mut summary)?;
        }
        let journal = journal.into_inner().unwrap_or_else(|p| p.into_inner());
        make_durable(&shared, &dest, journal, record.as_deref())?;
        shared.counters.fill(&mut summary);
        Ok(summary)
    })
}

/// Give directories their metadata last, deepest first: creating their
/// children changed their times.
fn stamp_dirs(
    tree: &btm::confined::Tree,
    dirs: &mut [Entry],
    owners: crate::localfs::Owners,
) -> Result<(), ChunkError> {
    dirs.sort_by_key(|e| std::cmp::Reverse(e.path.iter().filter(|&&c| c == b'/').count()));
    dirs.iter()
        .try_for_each(|e| crate::localfs::apply_dir_metadata(tree, e, owners))
}

/// The restore's last sync, then the restore record (if one is kept) and
/// the journal's removal: after this the restore may report success.
fn make_durable(
    shared: &Shared<'_>,
    dest: &Dest<'_>,
    mut journal: Journal,
    record: Option<&Path>,
) -> Result<(), ChunkError> {
    nix::unistd::syncfs(dest.fd).map_err(|e| ChunkError::io(dest.path, e.into()))?;
    if record.is_some() {
        restamp_linked(shared, dest.tree);
        // The files completed since the last checkpoint, durable now: the
        // record is to name every file.
        let rest = std::mem::take(&mut *shared.completed.lock().unwrap_or_else(|p| p.into_inner()));
        journal.record(&rest)?;
    }
    journal.finish(dest.fd, record)
}

/// Making a hard link changes its target's change time, so a target that
/// was complete, and stamped, before a link to it was made would no
/// longer match its record, and the next restore would read it again to
/// compare. Once every link is made, each such file is stamped again: the
/// same inode, size and modification time, only a later change time.
/// Anything else changed means someone else wrote it: it keeps its first
/// record (and is compared next time). A file that cannot be looked at
/// now keeps it too; it was already journalled, nothing is lost.
fn restamp_linked(shared: &Shared<'_>, tree: &btm::confined::Tree) {
    let linked = std::mem::take(&mut *shared.linked.lock().unwrap_or_else(|p| p.into_inner()));
    let again: Vec<Durable> = linked
        .into_iter()
        .filter_map(|d| {
            let (dir, name) = crate::localfs::split_name(&d.path);
            let comps =
                btm::confined::components(Path::new(std::ffi::OsStr::from_bytes(dir))).ok()?;
            let parent = tree.dir(&comps, false).ok()?;
            let st = nix::sys::stat::fstatat(
                &parent,
                std::ffi::OsStr::from_bytes(name),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .ok()?;
            let (now, was) = (journal::Stamp::of(&st), d.record.stamp);
            let same = |s: &journal::Stamp| (s.ino, s.size, s.mtime_ns);
            (now != was && same(&now) == same(&was)).then_some(Durable {
                record: journal::Record {
                    stamp: now,
                    ..d.record
                },
                ..d
            })
        })
        .collect();
    shared
        .completed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(again);
}

/// The restore record of `dest` (open as `fd`) in `dir`: named by the
/// directory's device and inode and its canonical path, so a directory
/// replaced or moved starts without one.
fn record_path(dir: &Path, dest: &Path, fd: &OwnedFd) -> Option<std::path::PathBuf> {
    let st = nix::sys::stat::fstat(fd).ok()?;
    let canonical = std::fs::canonicalize(dest).ok()?;
    let path_hash = Id::of(canonical.as_os_str().as_encoded_bytes()).to_hex();
    Some(dir.join(format!(
        "{:x}-{:x}-{}",
        st.st_dev,
        st.st_ino,
        &path_hash[..16]
    )))
}

/// Where a restore writes: the destination open, a descriptor of it for
/// `syncfs` and the journal, and its path for messages.
struct Dest<'d> {
    tree: &'d btm::confined::Tree,
    fd: &'d OwnedFd,
    path: &'d Path,
    /// It held nothing when the restore began (see [`holds_nothing`]).
    fresh: bool,
}

/// Whether `dest` holds nothing (an empty `lost+found`, which a new
/// volume has, aside): a new node's restore then creates every entry
/// without looking first. Only a hint, see `planner::OpenDir::fresh`.
fn holds_nothing(dest: &Path) -> bool {
    let Ok(mut list) = std::fs::read_dir(dest) else {
        return false;
    };
    list.all(|e| {
        e.is_ok_and(|e| {
            e.file_name() == "lost+found"
                && std::fs::read_dir(e.path()).is_ok_and(|mut l| l.next().is_none())
        })
    })
}

/// Run the stages of the header's diagram until the planner has planned
/// every entry and every chunk is written or the pipeline stopped.
fn run_pipeline<'a>(
    shared: &'a Shared<'a>,
    dest: &Dest<'_>,
    prior: &journal::Prior,
    journal: &Mutex<Journal>,
    entries: inventory::Entries<'_>,
    dirs: &mut Vec<Entry>,
    summary: &mut RestoreSummary,
) {
    let opts = shared.opts;
    let connections = shared.repo.read_connections();
    std::thread::scope(|s| {
        let (verify_tx, verify_rx) = crossbeam_channel::bounded(opts.workers * 16);
        let (batch_tx, batch_rx) = crossbeam_channel::unbounded();
        let (fetch_tx, fetch_rx) = crossbeam_channel::bounded(connections);
        let to_batcher = batch_tx.clone();
        shared.pipeline.spawn_workers(
            s,
            opts.workers,
            &verify_rx,
            || Ok(Vec::new()),
            move |buf, w| verify::verify(shared, buf, w, &to_batcher),
        );
        drop(verify_rx);
        let batcher = s.spawn(move || fetch::batcher(shared, batch_rx, fetch_tx));
        shared.pipeline.spawn_workers(
            s,
            connections,
            &fetch_rx,
            fetch::Fetcher::new,
            move |fetcher, f| fetcher.fetch(shared, f),
        );
        drop(fetch_rx);
        let checkpointer = s.spawn(move || checkpoint::checkpointer(shared, journal, dest.fd));
        let mut planner = planner::Planner {
            shared,
            tree: dest.tree,
            dest: dest.path,
            prior,
            open_files: &shared.open_files,
            verify: verify_tx,
            batch: batch_tx.clone(),
            stack: Vec::new(),
            root_fresh: dest.fresh,
            left_out: Default::default(),
            dirs,
            summary,
        };
        if let Err(e) = planner.run(entries) {
            shared.pipeline.fail(e);
        }
        drop(planner);
        let _ = batch_tx.send(fetch::BatchMsg::Done);
        drop(batch_tx);
        let _ = batcher.join();
        shared.stop_checkpoints();
        if let Ok(Err(e)) = checkpointer.join() {
            shared.pipeline.fail(e);
        }
    });
}

/// `--delete`: remove what the backup lacks, within the restore's scope.
fn delete_extra(
    repo: &Repo,
    name: &str,
    index: &Decoded,
    dest: &Path,
    opts: &RestoreOptions,
    summary: &mut RestoreSummary,
) -> Result<(), ChunkError> {
    let entries = repo.entries(name, index);
    let scope = delete::Scope {
        filter: opts.filter.as_ref(),
        keep_signing_state: !opts.overwrite_signing_state,
        policy: opts.policy,
    };
    let done = delete::delete_extra(dest, index, entries, &scope)?;
    summary.deleted = done.removed;
    summary.not_deleted = done.kept;
    summary.not_deleted_named = done.kept_named;
    Ok(())
}
