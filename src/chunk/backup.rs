//! Backing up a directory tree into a store.
//!
//! The main thread walks the tree, plans each file ([`plan_backup`]) and
//! feeds the chunks to read into a bounded channel; `workers` threads each
//! `pread` a chunk (no lock around the file), skip it if all zeros, hash it
//! with BLAKE3, and if the store does not have it yet, compress it with
//! zstd, check the round trip, and put it. Peak memory is about
//! `workers × 3 × chunk_size` plus the channel, whatever the data size.
//! The index is written last, only after every chunk it names is stored.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::sleep;
use std::time::Duration;

use chrono::Utc;
use regex::Regex;
use serde::Serialize;

use super::index::{
    validate_tag, ChunkHash, ChunkRef, Entry, EntryKind, Index, IndexName, FORMAT_VERSION,
};
use super::lease::{Lease, LeaseKind};
use super::plan::{plan_backup, BackupStep, Previous};
use super::throttle::Throttle;
use super::{latest_index, ChunkError};
use crate::store::{LocalStore, Store, StoreError};

/// Default chunk size; see `docs/format.md` for the benchmark behind it.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// How a backup is made.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The tag (exact match when finding the previous backup).
    pub tag: String,
    /// Free-form metadata stored in the index.
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Only paths matching this are backed up (directories leading to them
    /// are kept).
    pub filter: Option<Regex>,
    /// Relative paths of append-only files (block logs).
    pub append_only: Vec<String>,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Worker threads.
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
    /// Keep a copy of uploaded chunks here.
    pub cache: Option<PathBuf>,
    /// Updated as chunks are planned and processed.
    pub progress: Arc<super::Progress>,
}

impl BackupOptions {
    /// Defaults: tag `default`, 4 MiB chunks, one worker per core (at
    /// least two), zstd level 1.
    pub fn new(tag: &str) -> Self {
        BackupOptions {
            tag: tag.to_owned(),
            meta: serde_json::Map::new(),
            filter: None,
            append_only: Vec::new(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            workers: super::default_workers(),
            zstd_level: 1,
            force_read: false,
            max_rate: None,
            parent: None,
            cache: None,
            progress: Arc::default(),
        }
    }
}

/// What a backup did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BackupSummary {
    /// The new backup's name.
    pub name: String,
    /// Files, directories and symlinks recorded.
    pub files: u64,
    /// Directories recorded.
    pub dirs: u64,
    /// Symlinks recorded.
    pub symlinks: u64,
    /// Files reused whole from the previous backup without reading.
    pub files_unchanged: u64,
    /// Logical bytes of all files.
    pub bytes_scanned: u64,
    /// Bytes read from disk.
    pub bytes_read: u64,
    /// Bytes hashed (read minus all-zero chunks).
    pub bytes_hashed: u64,
    /// Compressed bytes uploaded.
    pub bytes_uploaded: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Chunks the store already had, or reused from the previous backup.
    pub chunks_reused: u64,
    /// Empty chunks (holes and zeros), never stored.
    pub chunks_empty: u64,
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    hashed: AtomicU64,
    uploaded: AtomicU64,
    chunks_uploaded: AtomicU64,
    chunks_known: AtomicU64,
    zero: AtomicU64,
}

/// Retry a store call on temporary failures: 5 attempts, backoff from
/// 200 ms.
pub(crate) fn with_retry<T>(mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_temporary() && attempt < 5 => {
                tracing::warn!(error = %e, attempt, "store call failed; retrying");
                sleep(delay);
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

struct Work {
    file: Arc<File>,
    path: Arc<str>,
    file_idx: usize,
    step_idx: usize,
    off: u64,
    len: u64,
}

struct Done {
    file_idx: usize,
    step_idx: usize,
    result: Result<Option<ChunkHash>, ChunkError>,
}

/// A regular file being backed up.
struct PendingFile {
    entry: Entry,
    steps: Vec<BackupStep>,
    chunks: Vec<Option<ChunkRef>>,
}

fn meta_entry(path: String, kind: EntryKind, m: &fs::Metadata) -> Entry {
    Entry {
        path,
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        ino: m.ino(),
        append_only: false,
    }
}

/// Walk `root` without following symlinks, parents before children, names
/// sorted; returns (relative path, metadata) pairs.
fn walk(root: &Path) -> Result<Vec<(String, fs::Metadata)>, ChunkError> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| ChunkError::io(&dir, e))?
            .map(|e| {
                e.map(|e| e.file_name())
                    .map_err(|err| ChunkError::io(&dir, err))
            })
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let name_s = name.to_str().ok_or_else(|| ChunkError::Unsupported {
                path: dir.join(&name),
                detail: "the name is not valid UTF-8".into(),
            })?;
            let rel_path = if rel.is_empty() {
                name_s.to_owned()
            } else {
                format!("{rel}/{name_s}")
            };
            let full = dir.join(&name);
            let m = fs::symlink_metadata(&full).map_err(|e| ChunkError::io(&full, e))?;
            if m.is_dir() {
                subdirs.push((full, rel_path.clone()));
            }
            out.push((rel_path, m));
        }
        // Reverse so the stack pops them in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

/// Back up `root` into `store`. Returns once the index is written.
pub fn backup(
    store: &dyn Store,
    root: &Path,
    opts: &BackupOptions,
) -> Result<BackupSummary, ChunkError> {
    validate_tag(&opts.tag).map_err(ChunkError::Invalid)?;
    if opts.chunk_size < 4096 || opts.chunk_size > 256 << 20 {
        return Err(ChunkError::Invalid(format!(
            "chunk size {} must be between 4 KiB and 256 MiB",
            opts.chunk_size
        )));
    }
    let root_meta = fs::metadata(root).map_err(|e| ChunkError::io(root, e))?;
    if !root_meta.is_dir() {
        return Err(ChunkError::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    super::lease::with_lease(
        store,
        LeaseKind::Backup,
        Some(&opts.tag),
        &opts.progress.cancel,
        |lease| run(store, root, opts, lease),
    )
    .map_err(|e| match e {
        ChunkError::Lease(super::lease::LeaseError::Cancelled) => ChunkError::Cancelled,
        e => e,
    })
}

/// The backup proper, under a backup lease so that no GC sweep runs until
/// the index is written (see [`super::lease`]).
fn run(
    store: &dyn Store,
    root: &Path,
    opts: &BackupOptions,
    lease: &Lease<'_>,
) -> Result<BackupSummary, ChunkError> {
    let started = Utc::now();
    let name = IndexName::new(started, &opts.tag).to_string();
    let throttle = opts.max_rate.map(Throttle::new);

    let previous = latest_index(store, &opts.tag, None)?;
    let prev_files: HashMap<&str, &Entry> = previous
        .as_ref()
        .filter(|(_, idx)| idx.chunk_size == opts.chunk_size)
        .map(|(_, idx)| idx.entries.iter().map(|e| (e.path.as_str(), e)).collect())
        .unwrap_or_default();
    let known: Arc<Mutex<HashSet<ChunkHash>>> = Arc::new(Mutex::new(
        with_retry(|| store.list_chunks())?.into_iter().collect(),
    ));
    let cache = match &opts.cache {
        Some(dir) => Some(LocalStore::open(&dir.display().to_string())?),
        None => None,
    };

    let mut all = walk(root)?;
    if let Some(re) = &opts.filter {
        let keep: HashSet<String> = all
            .iter()
            .filter(|(p, m)| !m.is_dir() && re.is_match(p))
            .flat_map(|(p, _)| {
                let mut v = vec![p.clone()];
                let mut cur = p.as_str();
                while let Some((parent, _)) = cur.rsplit_once('/') {
                    v.push(parent.to_owned());
                    cur = parent;
                }
                v
            })
            .collect();
        all.retain(|(p, m)| keep.contains(p) || (m.is_dir() && re.is_match(p)));
    }

    let mut summary = BackupSummary {
        name: name.clone(),
        ..BackupSummary::default()
    };
    let counters = Counters::default();
    let abort = AtomicBool::new(false);
    let mut entries: Vec<Entry> = Vec::with_capacity(all.len());
    let mut files: Vec<(usize, PendingFile)> = Vec::new();

    let (work_tx, work_rx) = mpsc::sync_channel::<Work>(opts.workers * 2);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    std::thread::scope(|scope| -> Result<(), ChunkError> {
        for _ in 0..opts.workers {
            let rx = Arc::clone(&work_rx);
            let done = done_tx.clone();
            let known = Arc::clone(&known);
            let (counters, abort, cache) = (&counters, &abort, cache.as_ref());
            let throttle = throttle.as_ref();
            scope.spawn(move || {
                let mut scratch = match Scratch::new(opts.zstd_level) {
                    Ok(s) => s,
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        let _ = done.send(Done {
                            file_idx: usize::MAX,
                            step_idx: 0,
                            result: Err(e),
                        });
                        return;
                    }
                };
                loop {
                    let item = {
                        let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                        guard.recv()
                    };
                    let Ok(item) = item else { return };
                    let result = if abort.load(Ordering::Relaxed)
                        || opts.progress.cancel.load(Ordering::Relaxed)
                    {
                        Err(ChunkError::Aborted)
                    } else {
                        if let Some(t) = throttle {
                            t.take(item.len);
                        }
                        process_chunk(store, cache, &item, &mut scratch, opts, &known, counters)
                    };
                    opts.progress.done.fetch_add(item.len, Ordering::Relaxed);
                    if result.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    let _ = done.send(Done {
                        file_idx: item.file_idx,
                        step_idx: item.step_idx,
                        result,
                    });
                }
            });
        }
        drop(done_tx);
        // Only the workers hold the receiver now: if they all stop, a send
        // fails instead of blocking.
        drop(work_rx);

        let produce = (|| -> Result<(), ChunkError> {
            for (rel, m) in &all {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                if opts.progress.cancel.load(Ordering::Relaxed) {
                    return Err(ChunkError::Cancelled);
                }
                let full = root.join(rel);
                if m.is_dir() {
                    summary.dirs += 1;
                    entries.push(meta_entry(rel.clone(), EntryKind::Dir, m));
                } else if m.file_type().is_symlink() {
                    summary.symlinks += 1;
                    let target = fs::read_link(&full).map_err(|e| ChunkError::io(&full, e))?;
                    let target = target.to_str().ok_or_else(|| ChunkError::Unsupported {
                        path: full.clone(),
                        detail: "the symlink target is not valid UTF-8".into(),
                    })?;
                    entries.push(meta_entry(
                        rel.clone(),
                        EntryKind::Symlink {
                            target: target.to_owned(),
                        },
                        m,
                    ));
                } else if m.is_file() {
                    summary.files += 1;
                    let file = Arc::new(File::open(&full).map_err(|e| ChunkError::io(&full, e))?);
                    // Metadata from the open file, so it matches what we read.
                    let m = file.metadata().map_err(|e| ChunkError::io(&full, e))?;
                    let size = m.len();
                    summary.bytes_scanned += size;
                    let prev_entry = prev_files.get(rel.as_str()).copied();
                    let unchanged = prev_entry.is_some_and(|e| {
                        !opts.force_read
                            && e.mtime_ns == m.mtime() * 1_000_000_000 + m.mtime_nsec()
                            && e.ctime_ns == m.ctime() * 1_000_000_000 + m.ctime_nsec()
                            && e.ino == m.ino()
                    });
                    let same = match (prev_entry, &opts.parent) {
                        (Some(e), Some(parent)) if !unchanged && !opts.force_read => {
                            shared_ranges(parent, rel, e, &file, size)
                        }
                        _ => Vec::new(),
                    };
                    let prev = prev_entry.and_then(|e| match &e.kind {
                        EntryKind::File {
                            size: psize,
                            chunks,
                        } => Some(Previous {
                            size: *psize,
                            chunks,
                            unchanged,
                            same: &same,
                        }),
                        _ => None,
                    });
                    let append_only = opts.append_only.iter().any(|a| a == rel);
                    let regions = super::sparse::data_regions(&file, size);
                    let steps =
                        plan_backup(size, opts.chunk_size, regions.as_deref(), prev, append_only);
                    if prev.is_some_and(|p| p.unchanged && p.size == size) {
                        summary.files_unchanged += 1;
                    }
                    let file_idx = files.len();
                    let path: Arc<str> = Arc::from(rel.as_str());
                    let mut chunks = vec![None; steps.len()];
                    for (step_idx, step) in steps.iter().enumerate() {
                        match *step {
                            BackupStep::Reuse(c) => {
                                chunks[step_idx] = Some(c);
                                if c.hash.is_some() {
                                    summary.chunks_reused += 1;
                                } else {
                                    summary.chunks_empty += 1;
                                }
                            }
                            BackupStep::Hole { off, len } => {
                                chunks[step_idx] = Some(ChunkRef {
                                    off,
                                    len,
                                    hash: None,
                                });
                                summary.chunks_empty += 1;
                            }
                            BackupStep::Read { off, len } => {
                                opts.progress.total.fetch_add(len, Ordering::Relaxed);
                                let work = Work {
                                    file: Arc::clone(&file),
                                    path: Arc::clone(&path),
                                    file_idx,
                                    step_idx,
                                    off,
                                    len,
                                };
                                if work_tx.send(work).is_err() {
                                    return Err(ChunkError::Aborted);
                                }
                            }
                        }
                    }
                    let mut entry = meta_entry(
                        rel.clone(),
                        EntryKind::File {
                            size,
                            chunks: Vec::new(),
                        },
                        &m,
                    );
                    entry.append_only = append_only;
                    files.push((
                        entries.len(),
                        PendingFile {
                            entry,
                            steps,
                            chunks,
                        },
                    ));
                    // Placeholder, replaced once the chunks are known.
                    entries.push(meta_entry(rel.clone(), EntryKind::Dir, &m));
                } else {
                    tracing::warn!(path = %full.display(), "skipping special file (socket, fifo or device)");
                }
            }
            Ok(())
        })();
        drop(work_tx);
        let mut first_error: Option<ChunkError> = produce.err();
        for done in done_rx {
            match done.result {
                Ok(hash) => {
                    let pending = &mut files[done.file_idx].1;
                    let BackupStep::Read { off, len } = pending.steps[done.step_idx] else {
                        continue;
                    };
                    pending.chunks[done.step_idx] = Some(ChunkRef { off, len, hash });
                }
                Err(ChunkError::Aborted) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;

    for (pos, pending) in files {
        let mut entry = pending.entry;
        let chunks: Option<Vec<ChunkRef>> = pending.chunks.into_iter().collect();
        let chunks = chunks.ok_or(ChunkError::Aborted)?;
        if let EntryKind::File { size, .. } = entry.kind {
            entry.kind = EntryKind::File { size, chunks };
        }
        entries[pos] = entry;
    }
    summary.bytes_read = counters.read.load(Ordering::Relaxed);
    summary.bytes_hashed = counters.hashed.load(Ordering::Relaxed);
    summary.bytes_uploaded = counters.uploaded.load(Ordering::Relaxed);
    summary.chunks_uploaded = counters.chunks_uploaded.load(Ordering::Relaxed);
    summary.chunks_reused += counters.chunks_known.load(Ordering::Relaxed);
    summary.chunks_empty += counters.zero.load(Ordering::Relaxed);

    let index = Index {
        format: FORMAT_VERSION,
        chunk_size: opts.chunk_size,
        created: started,
        tag: opts.tag.clone(),
        meta: opts.meta.clone(),
        entries,
    };
    let encoded = index
        .encode()
        .map_err(|e| ChunkError::Compress(format!("index: {e}")))?;
    // Every chunk durable before the index that names them.
    with_retry(|| store.flush())?;
    // The chunks we took as known must still be there: only true while our
    // lease kept sweeps away.
    lease.check()?;
    with_retry(|| store.put_index(&name, &encoded))?;
    Ok(summary)
}

/// Byte ranges of `file` (now `size` bytes) that hold the same bytes as
/// `rel` under `parent`, the file the previous index recorded as `prev`.
/// Empty when anything does not match or FIEMAP is unavailable (ZFS): the
/// caller then reads, as it would have anyway.
fn shared_ranges(
    parent: &Path,
    rel: &str,
    prev: &Entry,
    file: &File,
    size: u64,
) -> Vec<(u64, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let EntryKind::File {
        size: prev_size, ..
    } = prev.kind
    else {
        return Vec::new();
    };
    let Ok(old) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(parent.join(rel))
    else {
        return Vec::new();
    };
    let Ok(om) = old.metadata() else {
        return Vec::new();
    };
    let recorded = om.is_file()
        && om.ino() == prev.ino
        && om.len() == prev_size
        && om.mtime() * 1_000_000_000 + om.mtime_nsec() == prev.mtime_ns
        && om.ctime() * 1_000_000_000 + om.ctime_nsec() == prev.ctime_ns;
    if !recorded {
        return Vec::new();
    }
    match (crate::sys::fiemap(&old), crate::sys::fiemap(file)) {
        (Ok(a), Ok(b)) => super::plan::identical_ranges(&a, &b, prev_size.min(size)),
        _ => Vec::new(),
    }
}

/// A worker's reusable buffers and compression context: allocating a
/// chunk-sized output buffer and a zstd context per chunk costs page faults
/// (and, with musl's allocator, an mmap/munmap pair) for every chunk.
struct Scratch {
    read: Vec<u8>,
    compressed: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl Scratch {
    fn new(level: i32) -> Result<Self, ChunkError> {
        Ok(Scratch {
            read: Vec::new(),
            compressed: Vec::new(),
            compressor: zstd::bulk::Compressor::new(level)
                .map_err(|e| ChunkError::Compress(e.to_string()))?,
        })
    }
}

fn process_chunk(
    store: &dyn Store,
    cache: Option<&LocalStore>,
    item: &Work,
    scratch: &mut Scratch,
    opts: &BackupOptions,
    known: &Mutex<HashSet<ChunkHash>>,
    counters: &Counters,
) -> Result<Option<ChunkHash>, ChunkError> {
    let buf = &mut scratch.read;
    buf.resize(item.len as usize, 0);
    item.file
        .read_exact_at(buf, item.off)
        .map_err(|e| ChunkError::io(Path::new(&*item.path), e))?;
    counters.read.fetch_add(item.len, Ordering::Relaxed);
    if buf.iter().all(|&b| b == 0) {
        counters.zero.fetch_add(1, Ordering::Relaxed);
        return Ok(None);
    }
    counters.hashed.fetch_add(item.len, Ordering::Relaxed);
    let hash = ChunkHash::of(buf);
    let is_known = known
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&hash);
    if is_known {
        counters.chunks_known.fetch_add(1, Ordering::Relaxed);
        return Ok(Some(hash));
    }
    let compressed = &mut scratch.compressed;
    compressed.clear();
    compressed.reserve(zstd::zstd_safe::compress_bound(buf.len()));
    scratch
        .compressor
        .compress_to_buffer(&buf[..], compressed)
        .map_err(|e| ChunkError::Compress(e.to_string()))?;
    // Round trip before upload: a compressor bug must not become a backup
    // that cannot be restored. Streaming the decompression into the hasher
    // checks it without a third chunk-sized buffer per worker.
    let mut hasher = blake3::Hasher::new();
    let n = zstd::stream::read::Decoder::new(&compressed[..])
        .and_then(|mut d| std::io::copy(&mut d, &mut hasher))
        .map_err(|e| ChunkError::Compress(e.to_string()))?;
    if n != item.len || ChunkHash(*hasher.finalize().as_bytes()) != hash {
        return Err(ChunkError::Compress(format!(
            "round trip of chunk {hash} differs"
        )));
    }
    with_retry(|| store.put_chunk(&hash, compressed)).map_err(|e| ChunkError::Store {
        context: format!("uploading chunk {hash} of {}", item.path),
        source: e,
    })?;
    if let Some(c) = cache {
        if let Err(e) = c.put_chunk(&hash, compressed) {
            tracing::warn!(error = %e, "could not write to the chunk cache");
        }
    }
    known.lock().unwrap_or_else(|p| p.into_inner()).insert(hash);
    counters
        .uploaded
        .fetch_add(compressed.len() as u64, Ordering::Relaxed);
    opts.progress
        .uploaded
        .fetch_add(compressed.len() as u64, Ordering::Relaxed);
    counters.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
    Ok(Some(hash))
}
