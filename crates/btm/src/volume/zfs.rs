//! ZFS datasets, through the `zfs` command.
//!
//! The `zfs` CLI is the stable interface of ZFS; libzfs has no stable ABI.
//! Commands are written for modern OpenZFS and fall back where the installed
//! tool lacks a feature (zfs-fuse, pool version 23, has no `list -p`, no
//! comma-separated batch destroy and no `.zfs` directory); each fallback is
//! exercised by the test suite on zfs-fuse.
//!
//! A rollback destroys nothing. As ZFS boot environments do, it clones the
//! target snapshot and promotes the clone, so the new line owns the shared
//! history; the line it leaves (its live state and newer snapshots) is
//! renamed to a sibling `<dataset>.btm-branch.<name>`, never mounted, and
//! the clone takes the dataset's name, local properties and mount point.
//! ZFS cannot exchange two names in one step: between the two renames the
//! name is on neither line, and a rerun of the same command finishes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::branch::{self, Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
use super::cmd::{self, CmdError, CmdErrorKind};
use super::{
    parse_height, DestroyReport, Error, Label, SnapMode, Snapshot, SnapshotOutcome, SnapshotView,
    Volume,
};
use crate::preserve;

/// How many snapshot names go into one `zfs destroy a@1,2,3` call.
const DESTROY_BATCH: usize = 64;
/// The ZFS user property holding a snapshot's protection label (visible to
/// other tools: `zfs get btm:protect`).
const PROTECT_PROPERTY: &str = "btm:protect";

/// Prefix of the temporary clones that serve as read-only snapshot views.
const VIEW_PREFIX: &str = "btm-view.";

/// Between the dataset's name and a branch's name in the branch dataset's.
const BRANCH_INFIX: &str = ".btm-branch.";
/// Suffix of the clone being switched in by a rollback.
const INCOMING_SUFFIX: &str = ".btm-incoming";
/// User properties a kept branch carries: when, why, and its fork height.
const BRANCH_MADE: &str = "btm:branch-made";
const BRANCH_REASON: &str = "btm:branch-reason";
const BRANCH_FORK: &str = "btm:branch-fork";
/// The steps of a switch, in order.
const STEPS: &[&str] = &[
    "stash",
    "clone",
    "promote",
    "mark",
    "unmount",
    "rename-out",
    "rename-in",
    "mount",
    "carry",
];
/// Below this many bytes available, a switch is refused before it starts:
/// a clone, a promote and property changes all need a little space.
const MIN_AVAILABLE: u64 = 1 << 20;
/// Local properties never copied to the line switched in: set at creation
/// only, or managed by the switch itself.
const NOT_COPIED: &[&str] = &[
    "canmount",
    "encryption",
    "keyformat",
    "keylocation",
    "pbkdf2iters",
    "casesensitivity",
    "normalization",
    "utf8only",
    BRANCH_MADE,
    BRANCH_REASON,
    BRANCH_FORK,
];

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
        let out = zfs(&[
            "list",
            "-H",
            "-o",
            "name,origin",
            "-t",
            "filesystem",
            "-d",
            "1",
            self.pool(),
        ])?;
        let prefix = self.view_clone_prefix();
        for line in out.lines() {
            let Some((name, origin)) = line.split_once('\t') else {
                continue;
            };
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

impl ZfsVolume {
    fn branch_ds(&self, name: &BranchName) -> String {
        format!("{}{BRANCH_INFIX}{name}", self.dataset)
    }

    fn incoming_ds(&self) -> String {
        format!("{}{INCOMING_SUFFIX}", self.dataset)
    }

    fn parent(&self) -> Result<&str, Error> {
        self.dataset
            .rsplit_once('/')
            .map(|(p, _)| p)
            .ok_or_else(|| Error::Unbranchable {
                volume: self.dataset.clone(),
                detail: "a pool's root dataset has no sibling for the branch a rollback keeps; \
                         keep the node's data in a child dataset"
                    .into(),
            })
    }

    /// This dataset's siblings and itself, with their guids.
    fn siblings(&self) -> Result<Vec<(String, String)>, Error> {
        let out = zfs(&[
            "list",
            "-H",
            "-o",
            "name,guid",
            "-t",
            "filesystem",
            "-d",
            "1",
            self.parent()?,
        ])?;
        let prefix = self.dataset.as_str();
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, g)| (n.to_owned(), g.trim().to_owned()))
            .collect())
    }

    fn get(&self, ds: &str, prop: &str) -> Result<String, Error> {
        Ok(zfs(&["get", "-H", "-o", "value", prop, ds])?
            .trim()
            .to_owned())
    }

    /// Heights of the active line that kept branches were cloned from.
    fn held_by_branches(&self) -> Result<Vec<(u64, String)>, Error> {
        let Ok(parent) = self.parent() else {
            return Ok(Vec::new());
        };
        let out = zfs(&[
            "list",
            "-H",
            "-o",
            "name,origin",
            "-t",
            "filesystem",
            "-d",
            "1",
            parent,
        ])?;
        let prefix = format!("{}{BRANCH_INFIX}", self.dataset);
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter_map(|(name, origin)| {
                let branch = name.strip_prefix(&prefix)?;
                Some((self.height_of(origin.trim())?, branch.to_owned()))
            })
            .collect())
    }

    /// Properties set on `ds` itself, except those a switch manages.
    fn local_props(&self, ds: &str) -> Result<Vec<(String, String)>, Error> {
        let out = zfs(&[
            "get",
            "-H",
            "-s",
            "local",
            "-o",
            "property,value",
            "all",
            ds,
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(k, _)| !NOT_COPIED.contains(k))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// Bytes written since the snapshot at `height` (what a rollback to
    /// it keeps in the branch), where the tool reports it.
    fn written_since(&self, height: u64) -> Option<u64> {
        let prop = format!("written@{height}");
        zfs(&["get", "-Hp", "-o", "value", &prop, &self.dataset])
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Refuse, before anything changes, a volume whose switch could not be
    /// made safely: no room for a clone, child datasets (they would move
    /// with the kept line), or a clone of something btm did not make.
    fn check_branchable(&self) -> Result<(), Error> {
        self.parent()?;
        let available: u64 = zfs(&["get", "-Hp", "-o", "value", "available", &self.dataset])?
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        if available < MIN_AVAILABLE {
            return Err(Error::NoSpace {
                volume: self.dataset.clone(),
                available,
            });
        }
        let out = zfs(&["list", "-H", "-o", "name", "-r", "-d", "1", &self.dataset])?;
        let children: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|n| *n != self.dataset && !n.contains('@'))
            .collect();
        if !children.is_empty() {
            return Err(Error::Unbranchable {
                volume: self.dataset.clone(),
                detail: format!(
                    "it has child datasets ({}), which would move with the line a rollback keeps",
                    children.join(", ")
                ),
            });
        }
        let origin = self.get(&self.dataset, "origin")?;
        let origin_ds = origin.split('@').next().unwrap_or("");
        let ours = origin == "-"
            || origin_ds.starts_with(&format!("{}{BRANCH_INFIX}", self.dataset))
            || origin_ds == self.incoming_ds();
        if !ours {
            return Err(Error::Unbranchable {
                volume: self.dataset.clone(),
                detail: format!("it is a clone of {origin}, which btm did not make"),
            });
        }
        Ok(())
    }

    fn run_switch(&self, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error> {
        let ds = self.dataset.clone();
        let kept = self.branch_ds(&sw.keep_as);
        let carried = sw.carried()?;
        if !sw.notes.contains_key("out") {
            sw.notes.insert("out".into(), self.get(&ds, "guid")?);
            sw.notes
                .insert("canmount".into(), self.get(&ds, "canmount")?);
            progress.record(sw)?;
        }
        if sw.stash.is_none() && !carried.is_empty() {
            let root = self.root()?;
            let present: Vec<_> = carried
                .iter()
                .map(|(p, _)| p.clone())
                .filter(|p| std::fs::symlink_metadata(root.join(p.as_path())).is_ok())
                .collect();
            let dir = self.dirs.preserve_stash(&ds)?;
            preserve::copy_into(&root, &dir, &present)?;
            sw.stash = Some(dir);
            progress.record(sw)?;
        }
        progress.step("stash")?;
        if !sw.notes.contains_key("in") {
            let incoming = match &sw.enter {
                Enter::Snapshot { height } => self.clone_incoming(*height)?,
                Enter::Branch { name } => self.branch_ds(name),
            };
            let guid = self
                .get(&incoming, "guid")
                .map_err(|e| match (&sw.enter, e) {
                    (Enter::Branch { name }, Error::Command(c))
                        if c.kind == CmdErrorKind::NotFound =>
                    {
                        Error::NoSuchBranch(name.clone())
                    }
                    (_, e) => e,
                })?;
            sw.notes.insert("in".into(), guid);
            progress.record(sw)?;
        }
        progress.step("clone")?;
        let (in_name, out_name) = self.locate(sw)?;
        self.promote_fully(&in_name, &kept)?;
        progress.step("promote")?;
        let marks = [
            (BRANCH_MADE, sw.made.to_rfc3339()),
            (BRANCH_REASON, sw.reason.clone()),
            (BRANCH_FORK, sw.fork.to_string()),
            ("canmount", "noauto".to_owned()),
        ];
        for (k, v) in marks {
            if self.get(&out_name, k)? != v {
                zfs(&["set", &format!("{k}={v}"), &out_name])?;
            }
        }
        progress.step("mark")?;
        // The incoming line too: zfs-fuse mounts a clone whatever its
        // canmount, and a mounted dataset cannot be renamed.
        // Once it has the name (a rerun), it stays mounted.
        let switched = in_name == ds;
        for name in [&out_name, &in_name] {
            let entered = switched && *name == in_name;
            if !entered && self.get(name, "mounted")? == "yes" {
                zfs_retrying(&["unmount", name])?;
            }
        }
        progress.step("unmount")?;
        if out_name == ds {
            zfs_retrying(&["rename", &ds, &kept])?;
        }
        progress.step("rename-out")?;
        if in_name != ds {
            zfs_retrying(&["rename", &in_name, &ds])?;
        }
        progress.step("rename-in")?;
        self.settle(&kept, sw.notes.get("canmount").map_or("on", String::as_str))?;
        progress.step("mount")?;
        if let Some(stash) = &sw.stash {
            branch::carry_across(stash, &self.root()?, &carried)?;
            let _ = std::fs::remove_dir_all(stash);
        }
        progress.step("carry")?;
        Ok(())
    }

    /// Clone the snapshot at `height` as the incoming line, with the
    /// dataset's local properties and never mounted until it has the name.
    /// One left by an interrupted switch is taken as it is.
    fn clone_incoming(&self, height: u64) -> Result<String, Error> {
        let incoming = self.incoming_ds();
        let snap = self.snap_name(height);
        if self.siblings()?.iter().any(|(n, _)| *n == incoming) {
            let origin = self.get(&incoming, "origin")?;
            if origin == snap {
                return Ok(incoming);
            }
            return Err(Error::Unbranchable {
                volume: self.dataset.clone(),
                detail: format!("{incoming} exists and is not a clone of {snap}; remove it"),
            });
        }
        let mut args = vec![
            "clone".to_owned(),
            "-o".to_owned(),
            "canmount=noauto".to_owned(),
        ];
        for (k, v) in self.local_props(&self.dataset)? {
            args.push("-o".into());
            args.push(format!("{k}={v}"));
        }
        args.push(snap);
        args.push(incoming.clone());
        zfs(&args)?;
        Ok(incoming)
    }

    /// The current names of the two lines of `sw`, by guid.
    fn locate(&self, sw: &Switch) -> Result<(String, String), Error> {
        let sib = self.siblings()?;
        let find = |key: &str| {
            let guid = sw.notes.get(key)?;
            sib.iter().find(|(_, g)| g == guid).map(|(n, _)| n.clone())
        };
        match (find("in"), find("out")) {
            (Some(i), Some(o)) => Ok((i, o)),
            _ => Err(Error::Unbranchable {
                volume: self.dataset.clone(),
                detail: "a dataset of the interrupted switch is gone (destroyed by hand?)".into(),
            }),
        }
    }

    /// Promote `ds` until it owns its whole history (no longer a clone of
    /// this volume's lines), so the active line lists every snapshot it
    /// descends from.
    fn promote_fully(&self, ds: &str, kept: &str) -> Result<(), Error> {
        let branch_prefix = format!("{}{BRANCH_INFIX}", self.dataset);
        for _ in 0..64 {
            let origin = self.get(ds, "origin")?;
            let origin_ds = origin.split('@').next().unwrap_or("");
            let ours = origin_ds == self.dataset
                || origin_ds == kept
                || origin_ds.starts_with(&branch_prefix)
                || origin_ds == self.incoming_ds();
            if origin == "-" || !ours {
                return Ok(());
            }
            zfs_retrying(&["promote", ds])?;
        }
        Err(Error::Unbranchable {
            volume: self.dataset.clone(),
            detail: format!("{ds} could not be promoted over its origins"),
        })
    }

    /// Give the line now named as the dataset the kept line's local
    /// properties and its mount state.
    fn settle(&self, kept: &str, canmount: &str) -> Result<(), Error> {
        let ds = &self.dataset;
        for (k, v) in self.local_props(kept)? {
            if self.get(ds, &k)? != v {
                zfs(&["set", &format!("{k}={v}"), ds])?;
            }
        }
        for k in [BRANCH_MADE, BRANCH_REASON, BRANCH_FORK] {
            if self.get(ds, k)? != "-" {
                zfs(&["inherit", k, ds])?;
            }
        }
        if self.get(ds, "canmount")? != canmount {
            zfs(&["set", &format!("canmount={canmount}"), ds])?;
        }
        let mountpoint = self.get(ds, "mountpoint")?;
        if canmount == "on" && mountpoint.starts_with('/') && self.get(ds, "mounted")? != "yes" {
            zfs_retrying(&["mount", ds])?;
        }
        Ok(())
    }
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
            Err(e) if e.kind.is_temporary() && attempt < 12 => {
                tracing::debug!(?args, attempt, "dataset busy, retrying");
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
        self.check_branchable()?;
        let (fork, moves_in) = match enter {
            Enter::Snapshot { height } => (*height, Vec::new()),
            Enter::Branch { name } => {
                let b = self
                    .branches()?
                    .into_iter()
                    .find(|b| &b.name == name)
                    .ok_or_else(|| Error::NoSuchBranch(name.clone()))?;
                let fork = b.fork.ok_or_else(|| Error::BranchDamaged {
                    name: name.clone(),
                    location: format!("{} (its {BRANCH_FORK} property)", b.location),
                })?;
                (fork, b.heights)
            }
        };
        let all = self.all_snapshots_by_txg()?;
        let fork_name = self.snap_name(fork);
        let pos = all.iter().position(|n| *n == fork_name);
        if pos.is_none() && matches!(enter, Enter::Snapshot { .. }) {
            return Err(Error::NoSuchSnapshot(fork));
        }
        let mut fx = SwitchEffects {
            enter: enter.clone(),
            fork,
            moves_out: Vec::new(),
            moves_in,
            kept_bytes: self.written_since(fork),
            foreign_blockers: Vec::new(),
        };
        for name in pos.map(|p| &all[p + 1..]).unwrap_or_default() {
            match self.height_of(name) {
                Some(h) => fx.moves_out.push(h),
                None => fx.foreign_blockers.push(name.clone()),
            }
        }
        fx.moves_out.sort_unstable_by(|a, b| b.cmp(a));
        Ok(fx)
    }

    fn switch(&self, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error> {
        self.run_switch(sw, progress)
    }

    fn switch_steps(&self) -> &'static [&'static str] {
        STEPS
    }

    fn branches(&self) -> Result<Vec<Branch>, Error> {
        let prefix = format!("{}{BRANCH_INFIX}", self.dataset);
        let mut out = Vec::new();
        for (name, _) in self.siblings()? {
            let Some(bname) = name
                .strip_prefix(&prefix)
                .and_then(|n| n.parse::<BranchName>().ok())
            else {
                continue;
            };
            let props = zfs(&[
                "get",
                "-Hp",
                "-o",
                "property,value",
                &format!("{BRANCH_MADE},{BRANCH_REASON},{BRANCH_FORK},used"),
                &name,
            ])?;
            let mut b = Branch {
                name: bname,
                made: None,
                reason: None,
                fork: None,
                heights: Vec::new(),
                protected: BTreeMap::new(),
                used: None,
                location: name.clone(),
                intact: true,
            };
            for (k, v) in props.lines().filter_map(|l| l.split_once('\t')) {
                let v = v.trim();
                match k {
                    BRANCH_MADE => {
                        b.made = DateTime::parse_from_rfc3339(v).ok().map(|t| t.to_utc())
                    }
                    BRANCH_REASON if v != "-" => b.reason = Some(v.to_owned()),
                    BRANCH_FORK => b.fork = parse_height(v),
                    "used" => b.used = v.parse().ok(),
                    _ => {}
                }
            }
            let listing = zfs(&[
                "list",
                "-H",
                "-t",
                "snapshot",
                "-o",
                &format!("name,{PROTECT_PROPERTY}"),
                "-d",
                "1",
                &name,
            ])?;
            let snap_prefix = format!("{name}@");
            (b.heights, b.protected) = labelled(&listing, |n| {
                n.strip_prefix(&snap_prefix).and_then(parse_height)
            });
            out.push(b);
        }
        out.sort_by(|a, b| (a.made, &a.name).cmp(&(b.made, &b.name)));
        Ok(out)
    }

    fn drop_branch(&self, name: &BranchName) -> Result<(), Error> {
        let b = self.branch_ds(name);
        if !self.siblings()?.iter().any(|(n, _)| *n == b) {
            return Err(Error::NoSuchBranch(name.clone()));
        }
        // Lines that share history with this one through its snapshots
        // take that history over first, so destroying it takes nothing
        // from them.
        let out = zfs(&[
            "list",
            "-H",
            "-o",
            "name,origin",
            "-t",
            "filesystem",
            "-r",
            self.pool(),
        ])?;
        let origin_prefix = format!("{b}@");
        for (dep, origin) in out.lines().filter_map(|l| l.split_once('\t')) {
            if !origin.trim().starts_with(&origin_prefix) {
                continue;
            }
            let ours =
                dep == self.dataset || dep.starts_with(&format!("{}{BRANCH_INFIX}", self.dataset));
            if !ours {
                return Err(Error::Unbranchable {
                    volume: self.dataset.clone(),
                    detail: format!(
                        "branch '{name}' cannot be dropped while {dep} (not a branch) is a clone of its snapshot {}",
                        origin.trim()
                    ),
                });
            }
            zfs(&["promote", dep])?;
        }
        zfs(&["destroy", "-r", &b])?;
        Ok(())
    }

    fn cleanup_stale_views(&self) -> Result<(), Error> {
        self.sweep_stale_views()
    }

    fn protections(&self) -> Result<BTreeMap<u64, String>, Error> {
        Ok(self.heights_and_protections()?.1)
    }

    fn heights_and_protections(&self) -> Result<(Vec<u64>, BTreeMap<u64, String>), Error> {
        let out = zfs(&[
            "list",
            "-H",
            "-t",
            "snapshot",
            "-o",
            &format!("name,{PROTECT_PROPERTY}"),
            "-d",
            "1",
            &self.dataset,
        ])?;
        let (heights, mut labels) = labelled(&out, |name| self.height_of(name));
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
