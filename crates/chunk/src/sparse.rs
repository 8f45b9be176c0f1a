//! The few syscalls that make sparse files cheap: finding data regions
//! (`SEEK_DATA`/`SEEK_HOLE`) and punching holes (`fallocate`). Both are
//! hints: any failure falls back to the plain path (read everything, write
//! zeros), which is slower but never wrong.

use std::fs::File;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

/// Byte ranges `[start, end)` of `file` (of length `size`) that may hold
/// data, sorted and disjoint; `None` when the filesystem cannot tell.
pub fn data_regions(file: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    let fd = file.as_fd();
    let mut regions = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            // No data after pos: the rest is a hole.
            Err(Errno::ENXIO) => break,
            Err(_) => return None,
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(_) => return None,
        };
        if end <= start {
            return None;
        }
        regions.push((start, end));
        pos = end;
    }
    Some(regions)
}

/// Deallocate `[off, off+len)` of `file`, keeping its size. `false` when
/// the filesystem does not support it; the caller then writes zeros.
pub fn punch_hole(file: &File, off: u64, len: u64) -> bool {
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file.as_fd(), flags, off as i64, len as i64).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_in_a_sparse_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("s"))
            .expect("open");
        let mb = 1 << 20;
        f.set_len(16 * mb).expect("len");
        f.write_all_at(&[1u8; 4096], 4 * mb).expect("write");
        let regions = data_regions(&f, 16 * mb).expect("supported on this filesystem");
        // Filesystems round to their block size; the data must be covered
        // and most of the file must be a hole.
        assert!(
            regions
                .iter()
                .any(|&(s, e)| s <= 4 * mb && e >= 4 * mb + 4096),
            "{regions:?}"
        );
        let covered: u64 = regions.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 2 * mb, "{regions:?}");
        assert!(punch_hole(&f, 4 * mb, 4096));
    }
}
