//! The target directory, checked before anything is mounted on it, and the
//! state directory a live restore keeps in it (`.btm-live`: the session
//! file, the live files' table, the presence file).
//!
//! The state directory lives in the target itself, on the same file
//! system as the data, so `syncfs` covers both and file handles stored in
//! it stay valid; finishing removes it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::backing::{probe, MIN_OPEN_FILES, PROBE};
use crate::skeleton::STATE_DIR;
use crate::{mount, LiveError};

/// The session file in the state directory.
const SESSION: &str = "session.json";
/// The layout of the state directory this version writes.
pub const STATE_VERSION: u32 = 2;

/// What the state directory says of the run it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// The backup served.
    pub backup: String,
    /// Whether the skeleton is complete and durable.
    pub skeleton: bool,
    /// The state directory's layout (1: before the live files' table).
    #[serde(default = "first_version")]
    pub version: u32,
    /// The file handle of the target directory, in hex: the table's
    /// handles are good only on the tree they were made on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// The file handle of directory `root`, in hex.
pub(crate) fn root_handle(root: &OwnedFd) -> Result<String, LiveError> {
    let h = btm::sys::handle_of(root.as_fd())
        .map_err(|e| LiveError::state("reading the target's file handle", e))?;
    Ok(btm_chunk::hex::encode(h.as_bytes()))
}

fn first_version() -> u32 {
    1
}

/// A target directory checked and opened before anything is mounted on it.
#[derive(Debug)]
pub struct Target {
    pub(crate) dir: PathBuf,
    pub(crate) root: OwnedFd,
    pub(crate) resume: Option<SessionFile>,
    /// The descriptor limit the server runs under.
    pub(crate) open_files: u64,
}

impl Target {
    /// The backup an unfinished live restore here serves: a rerun goes on
    /// with it, whatever `latest` means now.
    pub fn unfinished(&self) -> Option<&str> {
        self.resume.as_ref().map(|s| s.backup.as_str())
    }
}

fn io(dir: &Path, e: impl Into<std::io::Error>) -> LiveError {
    LiveError::Io {
        path: dir.display().to_string(),
        source: e.into(),
    }
}

/// Whether directory `root` holds an entry other than `.`, `..` and the
/// state directory (reading no further than the first).
fn holds_other(root: &OwnedFd, dir: &Path) -> Result<bool, LiveError> {
    let empty_dir = |name: &std::ffi::CStr| {
        openat(
            root.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .and_then(nix::dir::Dir::from_fd)
        .is_ok_and(|mut d| d.iter().filter_map(Result::ok).count() <= 2)
    };
    let d = nix::dir::Dir::from_fd(root.try_clone().map_err(|e| io(dir, e))?)
        .map_err(|e| io(dir, e))?;
    for e in d {
        let e = e.map_err(|e| io(dir, e))?;
        let n = e.file_name().to_bytes();
        let ours = [&b"."[..], b"..", STATE_DIR.as_bytes(), PROBE.as_bytes()];
        if ours.contains(&n) || (n == FS_ROOT_DIR.as_bytes() && empty_dir(e.file_name())) {
            continue;
        }
        return Ok(true);
    }
    Ok(false)
}

/// The directory ext4 (and e2fsck) keeps at the top of a file system: a
/// volume's root holds it from the start. Empty, it does not make a
/// directory unfit for a live restore, and clearing a half-made skeleton
/// leaves it.
pub const FS_ROOT_DIR: &str = "lost+found";

/// Check `dir` for a live restore: a descriptor limit it can run under,
/// FUSE usable, no mount on it (a dead live-restore mount is cleared),
/// empty or holding an unfinished live restore of this version, and on a
/// file system with file handles and user extended attributes. Created if
/// missing.
pub fn open_target(dir: &Path) -> Result<Target, LiveError> {
    let open_files = btm_chunk::restore::raise_open_file_limit();
    if open_files < MIN_OPEN_FILES {
        return Err(LiveError::Limit(open_files));
    }
    mount::check_fuse()?;
    mount::clear_dead(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let root = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(dir, e))?;
    let has_state = nix::sys::stat::fstatat(
        root.as_fd(),
        STATE_DIR,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .is_ok();
    let resume = if has_state {
        let session =
            read_session(&root).ok_or_else(|| LiveError::NotEmpty(dir.display().to_string()))?;
        if session.version != STATE_VERSION {
            return Err(LiveError::OldState {
                dir: dir.display().to_string(),
                version: session.version,
            });
        }
        if session.root.as_deref() != Some(root_handle(&root)?.as_str()) {
            return Err(LiveError::Moved(dir.display().to_string()));
        }
        probe(state_dir(&root, false)?.as_fd(), dir)?;
        Some(session)
    } else if holds_other(&root, dir)? {
        return Err(LiveError::NotEmpty(dir.display().to_string()));
    } else {
        probe(root.as_fd(), dir)?;
        None
    };
    Ok(Target {
        dir: dir.to_path_buf(),
        root,
        resume,
        open_files,
    })
}

/// The state directory under `root` (made if `create`).
pub(crate) fn state_dir(root: &OwnedFd, create: bool) -> Result<OwnedFd, LiveError> {
    if create {
        match nix::sys::stat::mkdirat(root.as_fd(), STATE_DIR, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(LiveError::state("making the state directory", e.into())),
        }
    }
    openat(
        root.as_fd(),
        STATE_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LiveError::state("opening the state directory", e.into()))
}

fn read_session(root: &OwnedFd) -> Option<SessionFile> {
    let state = state_dir(root, false).ok()?;
    let fd = openat(
        state.as_fd(),
        SESSION,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    serde_json::from_reader(File::from(fd)).ok()
}

/// Replace the session file, durably.
pub(crate) fn write_session(state: &OwnedFd, s: &SessionFile) -> Result<(), LiveError> {
    let err = |e: std::io::Error| LiveError::state("writing the session file", e);
    let tmp = "session.json.tmp";
    let fd = openat(
        state.as_fd(),
        tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| err(e.into()))?;
    let mut f = File::from(fd);
    let json = serde_json::to_vec(s).map_err(|e| err(e.into()))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    nix::fcntl::renameat(state.as_fd(), tmp, state.as_fd(), SESSION).map_err(|e| err(e.into()))?;
    nix::unistd::fsync(state.as_fd()).map_err(|e| err(e.into()))
}

/// Remove everything under `root` but the state directory (a skeleton
/// that a killed run left half made; nothing was served from it).
pub(crate) fn clear_tree(root: &OwnedFd) -> Result<(), LiveError> {
    remove_children(root.as_fd(), true)
        .map_err(|e| LiveError::state("clearing a half-made skeleton", e.into()))
}

fn remove_children(dir: BorrowedFd<'_>, top: bool) -> Result<(), nix::errno::Errno> {
    let mut d = nix::dir::Dir::from_fd(
        dir.try_clone_to_owned()
            .map_err(|_| nix::errno::Errno::EBADF)?,
    )?;
    let names: Vec<Vec<u8>> = d
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| {
            n != b"."
                && n != b".."
                && !(top && (n == STATE_DIR.as_bytes() || n == FS_ROOT_DIR.as_bytes()))
        })
        .collect();
    for n in names {
        let name = OsStr::from_bytes(&n);
        let st = nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let sub = openat(
                dir,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            remove_children(sub.as_fd(), false)?;
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir)?;
        } else {
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        }
    }
    Ok(())
}

/// Remove the state directory, whatever a killed run left in it: the
/// target is a plain directory again.
pub(crate) fn remove_state(root: &OwnedFd) -> Result<(), LiveError> {
    let err = |e: nix::errno::Errno| LiveError::state("removing the state directory", e.into());
    let state = state_dir(root, false)?;
    remove_children(state.as_fd(), false).map_err(err)?;
    drop(state);
    nix::unistd::unlinkat(
        root.as_fd(),
        STATE_DIR,
        nix::unistd::UnlinkatFlags::RemoveDir,
    )
    .map_err(err)?;
    nix::unistd::syncfs(root.as_fd()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(dir: &Path, version: u32) {
        std::fs::create_dir_all(dir.join(STATE_DIR)).expect("state");
        let root = nix::fcntl::open(dir, OFlag::O_RDONLY, Mode::empty()).expect("open");
        let handle = root_handle(&root).expect("handle");
        let s =
            format!(r#"{{"backup":"b","skeleton":true,"version":{version},"root":"{handle}"}}"#);
        std::fs::write(dir.join(STATE_DIR).join(SESSION), s).expect("session");
    }

    /// A fresh ext4 volume's root holds lost+found: empty, it is no
    /// obstacle, and clearing a half-made skeleton keeps it; with anything
    /// in it, the directory is not empty.
    #[test]
    fn an_empty_lost_and_found_is_the_file_systems_not_the_nodes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("volume");
        std::fs::create_dir_all(dir.join(FS_ROOT_DIR)).expect("dir");
        open_target(&dir).expect("a volume's root with an empty lost+found");
        std::fs::write(dir.join("half-made"), b"x").expect("w");
        let root = nix::fcntl::open(&dir, OFlag::O_RDONLY, Mode::empty()).expect("open");
        clear_tree(&root).expect("clear");
        assert!(dir.join(FS_ROOT_DIR).is_dir() && !dir.join("half-made").exists());
        std::fs::write(dir.join(FS_ROOT_DIR).join("#1234"), b"x").expect("w");
        assert!(matches!(open_target(&dir), Err(LiveError::NotEmpty(_))));
    }

    #[test]
    fn an_unfinished_live_restore_is_found_whatever_else_the_directory_holds() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("node");
        std::fs::create_dir(&dir).expect("dir");
        let t = open_target(&dir).expect("an empty directory");
        assert!(t.unfinished().is_none() && t.open_files >= MIN_OPEN_FILES);
        for i in 0..300 {
            std::fs::write(dir.join(format!("f{i}")), b"x").expect("w");
        }
        assert!(matches!(open_target(&dir), Err(LiveError::NotEmpty(_))));
        session(&dir, STATE_VERSION);
        let t = open_target(&dir).expect("an unfinished live restore");
        assert_eq!(t.unfinished(), Some("b"));
        // Its state copied to another directory: the table's handles are
        // not good there.
        let copy = tmp.path().join("copy");
        std::fs::create_dir(&copy).expect("dir");
        std::fs::create_dir(copy.join(STATE_DIR)).expect("state");
        std::fs::copy(
            dir.join(STATE_DIR).join(SESSION),
            copy.join(STATE_DIR).join(SESSION),
        )
        .expect("copy");
        let e = open_target(&copy).expect_err("moved");
        assert!(e.to_string().contains("another"), "{e}");
        session(&dir, 1);
        let e = open_target(&dir).expect_err("an earlier layout");
        assert!(e.to_string().contains("earlier btm"), "{e}");
    }

    #[test]
    fn a_session_of_the_first_layout_reads_as_version_1() {
        let old: SessionFile =
            serde_json::from_str(r#"{"backup":"b","skeleton":true}"#).expect("old session");
        assert_eq!(old.version, 1);
        let new = SessionFile {
            backup: "b".into(),
            skeleton: false,
            version: STATE_VERSION,
            root: Some("0100".into()),
        };
        let back: SessionFile =
            serde_json::from_str(&serde_json::to_string(&new).expect("json")).expect("parse");
        assert_eq!(back, new);
        assert!(
            serde_json::from_str::<SessionFile>(r#"{"backup":"b","skeleton":true,"x":1}"#).is_err()
        );
    }
}
