//! Background hydration: every chunk no read has asked for yet, fetched
//! the way a restore fetches (chunks of many files grouped into ranged
//! reads of their packs, `connections` reads in flight), in the order the
//! skeleton recorded ([`crate::order`]), until every live file is wholly
//! local.
//!
//! ```text
//! planner ──claims, a window at a time──▶ reads ──▶ fetchers ──fill──▶ backing files
//!    ▲                                                  │ failed: claims released
//!    └──── next pass (after a backoff, or once the disk has room) ◀┘
//! ```
//!
//! A read through the mount never waits for this queue: it claims its own
//! chunks and fetches them itself. A chunk hydration claimed is waited for
//! by a reader, not fetched twice. The window is bounded in bytes and in
//! chunks, and the reads in memory by the restore's in-flight budget
//! (`IN_FLIGHT_BYTES`), whatever the number of connections: a tree of a
//! million small files or a file of a million chunks costs no more memory
//! than a few large files.
//!
//! What stops a pass says how to go on: a store that fails is tried again
//! after a backoff that grows to 30 s; a disk that is full (`ENOSPC`,
//! `EDQUOT`) is waited on until it has room again. `btm live status` says
//! which, and why.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use btm_chunk::pipeline::{Budget, Cancel};
use btm_chunk::restore::IN_FLIGHT_BYTES;
use btm_chunk::store::Id;
use crossbeam_channel::{Receiver, Sender};

use crate::files::{Files, LiveFile};
use crate::source::{frame, Object, Read, SourceError, Wanted};

/// Frames of one pack closer than this share a read.
const MAX_GAP: u64 = 256 << 10;
/// The longest read.
const MAX_RANGE: u64 = 4 << 20;
/// The most chunks one read serves: the thread that made it writes them
/// all, so this bounds what the last reads leave to one core (a read of
/// 4 MiB of small files is thousands of them).
const MAX_READ_CHUNKS: usize = 256;
/// Bytes of chunks claimed before they are grouped into reads.
const WINDOW: u64 = 64 << 20;
/// Chunks claimed before they are grouped into reads.
const WINDOW_CHUNKS: usize = 8192;
/// Slots of the order read at once.
const ORDER_BLOCK: u32 = 16384;
/// The longest wait between passes that found nothing to claim (files
/// waiting for their checkpoint, or that the node holds open unlinked).
const MAX_IDLE: Duration = Duration::from_secs(5);
/// A fetcher keeps a buffer between reads only up to this size.
const KEEP_BUFFER: usize = 1 << 20;

/// Who wants one chunk: live files and the chunk's index in each.
type Wants = Vec<(Arc<LiveFile>, u64)>;

/// The claims one read serves: for each chunk, who wants it.
struct Job {
    read: Read,
    wanted: Vec<Wanted>,
    wants: Vec<Wants>,
}

/// Why a pass could not do all it claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The store failed, or a chunk could not be located.
    Store(String),
    /// The backing file system is full.
    DiskFull(String),
    /// A backing file could not be written for another reason.
    Disk(String),
}

impl Failure {
    fn of(e: &SourceError) -> Failure {
        match e {
            SourceError::Write(io)
                if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                Failure::DiskFull(io.to_string())
            }
            SourceError::Write(io) => Failure::Disk(io.to_string()),
            e => Failure::Store(e.to_string()),
        }
    }
}

/// Reads sent and not yet done, and the last failure in this pass.
#[derive(Default)]
struct Outstanding {
    count: Mutex<(usize, Option<Failure>)>,
    done: Condvar,
}

impl Outstanding {
    fn add(&self) {
        self.count.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }

    fn finish(&self, failure: Option<Failure>) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        c.0 -= 1;
        if failure.is_some() {
            c.1 = failure;
        }
        drop(c);
        self.done.notify_all();
    }

    /// Wait for every read sent; the last failure, if any, taken.
    fn drain(&self) -> Option<Failure> {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while c.0 > 0 {
            c = self.done.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.1.take()
    }
}

/// Hydrate every live file until none lacks a chunk or `stop` is
/// cancelled. Returns whether everything is local.
pub fn hydrate(files: &Files, stop: &Cancel) -> bool {
    let connections = files.source().connections().max(1);
    let outstanding = Outstanding::default();
    let budget = Budget::new(IN_FLIGHT_BYTES, stop);
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(connections);
        for _ in 0..connections {
            let rx: Receiver<Job> = rx.clone();
            let (outstanding, budget) = (&outstanding, &*budget);
            s.spawn(move || fetcher(files, &rx, outstanding, budget));
        }
        drop(rx);
        let complete = run(files, &tx, &outstanding, stop);
        drop(tx);
        complete
    })
}

/// Passes until done or stopped, waiting between them as their outcome
/// says. A read has made its call's attempts when it fails (the store's
/// one [`btm_chunk::store::RetryPolicy`]); the pass that met it is not repeated at once,
/// but the next comes after the policy's wait for as many failed passes
/// in a row, for as long as it takes: the mount must finish.
fn run(files: &Files, tx: &Sender<Job>, outstanding: &Outstanding, stop: &Cancel) -> bool {
    let mut failed: u32 = 0;
    let mut idle = Duration::from_millis(200);
    loop {
        if stop.is_cancelled() {
            return false;
        }
        let claimed = pass(files, tx, outstanding, stop);
        let failure = outstanding.drain();
        match failure {
            None if files.missing_chunks() == 0 => {
                files.stats.set_waiting(None);
                return true;
            }
            None => {
                files.stats.set_waiting(None);
                failed = 0;
                if claimed {
                    idle = Duration::from_millis(200);
                } else {
                    if stop.sleep(idle) {
                        return false;
                    }
                    idle = (idle * 2).min(MAX_IDLE);
                }
            }
            Some(Failure::DiskFull(why)) => {
                if wait_for_room(files, &why, stop) {
                    return false;
                }
            }
            Some(Failure::Store(why) | Failure::Disk(why)) => {
                failed += 1;
                let wait = files.source().retry_policy().wait(failed);
                files.stats.set_waiting(Some(format!(
                    "{why}; trying again in {:.1}s",
                    wait.as_secs_f64()
                )));
                tracing::warn!(error = %why, retry_in = ?wait, "hydration is waiting");
                if stop.sleep(wait) {
                    return false;
                }
            }
        }
    }
}

/// Free bytes on the backing file system.
fn free_bytes(files: &Files) -> u64 {
    nix::sys::statvfs::fstatvfs(files.backing().root())
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0)
}

/// The disk is full: say so, and wait until it has room for a few chunks
/// more than when it filled (or a minute has passed: space may come back
/// without showing, as on a thin pool). Whether `stop` came first.
fn wait_for_room(files: &Files, why: &str, stop: &Cancel) -> bool {
    let full_at = free_bytes(files);
    let want = full_at + 4 * files.table().head.chunk_size;
    let started = Instant::now();
    tracing::warn!(error = %why, "hydration is waiting for room on the disk");
    loop {
        let free = free_bytes(files);
        if free >= want || started.elapsed() >= Duration::from_secs(60) {
            files.stats.set_waiting(None);
            return false;
        }
        files.stats.set_waiting(Some(format!(
            "the disk is full ({why}): {} of the backup still to fetch, {} free; hydration goes on once space is freed",
            crate::human(files.absent_bytes()),
            crate::human(free)
        )));
        if stop.sleep(Duration::from_secs(1)) {
            return true;
        }
    }
}

/// The chunks claimed and not yet sent, grouped by hash.
#[derive(Default)]
struct Window {
    by_hash: HashMap<Id, (Wanted, Wants)>,
    bytes: u64,
    chunks: usize,
}

impl Window {
    fn room(&self) -> usize {
        WINDOW_CHUNKS.saturating_sub(self.chunks)
    }

    fn full(&self) -> bool {
        self.bytes >= WINDOW || self.chunks >= WINDOW_CHUNKS
    }

    fn add(&mut self, w: Wanted, f: &Arc<LiveFile>, i: u64) {
        self.bytes += w.raw_len;
        self.chunks += 1;
        self.by_hash
            .entry(w.hash)
            .or_insert_with(|| (w, Vec::new()))
            .1
            .push((Arc::clone(f), i));
    }
}

/// Claim every absent chunk, in the recorded order, a window at a time,
/// and send the reads. Returns whether anything was claimed.
fn pass(files: &Files, tx: &Sender<Job>, outstanding: &Outstanding, stop: &Cancel) -> bool {
    let mut window = Window::default();
    let mut claimed = false;
    let n = files.table().head.files;
    let mut at = 0;
    while at < n && !stop.is_cancelled() {
        let slots = match files.table().order(at, ORDER_BLOCK) {
            Ok(s) => s,
            Err(e) => {
                outstanding.add();
                outstanding.finish(Some(Failure::Disk(format!(
                    "cannot read the live files' table: {e}"
                ))));
                break;
            }
        };
        at += ORDER_BLOCK;
        for slot in slots {
            if stop.is_cancelled() {
                break;
            }
            claimed |= claim_file(files, slot, &mut window, tx, outstanding);
        }
    }
    dispatch(files, std::mem::take(&mut window), tx, outstanding);
    claimed
}

/// Claim the absent chunks of live file `slot` into `window`, sending it
/// whenever it fills. Whether anything was claimed.
fn claim_file(
    files: &Files,
    slot: u32,
    window: &mut Window,
    tx: &Sender<Job>,
    outstanding: &Outstanding,
) -> bool {
    if files.is_done(slot) {
        return false;
    }
    let f = match files.live(slot) {
        Ok(Some(f)) => f,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(slot, error = %e, "cannot read a live file's entry");
            return false;
        }
    };
    // Nothing to claim, or a file whose names are all gone (the node still
    // holds it open; its reads fetch what they need).
    if f.complete() || files.unlinked(&f) {
        return false;
    }
    let mut claimed = false;
    let mut from = 0;
    loop {
        let (queued, next) = f.queue(from, window.room().max(1));
        if queued.is_empty() {
            break;
        }
        claimed = true;
        from = next;
        match files.wanted(&f, &queued) {
            Ok(wanted) => {
                for (&i, w) in queued.iter().zip(wanted) {
                    match w {
                        Some(w) => window.add(w, &f, i),
                        None => f.unqueue(&[i]),
                    }
                }
            }
            Err(e) => {
                f.unqueue(&queued);
                outstanding.add();
                outstanding.finish(Some(Failure::Disk(format!(
                    "cannot read the live files' table: {e}"
                ))));
                break;
            }
        }
        if window.full() {
            dispatch(files, std::mem::take(window), tx, outstanding);
        }
    }
    claimed
}

/// Group a window into reads and send them; what cannot be planned is
/// released.
fn dispatch(files: &Files, window: Window, tx: &Sender<Job>, outstanding: &Outstanding) {
    if window.by_hash.is_empty() {
        return;
    }
    let (wanted, mut wants): (Vec<Wanted>, Vec<Wants>) = window.by_hash.into_values().unzip();
    let reads = match files
        .source()
        .plan(&wanted, MAX_GAP, MAX_RANGE, MAX_READ_CHUNKS)
    {
        Ok(r) => r,
        Err(e) => {
            // A chunk missing from the map: reload it for the next pass.
            let _ = files.source().reload();
            unqueue_all(&wants);
            outstanding.add();
            outstanding.finish(Some(Failure::Store(e.to_string())));
            return;
        }
    };
    for read in reads {
        let job_wanted = read.chunks.iter().map(|c| wanted[c.slot]).collect();
        let job_wants = read
            .chunks
            .iter()
            .map(|c| std::mem::take(&mut wants[c.slot]))
            .collect();
        let read = Read {
            chunks: read
                .chunks
                .iter()
                .enumerate()
                .map(|(slot, c)| crate::source::InRead { slot, ..*c })
                .collect(),
            ..read
        };
        outstanding.add();
        let job = Job {
            read,
            wanted: job_wanted,
            wants: job_wants,
        };
        if let Err(e) = tx.send(job) {
            unqueue_all(&e.0.wants);
            outstanding.finish(None);
        }
    }
}

/// Give up chunks queued and not asked for.
fn unqueue_all(wants: &[Wants]) {
    for w in wants {
        for (f, i) in w {
            f.unqueue(&[*i]);
        }
    }
}

/// Give back chunks asked for and not written.
fn release_all(wants: &[Wants]) {
    for w in wants {
        for (f, i) in w {
            f.release(&[*i]);
        }
    }
}

/// A fetcher: make each read (once `budget` has room for it), check and
/// write each chunk; on failure give the claims back.
fn fetcher(files: &Files, rx: &Receiver<Job>, outstanding: &Outstanding, budget: &Budget) {
    let Ok(mut dctx) = zstd::bulk::Decompressor::new() else {
        // Without zstd nothing can be fetched: leave the work to others.
        for job in rx.iter() {
            unqueue_all(&job.wants);
            outstanding.finish(Some(Failure::Store("cannot start zstd".into())));
        }
        return;
    };
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    for mut job in rx.iter() {
        // Only now are the chunks hydration's: a reader may have taken
        // some over while the job waited.
        for w in &mut job.wants {
            w.retain(|(f, i)| f.start(*i));
        }
        if job.wants.iter().all(Vec::is_empty) {
            outstanding.finish(None);
            continue;
        }
        // The bytes the read brings (a version 1 chunk object's size is
        // known only once read: its raw size stands in).
        let units = match job.read.object {
            Object::Range { len, .. } => len,
            Object::Chunk(_) => job.wanted.iter().map(|w| w.raw_len).sum(),
        };
        let Some(permit) = budget.take(units) else {
            // Stopped: the claims go back untouched.
            release_all(&job.wants);
            outstanding.finish(None);
            continue;
        };
        let result = fetch(files, &mut job, &mut buf, &mut out, &mut dctx);
        if result.is_err() {
            release_all(&job.wants);
        }
        outstanding.finish(result.err().map(|e| Failure::of(&e)));
        // Memory follows the budget, not the number of fetchers.
        for b in [&mut buf, &mut out] {
            if b.capacity() > KEEP_BUFFER {
                *b = Vec::new();
            }
        }
        drop(permit);
    }
}

/// Make `job`'s read and fill what it brings; what was filled leaves the
/// job, so that a failure gives back only the rest.
fn fetch(
    files: &Files,
    job: &mut Job,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), SourceError> {
    let source = files.source();
    files.stats.background_start();
    let got = source.get_until(&job.read, buf, None);
    files
        .stats
        .background_end(got.is_ok().then_some(buf.len() as u64));
    got?;
    for c in &job.read.chunks {
        if job.wants[c.slot].is_empty() {
            continue;
        }
        let w = &job.wanted[c.slot];
        source.open(w, frame(buf, &job.read, c), dctx, out)?;
        while let Some((f, i)) = job.wants[c.slot].pop() {
            if let Err(e) = files.fill(&f, i, out) {
                // `fill` settled this claim itself.
                return Err(SourceError::Write(e));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart_from_a_failing_store() {
        let full = SourceError::Write(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(Failure::of(&full), Failure::DiskFull(_)));
        let quota = SourceError::Write(std::io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(matches!(Failure::of(&quota), Failure::DiskFull(_)));
        let eio = SourceError::Write(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(Failure::of(&eio), Failure::Disk(_)));
        let store = SourceError::TimedOut(Duration::from_secs(1));
        assert!(matches!(Failure::of(&store), Failure::Store(_)));
    }
}
