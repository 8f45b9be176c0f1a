//! The backing tree: the directory the mount covers, and the only place
//! the server opens what is in it.
//!
//! The server holds one descriptor of the tree's root and reaches every
//! other inode by its file handle ([`btm::sys::FileHandle`]), which
//! follows renames and hard links and is refused once its inode is gone.
//! What it opens is kept in two bounded caches: the backing files that
//! hydration and on-demand reads fill, and the inodes the kernel asked
//! about. So the descriptors in use are a constant (sized from the limit)
//! plus one per file the node itself has open through the mount, whatever
//! the size of the tree; a tree of ten million files is served under the
//! usual limit of 1024.
//!
//! An open that finds the limit reached anyway (the node holds many files
//! open) empties both caches and tries once more before it fails.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use btm::sys::FileHandle;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::lru::Lru;
use crate::LiveError;

/// The probe file [`probe`] makes and removes.
pub const PROBE: &str = ".btm-live.probe";

/// The least descriptor limit a live restore runs under: the caches'
/// floor, the store's connections, the FUSE channels and room for the
/// node's own opens.
pub const MIN_OPEN_FILES: u64 = 256;

/// The root, and the inodes under it that are open now.
#[derive(Debug)]
pub struct Backing {
    root: OwnedFd,
    /// Backing files being filled: by live-file slot, with their inode
    /// number (for [`Backing::forget_inode`]).
    files: Lru<u32, (u64, Arc<File>)>,
    /// `O_PATH` descriptors of inodes the kernel knows, by inode number.
    nodes: Lru<u64, Arc<OwnedFd>>,
}

fn emfile(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl Backing {
    /// The tree under directory `root`, for a process allowed
    /// `open_files` descriptors.
    pub fn new(root: OwnedFd, open_files: u64) -> Self {
        let each = (open_files / 8).clamp(16, 256) as usize;
        Backing {
            root,
            files: Lru::new(each),
            nodes: Lru::new(each),
        }
    }

    /// The root directory.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Run `open`; if the descriptor limit is reached, empty the caches
    /// and run it once more.
    pub fn with_room<T>(&self, mut open: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
        match open() {
            Err(e) if emfile(&e) => {
                tracing::debug!("descriptor limit reached: emptying the caches");
                self.files.clear();
                self.nodes.clear();
                open()
            }
            r => r,
        }
    }

    /// Open the inode `h` names with `flags`.
    pub fn open(&self, h: &FileHandle, flags: OFlag) -> std::io::Result<OwnedFd> {
        self.with_room(|| btm::sys::open_by_handle(self.root(), h, flags))
    }

    /// Live file `slot`'s backing file, reached by `h`, open for reading
    /// and writing; `ESTALE` once its inode is gone.
    pub fn file(&self, slot: u32, h: &FileHandle) -> std::io::Result<Arc<File>> {
        if let Some((_, f)) = self.files.get(&slot) {
            return Ok(f);
        }
        let f = File::from(self.open(h, OFlag::O_RDWR)?);
        let ino = nix::sys::stat::fstat(&f)
            .map_err(std::io::Error::from)?
            .st_ino;
        let f = Arc::new(f);
        self.files.insert(slot, (ino, Arc::clone(&f)));
        Ok(f)
    }

    /// An `O_PATH` descriptor of inode `ino`, reached by `h`.
    pub fn node(&self, ino: u64, h: &FileHandle) -> std::io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.nodes.get(&ino) {
            return Ok(fd);
        }
        let fd = Arc::new(self.open(h, OFlag::O_PATH)?);
        self.nodes.insert(ino, Arc::clone(&fd));
        Ok(fd)
    }

    /// Keep `fd`, just opened, as inode `ino`'s.
    pub fn keep_node(&self, ino: u64, fd: OwnedFd) -> Arc<OwnedFd> {
        let fd = Arc::new(fd);
        self.nodes.insert(ino, Arc::clone(&fd));
        fd
    }

    /// Inode `ino` lost a name, or the kernel forgot it: let go of its
    /// descriptors, so that a deleted file's space is freed.
    pub fn forget_inode(&self, ino: u64) {
        self.nodes.remove(&ino);
        self.files.remove_where(|_, (i, _)| *i == ino);
    }

    /// Hydration is over: no backing file needs filling.
    pub fn forget_files(&self) {
        self.files.clear();
    }

    /// Descriptors the caches hold.
    #[cfg(test)]
    fn cached(&self) -> usize {
        self.files.len() + self.nodes.len()
    }
}

/// Check, before anything is made, that the file system under `state` (the
/// target, or its state directory) gives what a live restore needs: file
/// handles that reopen, and user extended attributes. A probe file is made
/// there and removed. Each failure names what to change.
pub fn probe(state: BorrowedFd<'_>, dir: &std::path::Path) -> Result<(), LiveError> {
    let unsupported = |what: &str, e: std::io::Error| {
        LiveError::Unsupported(format!(
            "the file system under {} {what} ({e})",
            dir.display()
        ))
    };
    let fd = openat(
        state,
        PROBE,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| LiveError::state("making a probe file", e.into()))?;
    let file = File::from(fd);
    let result = (|| {
        xattr::FileExt::set_xattr(&file, crate::files::MARK, b"probe").map_err(|e| {
            unsupported(
                "has no user extended attributes; a live restore needs them (ext4, XFS, btrfs, ZFS; tmpfs since Linux 6.6)",
                e,
            )
        })?;
        let h = btm::sys::handle_of(file.as_fd()).map_err(|e| {
            unsupported(
                "cannot give file handles (name_to_handle_at); a live restore needs them (ext4, XFS, btrfs, ZFS, tmpfs)",
                e,
            )
        })?;
        btm::sys::open_by_handle(state, &h, OFlag::O_RDONLY).map_err(|e| {
            if e.raw_os_error() == Some(libc::EPERM) {
                LiveError::Unsupported(format!(
                    "cannot open files by handle ({e}): a live restore needs the CAP_DAC_READ_SEARCH capability (run it as root; in a container or unit, add the capability)"
                ))
            } else {
                unsupported("cannot open files by handle (open_by_handle_at)", e)
            }
        })?;
        Ok(())
    })();
    let _ = nix::unistd::unlinkat(state, PROBE, nix::unistd::UnlinkatFlags::NoRemoveDir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_reached_by_handle_and_let_go_of_when_unlinked() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = nix::fcntl::open(
            dir.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .expect("root");
        probe(root.as_fd(), dir.path()).expect("a disk file system has what it takes");
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        let f = File::open(dir.path().join("f")).expect("open");
        let h = btm::sys::handle_of(f.as_fd()).expect("handle");
        let ino = nix::sys::stat::fstat(&f).expect("stat").st_ino;
        drop(f);
        let b = Backing::new(root, 256);
        let a = b.file(7, &h).expect("by handle");
        assert!(Arc::ptr_eq(&a, &b.file(7, &h).expect("cached")));
        b.node(ino, &h).expect("node");
        assert_eq!(b.cached(), 2);
        std::fs::rename(dir.path().join("f"), dir.path().join("g")).expect("mv");
        b.forget_inode(ino);
        assert_eq!(b.cached(), 0);
        std::fs::remove_file(dir.path().join("g")).expect("rm");
        drop(a);
        let gone = b.file(7, &h).expect_err("gone");
        assert_eq!(gone.raw_os_error(), Some(libc::ESTALE));
    }

    #[test]
    fn a_full_descriptor_table_empties_the_caches_and_tries_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = nix::fcntl::open(dir.path(), OFlag::O_RDONLY, Mode::empty()).expect("root");
        let b = Backing::new(root, 256);
        let mut tries = 0;
        let r = b.with_room(|| {
            tries += 1;
            if tries == 1 {
                Err(std::io::Error::from_raw_os_error(libc::EMFILE))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(r.expect("second try"), 2);
    }
}
