//! File operations confined to one directory tree.
//!
//! Paths given relative to a tree's root are resolved one component at a
//! time, each opened with `O_NOFOLLOW` relative to its parent's descriptor.
//! A symlink anywhere below the root, whether planted in a snapshot or
//! swapped in while btm works, is refused rather than followed, so nothing
//! outside the tree is ever read or written through it, and a name is never
//! resolved twice between a check and its use. (`openat2` with
//! `RESOLVE_BENEATH` would do the same in one call, but only on Linux 5.6
//! and later; node operators run older kernels.)
//!
//! The root itself is opened as given: it is the operator's path.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchownat, unlinkat, UnlinkatFlags};

/// Why a confined operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A component of the path is a symlink; following it could leave the
    /// tree.
    #[error("'{path}' in {root} is a symlink; refusing to follow it")]
    Symlink {
        /// The tree's root.
        root: PathBuf,
        /// The symlink, relative to the root.
        path: PathBuf,
    },
    /// A component that must be a directory is something else.
    #[error("'{path}' in {root} is not a directory")]
    NotDir {
        /// The tree's root.
        root: PathBuf,
        /// The component, relative to the root.
        path: PathBuf,
    },
    /// A name that must be a regular file is something else.
    #[error("'{path}' in {root} is not a regular file")]
    NotAFile {
        /// The tree's root.
        root: PathBuf,
        /// The entry, relative to the root.
        path: PathBuf,
    },
    /// The path is not a plain relative path (`..`, absolute, empty).
    #[error("'{0}' is not a plain relative path")]
    NotRelative(PathBuf),
    /// A system call failed.
    #[error("{path}: {cause}")]
    Io {
        /// The full path involved.
        path: PathBuf,
        /// What the system said.
        cause: io::Error,
    },
}

impl Error {
    /// Whether the failure is "no such file or directory".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { cause, .. } if cause.kind() == io::ErrorKind::NotFound)
    }
}

/// What is at a name, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, fifo or socket.
    Other,
}

/// A directory tree whose paths are resolved without following symlinks.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    fd: OwnedFd,
}

/// The normal components of `rel`, or an error if it has any other kind.
pub fn components(rel: &Path) -> Result<Vec<&OsStr>, Error> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(Error::NotRelative(rel.to_owned())),
        }
    }
    if out.is_empty() {
        return Err(Error::NotRelative(rel.to_owned()));
    }
    Ok(out)
}

fn kind_of(mode: u32) -> Kind {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// How a directory below the root is opened: read-only, never through a
/// symlink, closed on exec.
pub const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Tree {
    /// Open the tree rooted at `root` (which must be a directory).
    pub fn open(root: &Path) -> Result<Tree, Error> {
        let fd = File::open(root)
            .and_then(|f| {
                if f.metadata()?.is_dir() {
                    Ok(OwnedFd::from(f))
                } else {
                    Err(io::Error::from(io::ErrorKind::NotADirectory))
                }
            })
            .map_err(|cause| Error::Io {
                path: root.to_owned(),
                cause,
            })?;
        Ok(Tree {
            root: root.to_owned(),
            fd,
        })
    }

    /// The root as given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, rel: &[&OsStr], errno: Errno) -> Error {
        Error::Io {
            path: self.root.join(join(rel)),
            cause: io::Error::from(errno),
        }
    }

    /// Turn a failed `openat` of `rel` (the last component opened in
    /// `parent`) into the precise reason: a symlink or a non-directory is
    /// named as such rather than as ELOOP or ENOTDIR.
    fn classify(&self, parent: &OwnedFd, rel: &[&OsStr], errno: Errno) -> Error {
        if matches!(errno, Errno::ELOOP | Errno::ENOTDIR) {
            let name = rel.last().copied().unwrap_or_default();
            if let Ok(st) = fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                let path = join(rel);
                return match kind_of(st.st_mode) {
                    Kind::Symlink => Error::Symlink {
                        root: self.root.clone(),
                        path,
                    },
                    _ => Error::NotDir {
                        root: self.root.clone(),
                        path,
                    },
                };
            }
        }
        self.io(rel, errno)
    }

    /// The directory `rel` (all of its components), each component opened
    /// without following symlinks. With `create`, missing directories are
    /// made with mode 0755 (then subject to the umask).
    pub fn dir(&self, rel: &[&OsStr], create: bool) -> Result<OwnedFd, Error> {
        let mut cur = self.fd.try_clone().map_err(|cause| Error::Io {
            path: self.root.clone(),
            cause,
        })?;
        for i in 0..rel.len() {
            let name = rel[i];
            let next = match openat(&cur, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&cur, name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.io(&rel[..=i], e)),
                    }
                    openat(&cur, name, DIR_FLAGS, Mode::empty())
                        .map_err(|e| self.classify(&cur, &rel[..=i], e))?
                }
                Err(e) => return Err(self.classify(&cur, &rel[..=i], e)),
            };
            cur = next;
        }
        Ok(cur)
    }

    /// What is at `rel`, without following a symlink there or on the way;
    /// `None` if nothing is.
    pub fn kind(&self, rel: &Path) -> Result<Option<Kind>, Error> {
        let comps = components(rel)?;
        let (name, parents) = split_last(&comps);
        let parent = match self.dir(parents, false) {
            Ok(p) => p,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        match fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(kind_of(st.st_mode))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.io(&comps, e)),
        }
    }

    /// The entries of directory `rel` (empty: the root) with what each is,
    /// symlinks not followed. Sorted by name.
    pub fn list(&self, rel: &Path) -> Result<Vec<(std::ffi::OsString, Kind)>, Error> {
        let comps = if rel.as_os_str().is_empty() {
            Vec::new()
        } else {
            components(rel)?
        };
        let fd = self.dir(&comps, false)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| self.io(&comps, e))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| self.io(&comps, e))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            out.push(name.to_owned());
        }
        let fd = self.dir(&comps, false)?;
        let mut listed = Vec::with_capacity(out.len());
        for name in out {
            match fstatat(
                &fd,
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => listed.push((name, kind_of(st.st_mode))),
                // Removed since it was listed.
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(self.io(&comps, e)),
            }
        }
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(listed)
    }

    /// Open the regular file `rel` for reading. A symlink anywhere on the
    /// way, or at `rel` itself, is refused.
    pub fn open_file(&self, rel: &Path) -> Result<File, Error> {
        let comps = components(rel)?;
        let (name, parents) = split_last(&comps);
        let parent = self.dir(parents, false)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        let fd = openat(&parent, name, flags, Mode::empty())
            .map_err(|e| self.classify(&parent, &comps, e))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|cause| Error::Io {
            path: self.root.join(rel),
            cause,
        })?;
        if !meta.is_file() {
            return Err(Error::NotAFile {
                root: self.root.clone(),
                path: rel.to_owned(),
            });
        }
        Ok(file)
    }

    /// Replace `rel` atomically with the bytes of `src`, with `src`'s
    /// mode, owner and modification time: a temporary file in the same
    /// directory, fsynced, renamed over `rel`, then the directory fsynced.
    /// Missing parent directories are created; a symlink on the way is
    /// refused. A symlink *at* `rel` is replaced, never followed.
    pub fn replace_with_copy(&self, rel: &Path, src: &mut File) -> Result<(), Error> {
        let comps = components(rel)?;
        let (name, parents) = split_last(&comps);
        let parent = self.dir(parents, true)?;
        let meta = src.metadata().map_err(|cause| Error::Io {
            path: self.root.join(rel),
            cause,
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".btm-{}.tmp", std::process::id()));
        let tmp = tmp_name.as_os_str();
        let full = self.root.join(rel);
        let io_err = |cause: io::Error| Error::Io {
            path: full.clone(),
            cause,
        };
        // A stale temporary from a crashed run is ours to remove.
        let _ = unlinkat(&parent, tmp, UnlinkatFlags::NoRemoveDir);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&parent, tmp, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err(io::Error::from(e)))?;
        let mut out = File::from(fd);
        let written = (|| -> io::Result<()> {
            io::copy(src, &mut out)?;
            std::os::unix::fs::fchown(&out, Some(meta.uid()), Some(meta.gid()))?;
            out.set_permissions(meta.permissions())?;
            out.set_modified(meta.modified()?)?;
            out.sync_all()
        })();
        let renamed = written.and_then(|()| {
            renameat(&parent, tmp, &parent, name).map_err(io::Error::from)?;
            File::from(parent.try_clone()?).sync_all()
        });
        if let Err(cause) = renamed {
            let _ = unlinkat(&parent, tmp, UnlinkatFlags::NoRemoveDir);
            return Err(io_err(cause));
        }
        Ok(())
    }

    /// Change the owner of the entry at `rel` without following it.
    pub fn chown(&self, rel: &Path, uid: u32, gid: u32) -> Result<(), Error> {
        let comps = components(rel)?;
        let (name, parents) = split_last(&comps);
        let parent = self.dir(parents, false)?;
        fchownat(
            &parent,
            name,
            Some(uid.into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io(&comps, e))
    }

    /// The directory descriptor of the root, for callers that walk on.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn split_last<'a, 'b>(comps: &'b [&'a OsStr]) -> (&'a OsStr, &'b [&'a OsStr]) {
    match comps.split_last() {
        Some((last, parents)) => (last, parents),
        None => (OsStr::from_bytes(b""), &[]),
    }
}

fn join(comps: &[&OsStr]) -> PathBuf {
    comps.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_on_the_way_are_refused_not_followed() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), b"root only").expect("w");
        std::fs::write(root.join("real/f"), b"inside").expect("w");
        symlink(&outside, root.join("data")).expect("ln");
        symlink(outside.join("secret"), root.join("real/link")).expect("ln");
        let tree = Tree::open(&root).expect("open");

        assert!(matches!(
            tree.open_file(Path::new("data/secret")),
            Err(Error::Symlink { ref path, .. }) if path == Path::new("data")
        ));
        assert!(matches!(
            tree.open_file(Path::new("real/link")),
            Err(Error::Symlink { .. })
        ));
        assert_eq!(
            tree.kind(Path::new("data")).expect("kind"),
            Some(Kind::Symlink)
        );
        assert_eq!(tree.kind(Path::new("nope/x")).expect("kind"), None);

        let mut src = File::open(root.join("real/f")).expect("open");
        let err = tree
            .replace_with_copy(Path::new("data/secret"), &mut src)
            .expect_err("must refuse");
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
        assert_eq!(
            std::fs::read(outside.join("secret")).expect("r"),
            b"root only"
        );
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 1);

        // Created parents, and a symlink at the name itself is replaced.
        let mut src = File::open(root.join("real/f")).expect("open");
        tree.replace_with_copy(Path::new("new/dir/f"), &mut src)
            .expect("copy");
        assert_eq!(std::fs::read(root.join("new/dir/f")).expect("r"), b"inside");
        let mut src = File::open(root.join("real/f")).expect("open");
        tree.replace_with_copy(Path::new("real/link"), &mut src)
            .expect("copy");
        assert!(std::fs::symlink_metadata(root.join("real/link"))
            .expect("m")
            .is_file());
        assert_eq!(
            std::fs::read(outside.join("secret")).expect("r"),
            b"root only"
        );
    }

    #[test]
    fn paths_must_be_plain_and_relative() {
        for bad in ["", "/etc/passwd", "../x", "a/../b"] {
            assert!(components(Path::new(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(components(Path::new("./a/b")).expect("ok").len(), 2);
    }
}
