//! The skeleton: the backup's whole tree made in the backing directory
//! before anything is fetched — directories, symlinks, and every file at
//! its final size as a hole, with its owner, mode and times. A file that
//! holds data gets the [`MARK`] attribute and a slot in the live files'
//! table ([`crate::table`]).
//!
//! It costs a few syscalls per entry and nothing per byte, which is why a
//! live restore is ready in seconds whatever the backup's size, and it
//! holds one file open at a time and nothing per entry in memory: the
//! table and the holes go to disk as the backup's tree streams by. A
//! directory's times are set as the walk leaves it. On resume the skeleton
//! is not made again: the table and the presence file say what is left.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use btm_chunk::format::tree::{ChunkRef, Entry, EntryKind, Item};
use btm_chunk::inventory::Entries;
use btm_chunk::localfs::{
    apply_file_metadata, split_name, symlink_owner_and_times, Found, Owners, DIR_FLAGS,
};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::durable::Durable;
use crate::files::{Loaded, MARK};
use crate::table::{Started, Table, Writer};
use crate::LiveError;

/// The state directory's name at the backing tree's root; the mount hides
/// it.
pub const STATE_DIR: &str = ".btm-live";

fn io(path: &[u8], e: std::io::Error) -> LiveError {
    LiveError::Io {
        path: String::from_utf8_lossy(path).into_owned(),
        source: e,
    }
}

/// Open directory `path` under `root`, one component at a time.
fn open_path(root: BorrowedFd<'_>, path: &[u8]) -> Result<OwnedFd, LiveError> {
    let mut fd = root.try_clone_to_owned().map_err(|e| io(path, e))?;
    for c in path.split(|&b| b == b'/') {
        fd = openat(fd.as_fd(), OsStr::from_bytes(c), DIR_FLAGS, Mode::empty())
            .map_err(|e| io(path, e.into()))?;
    }
    Ok(fd)
}

/// Directories open on the way to the current entry, with the entry of
/// each this run made: its metadata is set once the walk leaves it.
struct Stack<'r> {
    root: BorrowedFd<'r>,
    open: Vec<(Vec<u8>, OwnedFd, Option<Entry>)>,
    /// For a backup not in walk order (format 1 lists parents first, in
    /// any order), the directories whose metadata waits for the end.
    deferred: Option<Vec<Entry>>,
}

impl Stack<'_> {
    /// Leave the top directory.
    fn pop(&mut self) -> Result<(), LiveError> {
        if let Some((_, fd, Some(e))) = self.open.pop() {
            match &mut self.deferred {
                Some(later) => later.push(e),
                None => set_metadata(&File::from(fd), &e).map_err(|x| io(&e.path, x))?,
            }
        }
        Ok(())
    }

    fn parent(&mut self, path: &[u8]) -> Result<BorrowedFd<'_>, LiveError> {
        let (parent, _) = split_name(path);
        while let Some((p, _, _)) = self.open.last() {
            if !parent.is_empty() && (p == parent || parent.starts_with(&[&p[..], b"/"].concat())) {
                break;
            }
            self.pop()?;
        }
        if parent.is_empty() {
            return Ok(self.root);
        }
        if self.open.last().is_none_or(|(p, _, _)| p != parent) {
            // Not on the way (format 1 lists parents first, in any order).
            let fd = open_path(self.root, parent)?;
            self.open.push((parent.to_vec(), fd, None));
        }
        Ok(self.open.last().map_or(self.root, |(_, fd, _)| fd.as_fd()))
    }

    /// The walk is over: leave every directory.
    fn close(mut self) -> Result<(), LiveError> {
        while !self.open.is_empty() {
            self.pop()?;
        }
        if let Some(mut dirs) = self.deferred.take() {
            // Deepest first: making children changed their parents' times.
            dirs.sort_by_key(|e| std::cmp::Reverse(e.path.iter().filter(|&&c| c == b'/').count()));
            for e in &dirs {
                let fd = open_path(self.root, &e.path)?;
                set_metadata(&File::from(fd), e).map_err(|x| io(&e.path, x))?;
            }
        }
        Ok(())
    }
}

/// Owner, then mode (a chown clears setuid bits), then times.
fn set_metadata(f: &File, e: &Entry) -> std::io::Result<()> {
    apply_file_metadata(f, e, None, Owners::Recorded)
}

/// A symlink with its owner and times, never following it.
fn make_symlink(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    e: &Entry,
    target: &[u8],
) -> Result<(), LiveError> {
    nix::unistd::symlinkat(OsStr::from_bytes(target), parent, name)
        .map_err(|x| io(&e.path, x.into()))?;
    symlink_owner_and_times(parent, name, e, Owners::Recorded).map_err(|x| io(&e.path, x.into()))
}

/// A file made, whose chunks are streaming by.
struct Pending {
    entry: Entry,
    size: u64,
    file: File,
    started: Started,
    /// Chunks seen, and bytes of data among them.
    chunks: u64,
    data: u64,
}

/// One bit a chunk, growing as the table does: the holes.
#[derive(Default)]
struct Holes(Vec<u64>);

impl Holes {
    fn push(&mut self, g: u64, hole: bool) {
        let w = (g / 64) as usize;
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        let bit = 1 << (g % 64);
        if hole {
            self.0[w] |= bit;
        } else {
            self.0[w] &= !bit;
        }
    }

    fn get(&self, g: u64) -> bool {
        self.0
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }
}

/// What the walk has made so far.
struct Walk<'s> {
    table: Writer,
    holes: Holes,
    chunk_size: u64,
    state: BorrowedFd<'s>,
    current: Option<Pending>,
    total_bytes: u64,
    entries: u64,
}

impl Walk<'_> {
    fn chunks(&mut self, chunks: Vec<ChunkRef>) -> Result<(), LiveError> {
        let Some(p) = self.current.as_mut() else {
            return Ok(());
        };
        let first = self.table.start_of(p.started) + p.chunks;
        for (k, c) in chunks.iter().enumerate() {
            if c.off != (p.chunks + k as u64) * self.chunk_size {
                return Err(LiveError::Layout(p.entry.display().into_owned()));
            }
            self.holes.push(first + k as u64, c.hash.is_none());
            if c.hash.is_some() {
                p.data += c.len;
            }
        }
        p.chunks += chunks.len() as u64;
        self.table.chunks(chunks.iter().map(|c| c.hash))
    }

    /// The file's chunks are all known: a slot and a mark if it holds
    /// data; its metadata either way.
    fn finish_file(&mut self) -> Result<(), LiveError> {
        let Some(p) = self.current.take() else {
            return Ok(());
        };
        if p.chunks != p.size.div_ceil(self.chunk_size) {
            return Err(LiveError::Layout(p.entry.display().into_owned()));
        }
        self.total_bytes += p.data;
        if p.data == 0 {
            self.table.discard(p.started)?;
        } else {
            let handle = btm::sys::handle_of(p.file.as_fd()).map_err(|x| io(&p.entry.path, x))?;
            let slot = self.table.add(
                p.started,
                p.size,
                &p.entry.path,
                &handle,
                p.entry.mtime_ns,
                p.data,
            )?;
            xattr::FileExt::set_xattr(&p.file, MARK, &u64::from(slot).to_le_bytes())
                .map_err(|x| io(&p.entry.path, x))?;
        }
        // Made with its mode by this process: only what differs is set.
        apply_file_metadata(
            &p.file,
            &p.entry,
            Some(Found::made(p.entry.mode & 0o777)),
            Owners::Recorded,
        )
        .map_err(|x| io(&p.entry.path, x))
    }

    fn entry(&mut self, stack: &mut Stack<'_>, e: Entry) -> Result<(), LiveError> {
        self.finish_file()?;
        self.entries += 1;
        let parent = stack.parent(&e.path)?;
        let name = OsStr::from_bytes(split_name(&e.path).1);
        match &e.kind {
            EntryKind::Dir => {
                match nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
                    // The file system's own lost+found, at the top.
                    Err(nix::errno::Errno::EEXIST)
                        if e.path == crate::target::FS_ROOT_DIR.as_bytes() => {}
                    r => r.map_err(|x| io(&e.path, x.into()))?,
                }
                let fd = openat(parent, name, DIR_FLAGS, Mode::empty())
                    .map_err(|x| io(&e.path, x.into()))?;
                stack.open.push((e.path.clone(), fd, Some(e)));
            }
            EntryKind::Symlink { target } => make_symlink(parent, name, &e, target)?,
            EntryKind::Link { target } => {
                // Another name of a file made earlier: the same inode, so
                // its slot, mark and hydration are shared (the mount's
                // inodes are the backing inodes).
                let (dir, file) = split_name(target);
                let from = match dir {
                    [] => None,
                    dir => Some(open_path(stack.root, dir)?),
                };
                let from = from.as_ref().map_or(stack.root, |fd| fd.as_fd());
                let parent = stack.parent(&e.path)?;
                nix::unistd::linkat(
                    from,
                    OsStr::from_bytes(file),
                    parent,
                    name,
                    nix::fcntl::AtFlags::empty(),
                )
                .map_err(|x| io(&e.path, x.into()))?;
            }
            EntryKind::File { size } => {
                let fd = openat(
                    parent,
                    name,
                    OFlag::O_RDWR
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    // Its final permissions (the umask is 0): one call fewer.
                    Mode::from_bits_truncate(e.mode & 0o777),
                )
                .map_err(|x| io(&e.path, x.into()))?;
                let file = File::from(fd);
                file.set_len(*size).map_err(|x| io(&e.path, x))?;
                self.current = Some(Pending {
                    size: *size,
                    entry: e,
                    file,
                    started: self.table.start(),
                    chunks: 0,
                    data: 0,
                });
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Loaded, LiveError> {
        self.finish_file()?;
        let head = self.table.finish(self.total_bytes, self.entries)?;
        let holes = self.holes;
        let durable = Durable::create(self.state, head.chunks, |g| holes.get(g))?;
        let table = Table::open(self.state)?;
        Ok(Loaded { table, durable })
    }
}

/// Make the skeleton of `entries` (of `chunk_size` chunks, in walk order
/// if `walk_ordered`) under `root` (an empty directory but for the state
/// directory `state`), and the live files' table in `state`. The process's
/// umask must be 0: files are made with their permissions.
pub fn build(
    root: BorrowedFd<'_>,
    state: BorrowedFd<'_>,
    mut entries: Entries<'_>,
    chunk_size: u64,
    walk_ordered: bool,
) -> Result<Loaded, LiveError> {
    let mut stack = Stack {
        root,
        open: Vec::new(),
        deferred: (!walk_ordered).then(Vec::new),
    };
    let mut walk = Walk {
        table: Writer::create(state, chunk_size)?,
        holes: Holes::default(),
        chunk_size,
        state,
        current: None,
        total_bytes: 0,
        entries: 0,
    };
    while let Some(item) = entries.next_item()? {
        match item {
            Item::Chunks(chunks) => walk.chunks(chunks)?,
            Item::Entry(e) => walk.entry(&mut stack, e)?,
        }
    }
    walk.finish_file()?;
    stack.close()?;
    walk.finish()
}

/// Pick up the skeleton and table an earlier run made in `state`, for a
/// backup of `chunk_size` chunks.
pub fn resume(state: BorrowedFd<'_>, chunk_size: u64) -> Result<Loaded, LiveError> {
    let table = Table::open(state)?;
    if table.head.chunk_size != chunk_size {
        return Err(LiveError::state(
            "reading the live files' table",
            std::io::Error::other("it was made for another chunk size"),
        ));
    }
    let durable = Durable::open(state, table.head.chunks)?;
    Ok(Loaded { table, durable })
}
