//! How restore and live restore touch a local tree, written once: the flags
//! directories are opened with, splitting a path into parent and name,
//! times as the kernel takes them, and owners, modes and times set through
//! descriptors (a symlink's through its parent), never through paths.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use std::os::fd::BorrowedFd;

use nix::fcntl::AtFlags;
use nix::sys::stat::Mode;

/// How every directory below a root is opened: never through a symlink
/// (see [`btm::confined`]).
pub use btm::confined::DIR_FLAGS;

use crate::format::tree::Entry;
use crate::ChunkError;

/// Whose files a restore makes: tar's convention. Root restores the
/// backup's owners; anyone else cannot, and gets files of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Owners {
    /// The backup's owners, exactly: a file whose owner cannot be set
    /// fails the restore (root's default, and `--same-owner`).
    #[default]
    Recorded,
    /// Owners are not set: files belong to the restoring user, and to the
    /// group the kernel gives new files (a setgid directory's, such as a
    /// Kubernetes volume's `fsGroup`). Content, modes and times are still
    /// exact (an ordinary user's default, and `--no-same-owner`).
    Restorer,
}

impl Owners {
    /// tar's default for this process: [`Owners::Recorded`] for root,
    /// [`Owners::Restorer`] for anyone else.
    pub fn for_this_process() -> Self {
        if nix::unistd::geteuid().is_root() {
            Owners::Recorded
        } else {
            Owners::Restorer
        }
    }
}

/// Owner and mode of a file as found when it was opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct Found {
    uid: u32,
    gid: u32,
    mode: u32,
}

impl Found {
    /// A file this process just made with `mode`: its owner is this
    /// process's effective user and group.
    pub fn made(mode: u32) -> Self {
        Found {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mode: mode & 0o7777,
        }
    }

    /// What `st` says.
    pub fn of(st: &nix::sys::stat::FileStat) -> Self {
        Found {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }

    /// Whether the owner is as `e` wants it (under [`Owners::Restorer`],
    /// any owner is).
    pub fn owned(&self, e: &Entry, owners: Owners) -> bool {
        match owners {
            Owners::Recorded => self.uid == e.uid && self.gid == e.gid,
            Owners::Restorer => true,
        }
    }

    /// Whether the mode is as `e` wants it. Never for setuid, setgid and
    /// sticky modes, which a write or a chown clears: they are always set
    /// again.
    pub fn moded(&self, e: &Entry) -> bool {
        let mode = e.mode & 0o7777;
        mode & 0o7000 == 0 && self.mode == mode
    }

    /// Whether nothing is left to set: owner and mode as `e` wants them.
    pub fn matches(&self, e: &Entry, owners: Owners) -> bool {
        self.owned(e, owners) && self.moded(e)
    }
}

/// Owner, mode and times of a restored file, through its descriptor (the
/// mode after the owner: a chown clears setuid bits). `found` saves the
/// calls that would change nothing, which is most of them in a tree of
/// small files created by this restore. Setuid, setgid and sticky modes are
/// always set again: writing to a file clears them. Under
/// [`Owners::Restorer`] the owner is left as it is.
pub fn apply_file_metadata(
    file: &File,
    e: &Entry,
    found: Option<Found>,
    owners: Owners,
) -> std::io::Result<()> {
    let owned = found.is_some_and(|f| f.owned(e, owners));
    if !owned {
        if let Owners::Recorded = owners {
            std::os::unix::fs::fchown(file, Some(e.uid), Some(e.gid))?;
        }
    }
    let moded = owned && found.is_some_and(|f| f.moded(e));
    if !moded {
        nix::sys::stat::fchmod(file, Mode::from_bits_truncate(e.mode))
            .map_err(std::io::Error::from)?;
    }
    let ts = timespec(e.mtime_ns);
    nix::sys::stat::futimens(file, &ts, &ts).map_err(std::io::Error::from)
}

/// Nanoseconds since the epoch as a `timespec` (negative times too).
pub fn timespec(ns: i64) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// `path` as its parent directory and its last component (`a/b/c` →
/// `a/b`, `c`; a name alone has an empty parent).
pub fn split_name(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

/// Give symlink `name` in `parent` the entry's owner (as `owners` says)
/// and time, never following it.
pub fn symlink_owner_and_times(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    e: &Entry,
    owners: Owners,
) -> nix::Result<()> {
    if owners == Owners::Recorded {
        nix::unistd::fchownat(
            parent,
            name,
            Some(e.uid.into()),
            Some(e.gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    let ts = timespec(e.mtime_ns);
    nix::sys::stat::utimensat(
        parent,
        name,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
}

/// Owner (as `owners` says), mode and times of the directory `e` names
/// below `tree`.
pub fn apply_dir_metadata(
    tree: &btm::confined::Tree,
    e: &Entry,
    owners: Owners,
) -> Result<(), ChunkError> {
    let rel = Path::new(OsStr::from_bytes(&e.path));
    let comps = btm::confined::components(rel).map_err(|x| ChunkError::Invalid(x.to_string()))?;
    let fd = tree
        .dir(&comps, false)
        .map_err(|x| ChunkError::Invalid(x.to_string()))?;
    let f = File::from(fd);
    apply_file_metadata(&f, e, None, owners).map_err(|x| ChunkError::io(&tree.root().join(rel), x))
}
