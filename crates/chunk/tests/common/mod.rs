//! Helpers for the engine's library-level tests: trees of files made in a
//! temporary directory, and comparison of two trees. No root, no servers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use btm_chunk::backup::{BackupOptions, BackupSummary};
use btm_chunk::format::head::Decoded;
use btm_chunk::restore::{RestoreOptions, RestoreSummary};
use btm_chunk::store::Store;
use btm_chunk::{inventory, ChunkError, Policy, Repo};

mod noise;
pub use noise::noise;

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;

/// Write `files` (relative path, seed, length) under `dir`.
pub fn write_tree(dir: &Path, files: &[(&str, u64, usize)]) {
    for (name, seed, len) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, noise(*seed, *len)).expect("write");
    }
}

/// A node-like tree: many small files (an LSM's tables), one big file
/// with a hole, and an append-only log.
pub fn node_tree(dir: &Path) {
    let mut files = Vec::new();
    let names: Vec<String> = (0..200).map(|i| format!("db/{i:06}.sst")).collect();
    for (i, n) in names.iter().enumerate() {
        files.push((n.as_str(), i as u64, 3 * KIB + i * 37));
    }
    files.push(("blocks/log", 1000, 3 * MIB + 123));
    write_tree(dir, &files);
    let big = dir.join("state.db");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(8 * MIB as u64).expect("sparse");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(7, 2 * MIB), 5 * MIB as u64)
        .expect("write");
    std::os::unix::fs::symlink("state.db", dir.join("current")).expect("symlink");
}

/// Every entry under `dir`: kind and content (symlink target for links).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let rel = e.path().strip_prefix(dir).expect("prefix").to_owned();
            if rel.starts_with(".btm-restore") || rel.to_string_lossy().contains(".btm-") {
                continue;
            }
            let t = e.file_type().expect("type");
            if t.is_symlink() {
                let target = std::fs::read_link(e.path()).expect("link");
                out.insert(rel, [b"L:", target.as_os_str().as_encoded_bytes()].concat());
            } else if t.is_dir() {
                out.insert(rel, b"D".to_vec());
                stack.push(e.path());
            } else {
                out.insert(rel, std::fs::read(e.path()).expect("read"));
            }
        }
    }
    out
}

/// Assert that `b` holds exactly what `a` holds.
#[track_caller]
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (x, y) = (snapshot(a), snapshot(b));
    assert_eq!(
        x.keys().collect::<Vec<_>>(),
        y.keys().collect::<Vec<_>>(),
        "the same entries"
    );
    for (k, v) in &x {
        assert!(y[k] == *v, "{} differs", k.display());
    }
}

/// `store` (a handle the test keeps a clone of) without a cache (each
/// test sees only its store) and with a few requests in flight.
pub fn repo<S: Store + Clone + 'static>(store: &S) -> Repo {
    Repo::new(Arc::new(store.clone()))
        .with_cache(None)
        .with_connections(Some(4))
}

/// Back up `src` under `tag` with small chunks and packs, so that a small
/// tree still spans many packs.
pub fn backup<S: Store + Clone + 'static>(
    store: &S,
    src: &Path,
    tag: &str,
) -> Result<BackupSummary, ChunkError> {
    let mut o = BackupOptions::new(tag, Policy::NONE);
    o.chunk_size = 64 * KIB as u64;
    o.pack_size = 256 * KIB;
    o.workers = 2;
    repo(store).backup(src, &o)
}

/// The newest backup of `tag` and its index.
pub fn newest(store: &dyn Store, tag: &str) -> (String, Decoded) {
    let names = inventory::list_backups(store, Some(tag)).expect("list");
    let name = names.first().expect("a backup").to_string();
    let index = inventory::read_index(store, &name).expect("index");
    (name, index)
}

/// Restore the newest backup of `tag` into `dest`.
pub fn restore<S: Store + Clone + 'static>(
    store: &S,
    tag: &str,
    dest: &Path,
) -> Result<RestoreSummary, ChunkError> {
    let (name, index) = newest(store, tag);
    let mut o = RestoreOptions::new(Policy::NONE);
    o.delete = true;
    o.workers = 2;
    repo(store).restore(&name, &index, dest, &o)
}
