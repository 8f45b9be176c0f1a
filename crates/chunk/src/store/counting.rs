//! A store that counts the requests made through it: how a command
//! reports what one of its steps cost (`btm backup --publish` reports the
//! requests publishing added, which `scripts/bench-public.sh` prints), and
//! what a benchmark reports by request (`examples/bench_scale.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Layer, Request, Store, StoreError};

/// `inner`, counting every call made through it (one call is one request
/// to a remote store; callers retry above it, so each attempt counts).
pub struct Counting {
    inner: Arc<dyn Store>,
    requests: AtomicU64,
    by_request: Mutex<BTreeMap<String, u64>>,
}

impl Counting {
    /// Count the requests made to `inner` from now on.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Counting {
            inner,
            requests: AtomicU64::new(0),
            by_request: Mutex::new(BTreeMap::new()),
        }
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests so far by what they were (`Get(Pack)`, `PutIndex`, …),
    /// in name order.
    pub fn by_request(&self) -> Vec<(String, u64)> {
        let counts = self.by_request.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(r, n)| (r.clone(), *n)).collect()
    }
}

impl Layer for Counting {
    fn inner(&self) -> &dyn Store {
        self.inner.as_ref()
    }

    fn before(&self, request: Request) -> Result<(), StoreError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .by_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{request:?}"))
            .or_default() += 1;
        Ok(())
    }
}
