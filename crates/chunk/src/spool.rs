//! A file's chunk list, in order, kept in memory up to [`SPOOL_MEMORY`]
//! bytes and in an anonymous temporary file beyond: what lets the backup
//! writer hold a file's chunks until it knows the file did not change, and
//! a restore hold an append-only prefix until it knows whether to trust it,
//! without a multi-terabyte file growing either.

use std::fs::File;
use std::io::{Read, Seek, Write};

use super::format::tree::ChunkRef;
use crate::store::Id;

/// Bytes kept in memory before spilling to disk.
pub const SPOOL_MEMORY: usize = 4 << 20;

/// Chunk records of one file, in order, from offset 0.
#[derive(Default)]
pub struct Spool {
    mem: Vec<u8>,
    disk: Option<File>,
    count: u64,
}

const RECORD: usize = 8 + 1 + 32;

/// Records replayed per call.
pub const RUN: u64 = 4096;

impl Spool {
    /// An empty spool.
    pub fn new() -> Self {
        Spool {
            mem: Vec::new(),
            disk: None,
            count: 0,
        }
    }

    /// Append the next chunk (its offset is implied).
    pub fn push(&mut self, c: &ChunkRef) -> std::io::Result<()> {
        self.mem.extend_from_slice(&c.len.to_le_bytes());
        match c.hash {
            Some(h) => {
                self.mem.push(1);
                self.mem.extend_from_slice(&h.0);
            }
            None => self.mem.extend_from_slice(&[0u8; 33]),
        }
        self.count += 1;
        if self.mem.len() >= SPOOL_MEMORY {
            let f = match &mut self.disk {
                Some(f) => f,
                None => self.disk.insert(tempfile::tempfile()?),
            };
            f.write_all(&self.mem)?;
            self.mem.clear();
        }
        Ok(())
    }

    /// How many chunks.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Replay the records in order, in runs of at most [`RUN`], to `f`; `io`
    /// turns a failure to read the spool back into `E`.
    pub fn replay<E>(
        mut self,
        io: impl Fn(std::io::Error) -> E,
        mut f: impl FnMut(&[ChunkRef]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut off = 0u64;
        // Sized to the file: most files are one chunk, and a 4096-record
        // buffer (a quarter of a megabyte) per file costs the allocator an
        // madvise when it is freed.
        let mut run: Vec<ChunkRef> = Vec::with_capacity(self.count.min(RUN) as usize);
        let mut emit = |bytes: &[u8], run: &mut Vec<ChunkRef>, off: &mut u64| -> Result<(), E> {
            for rec in bytes.chunks_exact(RECORD) {
                let mut len = [0u8; 8];
                len.copy_from_slice(&rec[..8]);
                let len = u64::from_le_bytes(len);
                let hash = (rec[8] == 1).then(|| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(&rec[9..]);
                    Id(h)
                });
                run.push(ChunkRef {
                    off: *off,
                    len,
                    hash,
                });
                *off += len;
                if run.len() == RUN as usize {
                    f(run)?;
                    run.clear();
                }
            }
            Ok(())
        };
        if let Some(mut d) = self.disk.take() {
            d.rewind().map_err(&io)?;
            let mut buf = vec![0u8; RECORD * RUN as usize];
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = d.read(&mut buf[filled..]).map_err(&io)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                emit(&buf[..filled - filled % RECORD], &mut run, &mut off)?;
                if filled < buf.len() {
                    break;
                }
            }
        }
        emit(&self.mem, &mut run, &mut off)?;
        if !run.is_empty() {
            f(&run)?;
        }
        Ok(())
    }
}
