//! Directory listings, streamed from the backing directory as the kernel
//! asks for them: a directory of a million entries costs one directory
//! stream, not a million names in memory.
//!
//! A listing's offsets are entry counts. The kernel reads on from where it
//! stopped; an offset from elsewhere (a `seekdir`, a rewind) starts the
//! stream again and skips to it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use fuser::FileType;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::skeleton::STATE_DIR;

/// One entry: backing inode number, type, name.
type Item = (u64, FileType, OsString);

/// An open directory being listed.
pub(super) struct DirStream {
    /// The directory, to start again from.
    fd: Arc<OwnedFd>,
    /// Its stream (an owning iterator: a borrowing one rewinds when
    /// dropped).
    dir: nix::dir::OwningIter,
    /// Whether it is the root, whose state directory is hidden.
    root: bool,
    /// The offset of the next entry the stream gives.
    pos: u64,
    /// An entry taken from the stream that the last reply had no room for.
    peeked: Option<Item>,
}

fn open_dir(fd: BorrowedFd<'_>) -> std::io::Result<nix::dir::OwningIter> {
    let dfd = openat(
        fd,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(nix::dir::Dir::from_fd(dfd)?.into_iter())
}

fn kind(t: Option<nix::dir::Type>) -> FileType {
    match t {
        Some(nix::dir::Type::Directory) => FileType::Directory,
        Some(nix::dir::Type::Symlink) => FileType::Symlink,
        Some(nix::dir::Type::Fifo) => FileType::NamedPipe,
        Some(nix::dir::Type::CharacterDevice) => FileType::CharDevice,
        Some(nix::dir::Type::BlockDevice) => FileType::BlockDevice,
        Some(nix::dir::Type::Socket) => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl DirStream {
    /// The directory `fd` refers to (any descriptor of it, `O_PATH`
    /// included; kept for as long as the listing is open).
    pub(super) fn open(fd: Arc<OwnedFd>, root: bool) -> std::io::Result<DirStream> {
        Ok(DirStream {
            dir: open_dir(fd.as_fd())?,
            fd,
            root,
            pos: 0,
            peeked: None,
        })
    }

    fn next_item(&mut self) -> std::io::Result<Option<Item>> {
        if let Some(i) = self.peeked.take() {
            return Ok(Some(i));
        }
        for e in self.dir.by_ref() {
            let e = e?;
            let name = e.file_name().to_bytes();
            if self.root && name == STATE_DIR.as_bytes() {
                continue;
            }
            return Ok(Some((
                e.ino(),
                kind(e.file_type()),
                OsStr::from_bytes(name).to_owned(),
            )));
        }
        Ok(None)
    }

    /// Give entries from `offset` on to `add` (backing inode, offset of the
    /// entry after it, type, name) until it says the reply is full.
    pub(super) fn read(
        &mut self,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> std::io::Result<()> {
        if offset != self.pos {
            self.dir = open_dir(self.fd.as_fd())?;
            self.pos = 0;
            self.peeked = None;
            while self.pos < offset && self.next_item()?.is_some() {
                self.pos += 1;
            }
        }
        while let Some(item) = self.next_item()? {
            if add(item.0, self.pos + 1, item.1, &item.2) {
                self.peeked = Some(item);
                break;
            }
            self.pos += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(d: &mut DirStream, offset: u64, room: usize) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        d.read(offset, |_, next, _, name| {
            if out.len() == room {
                return true;
            }
            out.push((next, name.to_string_lossy().into_owned()));
            false
        })
        .expect("read");
        out
    }

    #[test]
    fn a_listing_goes_on_where_it_stopped_and_starts_again_when_asked() {
        let tmp = tempfile::tempdir().expect("tmp");
        for i in 0..50 {
            std::fs::write(tmp.path().join(format!("f{i:02}")), b"").expect("w");
        }
        std::fs::create_dir(tmp.path().join(STATE_DIR)).expect("state");
        let fd = std::fs::File::open(tmp.path()).expect("open");
        let mut d = DirStream::open(Arc::new(fd.into()), true).expect("dir");
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let part = list(&mut d, offset, 7);
            let Some(&(next, _)) = part.last() else { break };
            offset = next;
            all.extend(part);
        }
        let names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names.len(),
            52,
            "50 files, . and .., not the state directory"
        );
        assert!(!names.contains(&STATE_DIR));
        // A rewind, and a jump back into the middle.
        assert_eq!(list(&mut d, 0, 3), all[..3].to_vec());
        assert_eq!(list(&mut d, 20, 2), all[20..22].to_vec());
    }
}
