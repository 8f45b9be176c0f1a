//! The FUSE file system: the backing tree, shown as it is, with the
//! backup's bytes fetched on demand underneath.
//!
//! Every request is passed to the backing tree through descriptors, never
//! a path, since the backing tree's own path is covered by this mount. The
//! inodes the kernel knows are reached by file handle (`nodes.rs`), and a
//! directory is listed as the kernel reads it (`dir.rs`): memory and
//! descriptors stay bounded whatever the tree and whatever the node walks.
//! The state directory is hidden, and so is the [`MARK`] attribute.
//!
//! Bytes of a live file go through [`Files`]: a read makes its chunks
//! local first, a write, truncate or hole makes the chunks it touches in
//! part local and takes those it covers whole, an `fsync` records. A file
//! with nothing left to fetch is opened with FUSE passthrough where the
//! kernel has it: the kernel then reads and writes the backing file
//! itself (`file.rs`).

mod attr;
mod dir;
mod file;
mod nodes;
mod reply;

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode};

use crate::backing::Backing;
use crate::files::{Files, MARK};
use crate::skeleton::STATE_DIR;
use attr::{attr, timespec_of};
use dir::DirStream;
use file::{Modes, OpenFile};
use nodes::Nodes;
use reply::{Answer, TTL};

/// An open file or directory.
enum Handle {
    File(Arc<OpenFile>),
    Dir(Mutex<DirStream>),
}

/// What a `setattr` changes.
struct Changes {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

/// The file system a live restore mounts.
pub struct LiveFs {
    nodes: Nodes,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    modes: Mutex<Modes>,
    files: Arc<Files>,
    backing: Arc<Backing>,
    passthrough: Arc<AtomicBool>,
    /// Whether to ask the kernel for passthrough (it may still refuse).
    want_passthrough: bool,
}

fn errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// `/proc/self/fd/N`: the inode behind an `O_PATH` descriptor, for the
/// calls that take no descriptor of that kind.
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Whether `name` in `parent` is the hidden state directory.
fn hidden(parent: INodeNo, name: &OsStr) -> bool {
    parent.0 == 1 && name.as_bytes() == STATE_DIR.as_bytes()
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(data);
    }
}

impl LiveFs {
    /// A file system over `backing`'s tree, with live files `files`.
    pub fn new(
        backing: Arc<Backing>,
        files: Arc<Files>,
        want_passthrough: bool,
    ) -> std::io::Result<Self> {
        Ok(LiveFs {
            nodes: Nodes::new(Arc::clone(&backing))?,
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            modes: Mutex::new(Modes::default()),
            files,
            backing,
            passthrough: Arc::default(),
            want_passthrough,
        })
    }

    /// Whether the kernel agreed to passthrough.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// What will say whether the kernel agreed to passthrough, once the
    /// file system is mounted (and moved into its session).
    pub fn passthrough_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.passthrough)
    }

    fn attr_of(&self, fd: BorrowedFd<'_>) -> Result<FileAttr, Errno> {
        let st = fstat(fd).map_err(errno)?;
        Ok(attr(self.nodes.swap(st.st_ino), &st))
    }

    /// Look `name` up in `parent` and count one more kernel reference.
    fn lookup_entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        if hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        let st = self.nodes.lookup(parent, name)?;
        Ok(attr(self.nodes.swap(st.st_ino), &st))
    }

    /// Give a new entry the caller's owner (this server runs as root), or
    /// the parent's group under a setgid directory.
    fn own(&self, req: &Request, parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
        let pst = fstat(parent).map_err(errno)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            req.gid()
        };
        nix::unistd::fchownat(
            parent,
            name,
            Some(req.uid().into()),
            Some(gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno)
    }

    /// Make entry `name` in `parent` with `make`, give it the caller's
    /// owner, and look it up.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>) -> nix::Result<()>,
    ) -> Result<FileAttr, Errno> {
        if hidden(parent, name) {
            return Err(Errno::EPERM);
        }
        let pfd = self.nodes.fd(parent)?;
        make(pfd.as_fd()).map_err(errno)?;
        self.own(req, pfd.as_fd(), name)?;
        self.lookup_entry(parent, name)
    }

    /// Remove or replace `name` in `parent` with `op`; the inode that lost
    /// the name lets go of its descriptors.
    fn unname(
        &self,
        parent: INodeNo,
        name: &OsStr,
        op: impl FnOnce(BorrowedFd<'_>) -> nix::Result<()>,
    ) -> Result<(), Errno> {
        if hidden(parent, name) {
            return Err(Errno::EPERM);
        }
        let pfd = self.nodes.fd(parent)?;
        let ino = fstatat(pfd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| st.st_ino);
        op(pfd.as_fd()).map_err(errno)?;
        if let Some(ino) = ino {
            self.backing.forget_inode(ino);
        }
        Ok(())
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        let handles = self.handles.read().unwrap_or_else(|p| p.into_inner());
        handles.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(h));
        FileHandle(fh)
    }

    fn setattr_inner(
        &self,
        ino: INodeNo,
        c: Changes,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let fd = self.nodes.fd(ino)?;
        if let Some(size) = c.size {
            let h = self.regular(ino, fh, OFlag::O_RDWR)?.ok_or(Errno::EISDIR)?;
            let cut = || h.file.set_len(size);
            match &h.live {
                Some(l) => self
                    .files
                    .node_truncate(l, &h.file, size, cut)
                    .map_err(errno)?,
                None => cut().map_err(|e| io_errno(&e))?,
            }
        }
        if c.uid.is_some() || c.gid.is_some() {
            nix::unistd::fchownat(
                fd.as_fd(),
                "",
                c.uid.map(Into::into),
                c.gid.map(Into::into),
                AtFlags::AT_EMPTY_PATH,
            )
            .map_err(errno)?;
        }
        let path = proc_path(fd.as_fd());
        if let Some(mode) = c.mode {
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                path.as_c_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(errno)?;
        }
        if c.atime.is_some() || c.mtime.is_some() {
            let omit = nix::sys::time::TimeSpec::UTIME_OMIT;
            let a = c.atime.map_or(omit, timespec_of);
            let m = c.mtime.map_or(omit, timespec_of);
            let set = || {
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    path.as_c_str(),
                    &a,
                    &m,
                    nix::sys::stat::UtimensatFlags::FollowSymlink,
                )
                .map_err(std::io::Error::from)
            };
            // Fills of a live file keep the times the node sets.
            let live = if self.files.files_left() > 0 {
                self.regular(ino, fh, OFlag::O_RDONLY)?
            } else {
                None
            };
            match live.as_deref() {
                Some(OpenFile {
                    file,
                    live: Some(l),
                    ..
                }) => l.node_change(file, set),
                _ => set(),
            }
            .map_err(|e| io_errno(&e))?;
        }
        self.attr_of(fd.as_fd())
    }

    /// The `/proc` path of `ino` for an extended attribute call (refused
    /// on symlinks), and the descriptor it names, kept open while it is
    /// used.
    fn xattr_target(&self, ino: INodeNo) -> Result<(Arc<OwnedFd>, std::path::PathBuf), Errno> {
        let fd = self.nodes.fd(ino)?;
        let st = fstat(fd.as_fd()).map_err(errno)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(Errno::from_i32(libc::ENOTSUP));
        }
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Ok((fd, path))
    }

    fn create_inner(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<FileAttr, Errno> {
        if hidden(parent, name) {
            return Err(Errno::EPERM);
        }
        let pfd = self.nodes.fd(parent)?;
        let excl = if flags & libc::O_EXCL != 0 {
            OFlag::O_EXCL
        } else {
            OFlag::empty()
        };
        let fd = self
            .backing
            .with_room(|| {
                openat(
                    pfd.as_fd(),
                    name,
                    OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | excl,
                    Mode::from_bits_truncate(mode & 0o7777),
                )
                .map_err(std::io::Error::from)
            })
            .map_err(|e| io_errno(&e))?;
        drop(fd);
        self.own(req, pfd.as_fd(), name)?;
        self.lookup_entry(parent, name)
    }

    fn fsyncdir_inner(&self, ino: INodeNo) -> Result<(), Errno> {
        let fd = self.nodes.fd(ino)?;
        let d = openat(
            fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        nix::unistd::fsync(d.as_fd()).map_err(errno)
    }
}

impl fuser::Filesystem for LiveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.want_passthrough && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            self.passthrough.store(ok, Ordering::Relaxed);
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply.answer(self.lookup_entry(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.nodes.forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.answer(self.nodes.fd(ino).and_then(|fd| self.attr_of(fd.as_fd())));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = Changes {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        reply.answer(self.setattr_inner(ino, changes, fh));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply.answer(self.nodes.fd(ino).and_then(|fd| {
            nix::fcntl::readlinkat(fd.as_fd(), "")
                .map(|t| t.as_bytes().to_vec())
                .map_err(errno)
        }));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = nix::sys::stat::SFlag::from_bits_truncate(mode & libc::S_IFMT);
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        reply.answer(self.make(req, parent, name, |pfd| {
            nix::sys::stat::mknodat(pfd, name, kind, perm, u64::from(rdev))
        }));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        reply.answer(self.make(req, parent, name, |pfd| {
            nix::sys::stat::mkdirat(pfd, name, perm)
        }));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.answer(self.unname(parent, name, |pfd| {
            nix::unistd::unlinkat(pfd, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
        }));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.answer(self.unname(parent, name, |pfd| {
            nix::unistd::unlinkat(pfd, name, nix::unistd::UnlinkatFlags::RemoveDir)
        }));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply.answer(self.make(req, parent, link_name, |pfd| {
            nix::unistd::symlinkat(target, pfd, link_name)
        }));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let pfd = self.nodes.fd(parent)?;
            self.unname(newparent, newname, |npfd| {
                btm::sys::renameat2(pfd.as_fd(), name, npfd, newname, flags.bits())
            })
        })();
        reply.answer(r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            if hidden(newparent, newname) {
                return Err(Errno::EPERM);
            }
            let (fd, npfd) = (self.nodes.fd(ino)?, self.nodes.fd(newparent)?);
            nix::unistd::linkat(
                fd.as_fd(),
                "",
                npfd.as_fd(),
                newname,
                AtFlags::AT_EMPTY_PATH,
            )
            .map_err(errno)?;
            self.lookup_entry(newparent, newname)
        })();
        reply.answer(r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino.0, |f| reply.open_backing(f)) {
            Ok((fh, flags, Some(b))) => {
                reply.opened_passthrough(fh, flags & !FopenFlags::FOPEN_PASSTHROUGH, &b)
            }
            Ok((fh, flags, None)) => reply.opened(fh, flags),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply.answer(self.read_file(fh, offset, size));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.answer(self.write_file(fh, offset, data));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        if let Some(Handle::File(f)) = h.as_deref() {
            self.release_file(f);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.answer(self.fsync_file(fh, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.nodes.fd(ino).and_then(|fd| {
            self.backing
                .with_room(|| DirStream::open(Arc::clone(&fd), ino.0 == 1))
                .map_err(|e| io_errno(&e))
        });
        match opened {
            Ok(d) => reply.opened(
                self.add_handle(Handle::Dir(Mutex::new(d))),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir(d) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
        let read = d.read(offset, |ino, next, kind, name| {
            reply.add(INodeNo(self.nodes.swap(ino)), next, kind, name)
        });
        match read {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.answer(self.fsyncdir_inner(ino));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::fstatvfs(self.backing.root()) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if name.as_bytes() == MARK.as_bytes() {
            return reply.error(Errno::EPERM);
        }
        reply.answer(
            self.xattr_target(ino)
                .and_then(|(_fd, p)| xattr::set_deref(p, name, value).map_err(|e| io_errno(&e))),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() == MARK.as_bytes() {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        match self
            .xattr_target(ino)
            .and_then(|(_fd, p)| xattr::get_deref(p, name).map_err(|e| io_errno(&e)))
        {
            Ok(Some(v)) => xattr_reply(reply, size, &v),
            Ok(None) => reply.error(Errno::from_i32(libc::ENODATA)),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .xattr_target(ino)
            .and_then(|(_fd, p)| xattr::list_deref(p).map_err(|e| io_errno(&e)))
        {
            Ok(names) => {
                let mut data = Vec::new();
                for n in names.filter(|n| n.as_bytes() != MARK.as_bytes()) {
                    data.extend_from_slice(n.as_bytes());
                    data.push(0);
                }
                xattr_reply(reply, size, &data);
            }
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if name.as_bytes() == MARK.as_bytes() {
            return reply.error(Errno::EPERM);
        }
        reply.answer(
            self.xattr_target(ino)
                .and_then(|(_fd, p)| xattr::remove_deref(p, name).map_err(|e| io_errno(&e))),
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let attr = match self.create_inner(req, parent, name, mode, flags) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        match self.open_file(attr.ino.0, |f| reply.open_backing(f)) {
            Ok((fh, flags, Some(b))) => reply.created_passthrough(
                &TTL,
                &attr,
                Generation(0),
                fh,
                flags & !FopenFlags::FOPEN_PASSTHROUGH,
                &b,
            ),
            Ok((fh, flags, None)) => reply.created(&TTL, &attr, Generation(0), fh, flags),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.answer(self.fallocate_file(fh, offset, length, mode));
    }
}
