//! Every store request of one backup or restore, on a timeline: what a
//! remote run waits for. Prints each request (start and duration in ms,
//! what it was), then the count, and the waits on the critical path: how
//! many times no request overlapped the one before, the sequential round
//! trips a faraway store turns into latency.
//!
//! ```text
//! cargo run --release --example trace_requests -- backup STORE SRC TAG [CACHE [APPEND_ONLY...]]
//! cargo run --release --example trace_requests -- restore STORE TAG DEST [CACHE]
//! ```
//! Used to count the round trips of `scripts/bench-remote.sh`'s
//! incremental and restore (see `docs/performance.md`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use btm_chunk::backup::BackupOptions;
use btm_chunk::restore::RestoreOptions;
use btm_chunk::store::{Layer, Request, Store, StoreError};
use btm_chunk::{Policy, Repo};

const USAGE: &str = "usage: trace_requests backup STORE SRC TAG [CACHE [APPEND_ONLY...]] | restore STORE TAG DEST [CACHE]";

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
    let (url, rest) = match &args[1..] {
        [what, url, rest @ ..] if what == "backup" || what == "restore" => (url, rest),
        _ => return Err(USAGE.into()),
    };
    let open = if args[1] == "backup" {
        btm_chunk::store::Open::Write
    } else {
        btm_chunk::store::Open::Read { anonymous: false }
    };
    let store = Arc::new(Traced {
        inner: btm_chunk::store::open(&url.parse()?, open)?,
        start: Instant::now(),
        log: Mutex::new(Vec::new()),
    });
    let repo = Repo::new(Arc::clone(&store) as Arc<dyn Store>);
    let what = match (args[1].as_str(), rest) {
        ("backup", [src, tag, rest @ ..]) => {
            // As `btm backup` does: with the cache and `--appendonly`.
            let (cache, append_only) = rest
                .split_first()
                .map_or((None, &[][..]), |(c, a)| (Some(c), a));
            let repo = repo.with_cache(cache.map(btm_chunk::cache::Cache::new));
            let mut opts = BackupOptions::new(tag, Policy::NONE);
            opts.append_only = append_only.iter().map(Into::into).collect();
            let s = repo.backup(Path::new(src), &opts)?;
            format!("{} files, {} uploaded", s.files, s.bytes_uploaded)
        }
        ("restore", [tag, dest, cache @ ..]) => {
            let repo = repo.with_cache(cache.first().map(btm_chunk::cache::Cache::new));
            // As `btm restore latest` does: the lookup beside the lease.
            let find = || {
                btm_chunk::inventory::latest_where(store.as_ref(), tag, None, |_| true)?
                    .ok_or_else(|| btm_chunk::ChunkError::Invalid("no backup with that tag".into()))
            };
            let found = btm_chunk::restore::restore_found(
                &repo,
                find,
                Path::new(dest),
                &RestoreOptions::new(Policy::NONE),
            );
            let s = found.result?;
            format!(
                "{} files, {} chunks fetched in {} reads",
                s.files, s.chunks_fetched, s.requests
            )
        }
        _ => return Err(USAGE.into()),
    };
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
        "{} requests, {sequential} on the critical path (| above), {total:.0} ms in all; {what}",
        log.len(),
    );
    Ok(())
}
