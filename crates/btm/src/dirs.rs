//! Where btm keeps its own small files: locks and view mountpoints under a
//! runtime directory (gone at reboot, like the locks they hold), and files
//! carried across a rollback under a state directory (kept across a crash).
//!
//! They come in as a [`Dirs`] value: every operation that touches them
//! takes one, so a test (or an embedding node) picks its own directories
//! and never needs `/run` or root. [`Dirs::from_env`] is what the binary
//! uses: `$BTM_RUNTIME_DIR` and `$BTM_STATE_DIR`, or `/run/btm` and
//! `/var/lib/btm`.

use std::io;
use std::path::PathBuf;

/// A directory btm needs could not be created.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {cause}")]
pub struct Error {
    /// The directory.
    pub path: PathBuf,
    /// The underlying error.
    pub cause: io::Error,
}

/// `$BTM_RUNTIME_DIR`, or `/run/btm`.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("BTM_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/btm"))
}

/// `$BTM_STATE_DIR`, or `/var/lib/btm`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("BTM_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/btm"))
}

/// A file-name-safe rendering of a volume name (`pool/data` → `pool%2Fdata`).
/// Injective, so two volumes never share a lock.
pub fn escape(volume: &str) -> String {
    let mut out = String::with_capacity(volume.len());
    for c in volume.chars() {
        match c {
            '/' => out.push_str("%2F"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

fn ensure(path: PathBuf) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(&path).map_err(|cause| Error {
        path: path.clone(),
        cause,
    })?;
    Ok(path)
}

/// btm's runtime and state directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// Locks, pins, view mountpoints, the control socket: gone at reboot.
    pub runtime: PathBuf,
    /// Height windows, files carried across a rollback: kept across a
    /// crash.
    pub state: PathBuf,
}

impl Default for Dirs {
    /// [`Dirs::from_env`].
    fn default() -> Self {
        Dirs::from_env()
    }
}

impl Dirs {
    /// `$BTM_RUNTIME_DIR` and `$BTM_STATE_DIR`, or `/run/btm` and
    /// `/var/lib/btm`.
    pub fn from_env() -> Self {
        Dirs {
            runtime: runtime_dir(),
            state: state_dir(),
        }
    }

    /// Both below one directory (tests, embedding nodes).
    pub fn under(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Dirs {
            runtime: root.join("run"),
            state: root.join("state"),
        }
    }

    /// The lock file for `volume`, its directory created if needed.
    pub fn lock_file(&self, volume: &str) -> Result<PathBuf, Error> {
        Ok(ensure(self.runtime.join("locks"))?.join(format!("{}.lock", escape(volume))))
    }

    /// The directory of pin files, created if needed.
    pub fn pins(&self) -> Result<PathBuf, Error> {
        ensure(self.runtime.join("pins"))
    }

    /// A fresh, empty mountpoint for a temporary snapshot view.
    pub fn view_mountpoint(&self, leaf: &str) -> Result<PathBuf, Error> {
        ensure(self.runtime.join("views").join(leaf))
    }

    /// A fresh directory to hold preserved files during a rollback of
    /// `volume`.
    pub fn preserve_stash(&self, volume: &str) -> Result<PathBuf, Error> {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        ensure(self.state.join("preserve").join(format!(
            "{}-{stamp}-{}",
            escape(volume),
            std::process::id()
        )))
    }

    /// The journal of a switch (rollback, undo) of `volume` in progress.
    pub fn switch_journal(&self, volume: &str) -> PathBuf {
        self.state
            .join("switches")
            .join(format!("{}.json", escape(volume)))
    }

    /// The file recording the height windows of `volume`'s snapshots.
    pub fn window_file(&self, volume: &str) -> PathBuf {
        self.state
            .join("windows")
            .join(format!("{}.json", escape(volume)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_is_injective_on_separators() {
        assert_eq!(escape("pool/data"), "pool%2Fdata");
        assert_ne!(escape("a/b"), escape("a%2Fb"));
        assert_eq!(escape("/data/chain"), "%2Fdata%2Fchain");
    }
}
