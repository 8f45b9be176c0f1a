//! The skeleton: the backup's whole tree made in the backing directory
//! before anything is fetched — directories, symlinks, and every file at
//! its final size as a hole, with its owner, mode and times. A file that
//! holds data gets the [`MARK`] attribute and becomes a [`LiveFile`].
//!
//! It costs a few syscalls per entry and nothing per byte, which is why a
//! live restore is ready in seconds whatever the backup's size. On resume
//! the skeleton is not made again: the marks found in the backing tree say
//! which files are still live, wherever the node renamed them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use btm_chunk::catalog::Entries;
use btm_chunk::format::tree::{ChunkRef, Entry, EntryKind, Item};
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode};
use nix::sys::time::TimeSpec;

use crate::files::{Backing, LiveFile, MARK};
use crate::journal::Replayed;
use crate::LiveError;

/// The state directory's name at the backing tree's root; the mount hides
/// it.
pub const STATE_DIR: &str = ".btm-live";

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// What the skeleton left to fetch.
pub struct Built {
    /// Files that hold data not local yet.
    pub files: Vec<Arc<LiveFile>>,
    /// Bytes of data in the whole backup.
    pub total_bytes: u64,
    /// Entries in the backup.
    pub entries: u64,
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

fn split_name(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

/// Directories open on the way to the current entry.
struct Stack<'r> {
    root: BorrowedFd<'r>,
    open: Vec<(Vec<u8>, OwnedFd)>,
}

impl Stack<'_> {
    fn parent(&mut self, path: &[u8]) -> Result<BorrowedFd<'_>, LiveError> {
        let (parent, _) = split_name(path);
        if parent.is_empty() {
            return Ok(self.root);
        }
        while let Some((p, _)) = self.open.last() {
            if p == parent || parent.starts_with(&[&p[..], b"/"].concat()) {
                break;
            }
            self.open.pop();
        }
        if self.open.last().is_none_or(|(p, _)| p != parent) {
            // Not on the way (format 1 lists parents first, in any order).
            let mut fd = self.root.try_clone_to_owned().map_err(|e| io(parent, e))?;
            for c in parent.split(|&b| b == b'/') {
                fd = openat(fd.as_fd(), OsStr::from_bytes(c), DIR_FLAGS, Mode::empty())
                    .map_err(|e| io(parent, e.into()))?;
            }
            self.open.push((parent.to_vec(), fd));
        }
        Ok(self.open.last().map_or(self.root, |(_, fd)| fd.as_fd()))
    }
}

fn io(path: &[u8], e: std::io::Error) -> LiveError {
    LiveError::Io {
        path: String::from_utf8_lossy(path).into_owned(),
        source: e,
    }
}

/// A file entry whose chunks are being collected.
struct Pending {
    entry: Entry,
    id: u64,
    file: Option<File>,
    chunks: Vec<ChunkRef>,
}

/// Walk `entries`: `entry` handles each entry (given the next file id)
/// and returns the file whose chunks follow, if any; each file, once its
/// chunks are known, becomes live if it holds data ([`finish_file`]).
fn stream(
    entries: &mut Entries<'_>,
    chunk_size: u64,
    found: &HashMap<u64, (File, u64)>,
    mut entry: impl FnMut(Entry, u64) -> Result<Option<Pending>, LiveError>,
) -> Result<Built, LiveError> {
    let mut built = Built {
        files: Vec::new(),
        total_bytes: 0,
        entries: 0,
    };
    let mut current: Option<Pending> = None;
    let mut next_id = 0u64;
    while let Some(item) = entries.next_item()? {
        match item {
            Item::Chunks(chunks) => {
                if let Some(p) = current.as_mut() {
                    p.chunks.extend(chunks);
                }
            }
            Item::Entry(e) => {
                if let Some(p) = current.take() {
                    finish_file(p, chunk_size, &mut built, found)?;
                }
                built.entries += 1;
                let is_file = matches!(e.kind, EntryKind::File { .. });
                current = entry(e, next_id)?;
                if is_file {
                    next_id += 1;
                }
            }
        }
    }
    if let Some(p) = current.take() {
        finish_file(p, chunk_size, &mut built, found)?;
    }
    Ok(built)
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
    nix::unistd::fchownat(
        parent,
        name,
        Some(e.uid.into()),
        Some(e.gid.into()),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|x| io(&e.path, x.into()))?;
    let ts = timespec(e.mtime_ns);
    nix::sys::stat::utimensat(
        parent,
        name,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|x| io(&e.path, x.into()))
}

/// Make the skeleton of `entries` under `root` (an empty directory).
pub fn build(
    root: BorrowedFd<'_>,
    mut entries: Entries<'_>,
    chunk_size: u64,
) -> Result<Built, LiveError> {
    let mut stack = Stack {
        root,
        open: Vec::new(),
    };
    let mut dirs: Vec<Entry> = Vec::new();
    let no_marks = HashMap::new();
    let built = stream(&mut entries, chunk_size, &no_marks, |e, id| {
        let parent = stack.parent(&e.path)?;
        let name = OsStr::from_bytes(split_name(&e.path).1);
        match &e.kind {
            EntryKind::Dir => {
                nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(0o700))
                    .map_err(|x| io(&e.path, x.into()))?;
                let fd = openat(parent, name, DIR_FLAGS, Mode::empty())
                    .map_err(|x| io(&e.path, x.into()))?;
                stack.open.push((e.path.clone(), fd));
                dirs.push(e);
                Ok(None)
            }
            EntryKind::Symlink { target } => {
                make_symlink(parent, name, &e, target)?;
                Ok(None)
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
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|x| io(&e.path, x.into()))?;
                let file = File::from(fd);
                file.set_len(*size).map_err(|x| io(&e.path, x))?;
                Ok(Some(Pending {
                    entry: e,
                    id,
                    file: Some(file),
                    chunks: Vec::new(),
                }))
            }
        }
    })?;
    // Deepest first: making children changed their parents' times.
    dirs.sort_by_key(|e| std::cmp::Reverse(e.path.iter().filter(|&&c| c == b'/').count()));
    for e in &dirs {
        let mut fd = root.try_clone_to_owned().map_err(|x| io(&e.path, x))?;
        for c in e.path.split(|&b| b == b'/') {
            fd = openat(fd.as_fd(), OsStr::from_bytes(c), DIR_FLAGS, Mode::empty())
                .map_err(|x| io(&e.path, x.into()))?;
        }
        set_metadata(&File::from(fd), e).map_err(|x| io(&e.path, x))?;
    }
    Ok(built)
}

/// Owner, then mode (a chown clears setuid bits), then times.
fn set_metadata(f: &File, e: &Entry) -> std::io::Result<()> {
    std::os::unix::fs::fchown(f, Some(e.uid), Some(e.gid))?;
    nix::sys::stat::fchmod(f, Mode::from_bits_truncate(e.mode & 0o7777))?;
    let ts = timespec(e.mtime_ns);
    nix::sys::stat::futimens(f, &ts, &ts)?;
    Ok(())
}

/// The file's chunks are all known: mark it live if it holds data (and,
/// on a fresh skeleton, give it its metadata).
fn finish_file(
    p: Pending,
    chunk_size: u64,
    built: &mut Built,
    found: &HashMap<u64, (File, u64)>,
) -> Result<(), LiveError> {
    let data: u64 = p
        .chunks
        .iter()
        .filter(|c| c.hash.is_some())
        .map(|c| c.len)
        .sum();
    built.total_bytes += data;
    let laid_out = p
        .chunks
        .iter()
        .enumerate()
        .all(|(i, c)| c.off == i as u64 * chunk_size);
    if !laid_out {
        return Err(LiveError::Layout(p.entry.display().into_owned()));
    }
    let (file, ino) = match p.file {
        Some(file) => {
            if data > 0 {
                xattr::FileExt::set_xattr(&file, MARK, &p.id.to_le_bytes())
                    .map_err(|x| io(&p.entry.path, x))?;
            }
            set_metadata(&file, &p.entry).map_err(|x| io(&p.entry.path, x))?;
            let ino = nix::sys::stat::fstat(&file)
                .map_err(|x| io(&p.entry.path, x.into()))?
                .st_ino;
            (file, ino)
        }
        None => match found.get(&p.id) {
            Some((file, ino)) => (file.try_clone().map_err(|x| io(&p.entry.path, x))?, *ino),
            None => return Ok(()),
        },
    };
    if data == 0 {
        return Ok(());
    }
    // Fills keep the file's modification time: the backup's, or what the
    // node left on a file an earlier run served.
    let mtime = nix::sys::stat::fstat(&file)
        .map(|st| TimeSpec::new(st.st_mtime, st.st_mtime_nsec))
        .map_err(|x| io(&p.entry.path, x.into()))?;
    built.files.push(Arc::new(LiveFile::new(
        p.id,
        p.entry.display().into_owned(),
        p.chunks,
        chunk_size,
        Backing { file, ino },
        mtime,
    )));
    Ok(())
}

/// Find the live files of an earlier run: every regular file in the
/// backing tree with the [`MARK`] attribute, by file id.
fn find_marked(root: BorrowedFd<'_>) -> Result<HashMap<u64, (File, u64)>, LiveError> {
    let mut found = HashMap::new();
    let mut todo: Vec<(Vec<u8>, OwnedFd)> = vec![(
        Vec::new(),
        root.try_clone_to_owned().map_err(|e| io(b".", e))?,
    )];
    while let Some((path, dir)) = todo.pop() {
        let mut d = nix::dir::Dir::from_fd(dir).map_err(|e| io(&path, e.into()))?;
        let fd = d.as_fd().try_clone_to_owned().map_err(|e| io(&path, e))?;
        for ent in d.iter() {
            let ent = ent.map_err(|e| io(&path, e.into()))?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." || (path.is_empty() && name == STATE_DIR.as_bytes()) {
                continue;
            }
            let child = if path.is_empty() {
                name.to_vec()
            } else {
                [&path[..], b"/", name].concat()
            };
            let name = OsStr::from_bytes(name);
            let st = fstatat(fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| io(&child, e.into()))?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    let sub = openat(fd.as_fd(), name, DIR_FLAGS, Mode::empty())
                        .map_err(|e| io(&child, e.into()))?;
                    todo.push((child, sub));
                }
                libc::S_IFREG => {
                    let f = File::from(
                        openat(
                            fd.as_fd(),
                            name,
                            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| io(&child, e.into()))?,
                    );
                    if let Ok(Some(v)) = xattr::FileExt::get_xattr(&f, MARK) {
                        if let Ok(id) = <[u8; 8]>::try_from(v.as_slice()) {
                            found.insert(u64::from_le_bytes(id), (f, st.st_ino));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(found)
}

/// Pick up the live files of an earlier run over `root`, with the chunks
/// the journal says are local.
pub fn resume(
    root: BorrowedFd<'_>,
    mut entries: Entries<'_>,
    chunk_size: u64,
    replayed: &Replayed,
) -> Result<Built, LiveError> {
    let found = find_marked(root)?;
    let built = stream(&mut entries, chunk_size, &found, |e, id| {
        Ok(matches!(e.kind, EntryKind::File { .. }).then(|| Pending {
            entry: e,
            id,
            file: None,
            chunks: Vec::new(),
        }))
    })?;
    for f in &built.files {
        if let Some(rs) = replayed.get(&f.id) {
            f.mark_present(rs);
        }
    }
    Ok(built)
}
