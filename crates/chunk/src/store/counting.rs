//! A store that counts the requests made through it: how a command
//! reports what one of its steps cost (`btm backup --publish` reports the
//! requests publishing added, which `scripts/bench-public.sh` prints).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Layer, Request, Store, StoreError};

/// `inner`, counting every call (one call is one request to a remote
/// store, retries aside).
pub struct Counting {
    inner: Arc<dyn Store>,
    requests: AtomicU64,
}

impl Counting {
    /// Count the requests made to `inner` from now on.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Counting {
            inner,
            requests: AtomicU64::new(0),
        }
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Layer for Counting {
    fn inner(&self) -> &dyn Store {
        self.inner.as_ref()
    }

    fn before(&self, _request: Request) -> Result<(), StoreError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
