//! The inodes the kernel knows, by FUSE inode number: the file handle that
//! reaches each and how many lookups the kernel holds on it.
//!
//! A FUSE inode number is the backing inode number, the root's swapped
//! with 1. The table holds no descriptor per inode (a node that walks its
//! whole tree makes the kernel remember every inode in it): an inode is
//! reached by its handle through [`Backing`]'s bounded cache, so renames
//! and hard links cannot confuse it, and an inode deleted since is
//! `ESTALE`, never another file.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, RwLock};

use btm::sys::FileHandle;
use fuser::{Errno, INodeNo};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode};

use super::{errno, io_errno};
use crate::backing::Backing;

/// An inode the kernel knows.
struct Node {
    handle: FileHandle,
    lookups: u32,
}

/// Every inode the kernel knows.
pub(super) struct Nodes {
    root_ino: u64,
    root: Arc<OwnedFd>,
    map: RwLock<HashMap<u64, Node>>,
    backing: Arc<Backing>,
}

impl Nodes {
    /// The inodes under `backing`'s root.
    pub(super) fn new(backing: Arc<Backing>) -> std::io::Result<Nodes> {
        let root = openat(
            backing.root(),
            ".",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let root_ino = fstat(root.as_fd())?.st_ino;
        Ok(Nodes {
            root_ino,
            root: Arc::new(root),
            map: RwLock::new(HashMap::new()),
            backing,
        })
    }

    /// FUSE inode number of backing inode `ino` (and back: the swap is its
    /// own inverse).
    pub(super) fn swap(&self, ino: u64) -> u64 {
        if ino == self.root_ino {
            1
        } else if ino == 1 {
            self.root_ino
        } else {
            ino
        }
    }

    /// The handle of inode `ino` (not the root).
    pub(super) fn handle(&self, ino: INodeNo) -> Result<FileHandle, Errno> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(&ino.0)
            .map(|n| n.handle.clone())
            .ok_or(Errno::ESTALE)
    }

    /// An `O_PATH` descriptor of inode `ino`.
    pub(super) fn fd(&self, ino: INodeNo) -> Result<Arc<OwnedFd>, Errno> {
        if ino.0 == 1 {
            return Ok(Arc::clone(&self.root));
        }
        let handle = self.handle(ino)?;
        self.backing
            .node(self.swap(ino.0), &handle)
            .map_err(|e| io_errno(&e))
    }

    /// Look `name` up in `parent` and count one more kernel reference.
    pub(super) fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileStat, Errno> {
        let pfd = self.fd(parent)?;
        let fd = self
            .backing
            .with_room(|| {
                openat(
                    pfd.as_fd(),
                    name,
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(std::io::Error::from)
            })
            .map_err(|e| io_errno(&e))?;
        let st = fstat(fd.as_fd()).map_err(errno)?;
        let ino = self.swap(st.st_ino);
        if ino == 1 {
            return Ok(st);
        }
        let handle = btm::sys::handle_of(fd.as_fd()).map_err(|e| io_errno(&e))?;
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let node = map.entry(ino).or_insert_with(|| Node {
            handle: handle.clone(),
            lookups: 0,
        });
        // The same number but another inode (the old one was deleted and
        // its number reused): the new handle is the truth.
        if node.handle != handle {
            node.handle = handle;
        }
        node.lookups = node.lookups.saturating_add(1);
        drop(map);
        self.backing.keep_node(st.st_ino, fd);
        Ok(st)
    }

    /// The kernel forgets `n` lookups of `ino`.
    pub(super) fn forget(&self, ino: INodeNo, n: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = map.get_mut(&ino.0) {
            node.lookups = node
                .lookups
                .saturating_sub(n.min(u64::from(u32::MAX)) as u32);
            if node.lookups == 0 {
                map.remove(&ino.0);
                drop(map);
                self.backing.forget_inode(self.swap(ino.0));
            }
        }
    }
}
