//! The sparse chunk engine: back up a directory tree to a store as
//! content-addressed, compressed, fixed-size chunks plus one index per
//! backup, and restore it in place, moving only what differs.
//!
//! Following pitreos's design, fixing its faults: BLAKE3 and zstd on all
//! cores instead of SHA3 and gzip behind a mutex; holes and zero chunks
//! never stored; exact tag matching; append-only files that never lose a
//! byte; permissions kept; a `check` command; a versioned, specified format
//! (`docs/format.md`). Planning is pure ([`plan`]); [`backup`] and
//! [`restore`] execute plans.

pub mod backup;
pub mod gc;
pub mod index;
pub mod keep;
pub mod lease;
pub mod plan;
pub mod restore;
pub mod sparse;
pub mod throttle;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::store::{Store, StoreError};
use index::{ChunkHash, EntryKind, Index, IndexError, IndexName};

/// Default worker threads: twice the cores (chunk work waits on I/O as
/// much as it computes), at least 4, at most 8 so peak memory stays well
/// under 128 MiB at the default chunk size.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).clamp(4, 8)
}

/// Live progress of a backup or restore, shared with whoever watches it
/// (a progress bar, the daemon's status), and a way to cancel it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes planned for reading (backup) or checking/fetching (restore).
    pub total: std::sync::atomic::AtomicU64,
    /// Bytes done so far.
    pub done: std::sync::atomic::AtomicU64,
    /// Compressed bytes uploaded so far (backup).
    pub uploaded: std::sync::atomic::AtomicU64,
    /// Set to stop a backup early; it then fails with
    /// [`ChunkError::Cancelled`] and writes no index.
    pub cancel: std::sync::atomic::AtomicBool,
}

/// Errors of the chunk engine.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// A store operation failed.
    #[error("{context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The store's error.
        source: StoreError,
    },
    /// An index is unreadable.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Something in the tree cannot be backed up.
    #[error("{path}: {detail}")]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A bad option or argument.
    #[error("{0}")]
    Invalid(String),
    /// An index names a path that would escape the target directory.
    #[error("refusing hostile index entry '{path}': {detail}")]
    Hostile {
        /// The entry's path.
        path: String,
        /// Why it is refused.
        detail: String,
    },
    /// A chunk's content does not match its hash.
    #[error("file {path}: chunk {hash} at offset {off} is corrupt ({detail})")]
    Corrupt {
        /// The file being restored.
        path: String,
        /// The chunk.
        hash: ChunkHash,
        /// Its offset.
        off: u64,
        /// What is wrong.
        detail: String,
    },
    /// Compression failed or did not round-trip.
    #[error("compression failed: {0}")]
    Compress(String),
    /// No backup matched.
    #[error("{0}")]
    NoBackup(String),
    /// A store lease could not be taken or kept (see [`lease`]).
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// Stopped on request ([`Progress::cancel`]); nothing was written.
    #[error("cancelled")]
    Cancelled,
    /// Stopped because another part of the job failed.
    #[error("aborted")]
    Aborted,
}

impl ChunkError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ChunkError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl From<StoreError> for ChunkError {
    fn from(source: StoreError) -> Self {
        ChunkError::Store {
            context: "store".into(),
            source,
        }
    }
}

/// A backup as listed: its name and, when read, its index.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    /// The index name.
    pub name: String,
    /// The tag.
    pub tag: String,
    /// Metadata (from the index).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Files in the backup.
    pub files: u64,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Bytes in non-empty chunks: what the files occupy on disk when
    /// restored sparse.
    pub disk_bytes: u64,
}

impl BackupInfo {
    /// Summarise an index.
    pub fn of(name: &str, idx: &Index) -> Self {
        let (mut files, mut logical, mut disk) = (0, 0, 0);
        for e in &idx.entries {
            if let EntryKind::File { size, chunks } = &e.kind {
                files += 1;
                logical += size;
                disk += chunks
                    .iter()
                    .filter(|c| c.hash.is_some())
                    .map(|c| c.len)
                    .sum::<u64>();
            }
        }
        BackupInfo {
            name: name.to_owned(),
            tag: idx.tag.clone(),
            meta: idx.meta.clone(),
            files,
            logical_bytes: logical,
            disk_bytes: disk,
        }
    }
}

/// Index names in the store, newest first, optionally only those with
/// exactly `tag`. Objects that are not index names are ignored.
pub fn list_backups(store: &dyn Store, tag: Option<&str>) -> Result<Vec<IndexName>, ChunkError> {
    let mut names: Vec<IndexName> = backup::with_retry(|| store.list_indexes())?
        .iter()
        .filter_map(|n| IndexName::parse(n))
        .filter(|n| tag.is_none_or(|t| n.tag == t))
        .collect();
    names.sort_by(|a, b| b.cmp(a));
    Ok(names)
}

/// Read and decode one index.
pub fn read_index(store: &dyn Store, name: &str) -> Result<Index, ChunkError> {
    let data = backup::with_retry(|| store.get_index(name)).map_err(|e| ChunkError::Store {
        context: format!("reading backup {name}"),
        source: e,
    })?;
    Ok(Index::decode(name, &data)?)
}

/// The newest backup with exactly `tag` (and, with `max_height`, whose
/// metadata height is at most that).
pub fn latest_index(
    store: &dyn Store,
    tag: &str,
    max_height: Option<u64>,
) -> Result<Option<(String, Index)>, ChunkError> {
    for name in list_backups(store, Some(tag))? {
        let name = name.to_string();
        let idx = read_index(store, &name)?;
        match max_height {
            Some(h) if idx.height().is_none_or(|ih| ih > h) => continue,
            _ => return Ok(Some((name, idx))),
        }
    }
    Ok(None)
}

/// What `check` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    /// Indexes read.
    pub indexes: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
    /// Chunks whose data was read and verified (`--read-data`).
    pub chunks_verified: u64,
    /// Problems, one line each.
    pub problems: Vec<String>,
}

/// Verify the store: every index parses and every chunk it references
/// exists; with `read_data`, every chunk also decompresses to bytes with
/// its hash.
pub fn check(store: &dyn Store, read_data: bool) -> Result<CheckReport, ChunkError> {
    let mut report = CheckReport::default();
    let present: HashSet<ChunkHash> = backup::with_retry(|| store.list_chunks())?
        .into_iter()
        .collect();
    let mut referenced: HashSet<ChunkHash> = HashSet::new();
    for name in backup::with_retry(|| store.list_indexes())? {
        report.indexes += 1;
        let idx = match read_index(store, &name) {
            Ok(i) => i,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        for e in &idx.entries {
            if let EntryKind::File { chunks, .. } = &e.kind {
                for c in chunks {
                    if let Some(h) = c.hash {
                        if referenced.insert(h) && !present.contains(&h) {
                            report.problems.push(format!(
                                "backup {name}: file {}: chunk {h} is missing",
                                e.path
                            ));
                        }
                    }
                }
            }
        }
    }
    report.chunks = referenced.len() as u64;
    if read_data {
        for h in referenced.iter().filter(|h| present.contains(h)) {
            match backup::with_retry(|| store.get_chunk(h)) {
                Ok(data) => match zstd::stream::decode_all(&data[..]) {
                    Ok(raw) if ChunkHash::of(&raw) == *h => report.chunks_verified += 1,
                    Ok(_) => report
                        .problems
                        .push(format!("chunk {h}: content does not match its hash")),
                    Err(e) => report
                        .problems
                        .push(format!("chunk {h}: cannot decompress: {e}")),
                },
                Err(e) => report.problems.push(format!("chunk {h}: {e}")),
            }
        }
    }
    Ok(report)
}
