//! Switching lines of history that are directory trees: btrfs subvolumes,
//! and the fake volume's plain directories. One implementation of the
//! switch for both, so the fake's failure-injection tests exercise the
//! same steps a real btrfs volume runs.
//!
//! Everything lives in one directory, the *home*, beside the live tree
//! `<base>`, because btrfs cannot move a read-only subvolume to another
//! directory (it would have to rewrite its `..`), only rename it in place:
//! - `<base>@<h>`: the active line's snapshots;
//! - `.<base>.btm-rollback`: the name reserved for the tree being switched
//!   in, so one `renameat2(RENAME_EXCHANGE)` swaps it with the live tree:
//!   the live name is never on nothing;
//! - `<base>.btm-branch.<name>`: a kept line's state, read-only, with its
//!   snapshots `<base>.btm-branch.<name>@<h>` and its record
//!   `.<base>.btm-branch.<name>.json` (when, why, and the fork height);
//! - `<leaf>.btm-protect` beside a protected snapshot, moved along.
//!
//! Steps are found done or not by the identity of the trees (a btrfs
//! subvolume ID, an inode number), recorded in the switch's journal before
//! they can change, so a rerun after a crash skips what is done.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::branch::{self, Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
use super::{parse_height, Error};

/// The steps of [`switch`], in order.
pub const STEPS: &[&str] = &[
    "incoming", "carry", "exchange", "keep", "move-out", "move-in",
];

/// A branch's own record, `.<base>.btm-branch.<name>.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    made: DateTime<Utc>,
    reason: String,
    fork: u64,
}

/// What a driver whose lines are directory trees provides.
pub(crate) trait Trees {
    /// The directory holding the live tree, its snapshots and branches.
    fn home(&self) -> PathBuf;
    /// The live tree's name in it.
    fn base(&self) -> &str;
    /// Heights of the active line, newest first.
    fn active_heights(&self) -> Result<Vec<u64>, Error>;
    /// A stable identity of the tree at `path`, `None` when there is none.
    fn id(&self, path: &Path) -> Result<Option<String>, Error>;
    /// A writable copy of the snapshot at `from`, made at `to`.
    fn writable_copy(&self, from: &Path, to: &Path) -> Result<(), Error>;
    /// Make the tree at `path` read-only or writable again.
    fn set_readonly(&self, path: &Path, readonly: bool) -> Result<(), Error>;
    /// Destroy the tree at `path`.
    fn delete_tree(&self, path: &Path) -> Result<(), Error>;
}

/// The names of one volume's trees in its home.
struct Names<'a>(&'a dyn Trees);

impl Names<'_> {
    fn live(&self) -> PathBuf {
        self.0.home().join(self.0.base())
    }
    fn scratch(&self) -> PathBuf {
        self.0
            .home()
            .join(format!(".{}.btm-rollback", self.0.base()))
    }
    fn snapshot(&self, height: u64) -> PathBuf {
        self.0.home().join(format!("{}@{height}", self.0.base()))
    }
    fn branch_prefix(&self) -> String {
        format!("{}.btm-branch.", self.0.base())
    }
    fn branch(&self, name: &BranchName) -> PathBuf {
        self.0
            .home()
            .join(format!("{}{name}", self.branch_prefix()))
    }
    fn branch_snapshot(&self, name: &BranchName, height: u64) -> PathBuf {
        self.0
            .home()
            .join(format!("{}{name}@{height}", self.branch_prefix()))
    }
    fn branch_record(&self, name: &BranchName) -> PathBuf {
        self.0
            .home()
            .join(format!(".{}{name}.json", self.branch_prefix()))
    }
}

fn leaf(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A snapshot's protection record: a sibling named `<leaf>.btm-protect`.
pub(crate) fn record_of(snapshot: &Path) -> PathBuf {
    snapshot.with_file_name(format!("{}.btm-protect", leaf(snapshot)))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Rename `from` to `to` and its protection record along, unless `to` is
/// there already (a rerun).
fn move_snapshot(from: &Path, to: &Path) -> Result<(), Error> {
    if exists(from) && !exists(to) {
        fs::rename(from, to).map_err(io(from))?;
    }
    let (rf, rt) = (record_of(from), record_of(to));
    if exists(&rf) && !exists(&rt) {
        fs::rename(&rf, &rt).map_err(io(&rf))?;
    }
    Ok(())
}

fn write_record(path: &Path, sw: &Switch) -> Result<(), Error> {
    if exists(path) {
        return Ok(());
    }
    let rec = Record {
        made: sw.made,
        reason: sw.reason.clone(),
        fork: sw.fork,
    };
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(&rec).map_err(|e| Error::io(path, e.into()))?;
    fs::write(&tmp, body)
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(io(path))
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The kept branches, oldest first.
pub(crate) fn branches(t: &dyn Trees) -> Result<Vec<Branch>, Error> {
    let n = Names(t);
    let home = t.home();
    let prefix = n.branch_prefix();
    let record_prefix = format!(".{prefix}");
    let mut names = std::collections::BTreeSet::new();
    for entry in fs::read_dir(&home).map_err(io(&home))? {
        let leaf = entry.map_err(io(&home))?.file_name();
        let Some(leaf) = leaf.to_str() else { continue };
        let name = if let Some(r) = leaf.strip_prefix(&record_prefix) {
            r.strip_suffix(".json")
        } else if let Some(r) = leaf.strip_prefix(&prefix) {
            (!r.ends_with(".btm-protect")).then(|| r.split('@').next().unwrap_or(r))
        } else {
            None
        };
        if let Some(name) = name.and_then(|r| r.parse::<BranchName>().ok()) {
            names.insert(name);
        }
    }
    let mut out = Vec::new();
    for name in names {
        out.push(branch_at(t, &name)?);
    }
    out.sort_by(|a, b| (a.made, &a.name).cmp(&(b.made, &b.name)));
    Ok(out)
}

fn branch_at(t: &dyn Trees, name: &BranchName) -> Result<Branch, Error> {
    let n = Names(t);
    let rec = read_record(&n.branch_record(name));
    let home = t.home();
    let snap_prefix = format!("{}{name}@", n.branch_prefix());
    let mut heights = Vec::new();
    let mut protected = std::collections::BTreeMap::new();
    for entry in fs::read_dir(&home).map_err(io(&home))? {
        let entry = entry.map_err(io(&home))?;
        let leaf = entry.file_name().to_string_lossy().into_owned();
        let Some(h) = height_after(&leaf, &snap_prefix) else {
            continue;
        };
        if t.id(&entry.path())?.is_none() {
            continue;
        }
        heights.push(h);
        if let Ok(label) = fs::read_to_string(record_of(&entry.path())) {
            if !label.trim().is_empty() {
                protected.insert(h, label.trim().to_owned());
            }
        }
    }
    heights.sort_unstable_by(|a, b| b.cmp(a));
    let live = n.branch(name);
    Ok(Branch {
        made: rec.as_ref().map(|r| r.made),
        reason: rec.as_ref().map(|r| r.reason.clone()),
        fork: rec.as_ref().map(|r| r.fork),
        intact: rec.is_some() && t.id(&live)?.is_some(),
        heights,
        protected,
        used: None,
        location: live.display().to_string(),
        name: name.clone(),
    })
}

fn find(t: &dyn Trees, name: &BranchName) -> Result<Branch, Error> {
    let b = branch_at(t, name)?;
    if b.made.is_none() && b.heights.is_empty() && !b.intact && !exists(Path::new(&b.location)) {
        return Err(Error::NoSuchBranch(name.clone()));
    }
    Ok(b)
}

/// What switching to `enter` would do.
pub(crate) fn effects(t: &dyn Trees, enter: &Enter) -> Result<SwitchEffects, Error> {
    let heights = t.active_heights()?;
    let (fork, moves_in) = match enter {
        Enter::Snapshot { height } => {
            if !heights.contains(height) {
                return Err(Error::NoSuchSnapshot(*height));
            }
            (*height, Vec::new())
        }
        Enter::Branch { name } => {
            let b = find(t, name)?;
            let (Some(fork), true) = (b.fork, b.intact) else {
                return Err(Error::BranchDamaged {
                    name: name.clone(),
                    location: b.location.clone(),
                });
            };
            (fork, b.heights)
        }
    };
    let moves_out: Vec<u64> = heights.into_iter().filter(|&h| h > fork).collect();
    Ok(SwitchEffects {
        enter: enter.clone(),
        fork,
        moves_out,
        moves_in,
        kept_bytes: None,
        foreign_blockers: Vec::new(),
    })
}

/// Run or finish `sw` (see [`super::Volume::switch`]).
pub(crate) fn switch(
    t: &dyn Trees,
    sw: &mut Switch,
    progress: &mut dyn Progress,
) -> Result<(), Error> {
    let n = Names(t);
    let live = n.live();
    let scratch = n.scratch();
    let carried = sw.carried()?;
    if !sw.notes.contains_key("out") {
        let id = t
            .id(&live)?
            .ok_or_else(|| Error::NotFound(live.display().to_string()))?;
        sw.notes.insert("out".into(), id);
        progress.record(sw)?;
    }
    let out = sw.notes.get("out").cloned();
    if t.id(&live)? == out {
        incoming(t, sw, progress)?;
        progress.step("incoming")?;
        branch::carry_across(&live, &scratch, &carried)?;
        progress.step("carry")?;
        let home = t.home();
        let dir = fs::File::open(&home).map_err(io(&home))?;
        crate::sys::rename_exchange(&dir, leaf(&scratch).as_ref(), leaf(&live).as_ref())
            .map_err(|errno| Error::io(&live, std::io::Error::from(errno)))?;
        progress.step("exchange")?;
    } else if t.id(&live)? != sw.notes.get("in").cloned() {
        return Err(Error::Unbranchable {
            volume: live.display().to_string(),
            detail: "it is neither the line the interrupted switch left nor the one it entered; \
                     it was changed by hand"
                .into(),
        });
    }
    let kept = n.branch(&sw.keep_as);
    write_record(&n.branch_record(&sw.keep_as), sw)?;
    if t.id(&scratch)? == out {
        fs::rename(&scratch, &kept).map_err(io(&scratch))?;
    }
    if t.id(&kept)? == out {
        t.set_readonly(&kept, true)?;
    }
    progress.step("keep")?;
    for &h in &sw.moves_out {
        move_snapshot(&n.snapshot(h), &n.branch_snapshot(&sw.keep_as, h))?;
    }
    progress.step("move-out")?;
    if let Enter::Branch { name } = &sw.enter {
        let b = branch_at(t, name)?;
        for h in b.heights {
            move_snapshot(&n.branch_snapshot(name, h), &n.snapshot(h))?;
        }
        let record = n.branch_record(name);
        if exists(&record) {
            fs::remove_file(&record).map_err(io(&record))?;
        }
    }
    progress.step("move-in")?;
    Ok(())
}

/// Put the tree being switched in at the scratch name, writable, and note
/// its identity.
fn incoming(t: &dyn Trees, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error> {
    let n = Names(t);
    let scratch = n.scratch();
    let recorded = sw.notes.get("in").cloned();
    let at_scratch = t.id(&scratch)?;
    if recorded.is_some() && at_scratch == recorded {
        return t.set_readonly(&scratch, false);
    }
    match &sw.enter {
        Enter::Snapshot { height } => {
            // The reserved name holds a copy an interrupted switch made
            // before it could note it: nothing but a copy of a snapshot.
            if at_scratch.is_some() {
                t.delete_tree(&scratch)?;
            }
            t.writable_copy(&n.snapshot(*height), &scratch)?;
        }
        Enter::Branch { name } => {
            let from = n.branch(name);
            let damaged = || Error::BranchDamaged {
                name: name.clone(),
                location: from.display().to_string(),
            };
            let id = t.id(&from)?.ok_or_else(damaged)?;
            if recorded.as_ref().is_some_and(|r| *r != id) {
                return Err(damaged());
            }
            if at_scratch.is_some() {
                t.delete_tree(&scratch)?;
            }
            sw.notes.insert("in".into(), id);
            progress.record(sw)?;
            fs::rename(&from, &scratch).map_err(io(&from))?;
        }
    }
    let id = t
        .id(&scratch)?
        .ok_or_else(|| Error::NotFound(scratch.display().to_string()))?;
    sw.notes.insert("in".into(), id);
    progress.record(sw)?;
    t.set_readonly(&scratch, false)
}

/// Destroy branch `name`: its snapshots, its live state, its records.
pub(crate) fn drop_branch(t: &dyn Trees, name: &BranchName) -> Result<(), Error> {
    let n = Names(t);
    let b = find(t, name)?;
    for h in &b.heights {
        let snap = n.branch_snapshot(name, *h);
        t.delete_tree(&snap)?;
        let _ = fs::remove_file(record_of(&snap));
    }
    let live = n.branch(name);
    if t.id(&live)?.is_some() {
        t.delete_tree(&live)?;
    }
    let record = n.branch_record(name);
    match fs::remove_file(&record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&record, e)),
        _ => Ok(()),
    }
}

/// Remove the protection of branch `name`'s snapshot at `height`.
pub(crate) fn release(t: &dyn Trees, name: &BranchName, height: u64) -> Result<(), Error> {
    let record = record_of(&Names(t).branch_snapshot(name, height));
    match fs::remove_file(&record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&record, e)),
        _ => Ok(()),
    }
}

/// Whether `leaf` is `<prefix><height>` with a canonical height.
pub(crate) fn height_after(leaf: &str, prefix: &str) -> Option<u64> {
    leaf.strip_prefix(prefix).and_then(parse_height)
}
