//! Branches of a ZFS dataset: how a rollback keeps the line it leaves.
//!
//! As ZFS boot environments do, a rollback clones the target snapshot and
//! promotes the clone, so the new line owns the shared history; the line it
//! leaves (its live state and newer snapshots) is renamed to a sibling
//! `<dataset>.btm-branch.<name>`, never mounted, and the clone takes the
//! dataset's name, local properties and mount point. ZFS cannot exchange
//! two names in one step: between the two renames the name is on neither
//! line, and a rerun of the same command finishes.

use std::collections::BTreeMap;

use chrono::DateTime;

use super::{zfs, zfs_retrying, ZfsVolume};
use crate::preserve;
use crate::volume::branch::{self, Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
use crate::volume::cmd::CmdErrorKind;
use crate::volume::{parse_height, Error, Volume};

/// Between the dataset's name and a branch's name in the branch dataset's.
pub(super) const BRANCH_INFIX: &str = ".btm-branch.";
/// Suffix of the clone being switched in by a rollback.
pub(super) const INCOMING_SUFFIX: &str = ".btm-incoming";
/// User properties a kept branch carries: when, why, and its fork height.
const BRANCH_MADE: &str = "btm:branch-made";
const BRANCH_REASON: &str = "btm:branch-reason";
const BRANCH_FORK: &str = "btm:branch-fork";
/// The steps of a switch, in order.
pub(super) const STEPS: &[&str] = &[
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

impl ZfsVolume {
    /// See [`Volume::switch_effects`].
    pub(super) fn effects_of(&self, enter: &Enter) -> Result<SwitchEffects, Error> {
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

    /// See [`Volume::branches`].
    pub(super) fn kept_branches(&self) -> Result<Vec<Branch>, Error> {
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
            (b.heights, b.protected) = self.labelled_snapshots(&name)?;
            out.push(b);
        }
        out.sort_by(|a, b| (a.made, &a.name).cmp(&(b.made, &b.name)));
        Ok(out)
    }

    /// See [`Volume::drop_branch`].
    pub(super) fn drop_kept(&self, name: &BranchName) -> Result<(), Error> {
        let b = self.branch_ds(name);
        if !self.siblings()?.iter().any(|(n, _)| *n == b) {
            return Err(Error::NoSuchBranch(name.clone()));
        }
        // Lines that share history with this one through its snapshots
        // take that history over first, so destroying it takes nothing
        // from them.
        let origin_prefix = format!("{b}@");
        for (dep, origin) in super::origins(&["-r", self.pool()])? {
            if !origin.starts_with(&origin_prefix) {
                continue;
            }
            let ours =
                dep == self.dataset || dep.starts_with(&format!("{}{BRANCH_INFIX}", self.dataset));
            if !ours {
                return Err(Error::Unbranchable {
                    volume: self.dataset.clone(),
                    detail: format!(
                        "branch '{name}' cannot be dropped while {dep} (not a branch) is a clone of its snapshot {origin}"
                    ),
                });
            }
            zfs(&["promote", &dep])?;
        }
        zfs(&["destroy", "-r", &b])?;
        Ok(())
    }

    pub(super) fn branch_ds(&self, name: &BranchName) -> String {
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
    ///
    /// Exact guids (`get -p`): without it older ZFS (zfs-fuse's pool
    /// version 23 among them) prints a guid as "5.95E", three digits, and
    /// two lines of a volume with a few branches then share one often
    /// enough that a switch took a branch for its incoming line. `zfs list`
    /// there has no `-p`; `zfs get` has, and `-d 1` from the parent gives
    /// the siblings and the parent's snapshots, left out here.
    fn siblings(&self) -> Result<Vec<(String, String)>, Error> {
        let out = zfs(&[
            "get",
            "-H",
            "-p",
            "-o",
            "name,value",
            "-d",
            "1",
            "guid",
            self.parent()?,
        ])?;
        let prefix = self.dataset.as_str();
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(n, _)| n.starts_with(prefix) && !n.contains('@'))
            .map(|(n, g)| (n.to_owned(), g.trim().to_owned()))
            .collect())
    }

    /// Property `prop` of `ds`; numbers exact (`-p`), guids among them.
    fn get(&self, ds: &str, prop: &str) -> Result<String, Error> {
        Ok(zfs(&["get", "-H", "-p", "-o", "value", prop, ds])?
            .trim()
            .to_owned())
    }

    /// Heights of the active line that kept branches were cloned from.
    pub(super) fn held_by_branches(&self) -> Result<Vec<(u64, String)>, Error> {
        let Ok(parent) = self.parent() else {
            return Ok(Vec::new());
        };
        let prefix = format!("{}{BRANCH_INFIX}", self.dataset);
        Ok(super::origins_below(parent)?
            .into_iter()
            .filter_map(|(name, origin)| {
                let branch = name.strip_prefix(&prefix)?;
                Some((self.height_of(&origin)?, branch.to_owned()))
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

    pub(super) fn run_switch(
        &self,
        sw: &mut Switch,
        progress: &mut dyn Progress,
    ) -> Result<(), Error> {
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
            sw.stash = Some(self.stash(&carried)?);
            progress.record(sw)?;
        }
        progress.step("stash")?;
        if !sw.notes.contains_key("in") {
            let guid = self.incoming_guid(&sw.enter)?;
            sw.notes.insert("in".into(), guid);
            progress.record(sw)?;
        }
        progress.step("clone")?;
        let (in_name, out_name) = self.locate(sw)?;
        self.promote_fully(&in_name, &kept)?;
        progress.step("promote")?;
        self.mark_kept(&out_name, sw)?;
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
            super::rename(&ds, &kept)?;
        }
        progress.step("rename-out")?;
        if in_name != ds {
            super::rename(&in_name, &ds)?;
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

    /// Copy the carried files the leaving line has into a fresh stash,
    /// while it is still mounted.
    fn stash(
        &self,
        carried: &[(crate::preserve::RelPath, bool)],
    ) -> Result<std::path::PathBuf, Error> {
        let root = self.root()?;
        let present: Vec<_> = carried
            .iter()
            .map(|(p, _)| p.clone())
            .filter(|p| std::fs::symlink_metadata(root.join(p.as_path())).is_ok())
            .collect();
        let dir = self.dirs.preserve_stash(&self.dataset)?;
        preserve::copy_into(&root, &dir, &present)?;
        Ok(dir)
    }

    /// The guid of the line being switched in: a new clone of the target
    /// snapshot, or the branch.
    fn incoming_guid(&self, enter: &Enter) -> Result<String, Error> {
        let incoming = match enter {
            Enter::Snapshot { height } => self.clone_incoming(*height)?,
            Enter::Branch { name } => self.branch_ds(name),
        };
        self.get(&incoming, "guid").map_err(|e| match (enter, e) {
            (Enter::Branch { name }, Error::Command(c)) if c.kind == CmdErrorKind::NotFound => {
                Error::NoSuchBranch(name.clone())
            }
            (_, e) => e,
        })
    }

    /// Mark the line being left as a kept branch that is never mounted.
    fn mark_kept(&self, out_name: &str, sw: &Switch) -> Result<(), Error> {
        let marks = [
            (BRANCH_MADE, sw.made.to_rfc3339()),
            (BRANCH_REASON, sw.reason.clone()),
            (BRANCH_FORK, sw.fork.to_string()),
            ("canmount", "noauto".to_owned()),
        ];
        for (k, v) in marks {
            if self.get(out_name, k)? != v {
                zfs(&["set", &format!("{k}={v}"), out_name])?;
            }
        }
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
