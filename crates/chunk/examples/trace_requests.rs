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
use btm_chunk::store::{Bytes, Id, Kind, Marker, Store, StoreError};
use btm_chunk::{Policy, Repo};

struct Traced {
    inner: Arc<dyn Store>,
    start: Instant,
    log: Mutex<Vec<(f64, f64, String)>>,
}

impl Traced {
    fn time<T>(&self, what: String, f: impl FnOnce() -> T) -> T {
        let t = self.start.elapsed().as_secs_f64() * 1e3;
        let out = f();
        let d = self.start.elapsed().as_secs_f64() * 1e3 - t;
        self.log.lock().expect("log").push((t, d, what));
        out
    }
}

impl Store for Traced {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        self.time(format!("put {kind:?}"), || self.inner.put(kind, id, data))
    }
    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.time(format!("get {kind:?}"), || self.inner.get(kind, id))
    }
    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.time(format!("get range {kind:?}"), || {
            self.inner.get_range_into(kind, id, offset, len, buf)
        })
    }
    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        self.time(format!("size {kind:?}"), || self.inner.size(kind, id))
    }
    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        self.time(format!("list {kind:?}"), || self.inner.list(kind))
    }
    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.time(format!("delete {kind:?}"), || self.inner.delete(kind, id))
    }
    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.time("create index".into(), || {
            self.inner.create_index(name, data)
        })
    }
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.time("get index".into(), || self.inner.get_index(name))
    }
    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.time("list indexes".into(), || self.inner.list_indexes())
    }
    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.time("delete index".into(), || self.inner.delete_index(name))
    }
    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.time(format!("put marker {name}"), || {
            self.inner.put_marker(name, data)
        })
    }
    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.time(format!("get marker {name}"), || self.inner.get_marker(name))
    }
    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        self.time(format!("list markers {dir}"), || {
            self.inner.list_markers(dir)
        })
    }
    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        self.time(format!("delete marker {name}"), || {
            self.inner.delete_marker(name)
        })
    }
    fn local_root(&self) -> Option<&Path> {
        self.inner.local_root()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
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
