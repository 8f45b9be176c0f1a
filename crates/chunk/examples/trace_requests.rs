//! Every store request of one backup, on a timeline: what a remote
//! incremental waits for. Prints each request (start and duration in ms,
//! what it was), then the count, and the waits on the critical path: how
//! many times no request overlapped the one before, the sequential round
//! trips a faraway store turns into latency.
//!
//! ```text
//! cargo run --release --example trace_requests -- STORE SRC TAG
//! ```
//! Used to count the round trips of `scripts/bench-remote.sh`'s
//! incremental (see `docs/performance.md`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use btm_chunk::backup::BackupOptions;
use btm_chunk::store::{Layer, Request, Store, StoreError};
use btm_chunk::{Policy, Repo};

struct Traced {
    inner: Arc<dyn Store>,
    start: Instant,
    log: Mutex<Vec<(f64, f64, String)>>,
}

/// Every request through it, timed on one clock.
impl Layer for Traced {
    fn inner(&self) -> &dyn Store {
        self.inner.as_ref()
    }

    fn around<T>(
        &self,
        request: Request,
        call: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let t = self.start.elapsed().as_secs_f64() * 1e3;
        let out = call();
        let d = self.start.elapsed().as_secs_f64() * 1e3 - t;
        self.log
            .lock()
            .expect("log")
            .push((t, d, format!("{request:?}")));
        out
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, src, tag] = &args[..] else {
        return Err("usage: trace_requests STORE SRC TAG".into());
    };
    let store = Arc::new(Traced {
        inner: btm_chunk::store::open(&url.parse()?, btm_chunk::store::Open::Write)?,
        start: Instant::now(),
        log: Mutex::new(Vec::new()),
    });
    let summary = Repo::new(Arc::clone(&store) as Arc<dyn Store>)
        .backup(Path::new(src), &BackupOptions::new(tag, Policy::NONE))?;
    let total = store.start.elapsed().as_secs_f64() * 1e3;
    let mut log = std::mem::take(&mut *store.log.lock().map_err(|_| "poisoned")?);
    log.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut sequential = 0;
    let mut busy_until = f64::MIN;
    for (t, d, what) in &log {
        let waited = *t >= busy_until;
        sequential += usize::from(waited);
        busy_until = busy_until.max(t + d);
        println!("{t:9.1} {d:7.1} {} {what}", if waited { '|' } else { ' ' });
    }
    println!(
        "{} requests, {sequential} on the critical path (| above), {total:.0} ms in all; {} files, {} uploaded",
        log.len(),
        summary.files,
        summary.bytes_uploaded
    );
    Ok(())
}
