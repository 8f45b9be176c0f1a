//! Pure planning for backup, restore and fetching: given sizes, data
//! regions and the previous backup's chunks, decide per chunk what to do;
//! given the chunks a restore needs, decide which ranged reads fetch them.
//! No I/O here; the planners of [`crate::backup`] and [`crate::restore`]
//! (`backup/planner.rs`, `restore/planner.rs`) carry the plans out, and the property tests below pin the rules.
//!
//! Decisions are made one chunk at a time ([`backup_step`],
//! [`restore_step`]), with the previous backup's chunk at the same offset
//! as input, so the executors can stream a file's chunk list instead of
//! holding it: a 2 TiB database file has two million of them.

use super::format::tree::ChunkRef;
use btm::sys::Extent;

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

impl BackupStep {
    /// The byte range the step covers.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            BackupStep::Reuse(c) => (c.off, c.len),
            BackupStep::Hole { off, len } | BackupStep::Read { off, len } => (off, len),
        }
    }
}

/// Everything about a file that the per-chunk backup rule needs, besides
/// the previous chunk at the same offset.
#[derive(Debug, Clone, Copy)]
pub struct FileRule<'a> {
    /// The file's size now.
    pub size: u64,
    /// The chunk size.
    pub chunk_size: u64,
    /// The previous backup's record of this path: its size, and whether
    /// size, mtime, ctime and inode are all unchanged since. `None` when
    /// there is no usable previous record.
    pub previous: Option<(u64, bool)>,
    /// Backed up as append-only (block logs).
    pub append_only: bool,
    /// Byte ranges (sorted, disjoint) known to hold the same bytes as when
    /// the previous chunks were recorded ([`identical_ranges`]).
    pub same: &'a [(u64, u64)],
    /// Ranges that may hold data (sorted, disjoint); `None` to read
    /// everything.
    pub regions: Option<&'a [(u64, u64)]>,
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

/// The chunk of a file at `off` (of length `len`; chunks are at multiples
/// of the chunk size), given `prev`, the previous backup's chunk at the
/// same offset if there was one.
///
/// Rules:
/// - an unchanged file (same size, mtime, ctime, inode) reuses every
///   previous chunk;
/// - an append-only file that did not shrink reuses every previous chunk
///   that was full-length, and re-reads from the previous last, partial
///   chunk on, so growth by even one byte inside it is captured;
/// - a chunk whose previous record has the same offset and length, and that
///   lies wholly in a range known to be unchanged, is reused unread;
/// - otherwise a chunk is read if it overlaps a data region, and recorded
///   as a hole if not.
pub fn backup_step(rule: &FileRule<'_>, off: u64, len: u64, prev: Option<&ChunkRef>) -> BackupStep {
    let same_place = prev.filter(|c| c.off == off && c.len == len);
    if let (Some((psize, unchanged)), Some(c)) = (rule.previous, same_place) {
        if unchanged && psize == rule.size {
            return BackupStep::Reuse(*c);
        }
        let full_end = psize / rule.chunk_size.max(1) * rule.chunk_size;
        if rule.append_only && psize <= rule.size && len == rule.chunk_size && off + len <= full_end
        {
            return BackupStep::Reuse(*c);
        }
        if within(rule.same, off, off + len) {
            return BackupStep::Reuse(*c);
        }
    }
    if rule.regions.is_none_or(|r| overlaps(r, off, off + len)) {
        BackupStep::Read { off, len }
    } else {
        BackupStep::Hole { off, len }
    }
}

/// The whole plan of a file at once (what the executor does chunk by
/// chunk), with the previous record's chunks as a slice.
pub fn plan_backup(rule: &FileRule<'_>, previous: &[ChunkRef]) -> Vec<BackupStep> {
    let cs = rule.chunk_size.max(1);
    let mut out = Vec::with_capacity(rule.size.div_ceil(cs) as usize);
    let mut off = 0;
    let mut i = 0;
    while off < rule.size {
        let len = cs.min(rule.size - off);
        out.push(backup_step(rule, off, len, previous.get(i)));
        off += len;
        i += 1;
    }
    out
}

/// What a restore does with one chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreStep {
    /// Known to be right locally already (journal, or a trusted
    /// append-only prefix): not even read.
    Keep(ChunkRef),
    /// Hash the local bytes; fetch and write only if they differ.
    Verify(ChunkRef),
    /// Nothing local to compare (beyond the old end): fetch and write.
    Fetch(ChunkRef),
    /// Should be empty: punch a hole (or write zeros).
    Empty(ChunkRef),
}

impl RestoreStep {
    /// The chunk concerned.
    pub fn chunk(&self) -> ChunkRef {
        match *self {
            RestoreStep::Keep(c)
            | RestoreStep::Verify(c)
            | RestoreStep::Fetch(c)
            | RestoreStep::Empty(c) => c,
        }
    }
}

/// What to do with chunk `c` of a file that was `local_size` bytes before
/// it was resized, of which `0..trusted_end` is known to be right.
pub fn restore_step(c: &ChunkRef, local_size: u64, trusted_end: u64) -> RestoreStep {
    if c.off + c.len <= trusted_end {
        return RestoreStep::Keep(*c);
    }
    match c.hash {
        None => RestoreStep::Empty(*c),
        Some(_) if c.off >= local_size => RestoreStep::Fetch(*c),
        Some(_) => RestoreStep::Verify(*c),
    }
}

/// What to do with chunk `c` of a file a restore record says holds
/// `recorded` (its chunk at the same index, if it has one): keep it if it
/// is the same chunk (offset, length and hash), else write it, without
/// comparing (the record says the local bytes are others).
pub fn restore_step_known(c: &ChunkRef, recorded: Option<&ChunkRef>) -> RestoreStep {
    match (recorded == Some(c), c.hash) {
        (true, _) => RestoreStep::Keep(*c),
        (false, None) => RestoreStep::Empty(*c),
        (false, Some(_)) => RestoreStep::Fetch(*c),
    }
}

/// How much of a local append-only file is trusted when there is no restore
/// journal (the node's own block log): whole chunks of the backup's file
/// that lie inside the local file and before its first hole. The caller
/// still hashes the last of those chunks and trusts nothing if it differs.
pub fn append_trusted_end(local_size: u64, first_hole: u64, size: u64, chunk_size: u64) -> u64 {
    let end = local_size.min(first_hole).min(size);
    end / chunk_size.max(1) * chunk_size
}

/// A chunk a restore must fetch from a pack: its frame's place, and which
/// of the caller's slots wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The pack.
    pub pack: u32,
    /// Frame offset in the pack.
    pub offset: u32,
    /// Frame length.
    pub len: u32,
    /// The caller's reference.
    pub slot: usize,
}

/// One ranged read of a pack, and the needs it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRange {
    /// The pack.
    pub pack: u32,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The needs inside, by offset.
    pub needs: Vec<Need>,
}

/// Group `needs` into ranged reads: needs of one pack whose frames are
/// adjacent, or separated by at most `max_gap` unneeded bytes, share one
/// read, as long as the read stays within `max_len` (a single frame longer
/// than that gets a read of its own) and serves at most `max_needs`.
///
/// `max_needs` bounds the work one read brings: a read of a few MiB of
/// tiny files is a few thousand files to create, done by the one thread
/// that made the read, and the last such read of a restore is done alone.
pub fn coalesce(
    mut needs: Vec<Need>,
    max_gap: u64,
    max_len: u64,
    max_needs: usize,
) -> Vec<ReadRange> {
    needs.sort_unstable_by_key(|n| (n.pack, n.offset));
    let mut out: Vec<ReadRange> = Vec::new();
    for n in needs {
        let (start, end) = (u64::from(n.offset), u64::from(n.offset) + u64::from(n.len));
        if let Some(r) = out.last_mut() {
            if r.pack == n.pack
                && start <= r.end + max_gap
                && end.max(r.end) - r.start <= max_len
                && r.needs.len() < max_needs
            {
                r.end = r.end.max(end);
                r.needs.push(n);
                continue;
            }
        }
        out.push(ReadRange {
            pack: n.pack,
            start,
            end,
            needs: vec![n],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Id;
    use proptest::prelude::*;

    fn full(size: u64, cs: u64) -> Vec<ChunkRef> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < size {
            let len = cs.min(size - off);
            out.push(ChunkRef {
                off,
                len,
                hash: Some(Id::of(&off.to_le_bytes())),
            });
            off += len;
        }
        out
    }

    fn rule(size: u64, cs: u64) -> FileRule<'static> {
        FileRule {
            size,
            chunk_size: cs,
            previous: None,
            append_only: false,
            same: &[],
            regions: None,
        }
    }

    #[test]
    fn one_byte_of_growth_is_read() {
        let prev = full(10, 4);
        let r = FileRule {
            previous: Some((10, false)),
            append_only: true,
            ..rule(11, 4)
        };
        assert_eq!(
            plan_backup(&r, &prev),
            vec![
                BackupStep::Reuse(prev[0]),
                BackupStep::Reuse(prev[1]),
                BackupStep::Read { off: 8, len: 3 },
            ]
        );
    }

    #[test]
    fn holes_are_not_read() {
        let r = FileRule {
            regions: Some(&[(5, 6)]),
            ..rule(16, 4)
        };
        assert_eq!(
            plan_backup(&r, &[]),
            vec![
                BackupStep::Hole { off: 0, len: 4 },
                BackupStep::Read { off: 4, len: 4 },
                BackupStep::Hole { off: 8, len: 4 },
                BackupStep::Hole { off: 12, len: 4 },
            ]
        );
    }

    fn merged(v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = v
            .into_iter()
            .map(|(s, l)| (s, (s + l).min(size)))
            .filter(|(s, e)| s < e)
            .collect();
        r.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in r {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn backup_plan_covers_the_file_and_never_skips_data(
            size in 0u64..400,
            cs in 1u64..64,
            regions in prop::collection::vec((0u64..400, 1u64..50), 0..8),
            use_regions in any::<bool>(),
            prev_size in 0u64..400,
            has_prev in any::<bool>(),
            append_only in any::<bool>(),
            unchanged in any::<bool>(),
        ) {
            let regions = merged(regions, size);
            let prev = full(prev_size, cs);
            let r = FileRule {
                size,
                chunk_size: cs,
                previous: has_prev.then_some((prev_size, unchanged)),
                append_only,
                same: &[],
                regions: use_regions.then_some(&regions[..]),
            };
            let steps = plan_backup(&r, if has_prev { &prev } else { &[] });
            // Contiguous cover of 0..size, in chunk-size pieces.
            let mut off = 0;
            for s in &steps {
                let (o, l) = s.range();
                prop_assert_eq!(o, off);
                prop_assert!(l > 0 && l <= cs);
                off += l;
            }
            prop_assert_eq!(off, size);
            for s in &steps {
                match *s {
                    // A hole never overlaps data.
                    BackupStep::Hole { off, len } => prop_assert!(use_regions && !overlaps(&regions, off, off + len)),
                    // Reuse only of the chunk at the same place, and only when the rules allow it.
                    BackupStep::Reuse(c) => {
                        prop_assert!(has_prev);
                        prop_assert!(
                            (unchanged && prev_size == size)
                                || (append_only && c.len == cs && c.off + c.len <= prev_size && prev_size <= size)
                        );
                    }
                    BackupStep::Read { .. } => {}
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
            let same = merged(same, size);
            let r = FileRule { previous: Some((size, false)), same: &same, ..rule(size, cs) };
            let steps = plan_backup(&r, &prev);
            for (step, c) in steps.iter().zip(&prev) {
                let inside = same.iter().any(|&(s, e)| s <= c.off && c.off + c.len <= e);
                prop_assert_eq!(matches!(step, BackupStep::Reuse(r) if r == c), inside);
            }
        }

        #[test]
        fn restore_steps_keep_only_the_trusted_prefix(
            size in 0u64..400,
            cs in 1u64..64,
            local in 0u64..500,
            trusted in 0u64..500,
            holes in prop::collection::vec(any::<bool>(), 0..20),
        ) {
            let mut chunks = full(size, cs);
            for (c, h) in chunks.iter_mut().zip(holes) {
                if h { c.hash = None; }
            }
            for c in &chunks {
                match restore_step(c, local, trusted) {
                    RestoreStep::Keep(k) => prop_assert!(k.off + k.len <= trusted),
                    RestoreStep::Fetch(f) => prop_assert!(f.off >= local && f.hash.is_some() && f.off + f.len > trusted),
                    RestoreStep::Verify(v) => prop_assert!(v.off < local && v.hash.is_some() && v.off + v.len > trusted),
                    RestoreStep::Empty(e) => prop_assert!(e.hash.is_none() && e.off + e.len > trusted),
                }
            }
        }

        /// A recorded file keeps exactly the chunks recorded at the same
        /// index with the same offset, length and hash, and never reads
        /// to compare.
        #[test]
        fn a_record_keeps_only_the_same_chunks(
            size in 0u64..400,
            cs in 1u64..64,
            changed in prop::collection::vec(0u8..4, 0..20),
            shorter in 0usize..3,
        ) {
            let new = full(size, cs);
            let mut old = new.clone();
            for (c, how) in old.iter_mut().zip(&changed) {
                match how {
                    1 => c.hash = Some(Id::of(&c.off.to_le_bytes())),
                    2 => c.hash = None,
                    _ => {}
                }
            }
            old.truncate(old.len().saturating_sub(shorter));
            for (i, c) in new.iter().enumerate() {
                let recorded = old.get(i);
                match restore_step_known(c, recorded) {
                    RestoreStep::Keep(k) => prop_assert_eq!(Some(&k), recorded),
                    RestoreStep::Fetch(f) => prop_assert!(f.hash.is_some() && Some(&f) != recorded),
                    RestoreStep::Empty(e) => prop_assert!(e.hash.is_none() && Some(&e) != recorded),
                    RestoreStep::Verify(_) => prop_assert!(false, "a recorded file is never read to compare"),
                }
            }
        }

        /// A truncate-extended file (a hole) is never trusted past the
        /// hole, and the trusted part is whole chunks of the backup's file.
        #[test]
        fn append_trust_stops_at_holes_and_chunk_bounds(
            local in 0u64..1000, hole in 0u64..1000, size in 0u64..1000, cs in 1u64..100,
        ) {
            let t = append_trusted_end(local, hole, size, cs);
            prop_assert!(t <= local && t <= hole && t <= size && t % cs == 0);
            prop_assert!(t + cs > local.min(hole).min(size));
        }

        /// Every need is served by exactly one read that contains its
        /// frame; reads of one pack never overlap; a read only joins frames
        /// at most `gap` apart and stays within `max` unless one frame is
        /// larger, and serves at most `most` needs.
        #[test]
        fn coalescing_serves_every_need_once(
            frames in prop::collection::vec((0u32..4, 0u32..2000, 1u32..300), 0..60),
            gap in 0u64..200,
            max in 1u64..2000,
            most in 1usize..8,
        ) {
            let needs: Vec<Need> = frames.iter().enumerate().map(|(slot, &(pack, offset, len))| Need { pack, offset, len, slot }).collect();
            let reads = coalesce(needs.clone(), gap, max, most);
            let mut served = vec![0; needs.len()];
            for r in &reads {
                prop_assert!(r.end - r.start <= max || r.needs.len() == 1);
                prop_assert!(!r.needs.is_empty() && r.needs.len() <= most);
                // Each frame joins the read within `gap` of what came before.
                let mut reach = u64::from(r.needs[0].offset);
                for n in &r.needs {
                    prop_assert!(u64::from(n.offset) <= reach + gap);
                    reach = reach.max(u64::from(n.offset) + u64::from(n.len));
                }
                prop_assert_eq!(reach, r.end);
                for n in &r.needs {
                    prop_assert_eq!(n.pack, r.pack);
                    prop_assert!(r.start <= u64::from(n.offset) && u64::from(n.offset) + u64::from(n.len) <= r.end);
                    served[n.slot] += 1;
                }
            }
            prop_assert!(served.iter().all(|&s| s == 1));
            for w in reads.windows(2) {
                prop_assert!((w[0].pack, w[0].start) <= (w[1].pack, w[1].start));
            }
        }
    }
}
