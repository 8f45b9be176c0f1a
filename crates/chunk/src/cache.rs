//! A local cache of store metadata: pack indexes and tree segments. Both
//! are write-once and named by the hash of their bytes, so an entry can be
//! kept forever, shared by every store, and checked on every read (a
//! damaged entry is dropped and fetched again). A backup's parent and the
//! chunk map are then read from local disk instead of a bucket far away.

use std::path::{Path, PathBuf};

use crate::store::{Id, Kind};

/// A cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// The default location: `$BTM_CACHE_DIR`, else `/var/cache/btm` for
    /// root, else `$XDG_CACHE_HOME/btm` or `~/.cache/btm`; `None` when none
    /// can be used (no cache then, everything is fetched).
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("BTM_CACHE_DIR") {
            return Some(PathBuf::from(d));
        }
        if nix::unistd::geteuid().is_root() {
            return Some(PathBuf::from("/var/cache/btm"));
        }
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .map(|d| d.join("btm"))
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, kind: Kind, id: &Id) -> PathBuf {
        self.root.join(kind.path(id))
    }

    /// The cached bytes of `id`, if present and intact.
    pub fn get(&self, kind: Kind, id: &Id) -> Option<crate::store::Bytes> {
        let p = self.path(kind, id);
        let data = std::fs::read(&p).ok()?;
        if Id::of(&data) == *id {
            Some(data.into())
        } else {
            let _ = std::fs::remove_file(&p);
            None
        }
    }

    /// Keep `data` as `id`. Failures only cost a later fetch, so they are
    /// logged, not returned.
    pub fn put(&self, kind: Kind, id: &Id, data: &[u8]) {
        let p = self.path(kind, id);
        if p.exists() {
            return;
        }
        let result = (|| -> std::io::Result<()> {
            let dir = p.parent().unwrap_or(&self.root);
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{}.{}.tmp", id.to_hex(), std::process::id()));
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, &p)
        })();
        if let Err(e) = result {
            tracing::debug!(error = %e, path = %p.display(), "could not write to the metadata cache");
        }
    }

    /// Drop `id` (the store no longer has it).
    pub fn forget(&self, kind: Kind, id: &Id) {
        let _ = std::fs::remove_file(self.path(kind, id));
    }
}
