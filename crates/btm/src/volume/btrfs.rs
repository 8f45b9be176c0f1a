//! btrfs subvolumes, through `btrfs-progs`.
//!
//! A snapshot of `/data/chain` at height 120 is the read-only sibling
//! subvolume `/data/chain@120`, as in the original btm. Listing reads the
//! parent directory (no command needed just for heights); details come from
//! `btrfs subvolume show`, and space used from quota groups when enabled.
//!
//! A rollback never leaves the volume path missing and destroys nothing: a
//! writable snapshot of the target is prepared beside the live subvolume,
//! the two are swapped with one atomic `renameat2(RENAME_EXCHANGE)`, and
//! the old live subvolume is kept read-only as a branch with the newer
//! snapshots, renamed beside it to `<name>.btm-branch.<branch>`
//! (`volume::lines`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::branch::{Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
use super::cmd::{self, CmdError, CmdErrorKind};
use super::lines::{self, Trees};
use super::{
    parse_height, DestroyReport, Error, Label, SnapMode, Snapshot, SnapshotOutcome, SnapshotView,
    Volume,
};

/// The inode number of every btrfs subvolume's root directory.
const SUBVOLUME_ROOT_INO: u64 = 256;

fn btrfs<S: AsRef<str>>(args: &[S]) -> Result<String, CmdError> {
    cmd::run("btrfs", args)
}

fn path_str(p: &Path) -> Result<&str, Error> {
    p.to_str().ok_or_else(|| Error::InvalidName {
        name: p.display().to_string(),
        reason: "it is not valid UTF-8".into(),
    })
}

/// A btrfs subvolume.
#[derive(Debug, Clone)]
pub struct BtrfsVolume {
    path: PathBuf,
    name: String,
    parent: PathBuf,
    base: String,
}

impl BtrfsVolume {
    /// Open an existing subvolume by path. Only reads.
    pub fn open(volume: &str) -> Result<Self, Error> {
        let path = fs::canonicalize(volume).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(volume.to_owned()),
            _ => Error::io(volume, e),
        })?;
        let name = path_str(&path)?.to_owned();
        super::validate_name(&name)?;
        let wrong = |detail: String| Error::WrongType {
            volume: volume.to_owned(),
            mode: SnapMode::Btrfs,
            detail,
        };
        let (Some(parent), Some(base)) = (path.parent(), path.file_name()) else {
            return Err(wrong(
                "the filesystem root has no sibling directory for snapshots".into(),
            ));
        };
        let base = base.to_string_lossy().into_owned();
        if let Some((_, h)) = base.rsplit_once('@') {
            if parse_height(h).is_some() {
                return Err(wrong("it is itself a btm snapshot".into()));
            }
        }
        let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if !meta.is_dir() {
            return Err(wrong("it is not a directory".into()));
        }
        btrfs(&["subvolume", "show", &name]).map_err(|e| match e.kind {
            CmdErrorKind::Other | CmdErrorKind::WrongType | CmdErrorKind::NotFound => wrong(
                e.stderr
                    .lines()
                    .next()
                    .unwrap_or("not a subvolume")
                    .to_owned(),
            ),
            _ => Error::Command(e),
        })?;
        Ok(BtrfsVolume {
            parent: parent.to_owned(),
            base,
            path,
            name,
        })
    }

    /// The snapshot subvolume's path for `height`.
    pub fn snapshot_path(&self, height: u64) -> PathBuf {
        self.parent.join(format!("{}@{height}", self.base))
    }

    /// Drop the protection records of destroyed snapshots (a new snapshot
    /// at the same height must not inherit a label).
    fn forget_protections(&self, heights: &[u64]) {
        for &h in heights {
            let _ = fs::remove_file(self.protection_record(h));
        }
    }

    /// The record beside the snapshot at `height` that holds its
    /// protection label (btrfs has no user properties on subvolumes that
    /// other tools would read).
    fn protection_record(&self, height: u64) -> PathBuf {
        lines::record_of(&self.snapshot_path(height))
    }

    fn is_subvolume(path: &Path) -> Option<bool> {
        fs::symlink_metadata(path)
            .ok()
            .map(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INO)
    }

    /// The name reserved for the subvolume prepared during a rollback.
    fn rollback_scratch(&self) -> PathBuf {
        self.parent.join(format!(".{}.btm-rollback", self.base))
    }

    fn delete_subvolumes(paths: &[&str]) -> Result<(), CmdError> {
        let mut args = vec!["subvolume", "delete"];
        args.extend_from_slice(paths);
        btrfs(&args).map(|_| ())
    }

    /// Per-subvolume exclusive bytes from quota groups; empty when quotas
    /// are off, which is the common case.
    fn qgroup_exclusive(&self) -> HashMap<u64, u64> {
        let Ok(out) = btrfs(&["qgroup", "show", "--raw", &self.name]) else {
            return HashMap::new();
        };
        out.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let id = f.next()?.strip_prefix("0/")?.parse().ok()?;
                let _rfer = f.next()?;
                Some((id, f.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// Whether `path` is where a file system is mounted (`/proc/self/mountinfo`,
/// whose fifth field escapes space, tab, newline and backslash as octal).
fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let unescape = |f: &str| {
        let mut out = Vec::with_capacity(f.len());
        let b = f.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let octal = b.get(i + 1..i + 4).and_then(|d| {
                std::str::from_utf8(d)
                    .ok()
                    .and_then(|d| u8::from_str_radix(d, 8).ok())
            });
            match (b[i], octal) {
                (b'\\', Some(c)) => {
                    out.push(c);
                    i += 4;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        out
    };
    let want = path.as_os_str().as_encoded_bytes();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape(mp) == want)
}

/// Parse `btrfs subvolume show` output into (creation time, subvolume id).
fn parse_show(out: &str) -> (Option<DateTime<Utc>>, Option<u64>) {
    let mut created = None;
    let mut id = None;
    for line in out.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Creation time" => {
                created = DateTime::parse_from_str(value, "%Y-%m-%d %H:%M:%S %z")
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
            "Subvolume ID" => id = value.parse().ok(),
            _ => {}
        }
    }
    (created, id)
}

impl Volume for BtrfsVolume {
    fn mode(&self) -> SnapMode {
        SnapMode::Btrfs
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn root(&self) -> Result<PathBuf, Error> {
        Ok(self.path.clone())
    }

    fn heights(&self) -> Result<Vec<u64>, Error> {
        let prefix = format!("{}@", self.base);
        let mut hs = Vec::new();
        for entry in fs::read_dir(&self.parent).map_err(|e| Error::io(&self.parent, e))? {
            let entry = entry.map_err(|e| Error::io(&self.parent, e))?;
            let file_name = entry.file_name();
            let Some(h) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(parse_height)
            else {
                continue;
            };
            if Self::is_subvolume(&entry.path()) == Some(true) {
                hs.push(h);
            }
        }
        hs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(hs)
    }

    fn list(&self) -> Result<Vec<Snapshot>, Error> {
        let heights = self.heights()?;
        let exclusive = if heights.is_empty() {
            HashMap::new()
        } else {
            self.qgroup_exclusive()
        };
        let mut snaps = Vec::with_capacity(heights.len());
        for h in heights {
            let path = self.snapshot_path(h);
            let name = path_str(&path)?.to_owned();
            let (created, id) = match btrfs(&["subvolume", "show", &name]) {
                Ok(out) => parse_show(&out),
                // Deleted between the directory read and now.
                Err(e) if e.kind == CmdErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            snaps.push(Snapshot {
                height: h,
                name,
                created,
                used: id.and_then(|id| exclusive.get(&id).copied()),
                height_after: None,
                durable_height: None,
                protected: None,
            });
        }
        Ok(snaps)
    }

    fn snapshot(&self, height: u64) -> Result<SnapshotOutcome, Error> {
        let dst = self.snapshot_path(height);
        match Self::is_subvolume(&dst) {
            Some(true) => return Ok(SnapshotOutcome::AlreadyExists),
            Some(false) => return Err(Error::Obstructed(dst)),
            None => {}
        }
        match btrfs(&["subvolume", "snapshot", "-r", &self.name, path_str(&dst)?]) {
            Ok(_) => Ok(SnapshotOutcome::Created),
            Err(e) if e.kind == CmdErrorKind::AlreadyExists => Ok(SnapshotOutcome::AlreadyExists),
            Err(e) => Err(e.into()),
        }
    }

    fn protections(&self) -> Result<BTreeMap<u64, String>, Error> {
        let mut out = BTreeMap::new();
        for h in self.heights()? {
            let record = self.protection_record(h);
            match fs::read_to_string(&record) {
                Ok(label) if !label.trim().is_empty() => {
                    out.insert(h, label.trim().to_owned());
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(record, e)),
            }
        }
        Ok(out)
    }

    fn set_protection(&self, height: u64, label: Option<&Label>) -> Result<(), Error> {
        if Self::is_subvolume(&self.snapshot_path(height)) != Some(true) {
            return Err(Error::NoSuchSnapshot(height));
        }
        let record = self.protection_record(height);
        let Some(label) = label else {
            return match fs::remove_file(&record) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(record, e)),
                _ => Ok(()),
            };
        };
        // Written whole then renamed: a crash leaves the old record or the
        // new one.
        let tmp = self
            .parent
            .join(format!(".{}@{height}.btm-protect.tmp", self.base));
        fs::write(&tmp, format!("{label}\n"))
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &record))
            .map_err(|e| Error::io(&record, e))
    }

    fn destroy(&self, heights: &[u64]) -> DestroyReport {
        let mut report = DestroyReport::default();
        let mut todo: Vec<(u64, String)> = Vec::new();
        for &h in heights {
            let p = self.snapshot_path(h);
            match Self::is_subvolume(&p) {
                None => report.destroyed.push(h),
                Some(false) => report.failed.push((h, Error::Obstructed(p))),
                Some(true) => match path_str(&p) {
                    Ok(s) => todo.push((h, s.to_owned())),
                    Err(e) => report.failed.push((h, e)),
                },
            }
        }
        if todo.is_empty() {
            return report;
        }
        let all: Vec<&str> = todo.iter().map(|(_, p)| p.as_str()).collect();
        if Self::delete_subvolumes(&all).is_ok() {
            report.destroyed.extend(todo.iter().map(|(h, _)| *h));
            self.forget_protections(&report.destroyed);
            return report;
        }
        for (h, p) in &todo {
            match Self::delete_subvolumes(&[p]) {
                Ok(()) => report.destroyed.push(*h),
                Err(e) if e.kind == CmdErrorKind::NotFound => report.destroyed.push(*h),
                Err(e) => report.failed.push((*h, e.into())),
            }
        }
        self.forget_protections(&report.destroyed);
        report
    }

    fn switch_effects(&self, enter: &Enter) -> Result<SwitchEffects, Error> {
        if is_mount_point(&self.path) {
            return Err(Error::WrongType {
                volume: self.name.clone(),
                mode: SnapMode::Btrfs,
                detail: "it is a mount point, so it cannot be swapped for the rolled-back \
                         subvolume; mount its parent and use the subvolume below it"
                    .into(),
            });
        }
        match Self::is_subvolume(&self.rollback_scratch()) {
            Some(false) => Err(Error::Obstructed(self.rollback_scratch())),
            _ => lines::effects(self, enter),
        }
    }

    fn switch(&self, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error> {
        lines::switch(self, sw, progress).map_err(|e| match e {
            Error::Io { cause, .. } if cause.raw_os_error() == Some(libc::EBUSY) => {
                Error::WrongType {
                    volume: self.name.clone(),
                    mode: SnapMode::Btrfs,
                    detail: "it is a mount point, so it cannot be swapped for the rolled-back \
                             subvolume; mount its parent and use the subvolume below it"
                        .into(),
                }
            }
            e => e,
        })
    }

    fn switch_steps(&self) -> &'static [&'static str] {
        lines::STEPS
    }

    fn branches(&self) -> Result<Vec<Branch>, Error> {
        let mut bs = lines::branches(self)?;
        let exclusive = if bs.is_empty() {
            HashMap::new()
        } else {
            self.qgroup_exclusive()
        };
        if !exclusive.is_empty() {
            for b in &mut bs {
                // The branch's live subvolume and its snapshots beside it.
                let live = PathBuf::from(&b.location);
                let mut sum = 0;
                let mut trees = vec![live.clone()];
                trees.extend(
                    b.heights
                        .iter()
                        .map(|h| PathBuf::from(format!("{}@{h}", live.display()))),
                );
                for t in trees {
                    if let Some(id) = self.id(&t)?.and_then(|id| id.parse::<u64>().ok()) {
                        sum += exclusive.get(&id).copied().unwrap_or(0);
                    }
                }
                b.used = Some(sum);
            }
        }
        Ok(bs)
    }

    fn drop_branch(&self, name: &BranchName) -> Result<(), Error> {
        lines::drop_branch(self, name)
    }

    fn release_in_branch(&self, name: &BranchName, height: u64) -> Result<(), Error> {
        lines::release(self, name, height)
    }

    fn view(&self, height: u64) -> Result<SnapshotView, Error> {
        let path = self.snapshot_path(height);
        match Self::is_subvolume(&path) {
            Some(true) => Ok(SnapshotView::borrowed(path)),
            _ => Err(Error::NoSuchSnapshot(height)),
        }
    }
}

impl Trees for BtrfsVolume {
    fn home(&self) -> PathBuf {
        self.parent.clone()
    }

    fn base(&self) -> &str {
        &self.base
    }

    fn active_heights(&self) -> Result<Vec<u64>, Error> {
        self.heights()
    }

    /// The subvolume ID: stable across mounts, never reused.
    fn id(&self, path: &Path) -> Result<Option<String>, Error> {
        if Self::is_subvolume(path) != Some(true) {
            return Ok(None);
        }
        let out = btrfs(&["inspect-internal", "rootid", path_str(path)?])?;
        Ok(Some(out.trim().to_owned()))
    }

    fn writable_copy(&self, from: &Path, to: &Path) -> Result<(), Error> {
        btrfs(&["subvolume", "snapshot", path_str(from)?, path_str(to)?])?;
        Ok(())
    }

    fn set_readonly(&self, path: &Path, readonly: bool) -> Result<(), Error> {
        let value = if readonly { "true" } else { "false" };
        btrfs(&["property", "set", "-ts", path_str(path)?, "ro", value])?;
        Ok(())
    }

    fn delete_tree(&self, path: &Path) -> Result<(), Error> {
        Self::delete_subvolumes(&[path_str(path)?])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subvolume_show() {
        let out = "data@10\n\tName: \t\t\tdata@10\n\tUUID: \t\t\t5314ae5c\n\tCreation time: \t\t2026-11-22 03:01:37 +0000\n\tSubvolume ID: \t\t257\n\tFlags: \t\t\treadonly\n";
        let (created, id) = parse_show(out);
        assert_eq!(id, Some(257));
        assert_eq!(
            created.map(|c| c.to_rfc3339()),
            Some("2026-11-22T03:01:37+00:00".to_owned())
        );
    }
}
