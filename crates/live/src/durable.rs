//! Which chunks are durably local: one bit a chunk, in the state
//! directory (`.btm-live/present`), so that a live restore killed at any
//! moment resumes without fetching them again and, above all, without
//! fetching over what the node wrote and synced.
//!
//! A bit is set only after the bytes it covers are durable (`syncfs`, or
//! the file's `fsync`), and the file is synced before the call that made
//! them durable returns. Bits are only ever set, never cleared, and are
//! written in place: whatever mix of old and new bytes a crash leaves in a
//! torn write, every bit set in it was set after its chunk became durable.
//! So the file needs no log and no checksum, and a resumed run reads it
//! straight into memory: 1 MiB covers 8 million chunks.
//!
//! ```text
//! present  magic "BTMLIVEP" | chunks u64 | bit g of word g/64 (u64 LE):
//!          chunk g is durably local
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::LiveError;

/// The file's name in the state directory.
pub const NAME: &str = "present";
const MAGIC: &[u8; 8] = b"BTMLIVEP";
const HEADER: u64 = 16;
/// Words closer than this are written in one call.
const GAP: usize = 64;

/// The durable bits, in memory and on disk.
#[derive(Debug)]
pub struct Durable {
    file: File,
    words: Vec<u64>,
    len: u64,
}

fn err(what: &'static str) -> impl Fn(std::io::Error) -> LiveError {
    move |e| LiveError::state(what, e)
}

impl Durable {
    /// A new file for `len` chunks in state directory `state`, with the
    /// chunks `present` names set (holes: durable as soon as the skeleton
    /// is). Durable with the next `syncfs`.
    pub fn create(
        state: BorrowedFd<'_>,
        len: u64,
        present: impl Fn(u64) -> bool,
    ) -> Result<Durable, LiveError> {
        let fd = openat(
            state,
            NAME,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| err("making the presence file")(e.into()))?;
        let file = File::from(fd);
        let mut words = vec![0u64; len.div_ceil(64) as usize];
        for g in (0..len).filter(|&g| present(g)) {
            words[(g / 64) as usize] |= 1 << (g % 64);
        }
        let mut out = std::io::BufWriter::new(&file);
        out.write_all(MAGIC)
            .and_then(|()| out.write_all(&len.to_le_bytes()))
            .map_err(err("writing the presence file"))?;
        // Every word is written (no holes), so that setting a bit later
        // never needs space on a full disk.
        for w in &words {
            out.write_all(&w.to_le_bytes())
                .map_err(err("writing the presence file"))?;
        }
        out.flush().map_err(err("writing the presence file"))?;
        drop(out);
        Ok(Durable { file, words, len })
    }

    /// The file an earlier run left in `state`, for `len` chunks.
    pub fn open(state: BorrowedFd<'_>, len: u64) -> Result<Durable, LiveError> {
        let fd = openat(state, NAME, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| err("opening the presence file")(e.into()))?;
        let file = File::from(fd);
        let n = len.div_ceil(64) as usize;
        let mut bytes = vec![0u8; HEADER as usize + n * 8];
        file.read_exact_at(&mut bytes, 0)
            .map_err(err("reading the presence file"))?;
        if &bytes[..8] != MAGIC || bytes[8..16] != len.to_le_bytes() {
            return Err(err("reading the presence file")(std::io::Error::other(
                "it does not belong to this table",
            )));
        }
        let words = bytes[HEADER as usize..]
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        Ok(Durable { file, words, len })
    }

    /// Whether chunk `g` is durably local.
    pub fn contains(&self, g: u64) -> bool {
        g < self.len && self.words[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    /// Whether every chunk of `range` is.
    pub fn all(&self, range: Range<u64>) -> bool {
        range.clone().all(|g| self.contains(g))
    }

    /// Chunks `ranges` are durably local now (their bytes are durable
    /// already): record it, durably. On failure nothing is promised, and
    /// the caller records them again later.
    pub fn record(&mut self, ranges: &[Range<u64>]) -> Result<(), LiveError> {
        // The words as they will be; memory follows the file only once the
        // file has them, so that a failure leaves both as they were.
        let mut changed: BTreeMap<usize, u64> = BTreeMap::new();
        for r in ranges {
            for g in r.start..r.end.min(self.len) {
                let w = (g / 64) as usize;
                let word = changed.entry(w).or_insert(self.words[w]);
                *word |= 1 << (g % 64);
            }
        }
        changed.retain(|&w, v| *v != self.words[w]);
        let Some((&first, _)) = changed.first_key_value() else {
            return Ok(());
        };
        let mut run: (usize, Vec<u8>) = (first, Vec::new());
        let mut runs = Vec::new();
        for (&w, &v) in &changed {
            let next = run.0 + run.1.len() / 8;
            if w > next + GAP {
                runs.push(std::mem::replace(&mut run, (w, Vec::new())));
            } else {
                for gap in next..w {
                    run.1.extend_from_slice(&self.words[gap].to_le_bytes());
                }
            }
            run.1.extend_from_slice(&v.to_le_bytes());
        }
        runs.push(run);
        for (start, bytes) in &runs {
            self.file
                .write_all_at(bytes, HEADER + *start as u64 * 8)
                .map_err(err("writing the presence file"))?;
        }
        self.file
            .sync_data()
            .map_err(err("syncing the presence file"))?;
        for (w, v) in changed {
            self.words[w] = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn bits_recorded_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = File::open(dir.path()).expect("open");
        let mut d = Durable::create(state.as_fd(), 10_000, |g| g % 1000 == 0).expect("create");
        assert!(d.contains(3000) && !d.contains(3001));
        d.record(&[5..70, 9000..9001, 9999..12_000])
            .expect("record");
        d.record(&[5..6, 7..8]).expect("nothing new");
        d.record(&[300..301, 2000..2001, 4000..4001])
            .expect("words far apart");
        drop(d);
        let d = Durable::open(state.as_fd(), 10_000).expect("open");
        assert!(d.all(5..70) && d.contains(9000) && d.contains(9999));
        assert!(!d.contains(70) && !d.contains(4) && !d.contains(10_000));
        assert!(d.contains(0) && d.contains(2000) && d.contains(300) && d.contains(4000));
        assert!(!d.contains(301) && !d.contains(3999));
        assert!(
            Durable::open(state.as_fd(), 9_999).is_err(),
            "another table"
        );
    }
}
