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
//! restore. A copy of it is kept outside the destination first, as the
//! restore record: lines of complete files carry their chunk lists, so
//! the next restore into the same directory knows what each file still
//! holds without reading it ([`Prior::known`]).
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
use std::sync::Arc;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::super::ChunkError;
use crate::format::tree::ChunkRef;
use crate::store::Id;

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
    /// The chunks of a complete file (`docs/format.md`, "Restore").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunks: Option<String>,
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
    /// A complete file's chunks, as the backup's tree has them.
    pub chunks: Option<Arc<[ChunkRef]>>,
}

/// What a file held when a record was made of it: its stamp then, and its
/// chunks.
#[derive(Debug, Clone)]
pub struct Known {
    /// The file when the record was made.
    pub stamp: Stamp,
    /// Exactly its content then.
    pub chunks: Arc<[ChunkRef]>,
}

/// `chunks` as a line holds them: per chunk, its length (8 bytes,
/// big-endian) and its hash (32 zero bytes for an empty chunk), in hex.
fn encode_chunks(chunks: &[ChunkRef]) -> String {
    let mut text = String::with_capacity(chunks.len() * 80);
    for c in chunks {
        crate::hex::encode_into(&mut text, &c.len.to_be_bytes());
        crate::hex::encode_into(&mut text, c.hash.as_ref().map_or(&[0u8; 32], |h| &h.0));
    }
    text
}

/// The chunks of a line, offsets implied; `None` if malformed.
fn decode_chunks(text: &str) -> Option<Vec<ChunkRef>> {
    let raw = crate::hex::decode(text)?;
    if raw.len() % 40 != 0 {
        return None;
    }
    let mut off = 0u64;
    raw.chunks_exact(40)
        .map(|c| {
            let len = u64::from_be_bytes(c[..8].try_into().ok()?);
            let hash: [u8; 32] = c[8..].try_into().ok()?;
            let hash = (hash != [0u8; 32]).then_some(Id(hash));
            let r = ChunkRef { off, len, hash };
            off = off.checked_add(len)?;
            Some(r)
        })
        .collect()
}

/// What an earlier, unfinished run of the same restore made durable.
#[derive(Debug, Default)]
pub struct Prior {
    /// Whether a journal existed at all (for any backup): then nothing in
    /// the destination is trusted without a record.
    pub existed: bool,
    /// The last record of each path.
    pub files: HashMap<Vec<u8>, Record>,
    /// What complete files held when recorded, by this restore's journal
    /// or the record of the last restore that completed (of any backup).
    pub known: HashMap<Vec<u8>, Known>,
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

    /// The chunks `path` (now `now`) holds, if a record says so and the
    /// file is exactly as it was when the record was made.
    pub fn known(&self, path: &[u8], now: &Stamp) -> Option<Arc<[ChunkRef]>> {
        self.known
            .get(path)
            .filter(|k| k.stamp == *now)
            .map(|k| Arc::clone(&k.chunks))
    }
}

/// The lines of a journal after its header: each path's last record, and
/// what complete files with chunks held. `None` if a line other than the
/// last is malformed (a record that does not parse is ignored whole).
fn read_lines(
    lines: impl Iterator<Item = std::io::Result<String>>,
) -> (HashMap<Vec<u8>, Record>, HashMap<Vec<u8>, Known>) {
    let (mut files, mut known) = (HashMap::new(), HashMap::new());
    for line in lines {
        let Ok(line) = line else { break };
        // A torn last line: what follows it was never claimed.
        let Ok(l) = serde_json::from_str::<Line>(&line) else {
            break;
        };
        let Some(p) = crate::hex::decode(&l.path) else {
            break;
        };
        let stamp = Stamp {
            ino: l.ino,
            size: l.size,
            mtime_ns: l.mtime,
            ctime_ns: l.ctime,
        };
        let prefix = l.prefix.unwrap_or(l.size);
        let chunks = l.chunks.as_deref().and_then(decode_chunks);
        match chunks {
            Some(c) if prefix == l.size && c.iter().map(|c| c.len).sum::<u64>() == l.size => {
                known.insert(
                    p.clone(),
                    Known {
                        stamp,
                        chunks: c.into(),
                    },
                );
            }
            _ => {
                known.remove(&p);
            }
        }
        files.insert(p, Record { stamp, prefix });
    }
    (files, known)
}

/// What the record of the last completed restore (at `record`) knows;
/// it is removed once a new journal exists (see [`Journal::open`]).
fn read_known(record: Option<&Path>) -> HashMap<Vec<u8>, Known> {
    let Some(Ok(f)) = record.map(File::open) else {
        return HashMap::new();
    };
    let mut lines = BufReader::new(f).lines();
    let header = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str::<Header>(&l).ok());
    if header.is_none_or(|h| h.v != VERSION) {
        return HashMap::new();
    }
    read_lines(lines).1
}

/// Remove the record of the last completed restore: the journal now says
/// what may be trusted, and the record would go stale as this restore
/// changes files (harmlessly: a file changed since has another stamp).
fn forget_record(record: Option<&Path>) -> std::io::Result<()> {
    match record.map(std::fs::remove_file) {
        Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The journal of a running restore.
pub struct Journal {
    file: File,
    path: std::path::PathBuf,
}

impl Journal {
    /// Read what an earlier run of restoring `backup` into `dest` (open as
    /// `dir`) left, then start (or continue) the journal for this run.
    /// `record`: where the record of the last restore into `dest` that
    /// completed is kept, if anywhere (outside `dest`). `read_record`:
    /// whether to read it. A destination that holds nothing has none of
    /// the files it names, and a record of a million files costs seconds
    /// and a hundred MiB to load; it is removed all the same.
    pub fn open(
        dest: &Path,
        dir: &impl AsFd,
        backup: &str,
        record: Option<&Path>,
        read_record: bool,
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
            known: if read_record {
                read_known(record)
            } else {
                HashMap::new()
            },
            ..Prior::default()
        };
        if let Some(f) = existing {
            let mut lines = BufReader::new(&f).lines();
            let header = lines
                .next()
                .and_then(|l| l.ok())
                .and_then(|l| serde_json::from_str::<Header>(&l).ok())
                .filter(|h| h.v == VERSION);
            if let Some(h) = header {
                let (files, known) = read_lines(lines);
                // What complete files held is true whichever backup was
                // being restored; prefixes only for the same one.
                prior.known.extend(known);
                if h.backup == backup {
                    prior.files = files;
                    // Continue this journal: its records stay valid.
                    let mut file = f;
                    std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io)?;
                    forget_record(record).map_err(io)?;
                    return Ok((Journal { file, path }, prior));
                }
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
        forget_record(record).map_err(io)?;
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
        for Durable {
            path,
            record: r,
            chunks,
        } in done
        {
            let line = Line {
                path: crate::hex::encode(path),
                ino: r.stamp.ino,
                size: r.stamp.size,
                mtime: r.stamp.mtime_ns,
                ctime: r.stamp.ctime_ns,
                prefix: (r.prefix != r.stamp.size).then_some(r.prefix),
                chunks: chunks.as_deref().map(encode_chunks),
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

    /// The restore is complete and durable: keep the journal as the
    /// restore record at `record` (a failure is a warning: the next
    /// restore then compares what it finds), then remove it, durably.
    pub fn finish(mut self, dir: &impl AsFd, record: Option<&Path>) -> Result<(), ChunkError> {
        if let Some(record) = record {
            if let Err(e) = self.keep_as(record) {
                tracing::warn!(record = %record.display(), error = %e, "cannot keep the restore record; the next restore into this directory compares every file");
            }
        }
        let io = |e: nix::errno::Errno| ChunkError::io(&self.path, e.into());
        nix::unistd::unlinkat(dir.as_fd(), NAME, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(io)?;
        nix::unistd::fsync(dir.as_fd()).map_err(io)
    }

    /// Copy the journal to `record`, atomically.
    fn keep_as(&mut self, record: &Path) -> std::io::Result<()> {
        if let Some(parent) = record.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = record.with_extension(format!("{}.tmp", std::process::id()));
        std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(0))?;
        let mut out = File::create(&tmp)?;
        std::io::copy(&mut self.file, &mut out)?;
        out.sync_all()?;
        std::fs::rename(&tmp, record)
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
        let (mut j, prior) = Journal::open(t.path(), &dir, "b1", None, true).expect("open");
        assert!(!prior.existed);
        let (a, b) = (stamp(7, 100, 5), stamp(8, 50, 6));
        j.record(&[
            Durable {
                path: b"a/f".to_vec(),
                record: Record {
                    stamp: a,
                    prefix: 100,
                },
                chunks: None,
            },
            Durable {
                path: vec![0xff, b'x'],
                record: Record {
                    stamp: b,
                    prefix: 20,
                },
                chunks: None,
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
        let (_, prior) = Journal::open(t.path(), &dir, "b1", None, true).expect("reopen");
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
        let (j, prior) = Journal::open(t.path(), &dir, "b2", None, true).expect("other");
        assert!(prior.existed && prior.files.is_empty());
        let record = t.path().join("records/r");
        j.finish(&dir, Some(&record)).expect("finish");
        assert!(!t.path().join(NAME).exists());
        assert!(record.exists(), "kept as the record");
    }

    /// A record's chunk lists come back as written, for the next restore
    /// into a directory that still holds the files; one into a directory
    /// that holds nothing does not read it, and removes it all the same.
    #[test]
    fn a_record_is_read_only_where_files_remain() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = File::open(t.path()).expect("dir");
        let record = t.path().join("records/r");
        let chunks: Arc<[ChunkRef]> = vec![
            ChunkRef {
                off: 0,
                len: 4096,
                hash: Some(Id::of(b"one")),
            },
            ChunkRef {
                off: 4096,
                len: 10,
                hash: None,
            },
        ]
        .into();
        let file = stamp(7, 4106, 5);
        let done = [Durable {
            path: vec![b'd', b'/', 0xfe],
            record: Record {
                stamp: file,
                prefix: 4106,
            },
            chunks: Some(Arc::clone(&chunks)),
        }];
        let (mut j, _) = Journal::open(t.path(), &dir, "b1", Some(&record), true).expect("open");
        j.record(&done).expect("record");
        j.finish(&dir, Some(&record)).expect("finish");
        let (mut j, prior) =
            Journal::open(t.path(), &dir, "b2", Some(&record), true).expect("again");
        assert_eq!(
            prior.known(&[b'd', b'/', 0xfe], &file).as_deref(),
            Some(&chunks[..])
        );
        assert!(
            prior
                .known(&[b'd', b'/', 0xfe], &stamp(7, 4106, 6))
                .is_none(),
            "touched"
        );
        assert!(!record.exists(), "the journal now says what to trust");
        j.record(&done).expect("record");
        j.finish(&dir, Some(&record)).expect("finish");
        assert!(record.exists());
        let (_, prior) = Journal::open(t.path(), &dir, "b2", Some(&record), false).expect("fresh");
        assert!(prior.known.is_empty(), "not read");
        assert!(!record.exists(), "removed all the same");
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
        let (_, prior) = Journal::open(t.path(), &dir, "b1", None, true).expect("open");
        assert!(prior.existed && prior.files.is_empty());
    }
}
