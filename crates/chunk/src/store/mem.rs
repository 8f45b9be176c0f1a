//! An in-memory [`Store`] that keeps the store contract (write-once
//! objects, indexes created once, markers replaced atomically, the store's
//! own clock on markers), for unit tests of what sits above the stores
//! (backups, restores, GC, the daemon's export scheduler) in milliseconds.
//!
//! Clones share the same contents, so a test keeps one to inspect what the
//! code under test wrote. Test hooks: [`MemStore::set_down`] makes every
//! call fail as an unreachable store does, [`MemStore::hold_writes`]
//! makes object and index writes wait until released, to catch work in
//! flight, [`MemStore::age_marker`] moves a marker into the past, and
//! [`MemStore::before_marker_put`] lets another party act at a chosen
//! moment, and [`MemStore::inject`] makes chosen requests fail, fail after
//! their write landed, or wait: the faults of a real network, in
//! milliseconds. Its [`RetryPolicy`] makes the standard number of attempts
//! but waits a millisecond or two between them, so a test counts a call's
//! attempts without waiting out a real store's patience.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{check_marker_name, Id, Kind, Marker, RetryPolicy, Store, StoreError};

/// A fault a test injects into requests of a [`MemStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request fails before it acts, as on a reset connection (a
    /// temporary error).
    Fail,
    /// The request acts, then its answer is lost (a temporary error after
    /// the write landed): what a retry must cope with.
    CommitThenFail,
    /// The request waits this long first, as over a slow link.
    Slow(std::time::Duration),
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Every request.
    Any,
    /// Puts of objects of this kind.
    Put(Kind),
    /// Reads (whole or ranged) of objects of this kind.
    Get(Kind),
    /// Listings of objects of this kind.
    List(Kind),
    /// Deletions of objects.
    Delete,
    /// Backup index creations.
    PutIndex,
    /// Backup index reads and listings.
    GetIndex,
    /// Marker writes.
    PutMarker,
    /// Marker reads and listings.
    GetMarker,
}

/// One injected fault: skip `skip` matching requests, then apply to the
/// next `times`.
struct Injected {
    op: Request,
    skip: u64,
    times: u64,
    fault: Fault,
}

/// An in-memory store; see the module documentation.
#[derive(Clone, Default)]
pub struct MemStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// Unique per store, so caches keyed by the store's description never
    /// mix two stores.
    serial: u64,
    inner: Mutex<Inner>,
    released: Condvar,
}

impl Default for Shared {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Shared {
            serial: NEXT.fetch_add(1, Ordering::Relaxed),
            inner: Mutex::default(),
            released: Condvar::new(),
        }
    }
}

#[derive(Default)]
struct Inner {
    objects: HashMap<(Kind, Id), Bytes>,
    indexes: BTreeMap<String, Vec<u8>>,
    markers: BTreeMap<String, (Vec<u8>, DateTime<Utc>)>,
    down: bool,
    holding: bool,
    writes: u64,
    /// Run once, before the next put of a marker under the prefix.
    #[allow(clippy::type_complexity)]
    before_put: Option<(String, Box<dyn FnOnce(&MemStore) + Send>)>,
    faults: Vec<Injected>,
    /// Requests that met an injected fault.
    faulted: u64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let g = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.down {
            return Err(StoreError::Unreachable {
                what: "mem://".into(),
                detail: "the test took the store down".into(),
            });
        }
        Ok(g)
    }

    /// Make every call fail as an unreachable store (or work again).
    pub fn set_down(&self, down: bool) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down = down;
    }

    /// Make object and index writes wait until
    /// [`MemStore::release_writes`].
    pub fn hold_writes(&self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .holding = true;
    }

    /// Let held and future writes through.
    pub fn release_writes(&self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .holding = false;
        self.shared.released.notify_all();
    }

    /// How many object and index writes started (held ones included).
    pub fn writes(&self) -> u64 {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writes
    }

    /// Make marker `name` look written `by` earlier, by the store's clock.
    pub fn age_marker(&self, name: &str, by: std::time::Duration) {
        let mut g = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = g.markers.get_mut(name) {
            *t -= chrono::Duration::from_std(by).unwrap_or_default();
        }
    }

    /// Run `f` (once, given this store) just before the next marker whose
    /// name starts with `prefix` is put: another party acting at that moment.
    pub fn before_marker_put(&self, prefix: &str, f: impl FnOnce(&MemStore) + Send + 'static) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .before_put = Some((prefix.to_owned(), Box::new(f)));
    }

    /// Inject `fault` into requests `op` matches: the `nth` matching
    /// request from now (1 for the next) and the `times - 1` after it.
    pub fn inject(&self, op: Request, nth: u64, times: u64, fault: Fault) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .faults
            .push(Injected {
                op,
                skip: nth.saturating_sub(1),
                times,
                fault,
            });
    }

    /// Remove every injected fault not yet spent.
    pub fn clear_faults(&self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .faults
            .clear();
    }

    /// How many requests met an injected fault so far.
    pub fn faulted(&self) -> u64 {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .faulted
    }

    /// Count a request `op` against the injected faults: waits for a slow
    /// one, fails for a failing one, and returns whether the request must
    /// fail after acting.
    fn fault(&self, op: Request) -> Result<bool, StoreError> {
        let hit = {
            let mut g = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
            let hit = g
                .faults
                .iter_mut()
                .filter(|f| f.times > 0 && (f.op == Request::Any || f.op == op))
                .find_map(|f| {
                    if f.skip > 0 {
                        f.skip -= 1;
                        return None;
                    }
                    f.times -= 1;
                    Some(f.fault)
                });
            g.faults.retain(|f| f.times > 0);
            g.faulted += u64::from(hit.is_some());
            hit
        };
        let lost = || StoreError::Temporary {
            what: format!("{op:?}"),
            detail: "connection reset by peer (injected)".into(),
        };
        match hit {
            None => Ok(false),
            Some(Fault::Slow(d)) => {
                std::thread::sleep(d);
                Ok(false)
            }
            Some(Fault::Fail) => Err(lost()),
            Some(Fault::CommitThenFail) => Ok(true),
        }
    }

    /// The answer of a request that acted: lost if its fault says so.
    fn answer<T>(lose: bool, op: Request, value: T) -> Result<T, StoreError> {
        match lose {
            true => Err(StoreError::Temporary {
                what: format!("{op:?}"),
                detail: "the answer was lost after the write (injected)".into(),
            }),
            false => Ok(value),
        }
    }

    fn read(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        let g = self.inner()?;
        g.objects
            .get(&(kind, *id))
            .cloned()
            .ok_or_else(|| Self::not_found(kind, id))
    }

    /// The store's lock, once writes are not held.
    fn writable(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let mut g = self.inner()?;
        g.writes += 1;
        while g.holding {
            g = self
                .shared
                .released
                .wait(g)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(g)
    }

    /// Run the hook [`MemStore::before_marker_put`] set for `name`, once.
    fn before_put(&self, name: &str) -> Result<(), StoreError> {
        let hook = {
            let mut g = self.inner()?;
            match &g.before_put {
                Some((prefix, _)) if name.starts_with(prefix.as_str()) => g.before_put.take(),
                _ => None,
            }
        };
        if let Some((_, f)) = hook {
            f(self);
        }
        Ok(())
    }

    fn not_found(kind: Kind, id: &Id) -> StoreError {
        StoreError::NotFound(kind.describe(id))
    }
}

impl Store for MemStore {
    fn describe(&self) -> String {
        format!("mem://{}", self.shared.serial)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            first_wait: std::time::Duration::from_millis(1),
            max_wait: std::time::Duration::from_millis(2),
            ..*RetryPolicy::standard()
        }
    }

    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        let lose = self.fault(Request::Put(kind))?;
        self.writable()?.objects.entry((kind, *id)).or_insert(data);
        Self::answer(lose, Request::Put(kind), ())
    }

    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        let lose = self.fault(Request::Get(kind))?;
        let data = self.read(kind, id)?;
        Self::answer(lose, Request::Get(kind), data)
    }

    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let lose = self.fault(Request::Get(kind))?;
        let whole = self.read(kind, id)?;
        if lose {
            return Self::answer(lose, Request::Get(kind), ());
        }
        let end = offset.checked_add(len).filter(|&e| e <= whole.len() as u64);
        match end {
            Some(end) => {
                buf.clear();
                buf.extend_from_slice(&whole[offset as usize..end as usize]);
                Ok(())
            }
            None => Err(StoreError::Permanent {
                what: kind.describe(id),
                detail: format!("shorter than {len} bytes at offset {offset}"),
            }),
        }
    }

    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        Ok(self.read(kind, id)?.len() as u64)
    }

    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        self.fault(Request::List(kind))?;
        let g = self.inner()?;
        Ok(g.objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, id), data)| (*id, data.len() as u64))
            .collect())
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        let lose = self.fault(Request::Delete)?;
        self.inner()?.objects.remove(&(kind, *id));
        Self::answer(lose, Request::Delete, ())
    }

    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        let lose = self.fault(Request::PutIndex)?;
        let mut g = self.writable()?;
        let created = !g.indexes.contains_key(name);
        if created {
            g.indexes.insert(name.to_owned(), data.to_vec());
        }
        Self::answer(lose, Request::PutIndex, created)
    }

    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.fault(Request::GetIndex)?;
        self.inner()?
            .indexes
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("backup {name}")))
    }

    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.fault(Request::GetIndex)?;
        Ok(self.inner()?.indexes.keys().cloned().collect())
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.inner()?.indexes.remove(name);
        Ok(())
    }

    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        check_marker_name(name)?;
        let lose = self.fault(Request::PutMarker)?;
        self.before_put(name)?;
        self.inner()?
            .markers
            .insert(name.to_owned(), (data.to_vec(), Utc::now()));
        Self::answer(lose, Request::PutMarker, ())
    }

    fn replace_marker_if(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        check_marker_name(name)?;
        let lose = self.fault(Request::PutMarker)?;
        self.before_put(name)?;
        let mut g = self.inner()?;
        let holds = g.markers.get(name).map(|(d, _)| d.as_slice());
        let swapped = holds == expected;
        if swapped {
            g.markers
                .insert(name.to_owned(), (data.to_vec(), Utc::now()));
        }
        drop(g);
        Self::answer(lose, Request::PutMarker, swapped)
    }

    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        check_marker_name(name)?;
        self.inner()?
            .markers
            .get(name)
            .map(|(d, _)| d.clone())
            .ok_or_else(|| StoreError::NotFound(format!("marker {name}")))
    }

    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        Ok(self
            .inner()?
            .markers
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(n, (_, t))| Marker {
                name: n.clone(),
                modified: *t,
            })
            .collect())
    }

    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        check_marker_name(name)?;
        self.inner()?.markers.remove(name);
        Ok(())
    }
}
