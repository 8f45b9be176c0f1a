//! Pure planning for backup and restore: given sizes, data regions and the
//! previous backup's chunk list, decide per chunk what to do. No I/O here;
//! the executors in `backup.rs` and `restore.rs` carry the plans out, and
//! the property tests below pin the rules.

use super::index::ChunkRef;
use crate::sys::Extent;

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
    /// Byte ranges (sorted, disjoint) known to hold the same bytes as when
    /// `chunks` were recorded, from [`identical_ranges`]; empty if unknown.
    pub same: &'a [(u64, u64)],
}

/// `FIEMAP_EXTENT_*` flags under which an extent's physical address does
/// not identify its bytes: unknown or delayed location, compressed or
/// encrypted or inline or tail-packed data, and preallocated space.
const UNSAFE_EXTENT: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;

/// Where `at` lies in `extents` (sorted by offset): `Ok(physical)` if
/// mapped by a trustworthy extent, `Err(true)` if unmapped (a hole),
/// `Err(false)` if mapped by an extent whose address cannot be trusted.
fn locate(extents: &[Extent], at: u64) -> Result<u64, bool> {
    let i = extents.partition_point(|e| e.logical.saturating_add(e.length) <= at);
    match extents.get(i) {
        Some(e) if e.logical <= at => {
            if e.flags & UNSAFE_EXTENT == 0 {
                Ok(e.physical + (at - e.logical))
            } else {
                Err(false)
            }
        }
        _ => Err(true),
    }
}

/// Byte ranges of `0..size` where two files are known to hold the same
/// bytes because their extent maps agree: both unmapped (holes read as
/// zeros), or both mapped to the same physical bytes by trustworthy
/// extents. On a copy-on-write filesystem (btrfs) that is what an unchanged
/// region of a file looks like across snapshots: a changed block gets a new
/// extent. Sorted, disjoint, merged.
pub fn identical_ranges(a: &[Extent], b: &[Extent], size: u64) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = vec![0, size];
    for e in a.iter().chain(b) {
        for p in [e.logical, e.logical.saturating_add(e.length)] {
            if p < size {
                cuts.push(p);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        let same = match (locate(a, x), locate(b, x)) {
            (Err(true), Err(true)) => true,
            (Ok(pa), Ok(pb)) => pa == pb,
            _ => false,
        };
        if same {
            match out.last_mut() {
                Some(last) if last.1 == x => last.1 = y,
                _ => out.push((x, y)),
            }
        }
    }
    out
}

fn within(ranges: &[(u64, u64)], off: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(_, e)| e <= off);
    ranges.get(i).is_some_and(|&(s, e)| s <= off && end <= e)
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
/// - a chunk whose range the previous record describes with exactly the
///   same offset and length, and that lies wholly in a range known to be
///   unchanged (`Previous::same`), is reused without reading;
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
        if let Some(c) = previous.and_then(|p| {
            if !within(p.same, off, off + len) {
                return None;
            }
            let i = p.chunks.partition_point(|c| c.off < off);
            p.chunks.get(i).filter(|c| c.off == off && c.len == len)
        }) {
            steps.push(BackupStep::Reuse(*c));
            off += len;
            continue;
        }
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
                same: &[],
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
            let prev_arg = Some(Previous { size: prev_size, chunks: &prev, unchanged, same: &[] });
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

        /// Whatever happened to a file between two snapshots (blocks
        /// rewritten copy-on-write, holes punched, the file grown), every
        /// byte in a range `identical_ranges` reports is the same in both.
        #[test]
        fn identical_ranges_only_claim_identical_bytes(
            blocks in 1u64..40,
            ops in prop::collection::vec((0u8..3, 0u64..40, 1u64..6), 0..8),
            encoded in 0u64..40,
        ) {
            const B: u64 = 16;
            // Block-granular model: each file block is a hole or a disk block.
            let mut a: Vec<Option<u64>> = (0..blocks).map(|i| (i % 7 != 3).then_some(100 + i)).collect();
            let mut next_free = 1000;
            let mut b = a.clone();
            for (op, at, n) in ops {
                for i in at..at + n {
                    let i = i as usize;
                    match op {
                        0 if i < b.len() => { b[i] = Some(next_free); next_free += 1; }
                        1 if i < b.len() => b[i] = None,
                        2 => { while b.len() <= i { b.push(None); } b[i] = Some(next_free); next_free += 1; }
                        _ => {}
                    }
                }
            }
            // One block of `a` is compressed: its address means nothing.
            let enc = (encoded < blocks).then_some(encoded as usize);
            let to_extents = |f: &[Option<u64>], enc: Option<usize>| -> Vec<Extent> {
                f.iter().enumerate().filter_map(|(i, p)| p.map(|p| Extent {
                    logical: i as u64 * B, physical: p * B, length: B,
                    flags: if Some(i) == enc { 0x8 } else { 0 },
                })).collect()
            };
            // Content of byte x: its disk address, or 0 for a hole.
            let byte = |f: &[Option<u64>], x: u64| f.get((x / B) as usize).copied().flatten().map_or(0, |p| p * B + x % B + 1);
            if let Some(e) = enc { a[e] = Some(5000); }
            let size = (a.len().min(b.len()) as u64) * B;
            let ranges = identical_ranges(&to_extents(&a, enc), &to_extents(&b, None), size);
            for &(s, e) in &ranges {
                prop_assert!(s < e && e <= size);
                for x in s..e {
                    prop_assert_eq!(byte(&a, x), byte(&b, x), "byte {} claimed identical", x);
                    prop_assert!(enc.is_none_or(|i| x / B != i as u64), "compressed block claimed");
                }
            }
            prop_assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0), "not merged: {:?}", ranges);
            // A file compared with itself is identical wherever addresses are trustworthy.
            let same = identical_ranges(&to_extents(&b, None), &to_extents(&b, None), b.len() as u64 * B);
            prop_assert_eq!(same, if b.is_empty() { vec![] } else { vec![(0, b.len() as u64 * B)] });
        }

        /// With known-identical ranges, exactly the previous chunks that
        /// lie wholly inside them are reused, and nothing else is.
        #[test]
        fn unchanged_ranges_reuse_exactly_their_chunks(
            chunks in 1u64..30,
            same in prop::collection::vec((0u64..120, 1u64..40), 0..5),
        ) {
            let cs = 4;
            let size = chunks * cs - 1;
            let prev = full(size, cs);
            let mut ranges: Vec<(u64, u64)> = same.into_iter().map(|(s, l)| (s, (s + l).min(size))).filter(|(s, e)| s < e).collect();
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (s, e) in ranges {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            let p = Previous { size, chunks: &prev, unchanged: false, same: &merged };
            let steps = plan_backup(size, cs, None, Some(p), false);
            for (step, c) in steps.iter().zip(&prev) {
                let inside = merged.iter().any(|&(s, e)| s <= c.off && c.off + c.len <= e);
                prop_assert_eq!(matches!(step, BackupStep::Reuse(r) if r == c), inside);
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
