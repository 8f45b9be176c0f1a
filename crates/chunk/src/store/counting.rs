//! A store that counts the requests made through it: how a command
//! reports what one of its steps cost (`btm backup --publish` reports the
//! requests publishing added, which `scripts/bench-public.sh` prints).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Bytes, Id, Kind, Marker, Store, StoreError};

/// `inner`, counting every call (one call is one request to a remote
/// store, retries aside).
pub struct Counting<'s> {
    inner: &'s dyn Store,
    requests: AtomicU64,
}

impl<'s> Counting<'s> {
    /// Count the requests made to `inner` from now on.
    pub fn new(inner: &'s dyn Store) -> Self {
        Counting {
            inner,
            requests: AtomicU64::new(0),
        }
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count<T>(&self, r: T) -> T {
        self.requests.fetch_add(1, Ordering::Relaxed);
        r
    }
}

impl Store for Counting<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        self.count(self.inner.put(kind, id, data))
    }
    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.count(self.inner.get(kind, id))
    }
    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.count(self.inner.get_range_into(kind, id, offset, len, buf))
    }
    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        self.count(self.inner.size(kind, id))
    }
    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        self.count(self.inner.list(kind))
    }
    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.count(self.inner.delete(kind, id))
    }
    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.count(self.inner.create_index(name, data))
    }
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.count(self.inner.get_index(name))
    }
    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.count(self.inner.list_indexes())
    }
    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.count(self.inner.delete_index(name))
    }
    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.count(self.inner.put_marker(name, data))
    }
    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.count(self.inner.get_marker(name))
    }
    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        self.count(self.inner.list_markers(dir))
    }
    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        self.count(self.inner.delete_marker(name))
    }
    fn local_root(&self) -> Option<&std::path::Path> {
        self.inner.local_root()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}
