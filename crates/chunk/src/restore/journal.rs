//! The restore journal, `<dest>/.btm-restore`: what an interrupted restore
//! may trust when it runs again (`docs/format.md`, "Restore").
//!
//! It is written before the restore changes anything, and every line in it
//! claims only what a `syncfs` of the destination already made durable: a
//! file complete (`{"path","ino","size","mtime","ctime"}`), or a file's
//! first `prefix` bytes (the same and `"prefix"`). Paths are the raw bytes
//! in hex. A torn last line (a crash while appending) is ignored. The
//! journal is deleted once the whole restore is durable, and its absence
//! then means that nothing in the destination was touched by an unfinished
//! restore.
//!
//! A record is trusted only while the file is provably untouched since: the
//! same inode and size, and the modification and change times it had when
//! the record was made. A write in place at the same size (a preallocated
//! block file, a memory-mapped database) changes the change time, which no
//! one can set back; such a file is read and compared again.

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

/// The journal's version: 2 added the times (a version 1 journal, from an
/// older btm, is another backup's: nothing in it is trusted).
const VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Line {
    path: String,
    ino: u64,
    size: u64,
    mtime: i64,
    ctime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<u64>,
}

/// A file as `fstat` shows it: what a record must still match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Its inode.
    pub ino: u64,
    /// Its size.
    pub size: u64,
    /// Its modification time, in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Its change time, in nanoseconds since the epoch.
    pub ctime_ns: i64,
}

impl Stamp {
    /// The stamp of a file's `fstat`.
    pub fn of(st: &nix::sys::stat::FileStat) -> Self {
        Stamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        }
    }
}

/// A file's record: its stamp when recorded, and how many of its leading
/// bytes were durable and right then (`stamp.size` for a complete file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The file when the record was made.
    pub stamp: Stamp,
    /// Bytes known right from the start.
    pub prefix: u64,
}

/// A file made durable, to be journalled: its path and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    /// The path, relative to the destination.
    pub path: Vec<u8>,
    /// What was durable.
    pub record: Record,
}

/// What an earlier, unfinished run of the same restore made durable.
#[derive(Debug, Default)]
pub struct Prior {
    /// Whether a journal existed at all (for any backup): then nothing in
    /// the destination is trusted without a record.
    pub existed: bool,
    /// The last record of each path.
    pub files: HashMap<Vec<u8>, Record>,
}

impl Prior {
    /// Whether a record says the whole file is right and nothing changed
    /// it since (an empty file without a record is not: it may be one this
    /// run just created, still without its owner, mode and times).
    pub fn complete(&self, path: &[u8], now: &Stamp, size: u64) -> bool {
        matches!(self.files.get(path), Some(r) if r.stamp == *now && now.size == size && r.prefix >= size)
    }

    /// How many leading bytes of `path` (now `now`, to be restored at
    /// `size` bytes) are known right: those of its record, if the file is
    /// exactly as it was when the record was made.
    pub fn trusted(&self, path: &[u8], now: &Stamp, size: u64) -> u64 {
        match self.files.get(path) {
            Some(r) if r.stamp == *now && now.size == size => r.prefix.min(size),
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
                .is_some_and(|h| h.v == VERSION && h.backup == backup);
            if same {
                for line in lines {
                    let Ok(line) = line else { break };
                    // A torn last line: what follows it was never claimed.
                    let Ok(l) = serde_json::from_str::<Line>(&line) else {
                        break;
                    };
                    let Some(p) = unhex(&l.path) else { break };
                    let stamp = Stamp {
                        ino: l.ino,
                        size: l.size,
                        mtime_ns: l.mtime,
                        ctime_ns: l.ctime,
                    };
                    let prefix = l.prefix.unwrap_or(l.size);
                    prior.files.insert(p, Record { stamp, prefix });
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
            v: VERSION,
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

    /// Record files as durable: each path with its record, where a prefix
    /// of the whole size means complete. The caller made them durable
    /// first.
    pub fn record(&mut self, done: &[Durable]) -> Result<(), ChunkError> {
        if done.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for Durable { path, record: r } in done {
            let line = Line {
                path: hex(path),
                ino: r.stamp.ino,
                size: r.stamp.size,
                mtime: r.stamp.mtime_ns,
                ctime: r.stamp.ctime_ns,
                prefix: (r.prefix != r.stamp.size).then_some(r.prefix),
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

    fn stamp(ino: u64, size: u64, ctime_ns: i64) -> Stamp {
        Stamp {
            ino,
            size,
            mtime_ns: 1_000,
            ctime_ns,
        }
    }

    #[test]
    fn records_survive_a_rerun_and_a_torn_line_is_ignored() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = File::open(t.path()).expect("dir");
        let (mut j, prior) = Journal::open(t.path(), &dir, "b1").expect("open");
        assert!(!prior.existed);
        let (a, b) = (stamp(7, 100, 5), stamp(8, 50, 6));
        j.record(&[
            Durable {
                path: b"a/f".to_vec(),
                record: Record {
                    stamp: a,
                    prefix: 100,
                },
            },
            Durable {
                path: vec![0xff, b'x'],
                record: Record {
                    stamp: b,
                    prefix: 20,
                },
            },
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
        assert_eq!(prior.trusted(b"a/f", &a, 100), 100);
        assert_eq!(
            prior.trusted(b"a/f", &stamp(9, 100, 5), 100),
            0,
            "another inode"
        );
        assert_eq!(prior.trusted(&[0xff, b'x'], &b, 50), 20);
        assert_eq!(prior.files.len(), 2);
        // Another backup's journal trusts nothing, but says one existed.
        let (j, prior) = Journal::open(t.path(), &dir, "b2").expect("other");
        assert!(prior.existed && prior.files.is_empty());
        j.finish(&dir).expect("finish");
        assert!(!t.path().join(NAME).exists());
    }

    /// A file changed in place at the same size since
    /// its record (its change time moved) is not trusted, nor one whose
    /// modification time was set back.
    #[test]
    fn a_record_holds_only_while_the_file_is_untouched() {
        let mut prior = Prior::default();
        let recorded = stamp(7, 100, 5);
        prior.files.insert(
            b"f".to_vec(),
            Record {
                stamp: recorded,
                prefix: 100,
            },
        );
        assert_eq!(prior.trusted(b"f", &recorded, 100), 100);
        assert_eq!(
            prior.trusted(b"f", &stamp(7, 100, 6), 100),
            0,
            "written in place"
        );
        let touched = Stamp {
            mtime_ns: 2_000,
            ..recorded
        };
        assert_eq!(prior.trusted(b"f", &touched, 100), 0, "another mtime");
        assert_eq!(prior.trusted(b"f", &recorded, 99), 0, "another size wanted");
    }

    /// A version 1 journal (no times) trusts nothing.
    #[test]
    fn an_older_journal_trusts_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::write(
            t.path().join(NAME),
            "{\"v\":1,\"backup\":\"b1\"}\n{\"path\":\"61\",\"ino\":7,\"size\":1}\n",
        )
        .expect("w");
        let dir = File::open(t.path()).expect("dir");
        let (_, prior) = Journal::open(t.path(), &dir, "b1").expect("open");
        assert!(prior.existed && prior.files.is_empty());
    }
}
