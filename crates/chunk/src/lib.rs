//! The sparse chunk engine: back up a directory tree to a store and
//! restore it in place, moving only what differs.
//!
//! Files are cut into fixed-size, content-addressed chunks (holes and zero
//! chunks are never stored), compressed with zstd and grouped into packs;
//! each backup is a small head plus a stream of tree segments. The format
//! is `docs/format.md`; [`format`](mod@format) is the only code that
//! encodes it.
//!
//! The parts, from the store up:
//! - [`cache`] keeps store metadata (pack indexes, tree segments) locally;
//! - [`map`] is the chunk map: which chunks the store holds, and where;
//! - [`inventory`] lists, reads, selects and forgets backups, and streams
//!   their entries through the format's validator;
//! - [`plan`] holds the pure decisions (what to read, reuse, fetch, how to
//!   group fetches); [`backup`] and [`restore`] execute them;
//! - [`check`], [`gc`] (with [`lease`]) and [`keep`] maintain a store;
//! - [`store`] is the one small trait every backend (local, S3, GCS,
//!   Azure) implements, below everything else here.
//!
//! This crate is the middle layer: it depends on the `btm` library only for
//! its syscall wrappers, confined path handling and the validator lists,
//! and nothing in `btm` depends on it.

pub mod backup;
pub mod buffers;
pub mod cache;
pub mod check;
pub mod exclude;
pub mod format;
pub mod gc;
pub mod hex;
pub mod inventory;
pub mod keep;
pub mod lease;
pub mod localfs;
pub mod map;
pub mod pipeline;
pub mod plan;
pub mod policy;
pub mod public;
pub mod repo;
pub mod restore;
pub mod sparse;
pub mod spool;
pub mod store;
pub mod throttle;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Id, StoreError};

pub use format::head::{IndexError, IndexName};
pub use inventory::BackupInfo;
pub use policy::Policy;
pub use repo::Repo;

/// Default worker threads for CPU work (hashing, compressing,
/// decompressing): twice the cores (chunk work waits on disk as much as it
/// computes), at least 4, at most 8.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).clamp(4, 8)
}

/// Live progress of a backup or restore, shared with whoever watches it
/// (a progress bar, the daemon's status), and a way to cancel it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes planned for reading (backup) or checking/fetching (restore).
    pub total: AtomicU64,
    /// Bytes done so far.
    pub done: AtomicU64,
    /// Compressed bytes uploaded so far (backup).
    pub uploaded: AtomicU64,
    /// Store requests in flight right now.
    pub requests: AtomicU64,
    /// Set to stop early; the operation then fails with
    /// [`ChunkError::Cancelled`] and a backup writes no head.
    pub cancel: pipeline::Cancel,
}

impl Progress {
    /// Count one store request for as long as the guard lives.
    pub fn request(&self) -> RequestGuard<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self)
    }

    /// Whether cancellation was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// See [`Progress::request`].
pub struct RequestGuard<'a>(&'a Progress);

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Errors of the chunk engine. Each prints its cause; none hides one in
/// `source()`.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// A store operation failed.
    #[error("{context}: {cause}")]
    Store {
        /// What was being done.
        context: String,
        /// The store's error.
        cause: StoreError,
    },
    /// A backup index is unreadable or breaks the format's rules.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A pack, pack index or tree segment is corrupt.
    #[error("{0}")]
    Format(format::FormatError),
    /// A local file operation failed.
    #[error("{path}: {cause}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// A bad option or argument.
    #[error("{0}")]
    Invalid(String),
    /// Restoring an entry would write through something it must not
    /// (a symlink in the destination).
    #[error("refusing to restore '{path}': {detail}")]
    Refused {
        /// The entry's path.
        path: String,
        /// Why.
        detail: String,
    },
    /// A chunk is missing or its content does not match its hash.
    #[error("file {path}: chunk {hash} at offset {off} is {detail}")]
    Corrupt {
        /// The file being restored.
        path: String,
        /// The chunk.
        hash: Id,
        /// Its offset in the file.
        off: u64,
        /// What is wrong ("missing from the store", "corrupt (…)").
        detail: String,
    },
    /// A file kept changing while it was read, so no consistent copy of it
    /// could be taken.
    #[error("{path} changed while it was read, {attempts} times; back up a snapshot instead (btm export), or stop what writes it")]
    Changing {
        /// The file.
        path: String,
        /// Reads attempted.
        attempts: u32,
    },
    /// The store lies inside the directory being backed up.
    #[error(
        "the store {store} is inside {dir}, the directory being backed up; it would back itself up"
    )]
    StoreInsideSource {
        /// The store's directory.
        store: PathBuf,
        /// The directory being backed up.
        dir: PathBuf,
    },
    /// No backup matched.
    #[error("{0}")]
    NoBackup(String),
    /// A store lease could not be taken or kept (see [`lease`]).
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// A backup's lease was lost before its head was written (see
    /// [`lease::Lease::check`]), and a garbage collection removed objects
    /// the head would have referenced.
    #[error("its store lease was lost ({cause}), and meanwhile a garbage collection removed {missing} object(s) it needs, e.g. {example}; run it again")]
    LeaseLost {
        /// How the lease was lost.
        cause: String,
        /// How many chunks or segments are gone.
        missing: u64,
        /// The first of them, with the file that needed it.
        example: String,
    },
    /// A backup that cannot be restored whole (a tree segment or chunk
    /// missing or damaged), found before the restore changed anything.
    #[error("backup {name} cannot be restored, so nothing was changed: {detail}")]
    Unrestorable {
        /// The backup.
        name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Stopped on request ([`Progress::cancel`]); nothing was written.
    #[error("cancelled")]
    Cancelled,
    /// Stopped because another part of the job failed.
    #[error("aborted")]
    Aborted,
}

impl ChunkError {
    pub(crate) fn io(path: &Path, cause: std::io::Error) -> Self {
        ChunkError::Io {
            path: path.to_owned(),
            cause,
        }
    }

    pub(crate) fn store(context: impl Into<String>, cause: StoreError) -> Self {
        ChunkError::Store {
            context: context.into(),
            cause,
        }
    }
}

impl From<StoreError> for ChunkError {
    fn from(cause: StoreError) -> Self {
        ChunkError::Store {
            context: "store".into(),
            cause,
        }
    }
}

impl From<format::FormatError> for ChunkError {
    fn from(e: format::FormatError) -> Self {
        ChunkError::Format(e)
    }
}

/// A call to `store` made under its [`store::RetryPolicy`].
pub(crate) fn with_retry<T>(
    store: &dyn store::Store,
    f: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    store.retry_policy().run(f)
}
