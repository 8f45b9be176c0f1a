//! Restoring a backup into a directory, in place.
//!
//! Existing files are resized; each chunk's local bytes are hashed and only
//! chunks that differ are fetched (cache first), verified against their
//! hash, and written with `pwrite` by parallel workers. Chunks that should
//! be empty are hole-punched (zeros written where punching is unsupported).
//! Nothing outside the target directory is ever written: index paths are
//! validated, parents are created without following symlinks, and files are
//! opened with `O_NOFOLLOW`. Running an interrupted restore again finishes
//! it, because every step checks what is already there.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use regex::Regex;
use serde::Serialize;

use super::backup::with_retry;
use super::index::{ChunkRef, Entry, EntryKind, Index};
use super::plan::{plan_restore, RestoreStep};
use super::ChunkError;
use crate::store::{LocalStore, Store, StoreError};

/// How a restore is done.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Only entries whose path matches are restored.
    pub filter: Option<Regex>,
    /// Remove local entries that are not in the backup.
    pub delete: bool,
    /// Chunk cache directory, read first and filled with what is fetched.
    pub cache: Option<PathBuf>,
    /// Worker threads.
    pub workers: usize,
    /// Updated as chunks are planned and processed.
    pub progress: Arc<super::Progress>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            filter: None,
            delete: false,
            cache: None,
            workers: super::default_workers(),
            progress: Arc::default(),
        }
    }
}

/// What a restore did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RestoreSummary {
    /// Files restored (checked or written).
    pub files: u64,
    /// Logical bytes of those files.
    pub bytes_scanned: u64,
    /// Local bytes read to compare.
    pub bytes_verified: u64,
    /// Chunks already correct locally.
    pub chunks_reused: u64,
    /// Chunks fetched (from the cache or the store).
    pub chunks_fetched: u64,
    /// Compressed bytes downloaded from the store (cache hits excluded).
    pub bytes_downloaded: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Empty chunks made holes.
    pub holes: u64,
    /// Local entries removed (`--delete`).
    pub deleted: u64,
}

#[derive(Default)]
struct Counters {
    verified: AtomicU64,
    reused: AtomicU64,
    fetched: AtomicU64,
    downloaded: AtomicU64,
    written: AtomicU64,
    holes: AtomicU64,
}

/// Split an index path into safe components, or refuse it.
pub fn safe_components(path: &str) -> Result<Vec<&str>, ChunkError> {
    let hostile = |detail: &str| ChunkError::Hostile {
        path: path.to_owned(),
        detail: detail.to_owned(),
    };
    if path.is_empty() || path.contains('\0') {
        return Err(hostile("empty or NUL in path"));
    }
    if path.starts_with('/') {
        return Err(hostile("absolute path"));
    }
    let mut out = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n.to_str().ok_or_else(|| hostile("not UTF-8"))?),
            Component::ParentDir => return Err(hostile("'..' component")),
            _ => return Err(hostile("'.' or root component")),
        }
    }
    if path.split('/').any(|c| c.is_empty() || c == ".") {
        return Err(hostile("empty or '.' component"));
    }
    Ok(out)
}

/// Make sure every parent of `comps` under `dest` is a real directory,
/// creating missing ones; a symlink on the way is refused, never followed.
fn ensure_parents(dest: &Path, comps: &[&str], path: &str) -> Result<PathBuf, ChunkError> {
    let mut cur = dest.to_owned();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ChunkError::Hostile {
                    path: path.to_owned(),
                    detail: format!(
                        "{} is a symlink; refusing to write through it",
                        cur.display()
                    ),
                })
            }
            Ok(_) => {
                // A file where the backup has a directory: replace it.
                fs::remove_file(&cur).map_err(|e| ChunkError::io(&cur, e))?;
                fs::create_dir(&cur).map_err(|e| ChunkError::io(&cur, e))?;
            }
            Err(_) => fs::create_dir(&cur).map_err(|e| ChunkError::io(&cur, e))?,
        }
    }
    Ok(dest.join(comps.join("/")))
}

/// Remove whatever is at `p` unless it is a directory (which is refused).
fn clear_non_dir(p: &Path, path: &str) -> Result<(), ChunkError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(ChunkError::Invalid(format!(
            "{path}: the backup has a file or symlink here, but a directory exists; remove it first"
        ))),
        Ok(_) => fs::remove_file(p).map_err(|e| ChunkError::io(p, e)),
        Err(_) => Ok(()),
    }
}

struct Task {
    file: Arc<File>,
    path: Arc<str>,
    step: RestoreStep,
    local_size: u64,
}

fn open_store_cache(cache: &Option<PathBuf>) -> Result<Option<LocalStore>, ChunkError> {
    match cache {
        Some(dir) => Ok(Some(LocalStore::open(&dir.display().to_string())?)),
        None => Ok(None),
    }
}

/// Restore `index` (named `name`) from `store` into `dest`.
pub fn restore(
    store: &dyn Store,
    name: &str,
    index: &Index,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, ChunkError> {
    // Validate every path before touching anything.
    for e in &index.entries {
        safe_components(&e.path)?;
        if let EntryKind::File { size, chunks } = &e.kind {
            if !super::plan::covers(chunks, *size) {
                return Err(ChunkError::Hostile {
                    path: e.path.clone(),
                    detail: format!("backup {name}: its chunks do not cover the file"),
                });
            }
        }
    }
    fs::create_dir_all(dest).map_err(|e| ChunkError::io(dest, e))?;
    let cache = open_store_cache(&opts.cache)?;
    let selected: Vec<&Entry> = index
        .entries
        .iter()
        .filter(|e| {
            opts.filter
                .as_ref()
                .is_none_or(|re| re.is_match(&e.path) || matches!(e.kind, EntryKind::Dir))
        })
        .collect();
    let mut summary = RestoreSummary::default();
    let counters = Counters::default();
    let abort = AtomicBool::new(false);
    let (tx, rx) = mpsc::sync_channel::<Task>(opts.workers * 2);
    let rx = Arc::new(Mutex::new(rx));
    let (err_tx, err_rx) = mpsc::channel::<ChunkError>();

    std::thread::scope(|scope| -> Result<(), ChunkError> {
        for _ in 0..opts.workers {
            let rx = Arc::clone(&rx);
            let err_tx = err_tx.clone();
            let (counters, abort, cache) = (&counters, &abort, cache.as_ref());
            scope.spawn(move || {
                let mut buf = Vec::new();
                let mut dctx = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        let _ = err_tx.send(ChunkError::Compress(e.to_string()));
                        return;
                    }
                };
                loop {
                    let task = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(task) = task else { return };
                    if abort.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Err(e) = run_task(store, cache, &task, &mut buf, &mut dctx, counters) {
                        abort.store(true, Ordering::Relaxed);
                        let _ = err_tx.send(e);
                    }
                    let len = match task.step {
                        RestoreStep::Keep(c)
                        | RestoreStep::Verify(c)
                        | RestoreStep::Fetch(c)
                        | RestoreStep::Empty(c) => c.len,
                    };
                    opts.progress.done.fetch_add(len, Ordering::Relaxed);
                }
            });
        }
        drop(err_tx);
        let produced = (|| -> Result<(), ChunkError> {
            for e in &selected {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                let comps = safe_components(&e.path)?;
                let full = ensure_parents(dest, &comps, &e.path)?;
                match &e.kind {
                    EntryKind::Dir => match fs::symlink_metadata(&full) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            fs::remove_file(&full).map_err(|err| ChunkError::io(&full, err))?;
                            fs::create_dir(&full).map_err(|err| ChunkError::io(&full, err))?;
                        }
                        Err(_) => {
                            fs::create_dir(&full).map_err(|err| ChunkError::io(&full, err))?
                        }
                    },
                    EntryKind::Symlink { target } => {
                        if fs::read_link(&full).ok().as_deref() != Some(Path::new(target)) {
                            clear_non_dir(&full, &e.path)?;
                            std::os::unix::fs::symlink(target, &full)
                                .map_err(|err| ChunkError::io(&full, err))?;
                        }
                    }
                    EntryKind::File { size, chunks } => {
                        summary.files += 1;
                        summary.bytes_scanned += size;
                        if fs::symlink_metadata(&full).is_ok_and(|m| !m.is_file()) {
                            clear_non_dir(&full, &e.path)?;
                        }
                        let file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                            .mode(0o600)
                            .open(&full)
                            .map_err(|err| ChunkError::io(&full, err))?;
                        let local_size = file
                            .metadata()
                            .map_err(|err| ChunkError::io(&full, err))?
                            .len();
                        if local_size != *size {
                            file.set_len(*size)
                                .map_err(|err| ChunkError::io(&full, err))?;
                        }
                        let file = Arc::new(file);
                        let path: Arc<str> = Arc::from(e.path.as_str());
                        opts.progress.total.fetch_add(*size, Ordering::Relaxed);
                        for step in
                            plan_restore(chunks, local_size, e.append_only, index.chunk_size)
                        {
                            let task = Task {
                                file: Arc::clone(&file),
                                path: Arc::clone(&path),
                                step,
                                local_size,
                            };
                            if tx.send(task).is_err() {
                                return Err(ChunkError::Aborted);
                            }
                        }
                    }
                }
            }
            Ok(())
        })();
        drop(tx);
        let mut first = produced.err();
        for e in err_rx {
            if !matches!(e, ChunkError::Aborted) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;

    // Metadata last: writing content changes mtimes. Directories deepest
    // first, so setting a child does not disturb its parent's mtime.
    for e in &selected {
        if !matches!(e.kind, EntryKind::Dir) {
            apply_metadata(dest, e)?;
        }
    }
    let mut dirs: Vec<&&Entry> = selected
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Dir))
        .collect();
    dirs.sort_by_key(|e| std::cmp::Reverse(e.path.matches('/').count()));
    for e in dirs {
        apply_metadata(dest, e)?;
    }
    if opts.delete {
        summary.deleted = delete_extra(dest, index, opts.filter.as_ref())?;
    }
    summary.bytes_verified = counters.verified.load(Ordering::Relaxed);
    summary.chunks_reused = counters.reused.load(Ordering::Relaxed);
    summary.chunks_fetched = counters.fetched.load(Ordering::Relaxed);
    summary.bytes_downloaded = counters.downloaded.load(Ordering::Relaxed);
    summary.bytes_written = counters.written.load(Ordering::Relaxed);
    summary.holes = counters.holes.load(Ordering::Relaxed);
    Ok(summary)
}

/// Fetch chunk `c` (cache first), verify it against its hash, and leave its
/// bytes in `out`. `out` and `dctx` are the worker's, reused for every
/// chunk: a fresh chunk-sized buffer per chunk costs page faults.
fn fetch(
    store: &dyn Store,
    cache: Option<&LocalStore>,
    c: &ChunkRef,
    path: &str,
    counters: &Counters,
    out: &mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), ChunkError> {
    let Some(hash) = c.hash else {
        out.clear();
        out.resize(c.len as usize, 0);
        return Ok(());
    };
    let corrupt = |detail: String| ChunkError::Corrupt {
        path: path.to_owned(),
        hash,
        off: c.off,
        detail,
    };
    let mut decode = |data: &[u8], out: &mut Vec<u8>| -> Result<(), String> {
        out.clear();
        out.reserve(c.len as usize);
        dctx.decompress_to_buffer(data, out)
            .map_err(|e| format!("cannot decompress: {e}"))?;
        if out.len() as u64 != c.len || super::index::ChunkHash::of(out) != hash {
            return Err("content does not match its hash".into());
        }
        Ok(())
    };
    if let Some(cache) = cache {
        if let Ok(data) = cache.get_chunk(&hash) {
            if decode(&data, out).is_ok() {
                return Ok(());
            }
            // A bad cache entry is not fatal: fall through to the store.
            let _ = cache.delete_chunk(&hash);
        }
    }
    let data = with_retry(|| store.get_chunk(&hash)).map_err(|e| match e {
        StoreError::NotFound(_) => corrupt("missing from the store".into()),
        e => ChunkError::Store {
            context: format!("file {path}: fetching chunk {hash}"),
            source: e,
        },
    })?;
    counters
        .downloaded
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    decode(&data, out).map_err(corrupt)?;
    if let Some(cache) = cache {
        let _ = cache.put_chunk(&hash, &data);
    }
    Ok(())
}

fn run_task(
    store: &dyn Store,
    cache: Option<&LocalStore>,
    task: &Task,
    buf: &mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    counters: &Counters,
) -> Result<(), ChunkError> {
    let io = |e| ChunkError::io(Path::new(&*task.path), e);
    let write = |c: &ChunkRef, data: &[u8]| -> Result<(), ChunkError> {
        let written = write_sparse(&task.file, c.off, data, task.local_size).map_err(io)?;
        counters.written.fetch_add(written, Ordering::Relaxed);
        counters.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    match task.step {
        RestoreStep::Keep(_) => {
            counters.reused.fetch_add(1, Ordering::Relaxed);
        }
        RestoreStep::Fetch(c) => {
            fetch(store, cache, &c, &task.path, counters, buf, dctx)?;
            write(&c, buf)?;
        }
        RestoreStep::Verify(c) => {
            // Only the part that existed before the resize can match.
            let local_len = c.len.min(task.local_size.saturating_sub(c.off));
            buf.resize(c.len as usize, 0);
            task.file
                .read_exact_at(&mut buf[..local_len as usize], c.off)
                .map_err(io)?;
            buf[local_len as usize..].fill(0);
            counters.verified.fetch_add(local_len, Ordering::Relaxed);
            if c.hash == Some(super::index::ChunkHash::of(buf)) {
                counters.reused.fetch_add(1, Ordering::Relaxed);
            } else {
                fetch(store, cache, &c, &task.path, counters, buf, dctx)?;
                write(&c, buf)?;
            }
        }
        RestoreStep::Empty(c) => {
            counters.holes.fetch_add(1, Ordering::Relaxed);
            // Beyond the old size the file was extended with a hole already.
            if c.off < task.local_size && !super::sparse::punch_hole(&task.file, c.off, c.len) {
                let local_len = c.len.min(task.local_size - c.off) as usize;
                buf.resize(local_len, 0);
                task.file.read_exact_at(buf, c.off).map_err(io)?;
                if buf.iter().any(|&b| b != 0) {
                    buf.fill(0);
                    task.file.write_all_at(buf, c.off).map_err(io)?;
                }
            }
        }
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

fn apply_metadata(dest: &Path, e: &Entry) -> Result<(), ChunkError> {
    let full = dest.join(&e.path);
    let io = |err| ChunkError::io(&full, err);
    std::os::unix::fs::lchown(&full, Some(e.uid), Some(e.gid)).map_err(io)?;
    let mtime = UNIX_EPOCH + Duration::from_nanos(e.mtime_ns.max(0) as u64);
    match e.kind {
        EntryKind::Symlink { .. } => {
            let ts = nix::sys::time::TimeSpec::new(
                e.mtime_ns.div_euclid(1_000_000_000),
                e.mtime_ns.rem_euclid(1_000_000_000),
            );
            let _ = nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &full,
                &ts,
                &ts,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            );
        }
        _ => {
            fs::set_permissions(&full, fs::Permissions::from_mode(e.mode)).map_err(io)?;
            let f = File::open(&full).map_err(io)?;
            f.set_times(fs::FileTimes::new().set_modified(mtime).set_accessed(mtime))
                .map_err(io)?;
        }
    }
    Ok(())
}

/// Remove local entries under `dest` that the backup does not have (and
/// that the filter selects). Returns how many were removed.
fn delete_extra(dest: &Path, index: &Index, filter: Option<&Regex>) -> Result<u64, ChunkError> {
    let wanted: HashSet<&str> = index.entries.iter().map(|e| e.path.as_str()).collect();
    let mut removed = 0;
    let mut stack = vec![(dest.to_owned(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| ChunkError::io(&dir, e))? {
            let entry = entry.map_err(|e| ChunkError::io(&dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let full = entry.path();
            let m = fs::symlink_metadata(&full).map_err(|e| ChunkError::io(&full, e))?;
            let selected = filter.is_none_or(|re| re.is_match(&rel_path));
            if !wanted.contains(rel_path.as_str()) && selected {
                if m.is_dir() {
                    fs::remove_dir_all(&full).map_err(|e| ChunkError::io(&full, e))?;
                } else {
                    fs::remove_file(&full).map_err(|e| ChunkError::io(&full, e))?;
                }
                removed += 1;
            } else if m.is_dir() {
                stack.push((full, rel_path));
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "./a",
            "a//b",
            "a/\0",
        ] {
            assert!(safe_components(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            safe_components("a/b c/d").expect("ok"),
            vec!["a", "b c", "d"]
        );
    }
}
