//! An in-memory-and-directory volume that honours the [`Volume`] contract,
//! for unit tests of everything above the drivers (snapshots and pruning,
//! rollback planning, the daemon's scheduler and export scheduler) without root, a
//! pool or a loop device.
//!
//! The live contents are a plain directory; a snapshot copies it to a
//! sibling directory, so views read real files and a rollback really
//! restores them (carrying preserved paths across, as the drivers do).
//! Failures can be injected: the next snapshots fail, some heights cannot
//! be destroyed, foreign snapshots block rollbacks.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{
    DestroyReport, Error, Label, RollbackEffects, SnapMode, Snapshot, SnapshotOutcome,
    SnapshotView, Volume,
};
use crate::preserve::RelPath;

/// A fake volume: `<base>/live` holds the contents, `<base>/snaps/<h>` the
/// snapshots.
pub struct FakeVolume {
    name: String,
    mode: SnapMode,
    base: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    heights: BTreeSet<u64>,
    foreign: Vec<String>,
    fail_snapshots: u32,
    undestroyable: BTreeSet<u64>,
    protected: BTreeMap<u64, String>,
    taken: u64,
}

impl FakeVolume {
    /// A fake volume named `name` with its directories under `base`
    /// (created; `base` should be a fresh temporary directory).
    pub fn new(name: &str, mode: SnapMode, base: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(base.join("live"))?;
        std::fs::create_dir_all(base.join("snaps"))?;
        Ok(FakeVolume {
            name: name.to_owned(),
            mode,
            base: base.to_owned(),
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snap_dir(&self, height: u64) -> PathBuf {
        self.base.join("snaps").join(height.to_string())
    }

    /// The next `n` snapshots fail with an I/O error.
    pub fn fail_next_snapshots(&self, n: u32) {
        self.state().fail_snapshots = n;
    }

    /// Destroying the snapshot at `height` fails from now on.
    pub fn make_undestroyable(&self, height: u64) {
        self.state().undestroyable.insert(height);
    }

    /// A snapshot another tool made, which blocks every rollback (as
    /// `zfs rollback -r` would destroy it).
    pub fn add_foreign(&self, name: &str) {
        self.state().foreign.push(name.to_owned());
    }

    /// How many snapshots were created since the volume was made.
    pub fn snapshots_taken(&self) -> u64 {
        self.state().taken
    }
}

fn injected(path: &Path, what: &str) -> Error {
    Error::io(path, io::Error::other(format!("injected failure: {what}")))
}

/// Copy the tree at `from` to `to` (files, directories, symlinks).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

impl Volume for FakeVolume {
    fn mode(&self) -> SnapMode {
        self.mode
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn root(&self) -> Result<PathBuf, Error> {
        Ok(self.base.join("live"))
    }

    fn heights(&self) -> Result<Vec<u64>, Error> {
        Ok(self.state().heights.iter().rev().copied().collect())
    }

    fn list(&self) -> Result<Vec<Snapshot>, Error> {
        Ok(self
            .heights()?
            .into_iter()
            .map(|height| Snapshot {
                height,
                name: format!("{}@{height}", self.name),
                created: None,
                used: None,
                height_after: None,
                durable_height: None,
                protected: None,
            })
            .collect())
    }

    fn snapshot(&self, height: u64) -> Result<SnapshotOutcome, Error> {
        let mut st = self.state();
        if st.heights.contains(&height) {
            return Ok(SnapshotOutcome::AlreadyExists);
        }
        if st.fail_snapshots > 0 {
            st.fail_snapshots -= 1;
            return Err(injected(&self.snap_dir(height), "snapshot"));
        }
        let dir = self.snap_dir(height);
        copy_tree(&self.base.join("live"), &dir).map_err(|e| Error::io(&dir, e))?;
        st.heights.insert(height);
        st.taken += 1;
        Ok(SnapshotOutcome::Created)
    }

    fn destroy(&self, heights: &[u64]) -> DestroyReport {
        let mut st = self.state();
        let mut report = DestroyReport::default();
        for &h in heights {
            if st.undestroyable.contains(&h) {
                report
                    .failed
                    .push((h, injected(&self.snap_dir(h), "destroy")));
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(self.snap_dir(h)) {
                report.failed.push((h, Error::io(self.snap_dir(h), e)));
                continue;
            }
            st.heights.remove(&h);
            st.protected.remove(&h);
            report.destroyed.push(h);
        }
        report
    }

    fn rollback_effects(&self, target: u64) -> Result<RollbackEffects, Error> {
        let st = self.state();
        if !st.heights.contains(&target) {
            return Err(Error::NoSuchSnapshot(target));
        }
        Ok(RollbackEffects {
            target,
            destroys: st.heights.range(target + 1..).rev().copied().collect(),
            foreign_blockers: st.foreign.clone(),
        })
    }

    fn rollback(&self, target: u64, preserve: &[RelPath]) -> Result<(), Error> {
        let effects = self.rollback_effects(target)?;
        let live = self.base.join("live");
        let stash = self.base.join("stash");
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| Error::io(p, e)
        };
        // Carry the current content of each preserved path across.
        let _ = std::fs::remove_dir_all(&stash);
        for p in preserve {
            let (from, to) = (live.join(p.as_path()), stash.join(p.as_path()));
            if from.exists() {
                std::fs::create_dir_all(to.parent().unwrap_or(&stash)).map_err(io(&stash))?;
                std::fs::copy(&from, &to).map_err(io(&from))?;
            }
        }
        std::fs::remove_dir_all(&live).map_err(io(&live))?;
        copy_tree(&self.snap_dir(target), &live).map_err(io(&live))?;
        for p in preserve {
            let (from, to) = (stash.join(p.as_path()), live.join(p.as_path()));
            if from.exists() {
                std::fs::create_dir_all(to.parent().unwrap_or(&live)).map_err(io(&live))?;
                std::fs::copy(&from, &to).map_err(io(&to))?;
            }
        }
        let report = self.destroy(&effects.destroys);
        match report.failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn protections(&self) -> Result<BTreeMap<u64, String>, Error> {
        Ok(self.state().protected.clone())
    }

    fn set_protection(&self, height: u64, label: Option<&Label>) -> Result<(), Error> {
        let mut st = self.state();
        if !st.heights.contains(&height) {
            return Err(Error::NoSuchSnapshot(height));
        }
        match label {
            Some(l) => st.protected.insert(height, l.to_string()),
            None => st.protected.remove(&height),
        };
        Ok(())
    }

    fn view(&self, height: u64) -> Result<SnapshotView, Error> {
        if !self.state().heights.contains(&height) {
            return Err(Error::NoSuchSnapshot(height));
        }
        Ok(SnapshotView::borrowed(self.snap_dir(height)))
    }
}
