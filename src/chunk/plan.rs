//! Pure planning for backup and restore: given sizes, data regions and the
//! previous backup's chunk list, decide per chunk what to do. No I/O here;
//! the executors in `backup.rs` and `restore.rs` carry the plans out, and
//! the property tests below pin the rules.

use super::index::ChunkRef;

/// What a backup does with one chunk-sized range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupStep {
    /// Take this chunk from the previous backup without reading.
    Reuse(ChunkRef),
    /// Nothing allocated here: record an empty chunk without reading.
    Hole {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// Read, hash, and store unless known (all zeros become empty).
    Read {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
}

/// The previous backup's record of a file, for reuse.
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    /// Its size then.
    pub size: u64,
    /// Its chunks then.
    pub chunks: &'a [ChunkRef],
    /// Whether size, mtime, ctime and inode are all unchanged.
    pub unchanged: bool,
}

fn overlaps(regions: &[(u64, u64)], off: u64, end: u64) -> bool {
    // Regions are sorted and disjoint: find the first ending after `off`.
    let i = regions.partition_point(|&(_, e)| e <= off);
    regions.get(i).is_some_and(|&(s, _)| s < end)
}

/// Plan the backup of a file of `size` bytes in chunks of `chunk_size`.
///
/// Rules:
/// - an unchanged file (same size, mtime, ctime, inode as in the previous
///   backup) reuses the previous chunk list whole;
/// - an append-only file that did not shrink reuses every previous chunk
///   that was full-length, and re-reads from the previous last, partial
///   chunk on, so growth by even one byte inside it is captured;
/// - otherwise a chunk is read if it overlaps a data region, and recorded
///   as a hole if not (`regions == None` means "read everything").
pub fn plan_backup(
    size: u64,
    chunk_size: u64,
    regions: Option<&[(u64, u64)]>,
    previous: Option<Previous<'_>>,
    append_only: bool,
) -> Vec<BackupStep> {
    if let Some(p) = previous {
        if p.unchanged && p.size == size && covers(p.chunks, size) {
            return p.chunks.iter().copied().map(BackupStep::Reuse).collect();
        }
    }
    let mut steps = Vec::with_capacity(size.div_ceil(chunk_size.max(1)) as usize);
    let mut off = 0;
    if let Some(p) = previous.filter(|p| append_only && p.size <= size && covers(p.chunks, p.size))
    {
        for c in p.chunks {
            if c.len != chunk_size || c.off != off {
                break;
            }
            steps.push(BackupStep::Reuse(*c));
            off += c.len;
        }
    }
    while off < size {
        let len = chunk_size.min(size - off);
        let data = regions.is_none_or(|r| overlaps(r, off, off + len));
        steps.push(if data {
            BackupStep::Read { off, len }
        } else {
            BackupStep::Hole { off, len }
        });
        off += len;
    }
    steps
}

/// Whether `chunks` cover `0..size` contiguously.
pub fn covers(chunks: &[ChunkRef], size: u64) -> bool {
    let mut off = 0;
    for c in chunks {
        if c.off != off || c.len == 0 {
            return false;
        }
        off += c.len;
    }
    off == size
}

/// What a restore does with one chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreStep {
    /// Trusted as it is (append-only prefix already present locally).
    Keep(ChunkRef),
    /// Hash the local bytes; fetch and write only if they differ.
    Verify(ChunkRef),
    /// Nothing local to compare (beyond the old end): fetch and write.
    Fetch(ChunkRef),
    /// Should be empty: punch a hole (or write zeros).
    Empty(ChunkRef),
}

/// Plan restoring `chunks` over a local file that was `local_size` bytes
/// before it was resized. Append-only files trust every full-length chunk
/// that lies wholly inside the local size and only fix their tail.
pub fn plan_restore(
    chunks: &[ChunkRef],
    local_size: u64,
    append_only: bool,
    chunk_size: u64,
) -> Vec<RestoreStep> {
    let mut trusting = append_only;
    chunks
        .iter()
        .map(|&c| {
            let inside = c.off + c.len <= local_size;
            if trusting && inside && c.len == chunk_size && c.hash.is_some() {
                return RestoreStep::Keep(c);
            }
            trusting = false;
            match c.hash {
                None => RestoreStep::Empty(c),
                Some(_) if c.off >= local_size => RestoreStep::Fetch(c),
                Some(_) => RestoreStep::Verify(c),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::index::ChunkHash;
    use proptest::prelude::*;

    fn full(size: u64, cs: u64) -> Vec<ChunkRef> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < size {
            let len = cs.min(size - off);
            out.push(ChunkRef {
                off,
                len,
                hash: Some(ChunkHash::of(&off.to_le_bytes())),
            });
            off += len;
        }
        out
    }

    fn range(s: &BackupStep) -> (u64, u64) {
        match *s {
            BackupStep::Reuse(c) => (c.off, c.len),
            BackupStep::Hole { off, len } | BackupStep::Read { off, len } => (off, len),
        }
    }

    #[test]
    fn one_byte_of_growth_is_read() {
        let prev = full(10, 4);
        let steps = plan_backup(
            11,
            4,
            None,
            Some(Previous {
                size: 10,
                chunks: &prev,
                unchanged: false,
            }),
            true,
        );
        assert_eq!(
            steps,
            vec![
                BackupStep::Reuse(prev[0]),
                BackupStep::Reuse(prev[1]),
                BackupStep::Read { off: 8, len: 3 },
            ]
        );
    }

    #[test]
    fn holes_are_not_read() {
        let steps = plan_backup(16, 4, Some(&[(5, 6)]), None, false);
        assert_eq!(
            steps,
            vec![
                BackupStep::Hole { off: 0, len: 4 },
                BackupStep::Read { off: 4, len: 4 },
                BackupStep::Hole { off: 8, len: 4 },
                BackupStep::Hole { off: 12, len: 4 },
            ]
        );
    }

    fn regions_strategy(size: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0..size.max(1), 1u64..50), 0..8).prop_map(move |v| {
            let mut r: Vec<(u64, u64)> = v
                .into_iter()
                .map(|(s, l)| (s, (s + l).min(size)))
                .filter(|(s, e)| s < e)
                .collect();
            r.sort();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (s, e) in r {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            merged
        })
    }

    proptest! {
        #[test]
        fn backup_plan_covers_the_file_and_never_skips_data(
            size in 0u64..400,
            cs in 1u64..64,
            (regions, use_regions) in (0u64..400).prop_flat_map(|s| (regions_strategy(s.max(1)), any::<bool>())),
            prev_size in 0u64..400,
            append_only in any::<bool>(),
            unchanged in any::<bool>(),
        ) {
            let regions: Vec<(u64, u64)> = regions.into_iter().filter(|&(s, _)| s < size).map(|(s, e)| (s, e.min(size))).collect();
            let prev = full(prev_size, cs);
            let prev_arg = Some(Previous { size: prev_size, chunks: &prev, unchanged });
            let steps = plan_backup(size, cs, use_regions.then_some(&regions[..]), prev_arg, append_only);
            // Contiguous cover of 0..size.
            let mut off = 0;
            for s in &steps {
                let (o, l) = range(s);
                prop_assert_eq!(o, off);
                prop_assert!(l > 0);
                off += l;
            }
            prop_assert_eq!(off, size);
            for s in &steps {
                match *s {
                    // A hole never overlaps data.
                    BackupStep::Hole { off, len } => prop_assert!(!overlaps(&regions, off, off + len)),
                    // Reuse only when the rules allow it.
                    BackupStep::Reuse(c) => prop_assert!(
                        (unchanged && prev_size == size)
                            || (append_only && c.len == cs && c.off + c.len <= prev_size && prev_size <= size)
                    ),
                    BackupStep::Read { len, .. } => prop_assert!(len <= cs),
                }
            }
            // Append-only: everything past the last full previous chunk is read or a hole.
            if append_only && !unchanged && prev_size <= size {
                let reused_end = (prev_size / cs) * cs;
                for s in &steps {
                    if let BackupStep::Reuse(c) = s {
                        prop_assert!(c.off + c.len <= reused_end);
                    }
                }
            }
        }

        #[test]
        fn restore_plan_handles_every_chunk_once(
            size in 0u64..400,
            cs in 1u64..64,
            local in 0u64..500,
            append_only in any::<bool>(),
            holes in prop::collection::vec(any::<bool>(), 0..20),
        ) {
            let mut chunks = full(size, cs);
            for (c, h) in chunks.iter_mut().zip(holes) {
                if h { c.hash = None; }
            }
            let steps = plan_restore(&chunks, local, append_only, cs);
            prop_assert_eq!(steps.len(), chunks.len());
            let mut kept_prefix = true;
            for (s, c) in steps.iter().zip(&chunks) {
                match *s {
                    RestoreStep::Keep(k) => {
                        prop_assert!(append_only && kept_prefix && k == *c && c.off + c.len <= local && c.len == cs);
                    }
                    RestoreStep::Fetch(f) => {
                        kept_prefix = false;
                        prop_assert!(f.off >= local && f.hash.is_some());
                    }
                    RestoreStep::Verify(v) => {
                        kept_prefix = false;
                        prop_assert!(v.off < local && v.hash.is_some());
                    }
                    RestoreStep::Empty(e) => {
                        kept_prefix = false;
                        prop_assert!(e.hash.is_none());
                    }
                }
            }
        }
    }
}
