//! The few system calls btm needs that no safe wrapper offers on every
//! target (nix has no `setpriority`, `ioprio_set`, `FS_IOC_FIEMAP` or file
//! handles, and offers `renameat2` only with glibc, not musl), and the one
//! `pre_exec` hook (a parent-death signal for operator commands), and a
//! handler that makes SIGTERM reach a container's PID 1. This is
//! the only module allowed `unsafe`; each call passes integers,
//! NUL-terminated strings or buffers that outlive it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;

/// Where [`stop_signal_pipe`]'s handler writes: the pipe's write end, or -1.
static STOP_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Route SIGTERM and SIGINT to a pipe: each one writes its number (one
/// byte) to it, and the returned end reads them. A handler, not `sigwait`:
/// as PID 1 of a PID namespace (a container's entrypoint) the kernel drops
/// a signal whose action is the default before it is queued, so `podman
/// stop` or a Kubernetes pod's end would go unheard until SIGKILL; and a
/// handler runs on whichever thread takes the signal, including threads
/// started before the caller could block it. Syscalls it interrupts are
/// restarted. Call once.
pub fn stop_signal_pipe() -> std::io::Result<std::fs::File> {
    extern "C" fn on_stop(sig: libc::c_int) {
        let fd = STOP_PIPE.load(std::sync::atomic::Ordering::Relaxed);
        if fd >= 0 {
            let byte = sig as u8;
            // SAFETY: write(2) is async-signal-safe; the byte outlives the
            // call. A full pipe drops the byte: one is enough to stop.
            let _ = unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
        }
    }
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(std::io::Error::from)?;
    // The write end lives as long as the process: the handler may run at
    // any time.
    STOP_PIPE.store(
        std::os::fd::IntoRawFd::into_raw_fd(write),
        std::sync::atomic::Ordering::Relaxed,
    );
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid once sigemptyset has run;
        // the handler is async-signal-safe and lives for the whole program.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(std::fs::File::from(read))
}

/// Lowest CPU niceness.
const NICE_LOW: libc::c_int = 19;
/// `ioprio_set` encoding: best-effort class (2) at its lowest level (7).
/// Best-effort rather than idle, so an export still progresses on a node
/// that never stops writing.
const IOPRIO_BE_LOW: libc::c_int = (2 << 13) | 7;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;

/// Give the calling thread, and threads it creates from now on, the lowest
/// CPU priority and a low best-effort IO priority. Other threads of the
/// process are unaffected (Linux applies both per thread).
pub fn lower_thread_priority() -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: integer arguments only; setpriority reads no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE_LOW) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, IOPRIO_BE_LOW) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Atomically swap the entries `a` and `b` in directory `dir`
/// (`renameat2(RENAME_EXCHANGE)`). Both must exist.
pub fn rename_exchange(
    dir: &std::fs::File,
    a: &std::ffi::OsStr,
    b: &std::ffi::OsStr,
) -> Result<(), nix::errno::Errno> {
    renameat2(dir.as_fd(), a, dir.as_fd(), b, libc::RENAME_EXCHANGE)
}

/// `renameat2(2)`: rename `old` in `old_dir` to `new` in `new_dir`, with
/// `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`, `RENAME_WHITEOUT`).
/// nix has it for glibc only; this works on musl too.
pub fn renameat2(
    old_dir: std::os::fd::BorrowedFd<'_>,
    old: &std::ffi::OsStr,
    new_dir: std::os::fd::BorrowedFd<'_>,
    new: &std::ffi::OsStr,
    flags: u32,
) -> Result<(), nix::errno::Errno> {
    let old = CString::new(old.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let new = CString::new(new.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    // SAFETY: both strings are valid and NUL-terminated for the call's
    // duration; both descriptors are open directories borrowed for it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// Have `cmd`'s process killed (SIGKILL) when the thread that spawns it
/// exits, which for a process that exits includes every thread.
/// `PR_SET_PDEATHSIG` follows the spawning *thread*, so the caller must be
/// the thread that waits for the command.
pub fn kill_when_parent_thread_exits(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2), which is async-signal-safe, with integer arguments.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One extent of a file as `FS_IOC_FIEMAP` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device (for btrfs, in its logical address space).
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// `FIEMAP_EXTENT_LAST`: no extents follow.
pub const FIEMAP_EXTENT_LAST: u32 = 0x1;

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Extents asked for per call.
const FIEMAP_BATCH: usize = 256;

/// `struct fiemap` followed by room for [`FIEMAP_BATCH`] extents, laid out
/// as the kernel expects (`linux/fiemap.h`).
#[repr(C)]
struct FiemapBuf {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// Every extent of `file`, in file order. Fails with `EOPNOTSUPP` (or
/// similar) on filesystems without FIEMAP, such as ZFS.
pub fn fiemap(file: &std::fs::File) -> std::io::Result<Vec<Extent>> {
    let empty = FiemapExtent {
        fe_logical: 0,
        fe_physical: 0,
        fe_length: 0,
        fe_reserved64: [0; 2],
        fe_flags: 0,
        fe_reserved: [0; 3],
    };
    let mut buf = Box::new(FiemapBuf {
        fm_start: 0,
        fm_length: u64::MAX,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: FIEMAP_BATCH as u32,
        fm_reserved: 0,
        extents: [empty; FIEMAP_BATCH],
    });
    let mut out = Vec::new();
    loop {
        buf.fm_length = u64::MAX - buf.fm_start;
        buf.fm_mapped_extents = 0;
        // SAFETY: `buf` is a properly laid out, writable `struct fiemap`
        // with room for `fm_extent_count` extents, alive for the call.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP as _,
                &mut *buf as *mut FiemapBuf,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (buf.fm_mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            return Ok(out);
        }
        for e in &buf.extents[..n] {
            out.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            });
        }
        let last = &buf.extents[n - 1];
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(out);
        }
        let next = last.fe_logical.saturating_add(last.fe_length);
        if next <= buf.fm_start {
            return Ok(out);
        }
        buf.fm_start = next;
    }
}

/// A file handle (`name_to_handle_at(2)`): what reaches an inode again,
/// across renames and restarts, without a path and without holding a
/// descriptor. The kernel refuses a handle whose inode is gone (`ESTALE`),
/// also when its number was reused.
///
/// Its bytes are the handle type (4 bytes, little-endian) and the file
/// system's opaque handle: one small allocation, so that millions of them
/// stay cheap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileHandle(Box<[u8]>);

/// The largest opaque handle a file system gives (`MAX_HANDLE_SZ`).
const MAX_HANDLE: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE],
}

impl FileHandle {
    /// The handle as bytes, for storing it ([`FileHandle::from_bytes`]
    /// takes them back).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A handle stored with [`FileHandle::as_bytes`]; `None` if the bytes
    /// cannot be one.
    pub fn from_bytes(b: &[u8]) -> Option<FileHandle> {
        (b.len() > 4 && b.len() <= 4 + MAX_HANDLE).then(|| FileHandle(b.into()))
    }

    fn raw(&self) -> RawHandle {
        let mut raw = RawHandle {
            handle_bytes: (self.0.len() - 4) as libc::c_uint,
            handle_type: i32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]),
            f_handle: [0; MAX_HANDLE],
        };
        raw.f_handle[..self.0.len() - 4].copy_from_slice(&self.0[4..]);
        raw
    }
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileHandle(")?;
        for b in self.0.iter() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The handle of the inode `fd` refers to (any kind of descriptor,
/// `O_PATH` included; a symlink's own handle). `EOPNOTSUPP` where the file
/// system cannot give handles.
pub fn handle_of(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<FileHandle> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE as libc::c_uint,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a writable `struct file_handle` with room for
    // `handle_bytes` bytes, `mount_id` a writable int, the path an empty
    // NUL-terminated string; all outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut raw as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE);
    let mut bytes = Vec::with_capacity(4 + n);
    bytes.extend_from_slice(&raw.handle_type.to_le_bytes());
    bytes.extend_from_slice(&raw.f_handle[..n]);
    Ok(FileHandle(bytes.into_boxed_slice()))
}

/// Open the inode `handle` names, on the file system `mount` (any
/// descriptor on it) is on, with `flags` (`O_PATH` included; `O_CREAT` is
/// meaningless). Needs `CAP_DAC_READ_SEARCH`: `EPERM` without it.
/// `ESTALE` once the inode is gone.
///
/// An inode that is gone can also answer `ENOMEM` for a moment: when its
/// number is being given to a file created that instant, ext4's lookup
/// finds the new inode still being set up and reports that as a failed
/// allocation (seen under a full test run). `ENOMEM` is tried again a few
/// times, a millisecond apart, by which time the new inode is set up and
/// the answer is `ESTALE`; an `ENOMEM` that lasts is returned as such.
pub fn open_by_handle(
    mount: std::os::fd::BorrowedFd<'_>,
    handle: &FileHandle,
    flags: nix::fcntl::OFlag,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut tries = 0;
    loop {
        let mut raw = handle.raw();
        // SAFETY: `raw` is a valid `struct file_handle` that outlives the
        // call; integers otherwise.
        let r = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount.as_raw_fd(),
                &mut raw as *mut RawHandle,
                flags.bits() | libc::O_CLOEXEC,
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing
            // else owns.
            return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as libc::c_int) });
        }
        let e = std::io::Error::last_os_error();
        tries += 1;
        if e.raw_os_error() != Some(libc::ENOMEM) || tries == OPEN_BY_HANDLE_TRIES {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Attempts of [`open_by_handle`] while the kernel answers `ENOMEM`.
const OPEN_BY_HANDLE_TRIES: u32 = 5;

/// The calling thread's (niceness, ioprio) as the kernel reports them.
pub fn thread_priority() -> std::io::Result<(i32, i32)> {
    let tid = nix::unistd::gettid().as_raw();
    nix::errno::Errno::clear();
    // SAFETY: integer arguments only.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: integer arguments only.
    let io = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    if io < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((nice, io as i32))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rename_exchange_swaps_atomically() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("a"), "A").expect("w");
        std::fs::create_dir(dir.path().join("b")).expect("mkdir");
        let d = std::fs::File::open(dir.path()).expect("open");
        super::rename_exchange(&d, "a".as_ref(), "b".as_ref()).expect("swap");
        assert!(dir.path().join("a").is_dir());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b")).expect("r"),
            "A"
        );
        assert_eq!(
            super::rename_exchange(&d, "a".as_ref(), "missing".as_ref()),
            Err(nix::errno::Errno::ENOENT)
        );
    }

    #[test]
    fn a_handle_reopens_its_inode_across_a_rename_until_it_is_gone() {
        use nix::fcntl::OFlag;
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("a"), "A").expect("w");
        let d = std::fs::File::open(dir.path()).expect("open");
        let f = std::fs::File::open(dir.path().join("a")).expect("open");
        let h = super::handle_of(f.as_fd()).expect("handle");
        drop(f);
        assert_eq!(
            super::FileHandle::from_bytes(h.as_bytes()).as_ref(),
            Some(&h)
        );
        assert!(super::FileHandle::from_bytes(&[1, 0, 0, 0]).is_none());
        std::fs::rename(dir.path().join("a"), dir.path().join("b")).expect("mv");
        let fd = super::open_by_handle(d.as_fd(), &h, OFlag::O_RDONLY).expect("by handle");
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).expect("read");
        assert_eq!(s, "A");
        std::fs::remove_file(dir.path().join("b")).expect("rm");
        let gone = super::open_by_handle(d.as_fd(), &h, OFlag::O_PATH).expect_err("gone");
        assert_eq!(gone.raw_os_error(), Some(libc::ESTALE));
    }

    #[test]
    fn lowering_applies_to_this_thread_and_its_children_only() {
        std::thread::spawn(|| {
            super::lower_thread_priority().expect("lower");
            let mine = super::thread_priority().expect("get");
            assert_eq!(mine, (19, (2 << 13) | 7));
            let child = std::thread::spawn(super::thread_priority)
                .join()
                .expect("join")
                .expect("get");
            assert_eq!(child.0, 19, "threads inherit the niceness");
        })
        .join()
        .expect("join");
        assert_ne!(super::thread_priority().expect("get").0, 19);
    }
}
