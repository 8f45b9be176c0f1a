//! The few system calls btm needs that no safe wrapper offers on every
//! target (nix has no `setpriority` or `ioprio_set`, and offers `renameat2`
//! only with glibc, not musl). This is the only module allowed `unsafe`;
//! each call passes integers or NUL-terminated strings that outlive it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

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
    let a = CString::new(a.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let b = CString::new(b.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let fd = dir.as_raw_fd();
    // SAFETY: both strings are valid and NUL-terminated for the call's
    // duration; `fd` is an open directory borrowed from `dir`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            fd,
            a.as_ptr(),
            fd,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

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
