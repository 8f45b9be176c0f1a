//! Background hydration: every chunk no read has asked for yet, fetched
//! the way a restore fetches (chunks of many files grouped into ranged
//! reads of their packs, `connections` reads in flight), in the order of
//! [`crate::order`], until every live file is wholly local.
//!
//! ```text
//! planner ──claims, a window at a time──▶ reads ──▶ fetchers ──fill──▶ backing files
//!    ▲                                                  │ failed: claims released
//!    └──── next pass (after a backoff if the store failed) ◀┘
//! ```
//!
//! A read through the mount never waits for this queue: it claims its own
//! chunks and fetches them itself. A chunk hydration claimed is waited for
//! by a reader, not fetched twice. A store that fails releases the claims;
//! the next pass, after a backoff that grows to 30 s, tries again, and
//! `btm live status` says why it waits.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use btm_chunk::pipeline::Cancel;
use btm_chunk::store::Id;
use crossbeam_channel::{Receiver, Sender};

use crate::files::{Files, LiveFile};
use crate::source::{frame, Read, SourceError, Wanted};

/// Frames of one pack closer than this share a read.
const MAX_GAP: u64 = 256 << 10;
/// The longest read.
const MAX_RANGE: u64 = 4 << 20;
/// Bytes of chunks claimed before they are grouped into reads.
const WINDOW: u64 = 64 << 20;
/// How long one background read may keep retrying.
const READ_PATIENCE: Duration = Duration::from_secs(30);
/// The longest wait between passes after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Who wants one chunk: live files and the chunk's index in each.
type Wants = Vec<(Arc<LiveFile>, u64)>;

/// The claims one read serves: for each chunk, who wants it.
struct Job {
    read: Read,
    wanted: Vec<Wanted>,
    wants: Vec<Wants>,
}

/// Reads sent and not yet done, and whether one failed in this pass.
#[derive(Default)]
struct Outstanding {
    count: Mutex<(usize, Option<String>)>,
    done: Condvar,
}

impl Outstanding {
    fn add(&self) {
        self.count.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }

    fn finish(&self, failure: Option<String>) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        c.0 -= 1;
        if failure.is_some() {
            c.1 = failure;
        }
        drop(c);
        self.done.notify_all();
    }

    /// Wait for every read sent; the last failure, if any, taken.
    fn drain(&self) -> Option<String> {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while c.0 > 0 {
            c = self.done.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.1.take()
    }
}

/// Hydrate `order` (live files, most wanted first) until none lacks a
/// chunk or `stop` is cancelled. Returns whether everything is local.
pub fn hydrate(files: &Files, order: &[Arc<LiveFile>], stop: &Cancel) -> bool {
    let connections = files.source().connections().max(1);
    let outstanding = Outstanding::default();
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(connections);
        for _ in 0..connections {
            let rx: Receiver<Job> = rx.clone();
            let outstanding = &outstanding;
            s.spawn(move || fetcher(files, &rx, outstanding));
        }
        drop(rx);
        let mut backoff = Duration::from_secs(1);
        let complete = loop {
            if stop.is_cancelled() {
                break false;
            }
            let claimed = pass(files, order, &tx, &outstanding, stop);
            let failure = outstanding.drain();
            let left = order.iter().any(|f| !f.abandoned() && f.absent_bytes() > 0);
            match failure {
                None if !left => {
                    files.stats.set_waiting(None);
                    break true;
                }
                None => {
                    files.stats.set_waiting(None);
                    backoff = Duration::from_secs(1);
                    if !claimed && stop.sleep(Duration::from_millis(200)) {
                        break false;
                    }
                }
                Some(why) => {
                    files.stats.set_waiting(Some(format!(
                        "the store failed ({why}); trying again in {}s",
                        backoff.as_secs()
                    )));
                    tracing::warn!(error = %why, retry_in = ?backoff, "hydration is waiting for the store");
                    if stop.sleep(backoff) {
                        break false;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        drop(tx);
        complete
    })
}

/// Claim every absent chunk of `order`, a window at a time, and send the
/// reads. Returns whether anything was claimed.
fn pass(
    files: &Files,
    order: &[Arc<LiveFile>],
    tx: &Sender<Job>,
    outstanding: &Outstanding,
    stop: &Cancel,
) -> bool {
    let mut window: HashMap<Id, (Wanted, Wants)> = HashMap::new();
    let mut bytes = 0;
    let mut claimed = false;
    for f in order {
        if stop.is_cancelled() {
            break;
        }
        if f.abandoned() {
            continue;
        }
        for i in f.queue_absent() {
            claimed = true;
            let Some(w) = f.wanted(i) else {
                f.unqueue(&[i]);
                continue;
            };
            bytes += w.raw_len;
            window
                .entry(w.hash)
                .or_insert_with(|| (w, Vec::new()))
                .1
                .push((Arc::clone(f), i));
        }
        if bytes >= WINDOW {
            dispatch(files, std::mem::take(&mut window), tx, outstanding);
            bytes = 0;
        }
    }
    dispatch(files, window, tx, outstanding);
    claimed
}

/// Group a window into reads and send them; what cannot be planned is
/// released.
fn dispatch(
    files: &Files,
    window: HashMap<Id, (Wanted, Wants)>,
    tx: &Sender<Job>,
    outstanding: &Outstanding,
) {
    if window.is_empty() {
        return;
    }
    let (wanted, mut wants): (Vec<Wanted>, Vec<Wants>) = window.into_values().unzip();
    let reads = match files.source().plan(&wanted, MAX_GAP, MAX_RANGE) {
        Ok(r) => r,
        Err(e) => {
            // A chunk missing from the map: reload it for the next pass.
            let _ = files.source().reload();
            unqueue_all(&wants);
            outstanding.add();
            outstanding.finish(Some(e.to_string()));
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

/// A fetcher: make each read, check and write each chunk; on failure give
/// the claims back.
fn fetcher(files: &Files, rx: &Receiver<Job>, outstanding: &Outstanding) {
    let Ok(mut dctx) = zstd::bulk::Decompressor::new() else {
        // Without zstd nothing can be fetched: leave the work to others.
        for job in rx.iter() {
            unqueue_all(&job.wants);
            outstanding.finish(Some("cannot start zstd".into()));
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
        let result = fetch(files, &job, &mut buf, &mut out, &mut dctx);
        if result.is_err() {
            release_all(&job.wants);
        }
        outstanding.finish(result.err().map(|e| e.to_string()));
        if buf.capacity() > 2 * MAX_RANGE as usize {
            buf = Vec::new();
        }
    }
}

fn fetch(
    files: &Files,
    job: &Job,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), SourceError> {
    let source = files.source();
    files.stats.background_start();
    let got = source.get_until(&job.read, buf, Instant::now() + READ_PATIENCE);
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
        for (f, i) in &job.wants[c.slot] {
            f.fill(*i, out).map_err(SourceError::Write)?;
        }
    }
    Ok(())
}
