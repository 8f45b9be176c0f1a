//! Files that must survive a rollback unchanged.
//!
//! A validator that rolls back `data/priv_validator_state.json` forgets the
//! heights it already signed and can double-sign and be slashed. `btm
//! rollback --preserve PATH` therefore carries the *current* content of such
//! files (with mode, owner and mtime) into the rolled-back volume. Copies are
//! atomic (temporary file, fsync, rename), so a crash leaves either the old
//! or the new file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// Errors while carrying files across a rollback.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path given is not a plain relative path inside the volume.
    #[error("invalid --preserve path '{path}': {reason}")]
    InvalidPath {
        /// As given.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The file to preserve is not there now; a typo must not go unnoticed.
    #[error("--preserve {0}: no such file in the live volume")]
    Missing(PathBuf),
    /// Only regular files are carried across.
    #[error("--preserve {0}: not a regular file")]
    NotAFile(PathBuf),
    /// Copying failed.
    #[error("preserving {path}: {source}")]
    Io {
        /// The file being copied.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// A path relative to the volume root with no `..`, `.` or absolute parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath(PathBuf);

impl RelPath {
    /// The relative path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl FromStr for RelPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidPath {
            path: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        let p = Path::new(s);
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(bad("it must be relative to the volume root"))
                }
                Component::ParentDir => return Err(bad("it must not contain '..'")),
            }
        }
        if out.as_os_str().is_empty() {
            return Err(bad("it names the volume root itself"));
        }
        Ok(RelPath(out))
    }
}

/// Check that every path is a regular file under `root` (symlinks are not
/// followed: a link could point outside the volume).
pub fn check_sources(root: &Path, paths: &[RelPath]) -> Result<(), Error> {
    for p in paths {
        let full = root.join(&p.0);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => return Err(Error::NotAFile(p.0.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Missing(p.0.clone()))
            }
            Err(source) => return Err(Error::Io { path: full, source }),
        }
    }
    Ok(())
}

/// Copy each `paths` entry from `src_root` to `dst_root`, replacing what is
/// there atomically and keeping mode, owner and mtime. Missing parent
/// directories in the destination are created.
pub fn copy_into(src_root: &Path, dst_root: &Path, paths: &[RelPath]) -> Result<(), Error> {
    check_sources(src_root, paths)?;
    for p in paths {
        let src = src_root.join(&p.0);
        let dst = dst_root.join(&p.0);
        copy_one(&src, &dst).map_err(|source| Error::Io {
            path: p.0.clone(),
            source,
        })?;
    }
    Ok(())
}

fn copy_one(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let parent = dst
        .parent()
        .ok_or_else(|| io::Error::other("destination has no parent directory"))?;
    fs::create_dir_all(parent)?;
    let file_name = dst
        .file_name()
        .ok_or_else(|| io::Error::other("destination has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".btm-preserve.tmp");
    let tmp = parent.join(tmp_name);
    let result = (|| {
        let mut input = File::open(src)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::copy(&mut input, &mut out)?;
        std::os::unix::fs::fchown(&out, Some(meta.uid()), Some(meta.gid()))?;
        out.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        out.set_modified(meta.modified()?)?;
        out.sync_all()?;
        fs::rename(&tmp, dst)?;
        File::open(parent)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relpaths_are_checked() {
        assert!("data/priv_validator_state.json".parse::<RelPath>().is_ok());
        assert_eq!(
            "./a/./b".parse::<RelPath>().expect("ok").as_path(),
            Path::new("a/b")
        );
        for bad in ["", "/etc/passwd", "../x", "a/../../x", ".", "./"] {
            assert!(bad.parse::<RelPath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn copies_content_mode_and_mtime_atomically() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(src.path().join("data")).expect("mkdir");
        let f = src.path().join("data/state.json");
        fs::write(&f, b"{\"height\":42}").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).expect("chmod");
        let paths = vec!["data/state.json".parse::<RelPath>().expect("rel")];
        copy_into(src.path(), dst.path(), &paths).expect("copy");
        let out = dst.path().join("data/state.json");
        assert_eq!(fs::read(&out).expect("read"), b"{\"height\":42}");
        let (a, b) = (fs::metadata(&f).expect("m"), fs::metadata(&out).expect("m"));
        assert_eq!(b.mode() & 0o7777, 0o640);
        assert_eq!(a.mtime(), b.mtime());
        assert_eq!(
            fs::read_dir(dst.path().join("data")).expect("ls").count(),
            1
        );

        let missing = vec!["nope".parse::<RelPath>().expect("rel")];
        assert!(matches!(
            copy_into(src.path(), dst.path(), &missing),
            Err(Error::Missing(_))
        ));
    }
}
