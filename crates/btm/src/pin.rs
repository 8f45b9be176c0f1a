//! Pins: a snapshot that an export is reading must not be pruned under it.
//!
//! A pin is a file `$BTM_RUNTIME_DIR/pins/<volume>@<height>.<pid>` held
//! under an exclusive `flock` for as long as the [`Pin`] lives. Pruning, in
//! any btm process, skips pinned heights; a pin whose lock can be taken
//! belongs to a dead process and is removed. So a crash never leaves a
//! snapshot pinned for good, and a prune never needs to talk to the daemon.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::dirs::Dirs;

/// Errors pinning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pin directory could not be created.
    #[error(transparent)]
    Dir(#[from] crate::dirs::Error),
    /// A pin file could not be created, locked or read.
    #[error("pin {path}: {cause}")]
    Io {
        /// The pin file.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
}

/// Keeps the snapshot at one height from being pruned until dropped.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Pin {
    /// Pin the snapshot of `volume` at `height`.
    pub fn acquire(dirs: &Dirs, volume: &str, height: u64) -> Result<Pin, Error> {
        let path = dirs.pins()?.join(format!(
            "{}@{height}.{}",
            crate::dirs::escape(volume),
            std::process::id()
        ));
        let io = |cause| Error::Io {
            path: path.clone(),
            cause,
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io(std::io::Error::from(e)))?;
        Ok(Pin { path, _lock: lock })
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Heights of `volume` pinned by a live process. Pins of dead processes
/// are removed on the way.
pub fn pinned(dirs: &Dirs, volume: &str) -> Result<BTreeSet<u64>, Error> {
    let dir = dirs.pins()?;
    let prefix = format!("{}@", crate::dirs::escape(volume));
    let mut out = BTreeSet::new();
    let rd = std::fs::read_dir(&dir).map_err(|cause| Error::Io {
        path: dir.clone(),
        cause,
    })?;
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(height) = rest
            .split_once('.')
            .and_then(|(h, _)| crate::volume::parse_height(h))
        else {
            continue;
        };
        let path = entry.path();
        let Ok(file) = OpenOptions::new().read(true).open(&path) else {
            continue;
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_stale) => {
                let _ = std::fs::remove_file(&path);
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                out.insert(height);
            }
            Err((_, e)) => {
                return Err(Error::Io {
                    path,
                    cause: std::io::Error::from(e),
                })
            }
        }
    }
    Ok(out)
}
