//! Walking the tree to back up, in the order tree segments need (parents
//! first, siblings by the bytes of their names), and following the
//! previous backup's entries alongside it.
//!
//! The walk holds one open directory and its sorted names per level, never
//! the whole tree, and stats entries relative to their directory's
//! descriptor (`fstatat`), which is both faster and immune to a directory
//! being swapped for a symlink while the walk is in it.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};

use super::super::format::tree::{walk_order, ChunkRef, Entry, Item};
use super::super::inventory::Entries;
use super::super::ChunkError;

/// One entry found by the walk.
#[derive(Clone)]
pub struct Walked {
    /// Path relative to the root, raw bytes.
    pub rel: Vec<u8>,
    /// Its name in its directory.
    pub name: Vec<u8>,
    /// Its directory, open.
    pub dir: Arc<OwnedFd>,
    /// `lstat` of the entry.
    pub stat: FileStat,
    /// How many directories deep it is (0 at the root).
    pub depth: usize,
}

impl Walked {
    /// What the entry is.
    pub fn kind(&self) -> SFlag {
        SFlag::from_bits_truncate(self.stat.st_mode & SFlag::S_IFMT.bits())
    }
}

struct Frame {
    dir: Arc<OwnedFd>,
    rel: Vec<u8>,
    names: Vec<Vec<u8>>,
    next: usize,
}

/// The walk; an iterator of [`Walked`].
pub struct Walker {
    root: std::path::PathBuf,
    stack: Vec<Frame>,
    /// The directory just returned, opened only when the walk goes on
    /// into it: one the caller skips (an `--exclude`) is never opened, so
    /// an excluded directory this user cannot read is no error.
    pending: Option<Walked>,
}

use crate::localfs::DIR_FLAGS;

fn read_names(dir: &OwnedFd) -> std::io::Result<Vec<Vec<u8>>> {
    let dup = dir.try_clone()?;
    let mut d = nix::dir::Dir::from_fd(dup).map_err(std::io::Error::from)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(std::io::Error::from)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

impl Walker {
    /// Walk below `root` (not included).
    pub fn new(root: &Path) -> Result<Walker, ChunkError> {
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ChunkError::io(root, e.into()))?;
        let names = read_names(&fd).map_err(|e| ChunkError::io(root, e))?;
        Ok(Walker {
            root: root.to_owned(),
            stack: vec![Frame {
                dir: Arc::new(fd),
                rel: Vec::new(),
                names,
                next: 0,
            }],
            pending: None,
        })
    }

    /// Open the directory returned last and go into it.
    fn descend(&mut self, dir: Walked) -> Result<(), ChunkError> {
        let fd = openat(
            dir.dir.as_fd(),
            OsStr::from_bytes(&dir.name),
            DIR_FLAGS,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)
        .map_err(|e| ChunkError::io(&self.full(&dir.rel), e))?;
        let names = read_names(&fd).map_err(|e| ChunkError::io(&self.full(&dir.rel), e))?;
        self.stack.push(Frame {
            dir: Arc::new(fd),
            rel: dir.rel,
            names,
            next: 0,
        });
        Ok(())
    }

    fn full(&self, rel: &[u8]) -> std::path::PathBuf {
        self.root.join(OsStr::from_bytes(rel))
    }

    /// Do not descend into the directory just returned.
    pub fn skip_children(&mut self, of: &[u8]) {
        if self.pending.as_ref().is_some_and(|d| d.rel == of) {
            self.pending = None;
        }
    }
}

impl Iterator for Walker {
    type Item = Result<Walked, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(dir) = self.pending.take() {
            if let Err(e) = self.descend(dir) {
                return Some(Err(e));
            }
        }
        loop {
            let depth = self.stack.len().checked_sub(1)?;
            let frame = self.stack.last_mut()?;
            let Some(name) = frame.names.get(frame.next).cloned() else {
                self.stack.pop();
                continue;
            };
            frame.next += 1;
            let dir = Arc::clone(&frame.dir);
            let mut rel = frame.rel.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&name);
            let stat = match fstatat(
                dir.as_fd(),
                OsStr::from_bytes(&name),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(s) => s,
                // Gone since the directory was read: nothing to back up.
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Some(Err(ChunkError::io(&self.full(&rel), e.into()))),
            };
            let walked = Walked {
                rel,
                name,
                dir,
                stat,
                depth,
            };
            if walked.kind() == SFlag::S_IFDIR {
                self.pending = Some(walked.clone());
            }
            return Some(Ok(walked));
        }
    }
}

/// The previous backup's entries, followed in step with the walk.
pub struct Parent<'a> {
    entries: Entries<'a>,
    /// The entry the stream is positioned on (its chunks come next).
    current: Option<Entry>,
    /// Chunks of `current` read but not consumed.
    chunks: std::collections::VecDeque<ChunkRef>,
    /// The sought entry's chunks are all read: [`Parent::next_chunk`] gives
    /// nothing more until the next [`Parent::seek`], so a file that grew
    /// never takes the chunks of the entries after it.
    ended: bool,
    done: bool,
}

impl<'a> Parent<'a> {
    /// Follow `entries`.
    pub fn new(entries: Entries<'a>) -> Self {
        Parent {
            entries,
            current: None,
            chunks: Default::default(),
            ended: false,
            done: false,
        }
    }

    /// Pull one item; `false` at the end.
    fn pull(&mut self) -> Result<bool, ChunkError> {
        match self.entries.next_item()? {
            Some(Item::Entry(e)) => {
                self.current = Some(e);
                self.chunks.clear();
            }
            Some(Item::Chunks(c)) => self.chunks.extend(c),
            None => {
                self.done = true;
                self.current = None;
                self.chunks.clear();
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The previous record of `path`, if it has one. Entries before it (in
    /// walk order) are skipped; its chunks are then read with
    /// [`Parent::next_chunk`].
    pub fn seek(&mut self, path: &[u8]) -> Result<Option<Entry>, ChunkError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(e) = &self.current {
                match walk_order(&e.path, path) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        self.ended = false;
                        return Ok(Some(e.clone()));
                    }
                    std::cmp::Ordering::Greater => return Ok(None),
                }
            }
            // Skip to the next entry.
            loop {
                let had = self.current.as_ref().map(|e| e.path.clone());
                if !self.pull()? {
                    return Ok(None);
                }
                if self.current.as_ref().map(|e| &e.path) != had.as_ref() {
                    break;
                }
            }
        }
    }

    /// The next chunk of the entry [`Parent::seek`] found.
    pub fn next_chunk(&mut self) -> Result<Option<ChunkRef>, ChunkError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            if let Some(c) = self.chunks.pop_front() {
                return Ok(Some(c));
            }
            if self.done {
                return Ok(None);
            }
            let before = self.current.as_ref().map(|e| e.path.clone());
            if !self.pull()? {
                return Ok(None);
            }
            if self.current.as_ref().map(|e| &e.path) != before.as_ref() {
                // The next entry began: this one's chunks are all read.
                self.ended = true;
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory is opened only when the walk goes into it: one skipped
    /// (an `--exclude`) is never opened, so one this user cannot read, or
    /// one gone by then, is no error; one not skipped is walked.
    #[test]
    fn a_skipped_directory_is_never_opened() {
        let tmp = tempfile::tempdir().expect("tmp");
        for d in ["a/inner", "skipped/inner"] {
            std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
        }
        std::fs::write(tmp.path().join("a/inner/f"), b"x").expect("w");
        let mut w = Walker::new(tmp.path()).expect("walk");
        let mut seen = Vec::new();
        while let Some(e) = w.next() {
            let e = e.expect("no error");
            if e.rel == b"skipped" {
                // Gone before the walk would have read it.
                std::fs::remove_dir_all(tmp.path().join("skipped")).expect("rm");
                w.skip_children(&e.rel);
            }
            seen.push(String::from_utf8(e.rel).expect("utf8"));
        }
        assert_eq!(seen, ["a", "a/inner", "a/inner/f", "skipped"]);
    }
}
