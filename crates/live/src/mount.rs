//! What is mounted where. A target that is the mount point of a disk file
//! system is the usual case (a ZFS dataset, an XFS volume): the live
//! restore mounts over it and serves from it. A target that is already a
//! FUSE mount (a live restore serving it, or anything else) is refused,
//! except the dead mount a killed live restore left, which is cleared and
//! resumed under.

use std::path::{Path, PathBuf};

use crate::LiveError;

/// The source a live restore's mount shows in mountinfo (its type is
/// `fuse`).
pub const SOURCE: &str = "btm-live";

/// `dir` made absolute without touching `dir` itself (a dead FUSE mount
/// cannot be looked at): its parent canonical, its name as given.
pub fn absolute(dir: &Path) -> PathBuf {
    let name = dir.file_name();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (std::fs::canonicalize(parent), name) {
        (Ok(p), Some(n)) => p.join(n),
        _ => dir.to_path_buf(),
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() + 1 && b[i + 1..].len() >= 3 {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file system type and source of the topmost mount at `dir`, if
/// `dir` is a mount point.
pub fn mounted_at(dir: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = absolute(dir);
    let mut found = None;
    for line in info.lines() {
        let mut fields = line.split(' ');
        let point = fields.nth(4).map(unescape);
        let mut tail = line.split(" - ").nth(1).unwrap_or("").split(' ');
        let (fstype, source) = (tail.next().unwrap_or(""), tail.next().unwrap_or(""));
        if point.as_deref().map(Path::new) == Some(want.as_path()) {
            found = Some((fstype.to_owned(), unescape(source)));
        }
    }
    found
}

/// Clear a dead live-restore mount at `dir` (its server was killed): the
/// node's reads there fail anyway, and the backing tree under it holds
/// everything needed to go on. A live FUSE mount, or a dead one of
/// something else, is refused; a disk file system's mount point is fine.
pub fn clear_dead(dir: &Path) -> Result<bool, LiveError> {
    let Some((fstype, source)) = mounted_at(dir) else {
        return Ok(false);
    };
    if !fstype.starts_with("fuse") {
        return Ok(false);
    }
    let dead = matches!(std::fs::symlink_metadata(dir), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if source != SOURCE || !dead {
        return Err(LiveError::Mounted(dir.display().to_string()));
    }
    nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(|e| LiveError::Mount {
        dir: dir.display().to_string(),
        source: e.into(),
    })?;
    tracing::warn!(dir = %dir.display(), "cleared the mount a killed live restore left");
    Ok(true)
}

/// Whether the FUSE device can be used, or what is missing.
pub fn check_fuse() -> Result<(), LiveError> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LiveError::NoFuse(
            "no FUSE device (/dev/fuse): load the fuse module (modprobe fuse) or give the container the device".into(),
        )),
        Err(e) => Err(LiveError::NoFuse(format!(
            "cannot open /dev/fuse ({e}): a live restore must run as root (it mounts, and serves files of every owner)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(mounted_at(Path::new("/")).is_some());
        let d = tempfile::tempdir().expect("tempdir");
        assert!(mounted_at(d.path()).is_none());
        assert!(!clear_dead(d.path()).expect("not mounted"));
    }
}
