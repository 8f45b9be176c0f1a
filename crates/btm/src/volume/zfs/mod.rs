//! ZFS datasets, through the `zfs` command.
//!
//! The `zfs` CLI is the stable interface of ZFS; libzfs has no stable ABI.
//! Commands are written for modern OpenZFS and fall back where the installed
//! tool lacks a feature (zfs-fuse, pool version 23, has no `list -p`, no
//! comma-separated batch destroy and no `.zfs` directory); each fallback is
//! exercised by the test suite on zfs-fuse.
//!
//! A rollback destroys nothing: see `volume::zfs::branches`.

mod branches;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::branch::{Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
use super::cmd::{self, CmdError, CmdErrorKind};
use super::{
    parse_height, DestroyReport, Error, Label, SnapMode, Snapshot, SnapshotOutcome, SnapshotView,
    Volume,
};
use branches::{BRANCH_INFIX, INCOMING_SUFFIX};

/// How many snapshot names go into one `zfs destroy a@1,2,3` call.
const DESTROY_BATCH: usize = 64;
/// The ZFS user property holding a snapshot's protection label (visible to
/// other tools: `zfs get btm:protect`).
const PROTECT_PROPERTY: &str = "btm:protect";

/// Prefix of the temporary clones that serve as read-only snapshot views.
const VIEW_PREFIX: &str = "btm-view.";

fn zfs<S: AsRef<str>>(args: &[S]) -> Result<String, CmdError> {
    cmd::run("zfs", args)
}

/// A ZFS filesystem dataset.
#[derive(Debug, Clone)]
pub struct ZfsVolume {
    dataset: String,
    /// Where views are mounted and preserved files wait during a rollback.
    dirs: crate::dirs::Dirs,
}

impl ZfsVolume {
    /// Open an existing filesystem dataset by name (`pool/data`) or by its
    /// mountpoint (`/pool/data`). Only reads.
    pub fn open(volume: &str, dirs: &crate::dirs::Dirs) -> Result<Self, Error> {
        let dataset = if Path::new(volume).is_absolute() {
            Self::dataset_for_mountpoint(volume)?
        } else {
            volume.to_owned()
        };
        let out =
            zfs(&["get", "-H", "-o", "value", "type", &dataset]).map_err(|e| match e.kind {
                CmdErrorKind::NotFound => Error::NotFound(volume.to_owned()),
                _ => Error::Command(e),
            })?;
        match out.trim() {
            "filesystem" => Ok(ZfsVolume {
                dataset,
                dirs: dirs.clone(),
            }),
            other => Err(Error::WrongType {
                volume: volume.to_owned(),
                mode: SnapMode::Zfs,
                detail: format!("it is a ZFS {other}, not a filesystem"),
            }),
        }
    }

    /// The dataset `name` without checking it exists: for finishing a
    /// switch stopped while the name was on neither line.
    pub fn unchecked(name: &str, dirs: &crate::dirs::Dirs) -> Self {
        ZfsVolume {
            dataset: name.to_owned(),
            dirs: dirs.clone(),
        }
    }

    fn dataset_for_mountpoint(path: &str) -> Result<String, Error> {
        let wanted = Path::new(path);
        let out = zfs(&["list", "-H", "-o", "name,mountpoint", "-t", "filesystem"])?;
        // A kept branch has the same mount point but is never mounted.
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(name, _)| !name.contains(BRANCH_INFIX) && !name.ends_with(INCOMING_SUFFIX))
            .find(|(_, mp)| Path::new(mp) == wanted)
            .map(|(name, _)| name.to_owned())
            .ok_or_else(|| Error::WrongType {
                volume: path.to_owned(),
                mode: SnapMode::Zfs,
                detail: "no ZFS dataset is mounted there".into(),
            })
    }

    /// The dataset name, e.g. `pool/data`.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    fn snap_name(&self, height: u64) -> String {
        format!("{}@{height}", self.dataset)
    }

    fn height_of(&self, name: &str) -> Option<u64> {
        name.strip_prefix(&self.dataset)?
            .strip_prefix('@')
            .and_then(parse_height)
    }

    /// All snapshots of this dataset (btm's and others'), oldest first by
    /// creation transaction group: the order `zfs rollback` cares about.
    fn all_snapshots_by_txg(&self) -> Result<Vec<String>, Error> {
        let out = zfs(&[
            "list",
            "-H",
            "-t",
            "snapshot",
            "-o",
            "name",
            "-s",
            "createtxg",
            "-d",
            "1",
            &self.dataset,
        ])?;
        Ok(out
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    fn details_modern(&self) -> Result<Vec<Snapshot>, CmdError> {
        let out = zfs(&[
            "list",
            "-Hp",
            "-t",
            "snapshot",
            "-o",
            "name,creation,used",
            "-d",
            "1",
            &self.dataset,
        ])?;
        let mut snaps = Vec::new();
        for line in out.lines() {
            let mut f = line.split('\t');
            let (Some(name), Some(created), Some(used)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if let Some(height) = self.height_of(name) {
                snaps.push(Snapshot {
                    height,
                    name: name.to_owned(),
                    created: epoch(created),
                    used: used.parse().ok(),
                    height_after: None,
                    durable_height: None,
                    protected: None,
                });
            }
        }
        Ok(snaps)
    }

    /// zfs-fuse: names from `list`, then exact numbers from one `get -Hp`.
    fn details_fallback(&self) -> Result<Vec<Snapshot>, Error> {
        let names: Vec<String> = self
            .heights()?
            .into_iter()
            .map(|h| self.snap_name(h))
            .collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["get", "-Hp", "-o", "name,property,value", "creation,used"];
        args.extend(names.iter().map(String::as_str));
        let out = zfs(&args)?;
        let mut props: HashMap<&str, (Option<DateTime<Utc>>, Option<u64>)> = HashMap::new();
        for line in out.lines() {
            let mut f = line.split('\t');
            let (Some(name), Some(prop), Some(value)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let entry = props.entry(name).or_default();
            match prop {
                "creation" => entry.0 = epoch(value),
                "used" => entry.1 = value.parse().ok(),
                _ => {}
            }
        }
        Ok(names
            .iter()
            .filter_map(|n| {
                let (created, used) = props.get(n.as_str()).copied().unwrap_or_default();
                Some(Snapshot {
                    height: self.height_of(n)?,
                    name: n.clone(),
                    created,
                    used,
                    height_after: None,
                    durable_height: None,
                    protected: None,
                })
            })
            .collect())
    }

    fn destroy_one(&self, height: u64) -> Result<(), Error> {
        match zfs(&["destroy", &self.snap_name(height)]) {
            Ok(_) => Ok(()),
            // Already gone is the state we wanted.
            Err(e) if e.kind == CmdErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Heights (newest first) and protection labels of the btm snapshots
    /// of dataset `ds` (this one or a branch), in one listing.
    fn labelled_snapshots(&self, ds: &str) -> Result<(Vec<u64>, BTreeMap<u64, String>), Error> {
        let out = zfs(&[
            "list",
            "-H",
            "-t",
            "snapshot",
            "-o",
            &format!("name,{PROTECT_PROPERTY}"),
            "-d",
            "1",
            ds,
        ])?;
        let prefix = format!("{ds}@");
        Ok(labelled(&out, |n| {
            n.strip_prefix(&prefix).and_then(parse_height)
        }))
    }

    fn pool(&self) -> &str {
        self.dataset.split('/').next().unwrap_or(&self.dataset)
    }

    fn view_clone_prefix(&self) -> String {
        format!(
            "{}/{VIEW_PREFIX}{}.",
            self.pool(),
            self.dataset.replace('/', ".")
        )
    }

    /// Destroy read-only view clones of this dataset left behind by a btm
    /// process that no longer runs (crashed or killed). Clones of live
    /// processes, and anything whose origin is not one of this dataset's
    /// btm snapshots, are left alone.
    pub fn sweep_stale_views(&self) -> Result<(), Error> {
        let prefix = self.view_clone_prefix();
        for (name, origin) in origins_below(self.pool())? {
            let (name, origin) = (name.as_str(), origin.as_str());
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let Some((h, pid)) = rest.split_once('.') else {
                continue;
            };
            let (Some(h), Ok(pid)) = (parse_height(h), pid.parse::<u32>()) else {
                continue;
            };
            if origin != self.snap_name(h) || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            tracing::warn!(
                clone = name,
                "removing stale snapshot view left by a dead btm process"
            );
            destroy_clone(name)?;
        }
        Ok(())
    }
}

/// The filesystems directly below `parent`, with their origins (`-` for
/// a dataset that is not a clone).
fn origins_below(parent: &str) -> Result<Vec<(String, String)>, Error> {
    origins(&["-d", "1", parent])
}

/// The filesystems `scope` names (`-d 1 PARENT`, `-r POOL`), each with
/// its origin (`-` for a dataset that is not a clone).
pub(super) fn origins(scope: &[&str]) -> Result<Vec<(String, String)>, Error> {
    let mut args = vec!["list", "-H", "-o", "name,origin", "-t", "filesystem"];
    args.extend_from_slice(scope);
    let out = zfs(&args)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, o)| (n.trim().to_owned(), o.trim().to_owned()))
        .collect())
}

/// Destroy a view clone, retrying while it is busy.
fn destroy_clone(name: &str) -> Result<(), Error> {
    match zfs_retrying(&["destroy", name]) {
        Err(Error::Command(e)) if e.kind == CmdErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Run a `zfs` command that changes datasets, retrying while it reports
/// them busy: a FUSE-backed or just-used mount, or one just renamed, can
/// stay busy for a moment (zfs-fuse especially).
fn zfs_retrying(args: &[&str]) -> Result<(), Error> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match zfs(args) {
            Ok(_) => return Ok(()),
            // About 90 s in all, for a hold that outlasts a moment (a
            // mount being torn down, another command's look at the
            // dataset). A failure here is safe (the switch stops half
            // done, and a rerun finishes it), but it is a failed
            // rollback. (The holds that once lasted past it, in full test
            // runs on zfs-fuse, were a switch's own: it had taken a branch
            // for its incoming line, whose three-digit guid it shared, and
            // left the real one mounted; guids are now read exactly.)
            Err(e) if e.kind.is_temporary() && attempt < 48 => {
                tracing::debug!(?args, attempt, "dataset busy, retrying");
                sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Rename dataset `from` to `to` (retrying while busy), and return once
/// `to` can be opened: zfs-fuse on a loaded machine has answered "dataset
/// does not exist" for the new name just after the rename returned.
fn rename(from: &str, to: &str) -> Result<(), Error> {
    zfs_retrying(&["rename", from, to])?;
    let mut delay = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match zfs(&["list", "-H", "-o", "name", to]) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind == CmdErrorKind::NotFound && attempt < 24 => {
                tracing::debug!(to, attempt, "renamed dataset not visible yet, waiting");
                sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn epoch(s: &str) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(s.trim().parse().ok()?, 0)
}

impl Volume for ZfsVolume {
    fn mode(&self) -> SnapMode {
        SnapMode::Zfs
    }

    fn name(&self) -> &str {
        &self.dataset
    }

    fn root(&self) -> Result<PathBuf, Error> {
        let mp = zfs(&["get", "-H", "-o", "value", "mountpoint", &self.dataset])?;
        let mp = mp.trim();
        if !mp.starts_with('/') {
            return Err(Error::WrongType {
                volume: self.dataset.clone(),
                mode: SnapMode::Zfs,
                detail: format!("its mountpoint is '{mp}', so its files cannot be reached"),
            });
        }
        Ok(PathBuf::from(mp))
    }

    fn heights(&self) -> Result<Vec<u64>, Error> {
        let mut hs: Vec<u64> = self
            .all_snapshots_by_txg()?
            .iter()
            .filter_map(|n| self.height_of(n))
            .collect();
        hs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(hs)
    }

    fn list(&self) -> Result<Vec<Snapshot>, Error> {
        let mut snaps = match self.details_modern() {
            Ok(s) => s,
            Err(e) if e.kind == CmdErrorKind::Unsupported => self.details_fallback()?,
            Err(e) => return Err(e.into()),
        };
        snaps.sort_unstable_by_key(|s| std::cmp::Reverse(s.height));
        Ok(snaps)
    }

    fn snapshot(&self, height: u64) -> Result<SnapshotOutcome, Error> {
        if self.heights()?.contains(&height) {
            return Ok(SnapshotOutcome::AlreadyExists);
        }
        match zfs(&["snapshot", &self.snap_name(height)]) {
            Ok(_) => Ok(SnapshotOutcome::Created),
            Err(e) if e.kind == CmdErrorKind::AlreadyExists => Ok(SnapshotOutcome::AlreadyExists),
            Err(e) => Err(e.into()),
        }
    }

    fn destroy(&self, heights: &[u64]) -> DestroyReport {
        let mut report = DestroyReport::default();
        for batch in heights.chunks(DESTROY_BATCH) {
            // OpenZFS destroys `ds@a,b,c` atomically: all or none.
            let list = batch
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let batched =
                batch.len() > 1 && zfs(&["destroy", &format!("{}@{list}", self.dataset)]).is_ok();
            if batched {
                report.destroyed.extend_from_slice(batch);
                continue;
            }
            for &h in batch {
                match self.destroy_one(h) {
                    Ok(()) => report.destroyed.push(h),
                    Err(e) => report.failed.push((h, e)),
                }
            }
        }
        report
    }

    fn switch_effects(&self, enter: &Enter) -> Result<SwitchEffects, Error> {
        self.effects_of(enter)
    }

    fn switch(&self, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error> {
        self.run_switch(sw, progress)
    }

    fn switch_steps(&self) -> &'static [&'static str] {
        branches::STEPS
    }

    fn branches(&self) -> Result<Vec<Branch>, Error> {
        self.kept_branches()
    }

    fn drop_branch(&self, name: &BranchName) -> Result<(), Error> {
        self.drop_kept(name)
    }

    fn release_in_branch(&self, name: &BranchName, height: u64) -> Result<(), Error> {
        let snap = format!("{}@{height}", self.branch_ds(name));
        zfs(&["inherit", PROTECT_PROPERTY, &snap])?;
        Ok(())
    }

    fn cleanup_stale_views(&self) -> Result<(), Error> {
        self.sweep_stale_views()
    }

    fn protections(&self) -> Result<BTreeMap<u64, String>, Error> {
        Ok(self.heights_and_protections()?.1)
    }

    fn heights_and_protections(&self) -> Result<(Vec<u64>, BTreeMap<u64, String>), Error> {
        let (heights, mut labels) = self.labelled_snapshots(&self.dataset)?;
        // A snapshot a branch was cloned from cannot be destroyed while the
        // branch lives: it is held, as if protected, by the branch.
        for (h, branch) in self.held_by_branches()? {
            labels.entry(h).or_insert(format!("branch:{branch}"));
        }
        Ok((heights, labels))
    }

    fn set_protection(&self, height: u64, label: Option<&Label>) -> Result<(), Error> {
        if !self.heights()?.contains(&height) {
            return Err(Error::NoSuchSnapshot(height));
        }
        let snap = self.snap_name(height);
        match label {
            Some(l) => zfs(&["set", &format!("{PROTECT_PROPERTY}={l}"), &snap])?,
            None => zfs(&["inherit", PROTECT_PROPERTY, &snap])?,
        };
        Ok(())
    }

    fn view(&self, height: u64) -> Result<SnapshotView, Error> {
        if !self.heights()?.contains(&height) {
            return Err(Error::NoSuchSnapshot(height));
        }
        let root = self.root()?;
        let snapdir = root.join(".zfs/snapshot").join(height.to_string());
        if snapdir.is_dir() {
            return Ok(SnapshotView::borrowed(snapdir));
        }
        self.sweep_stale_views()?;
        let clone = format!(
            "{}{height}.{}",
            self.view_clone_prefix(),
            std::process::id()
        );
        let leaf = clone.rsplit('/').next().unwrap_or(&clone).to_owned();
        let mountpoint = self.dirs.view_mountpoint(&leaf)?;
        let mp_opt = format!("mountpoint={}", mountpoint.display());
        if let Err(e) = zfs(&[
            "clone",
            "-o",
            "readonly=on",
            "-o",
            &mp_opt,
            &self.snap_name(height),
            &clone,
        ]) {
            let _ = std::fs::remove_dir(&mountpoint);
            return Err(e.into());
        }
        let mp = mountpoint.clone();
        Ok(SnapshotView::with_cleanup(
            mountpoint,
            Box::new(move || {
                destroy_clone(&clone)?;
                let _ = std::fs::remove_dir(&mp);
                Ok(())
            }),
        ))
    }
}

/// Heights (newest first) and protection labels from `zfs list -H -o
/// name,btm:protect` output, keeping the snapshots `height_of` calls
/// btm's. An unset user property lists as `-`.
fn labelled(
    out: &str,
    height_of: impl Fn(&str) -> Option<u64>,
) -> (Vec<u64>, BTreeMap<u64, String>) {
    let mut heights = Vec::new();
    let mut labels = BTreeMap::new();
    for (name, label) in out.lines().filter_map(|l| l.split_once('\t')) {
        let Some(h) = height_of(name.trim()) else {
            continue;
        };
        heights.push(h);
        let label = label.trim();
        if label != "-" && !label.is_empty() {
            labels.insert(h, label.to_owned());
        }
    }
    heights.sort_unstable_by(|a, b| b.cmp(a));
    (heights, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_listing_gives_heights_and_labels() {
        let out = "tank/node@100\t-\ntank/node@250\tupgrade-v2\ntank/node@manual\tkeep\n\
                   tank/node@175\t-\n";
        let (heights, labels) = labelled(out, |n| n.strip_prefix("tank/node@")?.parse().ok());
        assert_eq!(heights, vec![250, 175, 100]);
        assert_eq!(labels, BTreeMap::from([(250, "upgrade-v2".to_owned())]));
    }
}
