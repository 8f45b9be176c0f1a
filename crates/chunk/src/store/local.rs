//! A store in a local directory (or a mounted network filesystem).
//!
//! Every put writes a temporary file in the destination directory, fsyncs
//! it, then `link()`s it into place: `link` fails if the name exists, which
//! gives create-if-absent without a race, and the object is either fully
//! there or not there at all. Index puts fsync their directory before
//! returning; other puts leave that to [`Store::flush`], which fsyncs every
//! directory touched since, once (a crash before it can only lose a link,
//! and nothing names an object before the flush that made it durable).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{check_marker_name, Bytes, Id, Kind, Marker, Store, StoreError};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A store rooted at a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    /// Directories with links not yet made durable.
    unsynced: Mutex<HashSet<PathBuf>>,
}

fn io_err(what: &str, e: std::io::Error) -> StoreError {
    match e.kind() {
        ErrorKind::NotFound => StoreError::NotFound(what.to_owned()),
        ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock => {
            StoreError::Temporary {
                what: what.to_owned(),
                detail: e.to_string(),
            }
        }
        _ => StoreError::Permanent {
            what: what.to_owned(),
            detail: e.to_string(),
        },
    }
}

impl LocalStore {
    /// A store at `path`. The directory is created at the first write;
    /// an existing non-directory is refused.
    pub fn open(path: &str) -> Result<Self, StoreError> {
        let root = PathBuf::from(path);
        if root.exists() && !root.is_dir() {
            return Err(StoreError::InvalidUrl {
                url: path.to_owned(),
                detail: "it exists and is not a directory".into(),
            });
        }
        Ok(LocalStore {
            root,
            unsynced: Mutex::new(HashSet::new()),
        })
    }

    /// Write `data` to `rel` unless it exists; `Ok(false)` if it existed.
    /// With `sync_dir`, the directory entry is durable on return;
    /// otherwise it is recorded for [`Store::flush`].
    fn create(&self, rel: &str, data: &[u8], sync_dir: bool) -> Result<bool, StoreError> {
        let dest = self.root.join(rel);
        let dir = dest.parent().unwrap_or(&self.root).to_owned();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| io_err(rel, e))?;
            // New directories need their own entries made durable too.
            let mut pending = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            let mut d = dir.as_path();
            while let Some(parent) = d.parent() {
                pending.insert(parent.to_owned());
                if parent == self.root || !parent.starts_with(&self.root) {
                    break;
                }
                d = parent;
            }
        }
        if dest.exists() {
            return Ok(false);
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| -> std::io::Result<bool> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            let created = match fs::hard_link(&tmp, &dest) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
            if sync_dir {
                File::open(&dir)?.sync_all()?;
            } else {
                self.unsynced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(dir.clone());
            }
            Ok(created)
        })();
        let _ = fs::remove_file(&tmp);
        result.map_err(|e| io_err(rel, e))
    }

    fn read(&self, rel: &str) -> Result<Vec<u8>, StoreError> {
        fs::read(self.root.join(rel)).map_err(|e| io_err(rel, e))
    }

    fn remove(&self, rel: &str) -> Result<(), StoreError> {
        match fs::remove_file(self.root.join(rel)) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(rel, e)),
            _ => Ok(()),
        }
    }

    fn names(dir: &Path) -> Result<Vec<String>, StoreError> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir.display().to_string(), e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| io_err(&dir.display().to_string(), e))?;
            if let Some(n) = entry.file_name().to_str().filter(|n| !n.starts_with('.')) {
                out.push(n.to_owned());
            }
        }
        Ok(out)
    }
}

impl Store for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        self.create(&kind.path(id), &data, false).map(|_| ())
    }

    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.read(&kind.path(id))
            .map(Bytes::from)
            .map_err(|e| match e {
                StoreError::NotFound(_) => StoreError::NotFound(kind.describe(id)),
                e => e,
            })
    }

    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let rel = kind.path(id);
        let file = File::open(self.root.join(&rel)).map_err(|e| match e.kind() {
            ErrorKind::NotFound => StoreError::NotFound(kind.describe(id)),
            _ => io_err(&rel, e),
        })?;
        let len = usize::try_from(len).map_err(|_| StoreError::Permanent {
            what: rel.clone(),
            detail: "range too large".into(),
        })?;
        buf.clear();
        buf.resize(len, 0);
        file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => StoreError::Permanent {
                what: kind.describe(id),
                detail: format!("shorter than {len} bytes at offset {offset}"),
            },
            _ => io_err(&rel, e),
        })
    }

    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        let rel = kind.path(id);
        fs::metadata(self.root.join(&rel))
            .map(|m| m.len())
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => StoreError::NotFound(kind.describe(id)),
                _ => io_err(&rel, e),
            })
    }

    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        let top = self.root.join(kind.dir());
        let dirs: Vec<PathBuf> = if kind.fanout() {
            Self::names(&top)?
                .into_iter()
                .filter(|n| n.len() == 2)
                .map(|n| top.join(n))
                .collect()
        } else {
            vec![top]
        };
        let mut out = Vec::new();
        for dir in dirs {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir.display().to_string(), e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| io_err(&dir.display().to_string(), e))?;
                let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Id>().ok())
                else {
                    continue;
                };
                match entry.metadata() {
                    Ok(m) if m.is_file() => out.push((id, m.len())),
                    Ok(_) => {}
                    // Deleted between the listing and now.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&dir.display().to_string(), e)),
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.remove(&kind.path(id))
    }

    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.flush()?;
        self.create(&format!("indexes/{name}"), data, true)
    }

    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.read(&format!("indexes/{name}")).map_err(|e| match e {
            StoreError::NotFound(_) => StoreError::NotFound(format!("backup {name}")),
            e => e,
        })
    }

    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        Self::names(&self.root.join("indexes"))
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.remove(&format!("indexes/{name}"))
    }

    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        check_marker_name(name)?;
        let dest = self.root.join(name);
        let dir = dest.parent().unwrap_or(&self.root).to_owned();
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| -> std::io::Result<()> {
            fs::create_dir_all(&dir)?;
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &dest)?;
            File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| io_err(name, e))
    }

    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        check_marker_name(name)?;
        self.read(name)
    }

    /// Under an exclusive `flock` of `.<name>.lock` beside the marker, so
    /// that two writers (two processes, or two machines on one NFS
    /// export) compare and replace one after the other.
    fn replace_marker_if(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        check_marker_name(name)?;
        let dest = self.root.join(name);
        let dir = dest.parent().unwrap_or(&self.root).to_owned();
        let file = dest.file_name().map(|f| f.to_string_lossy().into_owned());
        let lock_path = dir.join(format!(".{}.lock", file.unwrap_or_default()));
        fs::create_dir_all(&dir).map_err(|e| io_err(name, e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(name, e))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(name, std::io::Error::from(e)))?;
        let holds = match self.read(name) {
            Ok(d) => Some(d.to_vec()),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        if holds.as_deref() != expected {
            return Ok(false);
        }
        self.put_marker(name, data)?;
        Ok(true)
    }

    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        let mut out = Vec::new();
        let mut pending = vec![dir.trim_end_matches('/').to_owned()];
        while let Some(rel) = pending.pop() {
            for n in Self::names(&self.root.join(&rel))? {
                let rel = format!("{rel}/{n}");
                let meta = match fs::symlink_metadata(self.root.join(&rel)) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&rel, e)),
                };
                if meta.is_dir() {
                    pending.push(rel);
                } else if let Ok(t) = meta.modified() {
                    out.push(Marker {
                        name: rel,
                        modified: t.into(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        check_marker_name(name)?;
        self.remove(name)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let dirs: Vec<PathBuf> = self
            .unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for d in dirs {
            if let Err(e) = File::open(&d).and_then(|f| f.sync_all()) {
                // Keep it pending so a retry syncs it.
                self.unsynced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(d.clone());
                return Err(io_err(&d.display().to_string(), e));
            }
        }
        Ok(())
    }
}
