//! Which chunks of the backup's files are local, and the pure decisions
//! about them: what a read must fetch first, what a write or truncate must
//! fetch and what it makes local by overwriting it.
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
//!
//! The states of every chunk of every live file are one array of two bits
//! a chunk ([`States`]), indexed by a chunk's place in the live files'
//! table ([`crate::table`]): a million files or a terabyte of 1 MiB chunks
//! cost 256 KiB, whatever is open. A file sees its own window of it
//! ([`FileChunks`]), and every change to a window is made under that
//! file's lock, which is what makes a claim atomic.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

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

impl State {
    fn bits(self) -> u64 {
        match self {
            State::Absent => 0,
            State::Queued => 1,
            State::Fetching => 2,
            State::Present => 3,
        }
    }

    fn of(bits: u64) -> State {
        match bits & 3 {
            0 => State::Absent,
            1 => State::Queued,
            2 => State::Fetching,
            _ => State::Present,
        }
    }
}

/// Chunks per word of [`States`].
const PER_WORD: u64 = 32;

/// The states of every chunk of the live files, two bits each, and how
/// many are not present.
#[derive(Debug)]
pub struct States {
    words: Box<[AtomicU64]>,
    len: u64,
    missing: AtomicU64,
}

impl States {
    /// `len` chunks, those for which `present` says so already local (holes,
    /// or what an earlier run made durable), the others absent.
    pub fn new(len: u64, present: impl Fn(u64) -> bool) -> Self {
        let mut words = Vec::with_capacity(len.div_ceil(PER_WORD) as usize);
        let mut missing = 0;
        for w in 0..len.div_ceil(PER_WORD) {
            let mut word = 0u64;
            for g in w * PER_WORD..((w + 1) * PER_WORD).min(len) {
                if present(g) {
                    word |= State::Present.bits() << ((g % PER_WORD) * 2);
                } else {
                    missing += 1;
                }
            }
            words.push(AtomicU64::new(word));
        }
        States {
            words: words.into_boxed_slice(),
            len,
            missing: AtomicU64::new(missing),
        }
    }

    /// The number of chunks.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks not present, over every file.
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Relaxed)
    }

    /// The state of chunk `g` (chunks past the end are present).
    pub fn get(&self, g: u64) -> State {
        if g >= self.len {
            return State::Present;
        }
        let word = self.words[(g / PER_WORD) as usize].load(Ordering::Acquire);
        State::of(word >> ((g % PER_WORD) * 2))
    }

    /// Set chunk `g` to `s`, leaving the other chunks of its word alone
    /// (they may belong to another file, changed at the same time).
    fn set(&self, g: u64, s: State) {
        let shift = (g % PER_WORD) * 2;
        let word = &self.words[(g / PER_WORD) as usize];
        let mut cur = word.load(Ordering::Acquire);
        loop {
            let new = (cur & !(3 << shift)) | (s.bits() << shift);
            match word.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if s == State::Present {
            self.missing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The window of one file: chunks `range`. The caller holds that
    /// file's lock for as long as it uses the window.
    pub fn file(&self, range: Range<u64>) -> FileChunks<'_> {
        FileChunks {
            states: self,
            first: range.start,
            n: range.end.saturating_sub(range.start),
        }
    }
}

/// What a claim over some chunks found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Chunks that were `Absent` (or only `Queued`) and are now `Fetching`
    /// for the caller.
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

/// One file's chunks, numbered from 0: a window of [`States`].
#[derive(Debug)]
pub struct FileChunks<'a> {
    states: &'a States,
    first: u64,
    n: u64,
}

impl FileChunks<'_> {
    /// The number of chunks.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether the file has no chunks.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The state of chunk `i` (chunks past the end are present: the node
    /// made them).
    pub fn state(&self, i: u64) -> State {
        if i >= self.n {
            return State::Present;
        }
        self.states.get(self.first + i)
    }

    fn set(&self, i: u64, s: State) {
        self.states.set(self.first + i, s);
    }

    fn within(&self, chunks: Range<u64>) -> Range<u64> {
        chunks.start.min(self.n)..chunks.end.min(self.n)
    }

    /// Whether every chunk is present.
    pub fn complete(&self) -> bool {
        (0..self.n).all(|i| self.state(i) == State::Present)
    }

    /// Claim the absent (or only queued) chunks among `chunks` for the
    /// caller, who fetches them now.
    pub fn claim(&self, chunks: Range<u64>) -> Claim {
        let mut claim = Claim::default();
        for i in self.within(chunks) {
            match self.state(i) {
                State::Absent | State::Queued => {
                    self.set(i, State::Fetching);
                    claim.mine.push(i);
                }
                State::Fetching => claim.wait = true,
                State::Present => {}
            }
        }
        claim
    }

    /// Queue up to `max` absent chunks from `from` on for hydration, and
    /// say where to go on next time.
    pub fn queue(&self, from: u64, max: usize) -> (Vec<u64>, u64) {
        let mut queued = Vec::new();
        let mut i = from;
        while i < self.n && queued.len() < max {
            if self.state(i) == State::Absent {
                self.set(i, State::Queued);
                queued.push(i);
            }
            i += 1;
        }
        (queued, i)
    }

    /// Hydration is about to ask the store for queued chunk `i`: `true` if
    /// it is still queued (and now hydration's to settle), `false` if a
    /// reader or the node took it meanwhile.
    pub fn start(&self, i: u64) -> bool {
        let queued = self.state(i) == State::Queued;
        if queued {
            self.set(i, State::Fetching);
        }
        queued
    }

    /// Hydration gives queued chunk `i` up without asking for it.
    pub fn unqueue(&self, i: u64) {
        if self.state(i) == State::Queued {
            self.set(i, State::Absent);
        }
    }

    /// The caller's claim on chunk `i` ends: `Present` if it wrote it,
    /// `Absent` again if it could not. Whether it became present.
    pub fn settle(&self, i: u64, written: bool) -> bool {
        if self.state(i) != State::Fetching {
            return false;
        }
        self.set(
            i,
            if written {
                State::Present
            } else {
                State::Absent
            },
        );
        written
    }

    /// Make chunks `chunks` present because the node overwrites them
    /// whole: the chunks that were not present yet, or `None` (nothing
    /// changed) if one of them is being fetched: wait, then ask again (the
    /// fetch must not land after the node's bytes).
    pub fn cover(&self, chunks: Range<u64>) -> Option<Vec<u64>> {
        let range = self.within(chunks);
        if range.clone().any(|i| self.state(i) == State::Fetching) {
            return None;
        }
        let mut made = Vec::new();
        for i in range {
            if self.state(i) != State::Present {
                self.set(i, State::Present);
                made.push(i);
            }
        }
        Some(made)
    }

    /// The file is gone (no name and no open keeps it): make every chunk
    /// nobody is fetching present, as nothing will ever read it, calling
    /// `each` with each one; a chunk being fetched is settled by its
    /// claimer.
    pub fn abandon(&self, mut each: impl FnMut(u64)) {
        for i in 0..self.n {
            if matches!(self.state(i), State::Absent | State::Queued) {
                self.set(i, State::Present);
                each(i);
            }
        }
    }

    /// Give chunk `i`, made present by [`FileChunks::cover`] for a change
    /// of the node's that then failed, back to the backup: absent again.
    /// The one way a present chunk stops being one, and only for its
    /// coverer, before anything recorded it.
    pub fn uncover(&self, i: u64) {
        if i < self.n && self.state(i) == State::Present {
            self.set(i, State::Absent);
            self.states.missing.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The chunks not present (absent, queued or being fetched), in order.
    pub fn missing_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.n).filter(|&i| self.state(i) != State::Present)
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
        let states = States::new(4, |g| g == 3);
        let p = states.file(0..4);
        assert_eq!(states.missing(), 3);
        let c = p.claim(0..2);
        assert_eq!(c.mine, vec![0, 1]);
        assert!(!c.wait);
        let again = p.claim(0..4);
        assert_eq!(again.mine, vec![2]);
        assert!(again.wait);
        assert_eq!(
            p.cover(1..3),
            None,
            "a chunk being fetched is not overwritten"
        );
        assert!(p.settle(0, true));
        assert!(!p.settle(1, false));
        assert!(p.settle(2, true));
        assert_eq!(p.cover(1..2), Some(vec![1]));
        assert!(p.complete());
        assert_eq!(states.missing(), 0);
        // A settle of a chunk nobody claims changes nothing.
        assert!(!p.settle(1, false));
        assert!(p.complete());
    }

    #[test]
    fn a_reader_takes_over_what_hydration_only_queued() {
        let states = States::new(3, |_| false);
        let p = states.file(0..3);
        assert_eq!(p.queue(0, 2), (vec![0, 1], 2));
        assert_eq!(p.queue(2, 8), (vec![2], 3));
        assert!(p.start(0), "hydration asks for chunk 0");
        let reader = p.claim(0..2);
        assert_eq!(reader.mine, vec![1], "the reader takes chunk 1 over");
        assert!(reader.wait, "and waits for chunk 0, already asked for");
        assert!(!p.start(1), "hydration skips what the reader took");
        assert_eq!(
            p.cover(2..3),
            Some(vec![2]),
            "the node overwrites a queued chunk"
        );
        assert!(!p.start(2));
        p.settle(0, true);
        p.settle(1, true);
        assert!(p.complete());
        p.unqueue(2);
        assert!(p.complete(), "unqueueing a present chunk changes nothing");
    }

    #[test]
    fn neighbours_in_one_word_keep_their_states() {
        let states = States::new(70, |g| g % 2 == 0);
        let (a, b) = (states.file(0..33), states.file(33..70));
        assert_eq!(a.claim(0..33).mine.len(), 16);
        assert_eq!(b.cover(0..37).map(|m| m.len()), Some(19));
        assert!(b.complete());
        assert_eq!(a.state(32), State::Present);
        assert_eq!(a.state(31), State::Fetching);
        assert_eq!(states.missing(), 16);
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

        /// Whatever the sequence of claims, settles and covers on two files
        /// sharing words, a present chunk stays present, the other file is
        /// untouched, and the missing count matches the states.
        #[test]
        fn present_is_forever(ops in prop::collection::vec((0u8..6, 0u64..12, 0u64..12, any::<bool>()), 0..60)) {
            let states = States::new(40, |g| g % 4 == 0);
            let (p, other) = (states.file(5..15), states.file(15..40));
            let untouched: Vec<State> = (0..25).map(|i| other.state(i)).collect();
            for (op, a, b, ok) in ops {
                let before: Vec<State> = (0..10).map(|i| p.state(i)).collect();
                let r = a.min(b)..a.max(b);
                match op {
                    0 => { p.claim(r); }
                    1 => { p.settle(a, ok); }
                    2 => { p.queue(a, b as usize); }
                    3 => { p.start(a); }
                    4 => p.unqueue(a),
                    5 if ok && a == 0 => p.abandon(|_| {}),
                    _ => { p.cover(r); }
                }
                for (i, s) in before.iter().enumerate() {
                    if *s == State::Present {
                        prop_assert_eq!(p.state(i as u64), State::Present);
                    }
                }
                prop_assert_eq!(&(0..25).map(|i| other.state(i)).collect::<Vec<_>>(), &untouched);
                prop_assert_eq!(states.missing(), (0..40).filter(|&g| states.get(g) != State::Present).count() as u64);
            }
        }
    }
}
