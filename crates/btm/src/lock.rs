//! One advisory lock per volume, so that snapshot, prune, rollback and clean
//! never interleave across processes (a rollback must never race a
//! snapshot). It is a `flock` on a file under the runtime directory: the
//! kernel releases it when the holder exits, even by SIGKILL, so a crash
//! never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::dirs::Dirs;

/// How long CLI commands wait for another btm process by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lock directory could not be created.
    #[error(transparent)]
    Dir(#[from] crate::dirs::Error),
    /// The lock file could not be opened or locked.
    #[error("lock file {path}: {cause}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// Another process held the lock for the whole wait.
    #[error("volume '{volume}' is locked by another btm process{holder} (waited {waited:?}; lock file {path})")]
    Timeout {
        /// The volume.
        volume: String,
        /// The lock file.
        path: PathBuf,
        /// ", pid N" when the holder recorded its pid.
        holder: String,
        /// How long we waited.
        waited: Duration,
    },
}

impl Error {
    /// Whether trying again later may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// Holds the volume's lock until dropped.
#[derive(Debug)]
pub struct VolumeLock {
    _lock: Flock<File>,
}

impl VolumeLock {
    /// Take the exclusive lock for `volume`, waiting up to `wait` for
    /// another holder to release it.
    pub fn acquire(dirs: &Dirs, volume: &str, wait: Duration) -> Result<Self, Error> {
        let path = dirs.lock_file(volume)?;
        let io = |cause| Error::Io {
            path: path.clone(),
            cause,
        };
        let started = Instant::now();
        let mut announced = false;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    // Record the holder for the error message of the next
                    // process that has to wait. A daemon re-locks at every
                    // height: skip the write (and the dirty page that the
                    // next sync() would flush) when our pid is there already.
                    let pid = std::process::id().to_string();
                    let mut current = String::new();
                    let _ = lock.read_to_string(&mut current);
                    if current != pid {
                        let _ = lock.set_len(0);
                        let _ = lock.rewind();
                        let _ = lock.write_all(pid.as_bytes());
                    }
                    return Ok(VolumeLock { _lock: lock });
                }
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = match holder.trim() {
                        "" => String::new(),
                        pid => format!(", pid {pid}"),
                    };
                    if started.elapsed() >= wait {
                        return Err(Error::Timeout {
                            volume: volume.to_owned(),
                            path,
                            holder,
                            waited: started.elapsed(),
                        });
                    }
                    if !announced {
                        tracing::warn!(
                            volume,
                            "waiting for another btm process{holder} to release the volume"
                        );
                        announced = true;
                    }
                    sleep(Duration::from_millis(100));
                }
                Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
            }
        }
    }
}
