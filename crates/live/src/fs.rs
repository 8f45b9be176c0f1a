//! The FUSE file system: the backing tree, shown as it is, with the
//! backup's bytes fetched on demand underneath.
//!
//! Every request is passed to the backing tree through descriptors: an
//! `O_PATH` descriptor per inode the kernel knows (renames and hard links
//! cannot confuse it), never a path, since the backing tree's own path is
//! covered by this mount. A FUSE inode number is the backing inode number
//! (the root's swapped with 1). The state directory is hidden, and so is
//! the [`MARK`] attribute.
//!
//! Bytes of a live file go through [`Files`]: a read makes its chunks
//! local first, a write, truncate or hole makes the chunks it touches in
//! part local and takes those it covers whole, an `fsync` journals. A file
//! with nothing left to fetch is opened with FUSE passthrough where the
//! kernel has it: the kernel then reads and writes the backing file
//! itself.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode};

use crate::files::{Files, LiveFile, MARK};
use crate::skeleton::STATE_DIR;

/// How long the kernel may trust names and attributes.
const TTL: Duration = Duration::from_secs(1);

/// An inode the kernel knows.
struct Node {
    fd: Arc<OwnedFd>,
    lookups: u64,
}

/// An open file or directory.
enum Handle {
    File(Arc<OpenFile>),
    Dir(Vec<(u64, FileType, OsString)>),
}

/// An open regular file.
struct OpenFile {
    file: File,
    ino: u64,
    live: Option<Arc<LiveFile>>,
    /// Opened in passthrough mode (the kernel does its I/O).
    backing: Option<Arc<BackingId>>,
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

/// How an inode's opens are served: the kernel refuses to mix modes.
#[derive(Default)]
struct Modes {
    cached: HashMap<u64, u32>,
    passthrough: HashMap<u64, Weak<BackingId>>,
}

/// The file system a live restore mounts.
pub struct LiveFs {
    root_ino: u64,
    nodes: RwLock<HashMap<u64, Node>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    modes: Mutex<Modes>,
    files: Arc<Files>,
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

fn proc_pathbuf(fd: BorrowedFd<'_>) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn timespec_of(t: TimeOrNow) -> nix::sys::time::TimeSpec {
    match t {
        TimeOrNow::Now => nix::sys::time::TimeSpec::UTIME_NOW,
        TimeOrNow::SpecificTime(t) => {
            let (s, ns) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut s = -(d.as_secs() as i64);
                    let mut ns = -(d.subsec_nanos() as i64);
                    if ns < 0 {
                        s -= 1;
                        ns += 1_000_000_000;
                    }
                    (s, ns)
                }
            };
            nix::sys::time::TimeSpec::new(s, ns)
        }
    }
}

impl LiveFs {
    /// A file system over backing root `root` (a directory descriptor),
    /// with live files `files`.
    pub fn new(root: &OwnedFd, files: Arc<Files>, want_passthrough: bool) -> std::io::Result<Self> {
        let st = fstat(root.as_fd())?;
        let fd = openat(
            root.as_fd(),
            ".",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut nodes = HashMap::new();
        nodes.insert(
            1,
            Node {
                fd: Arc::new(fd),
                lookups: 1,
            },
        );
        Ok(LiveFs {
            root_ino: st.st_ino,
            nodes: RwLock::new(nodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            modes: Mutex::new(Modes::default()),
            files,
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

    /// FUSE inode number of backing inode `st_ino` (and back: the swap is
    /// its own inverse).
    fn swap(&self, ino: u64) -> u64 {
        if ino == self.root_ino {
            1
        } else if ino == 1 {
            self.root_ino
        } else {
            ino
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<OwnedFd>, Errno> {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        nodes
            .get(&ino.0)
            .map(|n| Arc::clone(&n.fd))
            .ok_or(Errno::ESTALE)
    }

    fn attr(&self, st: &FileStat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.swap(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Whether `name` in `parent` is the hidden state directory.
    fn hidden(parent: INodeNo, name: &OsStr) -> bool {
        parent.0 == 1 && name.as_bytes() == STATE_DIR.as_bytes()
    }

    /// Look `name` up in `parent` and count one more kernel reference.
    fn lookup_entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        if Self::hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        let pfd = self.node(parent)?;
        let fd = openat(
            pfd.as_fd(),
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let st = fstat(fd.as_fd()).map_err(errno)?;
        let ino = self.swap(st.st_ino);
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        match nodes.get_mut(&ino) {
            // The same number but another inode (the old one was deleted
            // and its number reused): the new descriptor is the truth.
            Some(n)
                if fstat(n.fd.as_fd()).is_ok_and(|old| old.st_nlink == 0) && st.st_nlink > 0 =>
            {
                n.fd = Arc::new(fd);
                n.lookups += 1;
            }
            Some(n) => n.lookups += 1,
            None => {
                nodes.insert(
                    ino,
                    Node {
                        fd: Arc::new(fd),
                        lookups: 1,
                    },
                );
            }
        }
        Ok(self.attr(&st))
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
    /// owner, and answer with it.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(BorrowedFd<'_>) -> nix::Result<()>,
    ) {
        let r = (|| {
            if Self::hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let pfd = self.node(parent)?;
            make(pfd.as_fd()).map_err(errno)?;
            self.own(req, pfd.as_fd(), name)?;
            self.lookup_entry(parent, name)
        })();
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    /// The backing inode `name` in `parent` refers to, if any.
    fn ino_at(parent: BorrowedFd<'_>, name: &OsStr) -> Option<u64> {
        fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| st.st_ino)
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

    /// Open backing inode `fd` (FUSE `ino`) for I/O: through [`Files`] if
    /// it is live, else in passthrough mode where the kernel allows.
    fn open_file(
        &self,
        ino: u64,
        fd: BorrowedFd<'_>,
        reply_backing: impl Fn(&File) -> std::io::Result<BackingId>,
    ) -> Result<(FileHandle, FopenFlags, Option<Arc<BackingId>>), Errno> {
        let file = File::from(
            nix::fcntl::open(
                proc_pathbuf(fd).as_path(),
                OFlag::O_RDWR | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?,
        );
        let backing_ino = self.swap(ino);
        let live = self.files.get(backing_ino);
        let mut modes = self.modes.lock().unwrap_or_else(|p| p.into_inner());
        let cached_elsewhere = modes.cached.get(&ino).copied().unwrap_or(0) > 0;
        let mut backing = None;
        if live.is_none() && !cached_elsewhere && self.passthrough() {
            let existing = modes.passthrough.get(&ino).and_then(Weak::upgrade);
            backing = match existing {
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
        if let Some(l) = &live {
            l.opened();
        }
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

    fn file_of(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        match &*self.handle(fh)? {
            Handle::File(f) => Ok(Arc::clone(f)),
            Handle::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn read_dir(
        &self,
        fd: BorrowedFd<'_>,
        root: bool,
    ) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let dfd = openat(
            fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let mut dir = nix::dir::Dir::from_fd(dfd).map_err(errno)?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(errno)?;
            let name = e.file_name().to_bytes();
            if root && name == STATE_DIR.as_bytes() {
                continue;
            }
            let t = match e.file_type() {
                Some(nix::dir::Type::Directory) => FileType::Directory,
                Some(nix::dir::Type::Symlink) => FileType::Symlink,
                Some(nix::dir::Type::Fifo) => FileType::NamedPipe,
                Some(nix::dir::Type::CharacterDevice) => FileType::CharDevice,
                Some(nix::dir::Type::BlockDevice) => FileType::BlockDevice,
                Some(nix::dir::Type::Socket) => FileType::Socket,
                _ => FileType::RegularFile,
            };
            out.push((self.swap(e.ino()), t, OsStr::from_bytes(name).to_owned()));
        }
        Ok(out)
    }

    fn setattr_inner(
        &self,
        ino: INodeNo,
        c: Changes,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let fd = self.node(ino)?;
        let path = proc_path(fd.as_fd());
        let live = self.files.get(self.swap(ino.0));
        if let Some(size) = c.size {
            if let Some(l) = &live {
                self.files.before_truncate(l, size).map_err(errno)?;
            }
            match fh.map(|fh| self.file_of(fh)) {
                Some(Ok(h)) => h.file.set_len(size).map_err(|e| io_errno(&e))?,
                _ => nix::unistd::truncate(path.as_c_str(), size as i64).map_err(errno)?,
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
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                path.as_c_str(),
                &a,
                &m,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .map_err(errno)?;
        }
        if let Some(l) = &live {
            l.node_changed();
        }
        let st = fstat(fd.as_fd()).map_err(errno)?;
        Ok(self.attr(&st))
    }

    fn xattr_allowed(&self, ino: INodeNo) -> Result<std::path::PathBuf, Errno> {
        let fd = self.node(ino)?;
        let st = fstat(fd.as_fd()).map_err(errno)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(Errno::from_i32(libc::ENOTSUP));
        }
        // The descriptor stays open in the node table while the path is used.
        Ok(proc_pathbuf(fd.as_fd()))
    }
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

impl Filesystem for LiveFs {
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
        match self.lookup_entry(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            if n.lookups == 0 {
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .node(ino)
            .and_then(|fd| fstat(fd.as_fd()).map_err(errno))
        {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
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
        match self.setattr_inner(ino, changes, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .node(ino)
            .and_then(|fd| nix::fcntl::readlinkat(fd.as_fd(), "").map_err(errno))
        {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
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
        self.make(req, parent, name, reply, |pfd| {
            nix::sys::stat::mknodat(pfd, name, kind, perm, u64::from(rdev))
        });
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
        self.make(req, parent, name, reply, |pfd| {
            nix::sys::stat::mkdirat(pfd, name, perm)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            if Self::hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let pfd = self.node(parent)?;
            let ino = Self::ino_at(pfd.as_fd(), name);
            nix::unistd::unlinkat(pfd.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(errno)?;
            if let Some(ino) = ino {
                self.files.maybe_unlinked(ino);
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            if Self::hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let pfd = self.node(parent)?;
            nix::unistd::unlinkat(pfd.as_fd(), name, nix::unistd::UnlinkatFlags::RemoveDir)
                .map_err(errno)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, link_name, reply, |pfd| {
            nix::unistd::symlinkat(target, pfd, link_name)
        });
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
            if Self::hidden(parent, name) || Self::hidden(newparent, newname) {
                return Err(Errno::EPERM);
            }
            let (pfd, npfd) = (self.node(parent)?, self.node(newparent)?);
            let replaced = Self::ino_at(npfd.as_fd(), newname);
            btm::sys::renameat2(pfd.as_fd(), name, npfd.as_fd(), newname, flags.bits())
                .map_err(errno)?;
            if let Some(ino) = replaced {
                self.files.maybe_unlinked(ino);
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
            if Self::hidden(newparent, newname) {
                return Err(Errno::EPERM);
            }
            let (fd, npfd) = (self.node(ino)?, self.node(newparent)?);
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
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fd = match self.node(ino) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        match self.open_file(ino.0, fd.as_fd(), |f| reply.open_backing(f)) {
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
        let r = (|| {
            let h = self.file_of(fh)?;
            let OpenFile { file, live, .. } = &*h;
            if let Some(l) = live {
                self.files
                    .ensure(l, offset, u64::from(size))
                    .map_err(errno)?;
            }
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_errno(&e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        })();
        match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
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
        let r = (|| {
            let h = self.file_of(fh)?;
            let OpenFile { file, live, .. } = &*h;
            if let Some(l) = live {
                self.files
                    .before_write(l, offset, data.len() as u64)
                    .map_err(errno)?;
            }
            file.write_all_at(data, offset).map_err(|e| io_errno(&e))?;
            if let Some(l) = live {
                l.node_changed();
            }
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
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
        if let Some(h) = h {
            if let Handle::File(f) = &*h {
                let OpenFile {
                    ino, live, backing, ..
                } = &**f;
                if backing.is_none() {
                    let mut modes = self.modes.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = modes.cached.get_mut(ino) {
                        *n -= 1;
                        if *n == 0 {
                            modes.cached.remove(ino);
                        }
                    }
                }
                if let Some(l) = live {
                    if l.closed() {
                        self.files.forget(l.ino);
                    }
                }
            }
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
        let r = (|| {
            let h = self.file_of(fh)?;
            let OpenFile { file, live, .. } = &*h;
            match live {
                Some(l) => self.files.sync_file(l, datasync).map_err(|e| {
                    tracing::error!(error = %e, "fsync failed");
                    Errno::EIO
                }),
                None if datasync => file.sync_data().map_err(|e| io_errno(&e)),
                None => file.sync_all().map_err(|e| io_errno(&e)),
            }
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self
            .node(ino)
            .and_then(|fd| self.read_dir(fd.as_fd(), ino.0 == 1))
        {
            Ok(entries) => reply.opened(self.add_handle(Handle::Dir(entries)), FopenFlags::empty()),
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
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (ino, t, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *t, name) {
                break;
            }
        }
        reply.ok();
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
        let r = self.node(ino).and_then(|fd| {
            let d = openat(
                fd.as_fd(),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            nix::unistd::fsync(d.as_fd()).map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self.node(INodeNo(1)).and_then(|fd| {
            let d = openat(
                fd.as_fd(),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            nix::sys::statvfs::fstatvfs(&d).map_err(errno)
        });
        match r {
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
            Err(e) => reply.error(e),
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
        match self
            .xattr_allowed(ino)
            .and_then(|p| xattr::set_deref(p, name, value).map_err(|e| io_errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() == MARK.as_bytes() {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        match self
            .xattr_allowed(ino)
            .and_then(|p| xattr::get_deref(p, name).map_err(|e| io_errno(&e)))
        {
            Ok(Some(v)) => xattr_reply(reply, size, &v),
            Ok(None) => reply.error(Errno::from_i32(libc::ENODATA)),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .xattr_allowed(ino)
            .and_then(|p| xattr::list_deref(p).map_err(|e| io_errno(&e)))
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
        match self
            .xattr_allowed(ino)
            .and_then(|p| xattr::remove_deref(p, name).map_err(|e| io_errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
        let r = (|| {
            if Self::hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let pfd = self.node(parent)?;
            let excl = if flags & libc::O_EXCL != 0 {
                OFlag::O_EXCL
            } else {
                OFlag::empty()
            };
            let fd = openat(
                pfd.as_fd(),
                name,
                OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | excl,
                Mode::from_bits_truncate(mode & 0o7777),
            )
            .map_err(errno)?;
            drop(fd);
            self.own(req, pfd.as_fd(), name)?;
            self.lookup_entry(parent, name)
        })();
        let attr = match r {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        let fd = match self.node(attr.ino) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        match self.open_file(attr.ino.0, fd.as_fd(), |f| reply.open_backing(f)) {
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
        let r = (|| {
            let h = self.file_of(fh)?;
            let OpenFile { file, live, .. } = &*h;
            if let Some(l) = live {
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    self.files.before_write(l, offset, length).map_err(errno)?;
                } else if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE)
                    != 0
                {
                    self.files.ensure_all(l).map_err(errno)?;
                }
            }
            nix::fcntl::fallocate(
                file.as_fd(),
                nix::fcntl::FallocateFlags::from_bits_truncate(mode),
                offset as i64,
                length as i64,
            )
            .map_err(errno)?;
            if let Some(l) = live {
                l.node_changed();
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
