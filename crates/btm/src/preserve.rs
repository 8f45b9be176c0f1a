//! Files that must survive a rollback unchanged.
//!
//! A validator that rolls back `data/priv_validator_state.json` forgets the
//! heights it already signed and can double-sign and be slashed. `btm
//! rollback --preserve PATH` therefore carries the *current* content of such
//! files (with mode, owner and mtime) into the rolled-back volume. Copies are
//! atomic (temporary file, fsync, rename), so a crash leaves either the old
//! or the new file, never a torn one. Both sides are resolved with
//! [`crate::confined`]: a symlink in the live volume or in the snapshot is
//! refused, never followed, so a preserve can neither read nor write a file
//! outside the volume.

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::confined::{self, Tree};

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
    /// A symlink on the way (in the live volume or in the snapshot) could
    /// lead outside the volume; nothing was changed.
    #[error("--preserve {path}: {detail}")]
    Escape {
        /// The preserved path.
        path: PathBuf,
        /// Which component is a symlink, and where.
        detail: crate::confined::Error,
    },
    /// Copying failed.
    #[error("preserving {path}: {detail}")]
    Io {
        /// The file being copied.
        path: PathBuf,
        /// What failed.
        detail: crate::confined::Error,
    },
}

/// A path relative to the volume root with no `..`, `.` or absolute parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

fn classify(path: &RelPath, e: confined::Error) -> Error {
    let path = path.0.clone();
    match e {
        e if e.is_not_found() => Error::Missing(path),
        e @ (confined::Error::Symlink { .. } | confined::Error::NotDir { .. }) => {
            Error::Escape { path, detail: e }
        }
        confined::Error::NotAFile { .. } => Error::NotAFile(path),
        e => Error::Io { path, detail: e },
    }
}

fn open_tree(root: &Path, first: Option<&RelPath>) -> Result<Tree, Error> {
    Tree::open(root).map_err(|detail| Error::Io {
        path: first.map(|p| p.0.clone()).unwrap_or_default(),
        detail,
    })
}

/// Check that every path is a regular file under `root`, reached without
/// following any symlink (a link could point outside the volume).
pub fn check_sources(root: &Path, paths: &[RelPath]) -> Result<(), Error> {
    if paths.is_empty() {
        return Ok(());
    }
    let tree = open_tree(root, paths.first())?;
    for p in paths {
        tree.open_file(&p.0).map_err(|e| classify(p, e))?;
    }
    Ok(())
}

/// Check that each path can be written under `root` (a snapshot about to
/// become the live volume) without following a symlink: every existing
/// parent is a real directory, and the name itself is not a directory.
/// Run before anything changes, so a refusal changes nothing.
pub fn check_destination(root: &Path, paths: &[RelPath]) -> Result<(), Error> {
    if paths.is_empty() {
        return Ok(());
    }
    let tree = open_tree(root, paths.first())?;
    for p in paths {
        let comps = confined::components(&p.0).map_err(|e| classify(p, e))?;
        let parents = &comps[..comps.len() - 1];
        // The deepest existing parent decides: everything above it was
        // opened without following, and what is missing gets created.
        for depth in (0..=parents.len()).rev() {
            match tree.dir(&parents[..depth], false) {
                Ok(_) => break,
                Err(e) if e.is_not_found() && depth > 0 => continue,
                Err(e) => return Err(classify(p, e)),
            }
        }
        if tree.kind(&p.0).map_err(|e| classify(p, e))? == Some(confined::Kind::Dir) {
            return Err(Error::NotAFile(p.0.clone()));
        }
    }
    Ok(())
}

/// Copy each `paths` entry from `src_root` to `dst_root`, replacing what is
/// there atomically and keeping mode, owner and mtime. Missing parent
/// directories in the destination are created. Neither side follows a
/// symlink: one on the way is refused.
pub fn copy_into(src_root: &Path, dst_root: &Path, paths: &[RelPath]) -> Result<(), Error> {
    if paths.is_empty() {
        return Ok(());
    }
    let src = open_tree(src_root, paths.first())?;
    let dst = open_tree(dst_root, paths.first())?;
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        files.push(src.open_file(&p.0).map_err(|e| classify(p, e))?);
    }
    for (p, mut file) in paths.iter().zip(files) {
        dst.replace_with_copy(&p.0, &mut file)
            .map_err(|e| classify(p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
