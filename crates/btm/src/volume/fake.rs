//! An in-memory-and-directory volume that honours the [`Volume`] contract,
//! for unit tests of everything above the drivers (snapshots and pruning,
//! rollback planning, the daemon's scheduler and export scheduler) without root, a
//! pool or a loop device.
//!
//! The live contents are a plain directory; a snapshot copies it to a
//! sibling directory, so views read real files and a rollback really
//! restores them. Switching lines (rollback, undo) runs the same steps as
//! btrfs (`volume::lines`), with directories for subvolumes, so failures
//! injected after each step test the real executor without root. Other
//! failures can be injected too: the next snapshots fail, some heights
//! cannot be destroyed, foreign snapshots block rollbacks.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::branch::{Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
use super::lines::{self, Trees};
use super::{
    parse_height, DestroyReport, Error, Label, SnapMode, Snapshot, SnapshotOutcome, SnapshotView,
    Volume,
};

/// A fake volume: `<base>/live` holds the contents, `<base>/live@<h>` the
/// snapshots (with `live@<h>.btm-protect` beside a protected one), and
/// `<base>/live.btm-branch.<name>` the kept branches.
pub struct FakeVolume {
    name: String,
    mode: SnapMode,
    base: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    foreign: Vec<String>,
    fail_snapshots: u32,
    undestroyable: BTreeSet<u64>,
    taken: u64,
}

impl FakeVolume {
    /// A fake volume named `name` with its directories under `base`
    /// (created; `base` should be a fresh temporary directory).
    pub fn new(name: &str, mode: SnapMode, base: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(base.join("live"))?;
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
        self.base.join(format!("live@{height}"))
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

    fn has(&self, height: u64) -> bool {
        self.snap_dir(height).is_dir()
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
        let dir = &self.base;
        let mut hs = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            if let Some(h) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("live@"))
                .and_then(parse_height)
            {
                hs.push(h);
            }
        }
        hs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(hs)
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
        if self.has(height) {
            return Ok(SnapshotOutcome::AlreadyExists);
        }
        let mut st = self.state();
        if st.fail_snapshots > 0 {
            st.fail_snapshots -= 1;
            return Err(injected(&self.snap_dir(height), "snapshot"));
        }
        let dir = self.snap_dir(height);
        copy_tree(&self.base.join("live"), &dir).map_err(|e| Error::io(&dir, e))?;
        st.taken += 1;
        Ok(SnapshotOutcome::Created)
    }

    fn destroy(&self, heights: &[u64]) -> DestroyReport {
        let st = self.state();
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
            let _ = std::fs::remove_file(lines::record_of(&self.snap_dir(h)));
            report.destroyed.push(h);
        }
        report
    }

    fn switch_effects(&self, enter: &Enter) -> Result<SwitchEffects, Error> {
        let mut fx = lines::effects(self, enter)?;
        if matches!(enter, Enter::Snapshot { .. }) {
            fx.foreign_blockers = self.state().foreign.clone();
        }
        Ok(fx)
    }

    fn switch(&self, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error> {
        lines::switch(self, sw, progress)
    }

    fn switch_steps(&self) -> &'static [&'static str] {
        lines::STEPS
    }

    fn branches(&self) -> Result<Vec<Branch>, Error> {
        lines::branches(self)
    }

    fn drop_branch(&self, name: &BranchName) -> Result<(), Error> {
        lines::drop_branch(self, name)
    }

    fn release_in_branch(&self, name: &BranchName, height: u64) -> Result<(), Error> {
        lines::release(self, name, height)
    }

    fn protections(&self) -> Result<BTreeMap<u64, String>, Error> {
        let mut out = BTreeMap::new();
        for h in self.heights()? {
            if let Ok(label) = std::fs::read_to_string(lines::record_of(&self.snap_dir(h))) {
                out.insert(h, label);
            }
        }
        Ok(out)
    }

    fn set_protection(&self, height: u64, label: Option<&Label>) -> Result<(), Error> {
        if !self.has(height) {
            return Err(Error::NoSuchSnapshot(height));
        }
        let record = lines::record_of(&self.snap_dir(height));
        match label {
            Some(l) => std::fs::write(&record, l.as_str()),
            None => std::fs::remove_file(&record).or(Ok(())),
        }
        .map_err(|e| Error::io(&record, e))
    }

    fn view(&self, height: u64) -> Result<SnapshotView, Error> {
        if !self.has(height) {
            return Err(Error::NoSuchSnapshot(height));
        }
        Ok(SnapshotView::borrowed(self.snap_dir(height)))
    }
}

impl Trees for FakeVolume {
    fn home(&self) -> PathBuf {
        self.base.clone()
    }

    fn base(&self) -> &str {
        "live"
    }

    fn active_heights(&self) -> Result<Vec<u64>, Error> {
        self.heights()
    }

    fn id(&self, path: &Path) -> Result<Option<String>, Error> {
        Ok(std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| m.ino().to_string()))
    }

    fn writable_copy(&self, from: &Path, to: &Path) -> Result<(), Error> {
        copy_tree(from, to).map_err(|e| Error::io(to, e))
    }

    fn set_readonly(&self, _: &Path, _: bool) -> Result<(), Error> {
        Ok(())
    }

    fn delete_tree(&self, path: &Path) -> Result<(), Error> {
        std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))
    }
}
