//! The live files' table: what the server must know of every backup file
//! not yet local, kept on disk in the state directory beside the backing
//! tree, so that neither memory nor descriptors grow with the tree.
//!
//! The skeleton writes it once, streaming, as it makes the tree; the
//! server reads what it needs with `pread` when a file is read, written or
//! hydrated. A resumed run opens it again instead of reading the backup's
//! tree. Files (`.btm-live/`, little-endian, docs/live-restore.md):
//!
//! ```text
//! files   header (64 bytes): magic "BTMLIVE\x02", chunk_size, files,
//!         chunks, total_bytes, entries, names_len, 0 (u64 each)
//!         then per live file (its slot), 32 bytes: first chunk u64,
//!         size u64, offset in names u64, path length u32, handle length
//!         u16, 0 u16
//! chunks  per chunk, in slot order, 32 bytes: its BLAKE3, or zeros for
//!         a hole (a chunk's length follows from the file's size)
//! names   per live file: its path in the backup, then its file handle
//!         (btm::sys::FileHandle bytes)
//! order   per live file, in hydration order (crate::order): slot u32
//! ```
//!
//! A live file is a backup file that holds data; its slot is its place
//! among them in the backup's walk order. The table is written before the
//! session says the skeleton is complete, and the `syncfs` before that
//! makes it durable with the tree; it is never changed afterwards.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

use btm::sys::FileHandle;
use btm_chunk::store::Id;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::order::{hydration_order, Key};
use crate::LiveError;

const MAGIC: &[u8; 8] = b"BTMLIVE\x02";
const HEADER: u64 = 64;
const FILE_REC: u64 = 32;
const CHUNK_REC: u64 = 32;
/// Bytes read at once when the table is scanned in order.
const SCAN: usize = 1 << 20;

const FILES: &str = "files";
const CHUNKS: &str = "chunks";
const NAMES: &str = "names";
const ORDER: &str = "order";

/// What the table holds, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The backup's chunk size.
    pub chunk_size: u64,
    /// Live files.
    pub files: u32,
    /// Their chunks.
    pub chunks: u64,
    /// Bytes of data in the whole backup.
    pub total_bytes: u64,
    /// Entries in the backup.
    pub entries: u64,
    names_len: u64,
}

/// Where a live file's chunks are, and its size in the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Its first chunk's place in `chunks` (and in the state arrays).
    pub first: u64,
    /// Its size in the backup.
    pub size: u64,
}

impl Extent {
    /// Its chunks, of `chunk_size` each but the last.
    pub fn chunks(&self, chunk_size: u64) -> u64 {
        self.size.div_ceil(chunk_size.max(1))
    }

    /// The global chunk range.
    pub fn range(&self, chunk_size: u64) -> std::ops::Range<u64> {
        self.first..self.first + self.chunks(chunk_size)
    }

    /// The length of its chunk `i`.
    pub fn chunk_len(&self, chunk_size: u64, i: u64) -> u64 {
        let cs = chunk_size.max(1);
        (self.size - (i * cs).min(self.size)).min(cs)
    }
}

/// One live file as the table has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// Where its chunks are.
    pub extent: Extent,
    /// Its path in the backup.
    pub path: Vec<u8>,
    /// How to reach its backing file.
    pub handle: FileHandle,
}

fn open(state: BorrowedFd<'_>, name: &str, create: bool) -> Result<File, LiveError> {
    let flags = if create {
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC
    } else {
        OFlag::O_RDONLY | OFlag::O_CLOEXEC
    };
    openat(state, name, flags, Mode::from_bits_truncate(0o600))
        .map(File::from)
        .map_err(|e| LiveError::state("opening the live files' table", e.into()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The table being written by the skeleton, one file at a time.
pub struct Writer {
    files: BufWriter<File>,
    chunks: BufWriter<File>,
    names: BufWriter<File>,
    order_file: File,
    keys: Vec<Key>,
    chunk_size: u64,
    n_files: u32,
    n_chunks: u64,
    names_len: u64,
}

/// A file whose chunks are being written.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    first: u64,
}

fn write_err(e: std::io::Error) -> LiveError {
    LiveError::state("writing the live files' table", e)
}

impl Writer {
    /// A new, empty table in state directory `state`, for a backup of
    /// `chunk_size` chunks.
    pub fn create(state: BorrowedFd<'_>, chunk_size: u64) -> Result<Writer, LiveError> {
        let mut files = BufWriter::with_capacity(SCAN, open(state, FILES, true)?);
        files
            .write_all(&[0u8; HEADER as usize])
            .map_err(write_err)?;
        Ok(Writer {
            files,
            chunks: BufWriter::with_capacity(SCAN, open(state, CHUNKS, true)?),
            names: BufWriter::with_capacity(SCAN, open(state, NAMES, true)?),
            order_file: open(state, ORDER, true)?,
            keys: Vec::new(),
            chunk_size,
            n_files: 0,
            n_chunks: 0,
            names_len: 0,
        })
    }

    /// Where the chunks of the file started at `s` begin.
    pub fn start_of(&self, s: Started) -> u64 {
        s.first
    }

    /// A file's chunks begin.
    pub fn start(&self) -> Started {
        Started {
            first: self.n_chunks,
        }
    }

    /// More chunks of the file started last: their hashes (`None` for a
    /// hole).
    pub fn chunks(&mut self, hashes: impl Iterator<Item = Option<Id>>) -> Result<(), LiveError> {
        for h in hashes {
            self.chunks
                .write_all(&h.map_or([0u8; 32], |h| h.0))
                .map_err(write_err)?;
            self.n_chunks += 1;
        }
        Ok(())
    }

    /// The file started at `s` holds no data: forget its chunks.
    pub fn discard(&mut self, s: Started) -> Result<(), LiveError> {
        if self.n_chunks != s.first {
            self.chunks
                .seek(SeekFrom::Start(s.first * CHUNK_REC))
                .map_err(write_err)?;
            self.n_chunks = s.first;
        }
        Ok(())
    }

    /// The file started at `s` is live: `size` bytes, at `path`, reached by
    /// `handle`, modified at `mtime_ns`, with `bytes` of data. Its slot.
    pub fn add(
        &mut self,
        s: Started,
        size: u64,
        path: &[u8],
        handle: &FileHandle,
        mtime_ns: i64,
        bytes: u64,
    ) -> Result<u32, LiveError> {
        let slot = self.n_files;
        let handle = handle.as_bytes();
        let mut rec = [0u8; FILE_REC as usize];
        rec[..8].copy_from_slice(&s.first.to_le_bytes());
        rec[8..16].copy_from_slice(&size.to_le_bytes());
        rec[16..24].copy_from_slice(&self.names_len.to_le_bytes());
        rec[24..28].copy_from_slice(&(path.len() as u32).to_le_bytes());
        rec[28..30].copy_from_slice(&(handle.len() as u16).to_le_bytes());
        self.files.write_all(&rec).map_err(write_err)?;
        self.names.write_all(path).map_err(write_err)?;
        self.names.write_all(handle).map_err(write_err)?;
        self.names_len += (path.len() + handle.len()) as u64;
        self.keys.push(Key::new(slot, path, bytes, mtime_ns));
        self.n_files = slot
            .checked_add(1)
            .ok_or_else(|| write_err(std::io::Error::other("more than 2^32 files")))?;
        Ok(slot)
    }

    /// Write the hydration order and the header. Durable with the next
    /// `syncfs` of the file system.
    pub fn finish(mut self, total_bytes: u64, entries: u64) -> Result<Head, LiveError> {
        hydration_order(&mut self.keys);
        let mut order = BufWriter::with_capacity(SCAN, &self.order_file);
        for k in &self.keys {
            order.write_all(&k.slot.to_le_bytes()).map_err(write_err)?;
        }
        order.flush().map_err(write_err)?;
        drop(order);
        let chunks = self
            .chunks
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?;
        chunks
            .set_len(self.n_chunks * CHUNK_REC)
            .map_err(write_err)?;
        self.names.flush().map_err(write_err)?;
        let head = Head {
            chunk_size: self.chunk_size,
            files: self.n_files,
            chunks: self.n_chunks,
            total_bytes,
            entries,
            names_len: self.names_len,
        };
        let files = self
            .files
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?;
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        for (i, v) in [
            head.chunk_size,
            u64::from(head.files),
            head.chunks,
            head.total_bytes,
            head.entries,
            head.names_len,
        ]
        .into_iter()
        .enumerate()
        {
            h[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        files.write_all_at(&h, 0).map_err(write_err)?;
        Ok(head)
    }
}

/// The table, open for reading.
#[derive(Debug)]
pub struct Table {
    files: File,
    chunks: File,
    names: File,
    order: File,
    /// What it holds.
    pub head: Head,
}

fn read_err(e: std::io::Error) -> LiveError {
    LiveError::state("reading the live files' table", e)
}

impl Table {
    /// Open the table in state directory `state`, checking that its parts
    /// fit together (a table from another version, or a damaged one, is
    /// refused).
    pub fn open(state: BorrowedFd<'_>) -> Result<Table, LiveError> {
        let files = open(state, FILES, false)?;
        let mut h = [0u8; HEADER as usize];
        files.read_exact_at(&mut h, 0).map_err(read_err)?;
        let bad = |what: &str| read_err(std::io::Error::other(format!("the table {what}")));
        if &h[..8] != MAGIC {
            return Err(bad("is not one this version writes"));
        }
        let n_files = u64_at(&h, 16);
        let head = Head {
            chunk_size: u64_at(&h, 8),
            files: u32::try_from(n_files).map_err(|_| bad("has too many files"))?,
            chunks: u64_at(&h, 24),
            total_bytes: u64_at(&h, 32),
            entries: u64_at(&h, 40),
            names_len: u64_at(&h, 48),
        };
        let t = Table {
            chunks: open(state, CHUNKS, false)?,
            names: open(state, NAMES, false)?,
            order: open(state, ORDER, false)?,
            files,
            head,
        };
        let len = |f: &File| f.metadata().map(|m| m.len()).map_err(read_err);
        if len(&t.files)? != HEADER + n_files * FILE_REC
            || len(&t.chunks)? != head.chunks * CHUNK_REC
            || len(&t.names)? != head.names_len
            || len(&t.order)? != n_files * 4
            || head.chunk_size == 0
        {
            return Err(bad("is incomplete"));
        }
        Ok(t)
    }

    fn decode_extent(rec: &[u8]) -> Extent {
        Extent {
            first: u64_at(rec, 0),
            size: u64_at(rec, 8),
        }
    }

    /// Where live file `slot`'s chunks are.
    pub fn extent(&self, slot: u32) -> std::io::Result<Extent> {
        let mut rec = [0u8; FILE_REC as usize];
        self.files
            .read_exact_at(&mut rec, HEADER + u64::from(slot) * FILE_REC)?;
        Ok(Self::decode_extent(&rec))
    }

    /// Live file `slot`.
    pub fn file(&self, slot: u32) -> std::io::Result<Rec> {
        if slot >= self.head.files {
            return Err(std::io::Error::other(format!("no live file {slot}")));
        }
        let mut rec = [0u8; FILE_REC as usize];
        self.files
            .read_exact_at(&mut rec, HEADER + u64::from(slot) * FILE_REC)?;
        let (at, path_len) = (u64_at(&rec, 16), u32_at(&rec, 24) as usize);
        let handle_len = u16::from_le_bytes([rec[28], rec[29]]) as usize;
        let mut names = vec![0u8; path_len + handle_len];
        self.names.read_exact_at(&mut names, at)?;
        let handle = FileHandle::from_bytes(&names[path_len..])
            .ok_or_else(|| std::io::Error::other("a file handle in the table is damaged"))?;
        names.truncate(path_len);
        Ok(Rec {
            extent: Self::decode_extent(&rec),
            path: names,
            handle,
        })
    }

    /// The hashes of chunks `range` (global), `None` for holes.
    pub fn hashes(&self, range: std::ops::Range<u64>) -> std::io::Result<Vec<Option<Id>>> {
        let n = range.end.saturating_sub(range.start) as usize;
        let mut buf = vec![0u8; n * CHUNK_REC as usize];
        self.chunks
            .read_exact_at(&mut buf, range.start * CHUNK_REC)?;
        Ok(buf
            .chunks_exact(CHUNK_REC as usize)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                (h != [0u8; 32]).then_some(Id(h))
            })
            .collect())
    }

    /// Every live file's extent, in slot order, read a block at a time.
    pub fn extents(&self) -> impl Iterator<Item = std::io::Result<(u32, Extent)>> + '_ {
        let per = SCAN / FILE_REC as usize;
        (0..self.head.files).step_by(per).flat_map(move |start| {
            let n = (self.head.files - start).min(per as u32) as usize;
            let mut buf = vec![0u8; n * FILE_REC as usize];
            let read = self
                .files
                .read_exact_at(&mut buf, HEADER + u64::from(start) * FILE_REC);
            let items: Vec<std::io::Result<(u32, Extent)>> = match read {
                Ok(()) => buf
                    .chunks_exact(FILE_REC as usize)
                    .enumerate()
                    .map(|(i, rec)| Ok((start + i as u32, Self::decode_extent(rec))))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            items
        })
    }

    /// Up to `n` slots of the hydration order from position `at`.
    pub fn order(&self, at: u32, n: u32) -> std::io::Result<Vec<u32>> {
        let n = n.min(self.head.files.saturating_sub(at)) as usize;
        let mut buf = vec![0u8; n * 4];
        self.order.read_exact_at(&mut buf, u64::from(at) * 4)?;
        Ok(buf.chunks_exact(4).map(|c| u32_at(c, 0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn handle(n: u8) -> FileHandle {
        FileHandle::from_bytes(&[1, 0, 0, 0, n, n, n, n, n, n, n, n]).expect("handle")
    }

    #[test]
    fn a_table_reads_back_what_the_skeleton_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = File::open(dir.path()).expect("open");
        let mut w = Writer::create(state.as_fd(), 4096).expect("create");
        let h = |b: u8| Some(Id([b; 32]));
        // A file with data, an all-hole file (not live), a big newer file.
        let s = w.start();
        w.chunks([h(1), None].into_iter()).expect("chunks");
        assert_eq!(
            w.add(s, 5000, b"db/CURRENT", &handle(7), 10, 4096)
                .expect("add"),
            0
        );
        let s = w.start();
        w.chunks([None, None, None].into_iter()).expect("chunks");
        w.discard(s).expect("discard");
        let s = w.start();
        w.chunks((0..600).map(|i| h((i % 200) as u8 + 2)))
            .expect("chunks");
        let big = 600 * 4096;
        assert_eq!(
            w.add(s, big, b"cold.bin", &handle(9), 99, big)
                .expect("add"),
            1
        );
        let head = w.finish(big + 4096, 5).expect("finish");
        assert_eq!((head.files, head.chunks, head.entries), (2, 602, 5));

        let t = Table::open(state.as_fd()).expect("open");
        assert_eq!(t.head, head);
        let r = t.file(0).expect("rec");
        assert_eq!(r.path, b"db/CURRENT");
        assert_eq!(r.handle, handle(7));
        assert_eq!(
            r.extent,
            Extent {
                first: 0,
                size: 5000
            }
        );
        assert_eq!(r.extent.chunks(4096), 2);
        assert_eq!(r.extent.chunk_len(4096, 1), 904);
        assert_eq!(t.hashes(0..2).expect("hashes"), vec![h(1), None]);
        let big_rec = t.file(1).expect("rec");
        assert_eq!(
            big_rec.extent.first, 2,
            "the discarded file's chunks are gone"
        );
        assert_eq!(t.hashes(601..602).expect("hashes"), vec![h(201)]);
        assert!(t.file(2).is_err());
        let all: Vec<(u32, Extent)> = t.extents().collect::<Result<_, _>>().expect("scan");
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].1.range(4096), 2..602);
        // Small files first, then the rest.
        assert_eq!(t.order(0, 10).expect("order"), vec![0, 1]);
        assert_eq!(t.order(1, 10).expect("order"), vec![1]);
    }

    #[test]
    fn a_table_cut_short_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = File::open(dir.path()).expect("open");
        let mut w = Writer::create(state.as_fd(), 4096).expect("create");
        let s = w.start();
        w.chunks([Some(Id([3; 32]))].into_iter()).expect("chunks");
        w.add(s, 10, b"a", &handle(1), 0, 10).expect("add");
        w.finish(10, 1).expect("finish");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(CHUNKS))
            .expect("open");
        f.set_len(16).expect("cut");
        let e = Table::open(state.as_fd()).expect_err("cut short");
        assert!(e.to_string().contains("table"), "{e}");
        std::fs::write(dir.path().join(FILES), b"nonsense").expect("w");
        assert!(Table::open(state.as_fd()).is_err());
    }
}
