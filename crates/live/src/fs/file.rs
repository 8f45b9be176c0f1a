//! Open regular files: how an open is served (through the server while
//! the file is live, passed through to the kernel once it is local), and
//! the reads, writes, syncs and truncates on it.
//!
//! The kernel decides an open's mode when it opens, and refuses to mix
//! modes on one inode. So a file the node opened before it was wholly local
//! goes through the server for as long as any of those opens lasts; once
//! all are closed, the next open is passed through (docs/live-restore.md).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Weak};

use fuser::{BackingId, Errno, FileHandle, FopenFlags, INodeNo};
use nix::fcntl::OFlag;

use super::{errno, io_errno, Handle, LiveFs};
use crate::files::LiveFile;

/// An open regular file.
pub(super) struct OpenFile {
    pub(super) file: File,
    ino: u64,
    pub(super) live: Option<Arc<LiveFile>>,
    /// Opened in passthrough mode (the kernel does its I/O).
    backing: Option<Arc<BackingId>>,
}

/// How an inode's opens are served.
#[derive(Default)]
pub(super) struct Modes {
    cached: HashMap<u64, u32>,
    passthrough: HashMap<u64, Weak<BackingId>>,
}

/// What an open answers with.
pub(super) type Opened = (FileHandle, FopenFlags, Option<Arc<BackingId>>);

impl LiveFs {
    /// Open FUSE inode `ino` for I/O: through [`crate::files::Files`] if it
    /// is live, else in passthrough mode where the kernel allows.
    pub(super) fn open_file(
        &self,
        ino: u64,
        reply_backing: impl Fn(&File) -> std::io::Result<BackingId>,
    ) -> Result<Opened, Errno> {
        let handle = self.nodes.handle(INodeNo(ino))?;
        let file = File::from(
            self.backing
                .open(&handle, OFlag::O_RDWR)
                .map_err(|e| io_errno(&e))?,
        );
        let live = self.files.live_of(&file).map_err(|e| io_errno(&e))?;
        let mut modes = self.modes.lock().unwrap_or_else(|p| p.into_inner());
        let cached_elsewhere = modes.cached.get(&ino).copied().unwrap_or(0) > 0;
        let mut backing = None;
        if live.is_none() && !cached_elsewhere && self.passthrough() {
            backing = match modes.passthrough.get(&ino).and_then(Weak::upgrade) {
                Some(b) => Some(b),
                None => match reply_backing(&file) {
                    Ok(b) => {
                        let b = Arc::new(b);
                        modes.passthrough.insert(ino, Arc::downgrade(&b));
                        Some(b)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no passthrough for this file");
                        None
                    }
                },
            };
        }
        if backing.is_none() {
            *modes.cached.entry(ino).or_default() += 1;
        }
        drop(modes);
        self.files.stats.opened(backing.is_some());
        let flags = if backing.is_some() {
            FopenFlags::FOPEN_PASSTHROUGH
        } else {
            FopenFlags::empty()
        };
        let fh = self.add_handle(Handle::File(Arc::new(OpenFile {
            file,
            ino,
            live,
            backing: backing.clone(),
        })));
        Ok((fh, flags, backing))
    }

    pub(super) fn file_of(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        match &*self.handle(fh)? {
            Handle::File(f) => Ok(Arc::clone(f)),
            Handle::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// The kernel closed `fh`.
    pub(super) fn release_file(&self, h: &OpenFile) {
        if h.backing.is_none() {
            let mut modes = self.modes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = modes.cached.get_mut(&h.ino) {
                *n -= 1;
                if *n == 0 {
                    modes.cached.remove(&h.ino);
                }
            }
        }
    }

    pub(super) fn read_file(
        &self,
        fh: FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        let h = self.file_of(fh)?;
        if let Some(l) = &h.live {
            self.files
                .ensure(l, offset, u64::from(size))
                .map_err(errno)?;
        }
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match h.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_errno(&e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub(super) fn write_file(
        &self,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Errno> {
        let h = self.file_of(fh)?;
        let write = || h.file.write_all_at(data, offset);
        match &h.live {
            Some(l) => self
                .files
                .node_write(l, &h.file, offset, data.len() as u64, write)
                .map_err(errno)?,
            None => write().map_err(|e| io_errno(&e))?,
        }
        Ok(data.len() as u32)
    }

    pub(super) fn fallocate_file(
        &self,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let h = self.file_of(fh)?;
        let op = || {
            nix::fcntl::fallocate(
                h.file.as_fd(),
                nix::fcntl::FallocateFlags::from_bits_truncate(mode),
                offset as i64,
                length as i64,
            )
            .map_err(std::io::Error::from)
        };
        let Some(l) = &h.live else {
            return op().map_err(|e| io_errno(&e));
        };
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            self.files
                .node_write(l, &h.file, offset, length, op)
                .map_err(errno)
        } else if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            self.files.node_rewrite(l, &h.file, op).map_err(errno)
        } else {
            // Space allocated, no byte changed: absent chunks stay absent.
            l.node_change(&h.file, op).map_err(|e| io_errno(&e))
        }
    }

    pub(super) fn fsync_file(&self, fh: FileHandle, datasync: bool) -> Result<(), Errno> {
        let h = self.file_of(fh)?;
        match &h.live {
            Some(l) => self.files.sync_file(l, &h.file, datasync).map_err(|e| {
                tracing::error!(error = %e, "fsync failed");
                Errno::EIO
            }),
            None if datasync => h.file.sync_data().map_err(|e| io_errno(&e)),
            None => h.file.sync_all().map_err(|e| io_errno(&e)),
        }
    }

    /// Inode `ino` as a regular file open with `flags`, with the live file
    /// it is, if any (through `fh` if the kernel gave one); `None` for what
    /// is not a regular file.
    pub(super) fn regular(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        flags: OFlag,
    ) -> Result<Option<Arc<OpenFile>>, Errno> {
        if let Some(Ok(h)) = fh.map(|fh| self.file_of(fh)) {
            return Ok(Some(h));
        }
        let fd = self.nodes.fd(ino)?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(errno)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        let handle = self.nodes.handle(ino)?;
        let file = File::from(
            self.backing
                .open(&handle, flags)
                .map_err(|e| io_errno(&e))?,
        );
        let live = self.files.live_of(&file).map_err(|e| io_errno(&e))?;
        Ok(Some(Arc::new(OpenFile {
            file,
            ino: ino.0,
            live,
            backing: None,
        })))
    }
}
