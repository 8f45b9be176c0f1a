//! Volumes: the node's data, held in a ZFS dataset or a btrfs subvolume.
//!
//! One trait, [`Volume`], with a driver per filesystem. Drivers own the
//! naming scheme (`<volume>@<height>`), and they only ever see, list or
//! destroy snapshots whose name matches it exactly, so snapshots made by
//! other tools are never touched. Opening a volume only reads: nothing is
//! created or changed to "help" a mistyped name along.

pub mod branch;
pub mod btrfs;
pub mod cmd;
pub mod fake;
mod lines;
pub mod zfs;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use branch::{Branch, BranchName, Enter, Progress, Switch, SwitchEffects};
pub use cmd::{CmdError, CmdErrorKind};

/// Which filesystem holds the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapMode {
    /// A ZFS filesystem dataset, driven through the `zfs` CLI.
    Zfs,
    /// A btrfs subvolume, driven through `btrfs-progs`.
    Btrfs,
}

impl fmt::Display for SnapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapMode::Zfs => "zfs",
            SnapMode::Btrfs => "btrfs",
        })
    }
}

impl FromStr for SnapMode {
    type Err = String;
    /// Case-insensitive `zfs` or `btrfs`, as the original btm accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "zfs" => Ok(SnapMode::Zfs),
            "btrfs" => Ok(SnapMode::Btrfs),
            _ => Err(format!("unknown mode '{s}' (expected zfs or btrfs)")),
        }
    }
}

/// One btm snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The block height in the snapshot's name.
    pub height: u64,
    /// The full name: `<dataset>@<height>` or the snapshot subvolume's path.
    pub name: String,
    /// When the filesystem created it, if it reports that.
    pub created: Option<DateTime<Utc>>,
    /// Bytes held only by this snapshot, where the filesystem reports it
    /// (ZFS `used`; btrfs only with quotas enabled).
    pub used: Option<u64>,
    /// For snapshots taken by a polling daemon: the height read just after
    /// the snapshot, so its state lies in `[height, height_after]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height_after: Option<u64>,
    /// The height the node's durable state held at the snapshot, when the
    /// node said (a forced write before it; see [`crate::window`]). Where
    /// it differs from `height`, the snapshot restarts the node there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_height: Option<u64>,
    /// The protection label, when the snapshot is protected from retention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protected: Option<String>,
}

/// What [`Volume::snapshot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotOutcome {
    /// A new snapshot was created.
    Created,
    /// A snapshot at that height already existed and was left untouched.
    AlreadyExists,
}

/// Result of destroying a batch: what went and what did not, with why.
#[derive(Debug, Default)]
pub struct DestroyReport {
    /// Heights whose snapshots are gone.
    pub destroyed: Vec<u64>,
    /// Heights whose snapshots could not be destroyed.
    pub failed: Vec<(u64, Error)>,
}

impl DestroyReport {
    /// True when every requested snapshot was destroyed.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Errors from the volume layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The volume name is unusable; nothing was run.
    #[error("invalid volume name '{name}': {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The volume does not exist.
    #[error("volume '{0}' does not exist")]
    NotFound(String),
    /// The volume exists but is not what the mode needs.
    #[error("'{volume}' is not a {mode} volume: {detail}")]
    WrongType {
        /// The volume name.
        volume: String,
        /// The mode that was required or tried.
        mode: SnapMode,
        /// Why not.
        detail: String,
    },
    /// Auto-detection found neither a ZFS dataset nor a btrfs subvolume.
    #[error("cannot tell whether '{0}' is ZFS or btrfs: it is neither a ZFS dataset nor a btrfs subvolume (use -m to say which)")]
    Undetected(String),
    /// A relative name that is neither a ZFS dataset nor an existing path.
    #[error("'{name}' is neither a ZFS dataset nor an existing path below the current directory ({}); give a btrfs subvolume as an absolute path", cwd.display())]
    RelativeUndetected {
        /// The name as given.
        name: String,
        /// The directory it was resolved against.
        cwd: PathBuf,
    },
    /// No btm snapshot exists at this height.
    #[error("no snapshot at height {0}")]
    NoSuchSnapshot(u64),
    /// Something that looks like a snapshot is in the way.
    #[error("'{0}' exists but is not a btrfs snapshot subvolume; refusing to touch it")]
    Obstructed(PathBuf),
    /// A rollback would move snapshots btm did not make into a branch.
    #[error("rolling back to height {target} would move snapshots not made by btm into a branch: {}; move or destroy them first", names.join(", "))]
    ForeignSnapshots {
        /// The requested rollback height.
        target: u64,
        /// The foreign snapshots in the way.
        names: Vec<String>,
    },
    /// No kept branch has this name.
    #[error("no branch named '{0}' (see `btm branches`)")]
    NoSuchBranch(BranchName),
    /// `--undo` with nothing to go back to.
    #[error("there is no branch to go back to: no rollback has kept one (see `btm branches`)")]
    NoBranches,
    /// A branch's live state was removed by hand: it cannot be entered.
    #[error("branch '{name}' cannot be entered: {location} was removed by hand; drop it with `btm branches drop {name}`")]
    BranchDamaged {
        /// The branch.
        name: BranchName,
        /// What is missing.
        location: String,
    },
    /// The name asked for the kept branch is taken.
    #[error("a branch named '{0}' already exists; choose another with --keep-as")]
    BranchExists(BranchName),
    /// The pool cannot hold even the metadata of a clone.
    #[error("'{volume}' has {available} bytes available, too few for the branch a rollback keeps; free space first")]
    NoSpace {
        /// The volume.
        volume: String,
        /// What the file system reports available.
        available: u64,
    },
    /// Something about the volume's layout keeps a switch from being safe.
    #[error("cannot keep branches of '{volume}': {detail}")]
    Unbranchable {
        /// The volume.
        volume: String,
        /// What is in the way.
        detail: String,
    },
    /// A switch stopped after a step because a test asked it to.
    #[error("stopped after step '{0}' (BTM_CRASH_AFTER); run the same command again to finish")]
    Interrupted(&'static str),
    /// An external command failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// A filesystem call failed.
    #[error("{path}: {cause}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A tool printed something btm could not understand.
    #[error("cannot parse output of {tool}: {detail}")]
    Parse {
        /// Which command.
        tool: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A directory btm needs could not be created.
    #[error(transparent)]
    Dir(#[from] crate::dirs::Error),
    /// A preserved file could not be carried across a rollback.
    #[error(transparent)]
    Preserve(#[from] crate::preserve::Error),
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Error::Command(c) if c.kind.is_temporary())
    }

    /// Whether a command ran past its time limit ([`cmd::limit`]): the
    /// volume is not answering.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Command(c) if c.kind == CmdErrorKind::TimedOut)
    }

    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

/// A read-only view of a snapshot's contents.
///
/// The path stays valid while this value lives. If the driver had to create
/// a temporary clone to provide it, the clone is destroyed on drop (and by
/// [`SnapshotView::close`], which reports failures).
pub struct SnapshotView {
    path: PathBuf,
    cleanup: Option<Box<dyn FnOnce() -> Result<(), Error> + Send>>,
}

impl SnapshotView {
    pub(crate) fn borrowed(path: PathBuf) -> Self {
        SnapshotView {
            path,
            cleanup: None,
        }
    }

    pub(crate) fn with_cleanup(
        path: PathBuf,
        cleanup: Box<dyn FnOnce() -> Result<(), Error> + Send>,
    ) -> Self {
        SnapshotView {
            path,
            cleanup: Some(cleanup),
        }
    }

    /// Where the snapshot's files can be read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Release the view now and report whether cleanup succeeded.
    pub fn close(mut self) -> Result<(), Error> {
        match self.cleanup.take() {
            Some(f) => f(),
            None => Ok(()),
        }
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        if let Some(f) = self.cleanup.take() {
            if let Err(e) = f() {
                tracing::error!(error = %e, path = %self.path.display(), "could not remove temporary snapshot view");
            }
        }
    }
}

/// Operations btm needs from a snapshotting filesystem.
///
/// Contract shared by all drivers:
/// - only snapshots named exactly `<volume>@<height>` (canonical decimal,
///   see [`parse_height`]) are btm's; everything else is invisible here;
/// - lists are sorted newest (highest height) first;
/// - no method ever replaces an existing snapshot.
pub trait Volume: Send + Sync {
    /// Which filesystem this is.
    fn mode(&self) -> SnapMode;
    /// The volume as named by the user (dataset name or canonical path).
    fn name(&self) -> &str;
    /// The directory where the live contents are mounted.
    fn root(&self) -> Result<PathBuf, Error>;
    /// Heights of btm snapshots, newest first; cheaper than [`Volume::list`].
    fn heights(&self) -> Result<Vec<u64>, Error>;
    /// btm snapshots with details, newest first.
    fn list(&self) -> Result<Vec<Snapshot>, Error>;
    /// Take a snapshot at `height`. The caller has already called `sync()`.
    /// An existing snapshot at that height is left as it is.
    fn snapshot(&self, height: u64) -> Result<SnapshotOutcome, Error>;
    /// Destroy the snapshots at `heights`: one command for the batch where
    /// the tool allows, else (or on failure) one at a time, reporting each.
    fn destroy(&self, heights: &[u64]) -> DestroyReport;
    /// What switching to `enter` would do, without acting; refuses (with
    /// the reason) a switch the volume cannot make safely. Errors if the
    /// snapshot or branch is missing.
    fn switch_effects(&self, enter: &Enter) -> Result<SwitchEffects, Error>;
    /// Switch the volume's name to another line, keeping the line it
    /// leaves as branch `sw.keep_as` (its live state and its snapshots in
    /// `sw.moves_out`), and carrying `sw.carry` across. Destroys nothing.
    ///
    /// Crash safety: every step is written so that, interrupted at any
    /// point, calling this again with the same `sw` (as recorded through
    /// `progress`) finishes the switch, and the volume's name is on the
    /// old line or the new one between steps.
    fn switch(&self, sw: &mut Switch, progress: &mut dyn Progress) -> Result<(), Error>;
    /// The steps [`Volume::switch`] reports, in order (for failure
    /// injection in tests).
    fn switch_steps(&self) -> &'static [&'static str];
    /// The kept branches, oldest first.
    fn branches(&self) -> Result<Vec<Branch>, Error>;
    /// Destroy a branch: its live state and its snapshots.
    fn drop_branch(&self, name: &BranchName) -> Result<(), Error>;
    /// Return the snapshot at `height` of branch `name` to the branch's
    /// normal expiry (`btm release` of a snapshot a rollback moved there).
    fn release_in_branch(&self, name: &BranchName, height: u64) -> Result<(), Error>;
    /// A read-only path to the contents of the snapshot at `height`.
    fn view(&self, height: u64) -> Result<SnapshotView, Error>;
    /// The labels of protected snapshots, by height: no retention policy
    /// prunes them, and `clean` keeps them unless asked by label. Stored
    /// with the snapshot itself, so it survives restarts.
    fn protections(&self) -> Result<BTreeMap<u64, String>, Error>;
    /// [`Volume::heights`] and [`Volume::protections`] together, in one
    /// read of the volume where the driver can: a retention plan needs
    /// both at every prune.
    fn heights_and_protections(&self) -> Result<(Vec<u64>, BTreeMap<u64, String>), Error> {
        Ok((self.heights()?, self.protections()?))
    }
    /// Protect the snapshot at `height` with `label`, or with `None` return
    /// it to normal retention. The snapshot must exist.
    fn set_protection(&self, height: u64, label: Option<&Label>) -> Result<(), Error>;
    /// Remove temporary views left by btm processes that died (the daemon
    /// calls this at start). Drivers whose views need no cleanup do nothing.
    fn cleanup_stale_views(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A protection label (an upgrade's name): 1 to 64 of `A-Z a-z 0-9 . _ -`,
/// so it is the same word in a ZFS property, a file and a command line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label(String);

impl Label {
    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Label(s.to_owned()))
        } else {
            Err(format!(
                "'{s}' is not a protection label (1 to 64 letters, digits, '.', '_' or '-')"
            ))
        }
    }
}

/// Parse the part after `@` of a snapshot name as a btm height.
///
/// Only the canonical decimal spelling counts (`"0"`, `"120"`; not `"012"`,
/// `"+5"`, `"1e3"` or anything that overflows `u64`). That way a height has
/// exactly one name, and every other name belongs to someone else.
pub fn parse_height(suffix: &str) -> Option<u64> {
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if suffix.len() > 1 && suffix.starts_with('0') {
        return None;
    }
    suffix.parse().ok()
}

/// Check a volume name before anything is run with it.
///
/// Accepted: ASCII letters, digits and `_ . - : / +`, not starting with `-`
/// (which a tool would read as an option), no `@` (which starts a snapshot
/// name), no empty or `..` path components. Everything else, spaces and
/// shell metacharacters included, is rejected with the offending character.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bad = |reason: String| Error::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if name.len() > 4000 {
        return Err(bad("it is too long".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-:/+".contains(*c)))
    {
        let what = match c {
            ' ' => "a space".to_owned(),
            c if c.is_control() => format!("control character {:?}", c),
            c => format!("'{c}'"),
        };
        return Err(bad(format!(
            "it contains {what}; only letters, digits and _ . - : / + are allowed"
        )));
    }
    if name.starts_with('-') {
        return Err(bad("it starts with '-'".into()));
    }
    let body = name.trim_matches('/');
    if name.len() > 1 && body.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(bad("it has an empty or '..' path component".into()));
    }
    Ok(())
}

/// Open `volume` as the given mode, or detect the mode if `None`.
///
/// Detection and opening only read: a name that is neither a ZFS dataset nor
/// a btrfs subvolume is an error, never a reason to create something.
/// `dirs` is where the driver keeps temporary views and files carried across
/// a rollback.
pub fn open(
    volume: &str,
    mode: Option<SnapMode>,
    dirs: &crate::dirs::Dirs,
) -> Result<Box<dyn Volume>, Error> {
    validate_name(volume)?;
    let opened = match mode {
        Some(SnapMode::Zfs) => zfs::ZfsVolume::open(volume, dirs).map(|v| Box::new(v) as _),
        Some(SnapMode::Btrfs) => btrfs::BtrfsVolume::open(volume).map(|v| Box::new(v) as _),
        None => detect(volume, dirs),
    };
    match opened {
        // A ZFS switch stopped between its two renames: the name is on
        // neither line until the same command finishes it.
        Err(Error::NotFound(_) | Error::RelativeUndetected { .. })
            if mode != Some(SnapMode::Btrfs)
                && !Path::new(volume).is_absolute()
                && dirs.switch_journal(volume).exists() =>
        {
            Ok(Box::new(zfs::ZfsVolume::unchecked(volume, dirs)))
        }
        other => other,
    }
}

fn detect(volume: &str, dirs: &crate::dirs::Dirs) -> Result<Box<dyn Volume>, Error> {
    let path = Path::new(volume);
    if !path.is_absolute() {
        return detect_relative(volume, dirs);
    }
    // A missing path is missing whatever the filesystem; asking `zfs` would
    // only add noise (or its daemon's complaints) to the error.
    if !path.exists() {
        return Err(Error::NotFound(volume.to_owned()));
    }
    // A path that exists is tried as btrfs first; a ZFS dataset is named
    // without a leading '/', but a ZFS mountpoint path is accepted too.
    match btrfs::BtrfsVolume::open(volume) {
        Ok(v) => return Ok(Box::new(v)),
        Err(Error::WrongType { .. }) => {}
        Err(e) => return Err(e),
    }
    match try_zfs(volume, dirs)? {
        Some(v) => Ok(v),
        None => Err(Error::Undetected(volume.to_owned())),
    }
}

/// A relative name is a ZFS dataset (`tank/chain`) or, failing that, a
/// path below the current directory, resolved to an absolute one.
fn detect_relative(volume: &str, dirs: &crate::dirs::Dirs) -> Result<Box<dyn Volume>, Error> {
    if let Some(v) = try_zfs(volume, dirs)? {
        return Ok(v);
    }
    if Path::new(volume).exists() {
        return Ok(Box::new(btrfs::BtrfsVolume::open(volume)?));
    }
    Err(Error::RelativeUndetected {
        name: volume.to_owned(),
        cwd: std::env::current_dir().unwrap_or_default(),
    })
}

/// `volume` as a ZFS dataset; `None` when it is not one (or there is no
/// usable ZFS here).
fn try_zfs(volume: &str, dirs: &crate::dirs::Dirs) -> Result<Option<Box<dyn Volume>>, Error> {
    match zfs::ZfsVolume::open(volume, dirs) {
        Ok(v) => Ok(Some(Box::new(v))),
        Err(Error::NotFound(_)) | Err(Error::WrongType { .. }) => Ok(None),
        // No zfs tool installed: the volume is not ZFS, as far as we can tell.
        Err(Error::Command(c))
            if matches!(c.kind, CmdErrorKind::Spawn | CmdErrorKind::Unavailable) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heights_are_canonical_decimals_only() {
        assert_eq!(parse_height("0"), Some(0));
        assert_eq!(parse_height("120"), Some(120));
        assert_eq!(parse_height("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "012",
            "+5",
            "-1",
            "1e3",
            "12a",
            "manual",
            "18446744073709551616",
            " 1",
            "１",
        ] {
            assert_eq!(parse_height(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hostile_names_are_rejected() {
        for bad in [
            "",
            "pool/data; rm -rf /",
            "pool/da ta",
            "$(touch /tmp/x)",
            "`id`",
            "a|b",
            "a&b",
            "a>b",
            "-rf",
            "pool/data@5",
            "a\nb",
            "/data/../etc",
            "pool//data",
            "a'b",
            "a\"b",
            "a*b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "zroot/data",
            "/data/chain",
            "pool",
            "/",
            "tank/a-b_c.d:e+f",
            "/mnt/x/",
        ] {
            assert!(validate_name(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn mode_parses_case_insensitively() {
        assert_eq!("ZFS".parse::<SnapMode>(), Ok(SnapMode::Zfs));
        assert_eq!("Btrfs".parse::<SnapMode>(), Ok(SnapMode::Btrfs));
        assert!("ext4".parse::<SnapMode>().is_err());
    }
}
