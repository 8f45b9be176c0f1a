//! The presence journal: which chunks of which backup files are durably
//! local, so that a live restore killed at any moment resumes without
//! fetching them again and, above all, without fetching over what the
//! node wrote and synced.
//!
//! `.btm-live/journal` is a sequence of 32-byte records: file id, first
//! chunk, end chunk (little-endian u64s) and the first 8 bytes of their
//! BLAKE3. A record is appended only after the bytes it covers are durable
//! (`syncfs` or the file's `fsync`), and the journal is synced before the
//! call that made them durable returns. A torn last record (a crash while
//! appending) fails its check and is ignored.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::fd::AsFd;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::LiveError;

const RECORD: usize = 32;
/// The journal's name in the state directory.
pub const NAME: &str = "journal";

/// Chunk ranges of one file, by file id.
pub type Replayed = HashMap<u64, Vec<Range<u64>>>;

/// The journal, open for appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
}

fn encode(id: u64, r: &Range<u64>) -> [u8; RECORD] {
    let mut rec = [0u8; RECORD];
    rec[..8].copy_from_slice(&id.to_le_bytes());
    rec[8..16].copy_from_slice(&r.start.to_le_bytes());
    rec[16..24].copy_from_slice(&r.end.to_le_bytes());
    let check = blake3::hash(&rec[..24]);
    rec[24..].copy_from_slice(&check.as_bytes()[..8]);
    rec
}

fn decode(rec: &[u8]) -> Option<(u64, Range<u64>)> {
    let check = blake3::hash(&rec[..24]);
    if rec[24..32] != check.as_bytes()[..8] {
        return None;
    }
    let n = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().unwrap_or_default());
    Some((n(0), n(8)..n(16)))
}

impl Journal {
    /// Open (or create) the journal in state directory `state`, and what
    /// it recorded.
    pub fn open(state: impl AsFd) -> Result<(Journal, Replayed), LiveError> {
        let fd = openat(
            state.as_fd(),
            NAME,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| LiveError::state("opening the journal", e.into()))?;
        let mut file = File::from(fd);
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| LiveError::state("reading the journal", e))?;
        let mut replayed = Replayed::new();
        let mut good = 0;
        for rec in data.chunks_exact(RECORD) {
            let Some((id, r)) = decode(rec) else { break };
            replayed.entry(id).or_default().push(r);
            good += RECORD;
        }
        if good != data.len() {
            // A torn tail: cut it so that what follows is read again.
            file.set_len(good as u64)
                .map_err(|e| LiveError::state("cutting the journal's torn tail", e))?;
        }
        Ok((Journal { file }, replayed))
    }

    /// Append `records` and make them durable. The bytes they cover must
    /// be durable already.
    pub fn append(&mut self, records: &[(u64, Range<u64>)]) -> Result<(), LiveError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * RECORD);
        for (id, r) in records {
            buf.extend_from_slice(&encode(*id, r));
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| LiveError::state("writing the journal", e))
    }
}

/// Turn sorted chunk indexes into ranges of consecutive ones.
pub fn ranges(chunks: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some(r) if r.end == c => r.end += 1,
            _ => out.push(c..c + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = File::open(dir.path()).expect("open");
        let (mut j, r) = Journal::open(&state).expect("journal");
        assert!(r.is_empty());
        j.append(&[(7, 0..3), (9, 5..6)]).expect("append");
        j.append(&[(7, 4..5)]).expect("append");
        drop(j);
        let path = dir.path().join(NAME);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(&[1, 2, 3]).expect("torn");
        drop(f);
        let (mut j, r) = Journal::open(&state).expect("journal");
        assert_eq!(r[&7], vec![0..3, 4..5]);
        assert_eq!(r[&9], vec![5..6]);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 3 * 32);
        j.append(&[(1, 0..1)]).expect("append after the cut");
        let (_, r) = Journal::open(&state).expect("journal");
        assert_eq!(r[&1], vec![0..1]);
    }

    #[test]
    fn chunk_runs_become_ranges() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), vec![0..3, 5..6, 7..9]);
        assert!(ranges(&[]).is_empty());
    }
}
