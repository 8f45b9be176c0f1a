//! Which chunks of a file are local, and the pure decisions about them:
//! what a read must fetch first, what a write or truncate must fetch and
//! what it makes local by overwriting it.
//!
//! A chunk is `Absent` (its bytes are still only in the store; the backing
//! file has a hole there), `Queued` (hydration means to fetch it, but has
//! not asked the store yet: a reader may take it over), `Fetching`
//! (someone asked the store and will settle it), or `Present` (the backing
//! file holds the right bytes: fetched, or written by the node). Only the
//! claimer of a chunk writes it, and only while it is `Fetching`; nobody
//! ever makes a `Present` chunk anything else. That is what keeps
//! hydration from overwriting the node's writes, and `Queued` is what
//! keeps a reader from waiting behind hydration's whole queue.

use std::ops::Range;

/// The state of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Only in the store.
    Absent,
    /// Hydration will fetch it; a reader may claim it first.
    Queued,
    /// Claimed; its claimer settles it.
    Fetching,
    /// Right in the backing file.
    Present,
}

/// The states of one file's chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    states: Vec<State>,
    absent: usize,
}

/// What a claim over some chunks found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Chunks that were `Absent` and are now `Fetching` for the caller.
    pub mine: Vec<u64>,
    /// Whether some chunk is being fetched by someone else: wait for it.
    pub wait: bool,
}

impl Claim {
    /// Nothing to fetch and nothing to wait for: every chunk is present.
    pub fn is_done(&self) -> bool {
        self.mine.is_empty() && !self.wait
    }
}

impl Presence {
    /// `n` chunks, those for which `present` says so already local (holes,
    /// or what an earlier run journalled).
    pub fn new(n: usize, present: impl Fn(u64) -> bool) -> Self {
        let states: Vec<State> = (0..n as u64)
            .map(|i| {
                if present(i) {
                    State::Present
                } else {
                    State::Absent
                }
            })
            .collect();
        let absent = states.iter().filter(|s| **s == State::Absent).count();
        Presence { states, absent }
    }

    /// The number of chunks.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether the file has no chunks.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The state of chunk `i` (chunks past the end are present: the node
    /// made them).
    pub fn state(&self, i: u64) -> State {
        self.states
            .get(i as usize)
            .copied()
            .unwrap_or(State::Present)
    }

    /// Whether every chunk is present.
    pub fn complete(&self) -> bool {
        self.absent == 0 && self.states.iter().all(|s| *s == State::Present)
    }

    /// Chunks still `Absent`.
    pub fn absent(&self) -> usize {
        self.absent
    }

    /// Claim the absent (or only queued) chunks among `chunks` for the
    /// caller, who fetches them now.
    pub fn claim(&mut self, chunks: Range<u64>) -> Claim {
        let mut claim = Claim::default();
        for i in chunks {
            match self.states.get_mut(i as usize) {
                Some(s @ State::Absent) => {
                    *s = State::Fetching;
                    self.absent -= 1;
                    claim.mine.push(i);
                }
                Some(s @ State::Queued) => {
                    *s = State::Fetching;
                    claim.mine.push(i);
                }
                Some(State::Fetching) => claim.wait = true,
                Some(State::Present) | None => {}
            }
        }
        claim
    }

    /// Queue the absent chunks among `chunks` for hydration.
    pub fn queue(&mut self, chunks: Range<u64>) -> Vec<u64> {
        let mut queued = Vec::new();
        for i in chunks {
            if let Some(s @ State::Absent) = self.states.get_mut(i as usize) {
                *s = State::Queued;
                self.absent -= 1;
                queued.push(i);
            }
        }
        queued
    }

    /// Hydration is about to ask the store for queued chunk `i`: `true` if
    /// it is still queued (and now hydration's to settle), `false` if a
    /// reader or the node took it meanwhile.
    pub fn start(&mut self, i: u64) -> bool {
        match self.states.get_mut(i as usize) {
            Some(s @ State::Queued) => {
                *s = State::Fetching;
                true
            }
            _ => false,
        }
    }

    /// Hydration gives queued chunk `i` up without asking for it.
    pub fn unqueue(&mut self, i: u64) {
        if let Some(s @ State::Queued) = self.states.get_mut(i as usize) {
            *s = State::Absent;
            self.absent += 1;
        }
    }

    /// The caller's claim on chunk `i` ends: `Present` if it wrote it,
    /// `Absent` again if it could not.
    pub fn settle(&mut self, i: u64, written: bool) {
        if let Some(s @ State::Fetching) = self.states.get_mut(i as usize) {
            if written {
                *s = State::Present;
            } else {
                *s = State::Absent;
                self.absent += 1;
            }
        }
    }

    /// Make chunks `chunks` present because the node overwrites them
    /// whole. `false` if one of them is being fetched: wait, then ask
    /// again (the fetch must not land after the node's bytes).
    pub fn cover(&mut self, chunks: Range<u64>) -> bool {
        let range = chunks.start as usize..(chunks.end as usize).min(self.states.len());
        if range.start >= range.end {
            return true;
        }
        if self.states[range.clone()].contains(&State::Fetching) {
            return false;
        }
        for s in &mut self.states[range] {
            if *s == State::Absent {
                self.absent -= 1;
            }
            *s = State::Present;
        }
        true
    }

    /// The chunks not present (absent, or being fetched), in order.
    pub fn missing_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.states
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != State::Present)
            .map(|(i, _)| i as u64)
    }

    /// The absent chunks, in order.
    pub fn absent_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.states
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == State::Absent)
            .map(|(i, _)| i as u64)
    }
}

/// The chunks a byte range touches, for a file cut into `chunk_size`
/// chunks: `first..end` (empty for an empty range).
pub fn touched(off: u64, len: u64, chunk_size: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    let cs = chunk_size.max(1);
    off / cs..(off + len).div_ceil(cs)
}

/// What a write of `off..off+len` into a file of `size` bytes (cut into
/// `chunk_size` chunks) needs: the chunks it covers only in part must be
/// local first (`edges`), those it covers whole, or whose part beyond the
/// file's end it covers, are simply overwritten (`covered`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// Chunks to fetch before writing.
    pub edges: Vec<u64>,
    /// Chunks the write replaces entirely.
    pub covered: Range<u64>,
}

/// Plan a write (or a hole punched, or zeros written) of `off..off+len`
/// into a file whose backup size is `size`.
pub fn plan_write(off: u64, len: u64, size: u64, chunk_size: u64) -> WritePlan {
    let cs = chunk_size.max(1);
    let t = touched(off, len, cs);
    if t.is_empty() {
        return WritePlan {
            edges: Vec::new(),
            covered: 0..0,
        };
    }
    let end = off + len;
    // A chunk is covered if the write spans its bytes that exist in the
    // backup (the last chunk may be short).
    let whole = |i: u64| off <= i * cs && end >= ((i + 1) * cs).min(size);
    let mut edges = Vec::new();
    let (mut first, mut last) = (t.start, t.end);
    if !whole(first) {
        edges.push(first);
        first += 1;
    }
    if last > first && !whole(last - 1) {
        edges.push(last - 1);
        last -= 1;
    }
    WritePlan {
        edges,
        covered: first..last.max(first),
    }
}

/// What truncating a file of backup size `size` to `new` bytes needs: the
/// chunk it cuts through must be local first, and every chunk from the
/// next one on needs nothing ever again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatePlan {
    /// The chunk cut in two, to fetch first.
    pub edge: Option<u64>,
    /// Chunks wholly past the new end.
    pub dropped: Range<u64>,
}

/// Plan a truncate to `new` bytes of a file with `chunks` chunks of
/// `chunk_size`.
pub fn plan_truncate(new: u64, chunks: u64, chunk_size: u64) -> TruncatePlan {
    let cs = chunk_size.max(1);
    let first_whole = new.div_ceil(cs);
    let edge = (new % cs != 0 && new / cs < chunks).then_some(new / cs);
    TruncatePlan {
        edge,
        dropped: first_whole.min(chunks)..chunks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn claims_settle_and_cover() {
        let mut p = Presence::new(4, |i| i == 3);
        assert_eq!(p.absent(), 3);
        let c = p.claim(0..2);
        assert_eq!(c.mine, vec![0, 1]);
        assert!(!c.wait);
        let again = p.claim(0..4);
        assert_eq!(again.mine, vec![2]);
        assert!(again.wait);
        assert!(!p.cover(1..3), "a chunk being fetched is not overwritten");
        p.settle(0, true);
        p.settle(1, false);
        p.settle(2, true);
        assert!(p.cover(1..2));
        assert!(p.complete());
        // A settle of a chunk nobody claims changes nothing.
        p.settle(1, false);
        assert!(p.complete());
    }

    #[test]
    fn a_reader_takes_over_what_hydration_only_queued() {
        let mut p = Presence::new(3, |_| false);
        assert_eq!(p.queue(0..3), vec![0, 1, 2]);
        assert!(p.start(0), "hydration asks for chunk 0");
        let reader = p.claim(0..2);
        assert_eq!(reader.mine, vec![1], "the reader takes chunk 1 over");
        assert!(reader.wait, "and waits for chunk 0, already asked for");
        assert!(!p.start(1), "hydration skips what the reader took");
        assert!(p.cover(2..3), "the node overwrites a queued chunk");
        assert!(!p.start(2));
        p.settle(0, true);
        p.settle(1, true);
        assert!(p.complete());
        p.unqueue(2);
        assert!(p.complete(), "unqueueing a present chunk changes nothing");
    }

    proptest! {
        /// Edges and covered chunks are exactly the touched chunks; a
        /// covered chunk lies wholly inside the write (or its existing
        /// bytes do), an edge does not.
        #[test]
        fn write_plans_split_touched_chunks(off in 0u64..5000, len in 0u64..5000, size in 0u64..8000, cs in 1u64..700) {
            let p = plan_write(off, len, size, cs);
            let t = touched(off, len, cs);
            let mut all: Vec<u64> = p.edges.clone();
            all.extend(p.covered.clone());
            all.sort_unstable();
            prop_assert_eq!(all, t.collect::<Vec<_>>());
            for i in p.covered.clone() {
                prop_assert!(off <= i * cs && off + len >= ((i + 1) * cs).min(size));
            }
            for &i in &p.edges {
                prop_assert!(!(off <= i * cs && off + len >= ((i + 1) * cs).min(size)));
            }
        }

        /// A truncate keeps every byte below the new end: the edge chunk
        /// holds the new end strictly inside it, and dropped chunks start
        /// at or past it.
        #[test]
        fn truncate_plans_keep_what_stays(new in 0u64..9000, chunks in 0u64..20, cs in 1u64..700) {
            let p = plan_truncate(new, chunks, cs);
            if let Some(e) = p.edge {
                prop_assert!(e * cs < new && new < (e + 1) * cs && e < chunks);
            }
            for i in p.dropped.clone() {
                prop_assert!(i * cs >= new);
            }
            let kept = (new.div_ceil(cs)).min(chunks);
            prop_assert_eq!(p.dropped.start, kept);
        }

        /// Whatever the sequence of claims, settles and covers, a present
        /// chunk stays present and the absent count matches the states.
        #[test]
        fn present_is_forever(ops in prop::collection::vec((0u8..6, 0u64..12, 0u64..12, any::<bool>()), 0..60)) {
            let mut p = Presence::new(10, |i| i % 4 == 0);
            for (op, a, b, ok) in ops {
                let before = p.clone();
                let r = a.min(b)..a.max(b);
                match op {
                    0 => { p.claim(r); }
                    1 => p.settle(a, ok),
                    2 => { p.queue(r); }
                    3 => { p.start(a); }
                    4 => p.unqueue(a),
                    _ => { p.cover(r); }
                }
                for i in 0..10 {
                    if before.state(i) == State::Present {
                        prop_assert_eq!(p.state(i), State::Present);
                    }
                }
                prop_assert_eq!(p.absent(), (0..10).filter(|&i| p.state(i) == State::Absent).count());
            }
        }
    }
}
