//! Tree segments: a backup's entries as a stream of binary records, cut
//! into segments so that neither writing nor reading ever holds a whole
//! tree (`docs/format.md`, "Tree segments").
//!
//! [`TreeWriter`] turns entries and their chunks into sealed segments;
//! [`TreeReader`] turns segments back into [`Item`]s and is the single
//! validator every consumer reads through: a hostile or broken stream is
//! refused at the first bad record, before anything acts on it.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashSet;

use super::head::Totals;
use super::{put_varint, put_zigzag, Cursor, FormatError};
use crate::store::Id;

/// The first 8 bytes of a decoded segment.
pub const MAGIC: &[u8; 8] = b"BTMTREE\x02";
/// The largest chunk size a backup may use.
pub const MAX_CHUNK: u64 = 256 << 20;
/// A segment is cut once its records reach this many bytes.
const SEGMENT_TARGET: usize = 4 << 20;
/// The largest decoded segment a reader accepts.
const SEGMENT_LIMIT: usize = 16 << 20;
/// Chunks per `chunks` record written.
const CHUNKS_PER_RECORD: usize = 4096;
/// Longest path or symlink target accepted.
const MAX_NAME: usize = 64 << 10;
/// Content-defined cut: after an entry whose path hash's low 14 bits are 0.
const CUT_MASK: u16 = 0x3fff;

const TAG_ENTRY: u8 = 1;
const TAG_CHUNKS: u8 = 2;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of `size` bytes; its chunks follow it.
    File {
        /// Size in bytes.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link (its target is never followed).
    Symlink {
        /// The target, as raw bytes.
        target: Vec<u8>,
    },
    /// Another name of a file earlier in the stream (format 3): one inode.
    Link {
        /// The full path of that file's entry.
        target: Vec<u8>,
    },
}

/// One entry of a backed-up tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the backup root: raw bytes, `/` between components.
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Backed up as append-only.
    pub append_only: bool,
    /// A file that had more than one link when it was backed up: later
    /// [`EntryKind::Link`] entries may name it.
    pub linked: bool,
}

impl Entry {
    /// The path for messages (lossy where it is not UTF-8).
    pub fn display(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.path)
    }

    /// The file's size, or 0.
    pub fn size(&self) -> u64 {
        match self.kind {
            EntryKind::File { size } => size,
            _ => 0,
        }
    }
}

/// One chunk of a file: `len` bytes at `off`, stored under `hash`, or
/// empty (a hole or zeros, never stored) when `hash` is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Offset in the file.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
    /// Hash of the bytes, or `None` for an empty chunk.
    pub hash: Option<Id>,
}

/// What a reader yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The next entry.
    Entry(Entry),
    /// More chunks of the most recent file entry, in order.
    Chunks(Vec<ChunkRef>),
}

/// The order entries come in: parents before children, siblings by the
/// bytes of their names (a depth-first walk with sorted directories).
pub fn walk_order(a: &[u8], b: &[u8]) -> Ordering {
    let mut ai = a.split(|&c| c == b'/');
    let mut bi = b.split(|&c| c == b'/');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match x.cmp(y) {
                Ordering::Equal => {}
                o => return o,
            },
        }
    }
}

/// Why a path is not a plain relative path, if it is not.
pub fn check_path(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.len() > MAX_NAME {
        return Err("path too long");
    }
    if path.contains(&0) {
        return Err("NUL in path");
    }
    if path[0] == b'/' {
        return Err("absolute path");
    }
    for c in path.split(|&c| c == b'/') {
        match c {
            b"" => return Err("empty component"),
            b"." => return Err("'.' component"),
            b".." => return Err("'..' component"),
            _ => {}
        }
    }
    Ok(())
}

fn cut_here(path: &[u8]) -> bool {
    let h = blake3::hash(path);
    let b = h.as_bytes();
    u16::from_le_bytes([b[0], b[1]]) & CUT_MASK == 0
}

/// A finished segment: its id and stored bytes.
#[derive(Debug)]
pub struct Segment {
    /// BLAKE3 of `data`.
    pub id: Id,
    /// zstd-compressed records.
    pub data: Vec<u8>,
}

/// Builds segments from entries and chunks given in walk order.
pub struct TreeWriter {
    buf: Vec<u8>,
    prev_path: Vec<u8>,
    /// The current file's size and how much of it chunks cover so far.
    file: Option<(Vec<u8>, u64, u64)>,
    totals: Totals,
    level: i32,
}

impl TreeWriter {
    /// A writer compressing segments at zstd `level`.
    pub fn new(level: i32) -> Self {
        let mut w = TreeWriter {
            buf: Vec::new(),
            prev_path: Vec::new(),
            file: None,
            totals: Totals::default(),
            level,
        };
        w.start();
        w
    }

    fn start(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(MAGIC);
        self.prev_path.clear();
    }

    /// Counts so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Add an entry (in walk order; the caller guarantees it). A file's
    /// chunks follow through [`TreeWriter::chunks`].
    pub fn entry(&mut self, e: &Entry) -> Result<Option<Segment>, FormatError> {
        if let Some((path, size, covered)) = &self.file {
            if covered != size {
                return Err(FormatError::new(
                    String::from_utf8_lossy(path),
                    "the next entry came before the file's chunks were complete",
                ));
            }
        }
        let shared = self
            .prev_path
            .iter()
            .zip(&e.path)
            .take_while(|(a, b)| a == b)
            .count();
        let b = &mut self.buf;
        b.push(TAG_ENTRY);
        put_varint(b, shared as u64);
        put_varint(b, (e.path.len() - shared) as u64);
        b.extend_from_slice(&e.path[shared..]);
        b.push(match e.kind {
            EntryKind::File { .. } => 1,
            EntryKind::Dir => 2,
            EntryKind::Symlink { .. } => 3,
            EntryKind::Link { .. } => 4,
        });
        b.push(u8::from(e.append_only) | u8::from(e.linked) << 1);
        put_varint(b, u64::from(e.mode));
        put_varint(b, u64::from(e.uid));
        put_varint(b, u64::from(e.gid));
        put_zigzag(b, e.mtime_ns);
        put_zigzag(b, e.ctime_ns);
        put_varint(b, e.ino);
        self.totals.entries += 1;
        match &e.kind {
            EntryKind::File { size } => {
                put_varint(b, *size);
                self.totals.files += 1;
                self.totals.bytes += size;
            }
            EntryKind::Dir => self.totals.dirs += 1,
            EntryKind::Symlink { target } => {
                put_varint(b, target.len() as u64);
                b.extend_from_slice(target);
                self.totals.symlinks += 1;
            }
            EntryKind::Link { target } => {
                put_varint(b, target.len() as u64);
                b.extend_from_slice(target);
                self.totals.links += 1;
            }
        }
        self.prev_path.clear();
        self.prev_path.extend_from_slice(&e.path);
        match e.kind {
            EntryKind::File { size } if size > 0 => {
                self.file = Some((e.path.clone(), size, 0));
                self.maybe_cut(false)
            }
            _ => {
                self.file = None;
                self.maybe_cut(true)
            }
        }
    }

    /// Add chunks of the current file, continuing where the last ended.
    pub fn chunks(&mut self, chunks: &[ChunkRef]) -> Result<Option<Segment>, FormatError> {
        if chunks.is_empty() {
            return Ok(None);
        }
        let Some((path, size, mut covered)) = self.file.take() else {
            return Err(FormatError::new("tree", "chunks without a file"));
        };
        let bad = |d: &str| FormatError::new(String::from_utf8_lossy(&path), d);
        let mut sealed = None;
        for run in chunks.chunks(CHUNKS_PER_RECORD) {
            let b = &mut self.buf;
            b.push(TAG_CHUNKS);
            put_varint(b, run.len() as u64);
            for c in run {
                if c.off != covered || c.len == 0 {
                    return Err(bad("chunks out of order"));
                }
                put_varint(b, (c.len << 1) | u64::from(c.hash.is_some()));
                if let Some(h) = c.hash {
                    b.extend_from_slice(&h.0);
                    self.totals.stored_bytes += c.len;
                }
                covered += c.len;
            }
            if covered > size {
                return Err(bad("chunks beyond the file's size"));
            }
            let complete = covered == size;
            if !complete {
                self.file = Some((path.clone(), size, covered));
            }
            if let Some(s) = self.maybe_cut(complete)? {
                sealed = Some(s);
            }
        }
        Ok(sealed)
    }

    /// Cut when the segment is full, or after a complete entry whose path
    /// says so (content-defined, so unchanged stretches cut alike).
    fn maybe_cut(&mut self, complete: bool) -> Result<Option<Segment>, FormatError> {
        let by_content = complete && cut_here(&self.prev_path);
        if complete {
            self.file = None;
        }
        if by_content || self.buf.len() >= SEGMENT_TARGET {
            return self.seal().map(Some);
        }
        Ok(None)
    }

    fn seal(&mut self) -> Result<Segment, FormatError> {
        let data = super::compress(&self.buf, self.level, "tree segment")?;
        self.start();
        Ok(Segment {
            id: Id::of(&data),
            data,
        })
    }

    /// The last segment, if anything is left; fails if a file's chunks
    /// are incomplete.
    pub fn finish(mut self) -> Result<(Option<Segment>, Totals), FormatError> {
        if let Some((path, _, _)) = &self.file {
            return Err(FormatError::new(
                String::from_utf8_lossy(path),
                "the tree ended before the file's chunks were complete",
            ));
        }
        let last = if self.buf.len() > MAGIC.len() {
            Some(self.seal()?)
        } else {
            None
        };
        Ok((last, self.totals))
    }
}

/// Reads and validates an entry stream, one segment at a time.
pub struct TreeReader {
    chunk_size: u64,
    seg: Vec<u8>,
    pos: usize,
    what: String,
    prev_path: Vec<u8>,
    /// Last path in walk order, across segments.
    last: Option<Vec<u8>>,
    /// Directories that may still have children, outermost first.
    dirs: Vec<Vec<u8>>,
    /// The current file's path, size, and bytes covered by chunks so far.
    file: Option<(Vec<u8>, u64, u64)>,
    /// Paths of the files so far that hard links may name (flag bit 1).
    linked: HashSet<Vec<u8>>,
    totals: Totals,
}

impl TreeReader {
    /// A reader for a backup whose chunks are at most `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> Self {
        TreeReader {
            chunk_size,
            seg: Vec::new(),
            pos: 0,
            what: String::new(),
            prev_path: Vec::new(),
            last: None,
            dirs: Vec::new(),
            file: None,
            linked: HashSet::new(),
            totals: Totals::default(),
        }
    }

    /// Start reading the next segment (its stored bytes; `what` names it).
    pub fn feed(&mut self, stored: &[u8], what: &str) -> Result<(), FormatError> {
        if self.pos < self.seg.len() {
            return Err(FormatError::new(
                what,
                "fed before the previous segment was read",
            ));
        }
        let seg = super::decompress(stored, SEGMENT_LIMIT, what)?;
        if seg.len() < MAGIC.len() || &seg[..MAGIC.len()] != MAGIC {
            return Err(FormatError::new(what, "not a btm tree segment"));
        }
        self.seg = seg;
        self.pos = MAGIC.len();
        self.what = what.to_owned();
        self.prev_path.clear();
        Ok(())
    }

    /// Counts over what was read so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The next item of the current segment; `None` when it is exhausted.
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        if self.pos >= self.seg.len() {
            return Ok(None);
        }
        let mut c = Cursor::new(&self.seg[self.pos..]);
        let before = c.remaining();
        let item = match c.u8().map_err(|_| self.bad("truncated"))? {
            TAG_ENTRY => {
                let e = read_entry(&mut c, &self.prev_path).map_err(|d| self.bad(d))?;
                Item::Entry(e)
            }
            TAG_CHUNKS => {
                let (path, size, covered) = match &self.file {
                    Some((p, s, cov)) => (p.clone(), *s, *cov),
                    None => return Err(self.bad("chunks without a file before them")),
                };
                let n = c.varint().map_err(|_| self.bad("truncated"))?;
                if n == 0 || n > c.remaining() as u64 {
                    return Err(self.bad("bad chunk count"));
                }
                let mut out = Vec::with_capacity(n as usize);
                let mut off = covered;
                for _ in 0..n {
                    let v = c.varint().map_err(|_| self.bad("truncated"))?;
                    let len = v >> 1;
                    if len == 0 || len > self.chunk_size {
                        return Err(self.entry_bad(&path, "chunk length out of range"));
                    }
                    let hash = if v & 1 == 1 {
                        Some(c.id().map_err(|_| self.bad("truncated"))?)
                    } else {
                        None
                    };
                    out.push(ChunkRef { off, len, hash });
                    off = off
                        .checked_add(len)
                        .filter(|&o| o <= size)
                        .ok_or_else(|| self.entry_bad(&path, "its chunks go beyond its size"))?;
                    if hash.is_some() {
                        self.totals.stored_bytes += len;
                    }
                }
                if let Some(f) = self.file.as_mut() {
                    f.2 = off;
                }
                Item::Chunks(out)
            }
            _ => return Err(self.bad("unknown record")),
        };
        self.pos += before - c.remaining();
        if let Item::Entry(e) = &item {
            self.accept(e)?;
        }
        Ok(Some(item))
    }

    fn bad(&self, detail: &str) -> FormatError {
        FormatError::new(self.what.clone(), detail)
    }

    fn entry_bad(&self, path: &[u8], detail: &str) -> FormatError {
        FormatError::new(
            self.what.clone(),
            format!("entry '{}': {detail}", String::from_utf8_lossy(path)),
        )
    }

    /// The stream rules for a new entry (see the module documentation).
    fn accept(&mut self, e: &Entry) -> Result<(), FormatError> {
        if let Some((path, size, covered)) = &self.file {
            if covered != size {
                return Err(self.entry_bad(path, "its chunks do not cover the file"));
            }
        }
        check_path(&e.path).map_err(|d| self.entry_bad(&e.path, d))?;
        if let Some(last) = &self.last {
            if walk_order(last, &e.path) != Ordering::Less {
                return Err(self.entry_bad(&e.path, "out of order or repeated"));
            }
        }
        let parent = match e.path.iter().rposition(|&c| c == b'/') {
            Some(i) => &e.path[..i],
            None => &[][..],
        };
        while self
            .dirs
            .last()
            .is_some_and(|d| !(parent == &d[..] || parent.starts_with(&[&d[..], b"/"].concat())))
        {
            self.dirs.pop();
        }
        if !parent.is_empty() && self.dirs.last().is_none_or(|d| d[..] != *parent) {
            return Err(self.entry_bad(
                &e.path,
                "its parent is not a directory of the backup (a file or symlink on the way?)",
            ));
        }
        self.prev_path.clone_from(&e.path);
        self.last = Some(e.path.clone());
        self.totals.entries += 1;
        self.file = None;
        match &e.kind {
            EntryKind::Dir => {
                self.dirs.push(e.path.clone());
                self.totals.dirs += 1;
            }
            EntryKind::File { size } => {
                self.totals.files += 1;
                self.totals.bytes += size;
                self.file = Some((e.path.clone(), *size, 0));
                if e.linked {
                    self.linked.insert(e.path.clone());
                }
            }
            EntryKind::Symlink { .. } => self.totals.symlinks += 1,
            EntryKind::Link { target } => {
                if !self.linked.contains(target) {
                    return Err(self.entry_bad(
                        &e.path,
                        "a hard link to something that is not an earlier file with links",
                    ));
                }
                self.totals.links += 1;
            }
        }
        Ok(())
    }

    /// The stream ended: the last file must be covered. Returns the totals.
    pub fn finish(&self) -> Result<Totals, FormatError> {
        if self.pos < self.seg.len() {
            return Err(self.bad("not read to the end"));
        }
        if let Some((path, size, covered)) = &self.file {
            if covered != size {
                return Err(self.entry_bad(path, "its chunks do not cover the file"));
            }
        }
        Ok(self.totals)
    }
}

fn read_entry(c: &mut Cursor<'_>, prev: &[u8]) -> Result<Entry, &'static str> {
    let t = |_| "truncated entry";
    let shared = c.varint().map_err(t)? as usize;
    let suffix_len = c.varint().map_err(t)? as usize;
    if shared > prev.len() || suffix_len > MAX_NAME {
        return Err("bad path prefix");
    }
    let mut path = prev[..shared].to_vec();
    path.extend_from_slice(c.bytes(suffix_len).map_err(t)?);
    let kind = c.u8().map_err(t)?;
    let flags = c.u8().map_err(t)?;
    if flags & !3 != 0 {
        return Err("unknown flags");
    }
    let small = |v: u64| u32::try_from(v).map_err(|_| "value out of range");
    let mode = small(c.varint().map_err(t)?)?;
    let uid = small(c.varint().map_err(t)?)?;
    let gid = small(c.varint().map_err(t)?)?;
    let mtime_ns = c.zigzag().map_err(t)?;
    let ctime_ns = c.zigzag().map_err(t)?;
    let ino = c.varint().map_err(t)?;
    let kind = match kind {
        1 => EntryKind::File {
            size: c.varint().map_err(t)?,
        },
        2 => EntryKind::Dir,
        3 | 4 => {
            let n = c.varint().map_err(t)? as usize;
            if n > MAX_NAME {
                return Err("link target too long");
            }
            let target = c.bytes(n).map_err(t)?.to_vec();
            if kind == 3 {
                EntryKind::Symlink { target }
            } else {
                check_path(&target)?;
                EntryKind::Link { target }
            }
        }
        _ => return Err("unknown entry kind"),
    };
    if mode > 0o7777 {
        return Err("mode out of range");
    }
    if flags != 0 && !matches!(kind, EntryKind::File { .. }) {
        return Err("a file's flag on a non-file");
    }
    Ok(Entry {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime_ns,
        ctime_ns,
        ino,
        append_only: flags & 1 == 1,
        linked: flags & 2 == 2,
    })
}

#[cfg(test)]
mod tests;
