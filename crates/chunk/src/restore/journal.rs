//! The restore journal, `<dest>/.btm-restore`: what an interrupted restore
//! may trust when it runs again (`docs/format.md`, "Restore").
//!
//! It is written before the restore changes anything, and every line in it
//! claims only what a `syncfs` of the destination already made durable: a
//! file complete (`{"path","ino","size"}`), or a file's first `prefix` bytes
//! (`{"path","ino","size","prefix"}`). Paths are the raw bytes in hex. A
//! torn last line (a crash while appending) is ignored. The journal is
//! deleted once the whole restore is durable, and its absence then means
//! that nothing in the destination was touched by an unfinished restore.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::super::ChunkError;

/// The journal's name in the destination.
pub const NAME: &str = ".btm-restore";

#[derive(Serialize, Deserialize)]
struct Header {
    v: u32,
    backup: String,
}

#[derive(Serialize, Deserialize)]
struct Line {
    path: String,
    ino: u64,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<u64>,
}

/// What an earlier, unfinished run of the same restore made durable.
#[derive(Debug, Default)]
pub struct Prior {
    /// Whether a journal existed at all (for any backup): then nothing in
    /// the destination is trusted without a record.
    pub existed: bool,
    /// Per path: the inode and size the file had, and how many of its
    /// bytes are known right (`size` for a complete file).
    pub files: HashMap<Vec<u8>, (u64, u64, u64)>,
}

impl Prior {
    /// How many leading bytes of `path` (now inode `ino`, `size` bytes,
    /// to be restored at `size`) are known right.
    pub fn trusted(&self, path: &[u8], ino: u64, size: u64) -> u64 {
        match self.files.get(path) {
            Some(&(i, s, prefix)) if i == ino && s == size => prefix.min(size),
            _ => 0,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The journal of a running restore.
pub struct Journal {
    file: File,
    path: std::path::PathBuf,
}

impl Journal {
    /// Read what an earlier run of restoring `backup` into `dest` (open as
    /// `dir`) left, then start (or continue) the journal for this run.
    pub fn open(
        dest: &Path,
        dir: &impl AsFd,
        backup: &str,
    ) -> Result<(Journal, Prior), ChunkError> {
        let path = dest.join(NAME);
        let io = |e: std::io::Error| ChunkError::io(&path, e);
        let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let existing = match openat(dir.as_fd(), NAME, flags, Mode::empty()) {
            Ok(fd) => Some(File::from(fd)),
            Err(nix::errno::Errno::ENOENT) => None,
            Err(e) => return Err(io(e.into())),
        };
        let mut prior = Prior {
            existed: existing.is_some(),
            ..Prior::default()
        };
        if let Some(f) = existing {
            let mut lines = BufReader::new(&f).lines();
            let same = lines
                .next()
                .and_then(|l| l.ok())
                .and_then(|l| serde_json::from_str::<Header>(&l).ok())
                .is_some_and(|h| h.v == 1 && h.backup == backup);
            if same {
                for line in lines {
                    let Ok(line) = line else { break };
                    // A torn last line: what follows it was never claimed.
                    let Ok(l) = serde_json::from_str::<Line>(&line) else {
                        break;
                    };
                    let Some(p) = unhex(&l.path) else { break };
                    prior
                        .files
                        .insert(p, (l.ino, l.size, l.prefix.unwrap_or(l.size)));
                }
                // Continue this journal: its records stay valid.
                let mut file = f;
                std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io)?;
                return Ok((Journal { file, path }, prior));
            }
        }
        // A new journal, durable before anything in `dest` changes.
        let tmp = format!("{NAME}.{}.tmp", std::process::id());
        let _ = nix::unistd::unlinkat(
            dir.as_fd(),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let fd = openat(
            dir.as_fd(),
            tmp.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io(e.into()))?;
        let mut file = File::from(fd);
        let header = Header {
            v: 1,
            backup: backup.to_owned(),
        };
        let mut line = serde_json::to_vec(&header)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        line.push(b'\n');
        file.write_all(&line).map_err(io)?;
        file.sync_all().map_err(io)?;
        nix::fcntl::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), NAME)
            .map_err(|e| io(e.into()))?;
        nix::unistd::fsync(dir.as_fd()).map_err(|e| io(e.into()))?;
        Ok((Journal { file, path }, prior))
    }

    /// Record files as durable: each `(path, ino, size, prefix)`, where
    /// `prefix == size` means complete. The caller made them durable first.
    pub fn record(&mut self, done: &[(Vec<u8>, u64, u64, u64)]) -> Result<(), ChunkError> {
        if done.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for (path, ino, size, prefix) in done {
            let line = Line {
                path: hex(path),
                ino: *ino,
                size: *size,
                prefix: (prefix != size).then_some(*prefix),
            };
            serde_json::to_writer(&mut buf, &line)
                .map_err(|e| ChunkError::io(&self.path, std::io::Error::other(e)))?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| ChunkError::io(&self.path, e))
    }

    /// The restore is complete and durable: remove the journal, durably.
    pub fn finish(self, dir: &impl AsFd) -> Result<(), ChunkError> {
        let io = |e: nix::errno::Errno| ChunkError::io(&self.path, e.into());
        nix::unistd::unlinkat(dir.as_fd(), NAME, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(io)?;
        nix::unistd::fsync(dir.as_fd()).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_rerun_and_a_torn_line_is_ignored() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = File::open(t.path()).expect("dir");
        let (mut j, prior) = Journal::open(t.path(), &dir, "b1").expect("open");
        assert!(!prior.existed);
        j.record(&[
            (b"a/f".to_vec(), 7, 100, 100),
            (vec![0xff, b'x'], 8, 50, 20),
        ])
        .expect("record");
        drop(j);
        // A crash in the middle of appending.
        std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join(NAME))
            .and_then(|mut f| f.write_all(b"{\"path\":\"6162\",\"ino\""))
            .expect("append");
        let (_, prior) = Journal::open(t.path(), &dir, "b1").expect("reopen");
        assert!(prior.existed);
        assert_eq!(prior.trusted(b"a/f", 7, 100), 100);
        assert_eq!(prior.trusted(b"a/f", 9, 100), 0, "another inode");
        assert_eq!(prior.trusted(&[0xff, b'x'], 8, 50), 20);
        assert_eq!(prior.files.len(), 2);
        // Another backup's journal trusts nothing, but says one existed.
        let (j, prior) = Journal::open(t.path(), &dir, "b2").expect("other");
        assert!(prior.existed && prior.files.is_empty());
        j.finish(&dir).expect("finish");
        assert!(!t.path().join(NAME).exists());
    }
}
