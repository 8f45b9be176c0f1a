//! Stores that wrap another store: forwarding written once.
//!
//! A wrapper (counting requests, publishing a catalog as it goes, reading
//! through a signed catalog, injecting faults in tests) changes a few
//! calls and passes the rest through. It implements [`Layer`]: it names
//! its inner store, overrides what it changes, and may see every request
//! before it goes ([`Layer::before`]) or around it ([`Layer::around`],
//! to time it). Every `Layer` is a [`Store`].

use std::sync::Arc;

use super::{Bytes, Id, Kind, Marker, Request, RetryPolicy, Store, StoreError};

/// A store that passes what it does not override to [`Layer::inner`].
pub trait Layer: Send + Sync + Sized {
    /// The store underneath.
    fn inner(&self) -> &dyn Store;

    /// Called before every request passed through (not for `describe`,
    /// `local_root` or `flush`, which make none); an error stops it.
    fn before(&self, _request: Request) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes every request passed through (`call`): [`Layer::before`],
    /// then the call. A layer that must see a request end overrides this.
    fn around<T>(
        &self,
        request: Request,
        call: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.before(request)?;
        call()
    }

    /// See [`Store::describe`].
    fn describe(&self) -> String {
        self.inner().describe()
    }
    /// See [`Store::put`].
    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        self.around(Request::Put(kind), || self.inner().put(kind, id, data))
    }
    /// See [`Store::get`].
    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.around(Request::Get(kind), || self.inner().get(kind, id))
    }
    /// See [`Store::get_range`]: through [`Layer::get_range_into`], as the
    /// store's own default.
    fn get_range(&self, kind: Kind, id: &Id, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let mut buf = Vec::new();
        Layer::get_range_into(self, kind, id, offset, len, &mut buf)?;
        Ok(Bytes::from(buf))
    }
    /// See [`Store::get_range_into`].
    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.around(Request::Get(kind), || {
            self.inner().get_range_into(kind, id, offset, len, buf)
        })
    }
    /// See [`Store::get_range_checked`]: read through this layer's own
    /// [`Layer::get_range_into`] (so an override of it applies), then
    /// check.
    fn get_range_checked(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        check: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        Layer::get_range_into(self, kind, id, offset, len, buf)?;
        super::checked(kind, id, &Layer::describe(self), buf, check)
    }
    /// See [`Store::sources`].
    fn sources(&self) -> usize {
        self.inner().sources()
    }
    /// See [`Store::size`].
    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        self.around(Request::Get(kind), || self.inner().size(kind, id))
    }
    /// See [`Store::list`].
    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        self.around(Request::List(kind), || self.inner().list(kind))
    }
    /// See [`Store::delete`].
    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.around(Request::Delete, || self.inner().delete(kind, id))
    }
    /// See [`Store::create_index`].
    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.around(Request::PutIndex, || self.inner().create_index(name, data))
    }
    /// See [`Store::put_index`]: through this layer's
    /// [`Layer::create_index`] and [`Layer::get_index`], as the store's
    /// own default.
    fn put_index(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if Layer::create_index(self, name, data)? {
            return Ok(());
        }
        super::same_index(name, &Layer::get_index(self, name)?, data)
    }
    /// See [`Store::get_index`].
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.around(Request::GetIndex, || self.inner().get_index(name))
    }
    /// See [`Store::list_indexes`].
    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.around(Request::GetIndex, || self.inner().list_indexes())
    }
    /// See [`Store::delete_index`].
    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.around(Request::Delete, || self.inner().delete_index(name))
    }
    /// See [`Store::put_marker`].
    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.around(Request::PutMarker, || self.inner().put_marker(name, data))
    }
    /// See [`Store::get_marker`].
    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.around(Request::GetMarker, || self.inner().get_marker(name))
    }
    /// See [`Store::replace_marker_if`].
    fn replace_marker_if(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        self.around(Request::PutMarker, || {
            self.inner().replace_marker_if(name, expected, data)
        })
    }
    /// See [`Store::list_markers`].
    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        self.around(Request::GetMarker, || self.inner().list_markers(dir))
    }
    /// See [`Store::delete_marker`].
    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        self.around(Request::Delete, || self.inner().delete_marker(name))
    }
    /// See [`Store::local_root`].
    fn local_root(&self) -> Option<&std::path::Path> {
        self.inner().local_root()
    }
    /// See [`Store::flush`].
    fn flush(&self) -> Result<(), StoreError> {
        self.inner().flush()
    }
    /// See [`Store::retry_policy`].
    fn retry_policy(&self) -> RetryPolicy {
        self.inner().retry_policy()
    }
}

/// A shared store is a store: what an [`Arc`] holds answers for it, so a
/// caller that keeps a store (a test's fake, a command's report counter)
/// can hand a [`crate::Repo`] a clone of its handle.
impl<S: Store> Layer for Arc<S> {
    fn inner(&self) -> &dyn Store {
        self.as_ref()
    }
}

impl<L: Layer> Store for L {
    fn describe(&self) -> String {
        Layer::describe(self)
    }
    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        Layer::put(self, kind, id, data)
    }
    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        Layer::get(self, kind, id)
    }
    fn get_range(&self, kind: Kind, id: &Id, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        Layer::get_range(self, kind, id, offset, len)
    }
    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        Layer::get_range_into(self, kind, id, offset, len, buf)
    }
    fn get_range_checked(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        check: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        Layer::get_range_checked(self, kind, id, offset, len, buf, check)
    }
    fn sources(&self) -> usize {
        Layer::sources(self)
    }
    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        Layer::size(self, kind, id)
    }
    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        Layer::list(self, kind)
    }
    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        Layer::delete(self, kind, id)
    }
    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        Layer::create_index(self, name, data)
    }
    fn put_index(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        Layer::put_index(self, name, data)
    }
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        Layer::get_index(self, name)
    }
    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        Layer::list_indexes(self)
    }
    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        Layer::delete_index(self, name)
    }
    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        Layer::put_marker(self, name, data)
    }
    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        Layer::get_marker(self, name)
    }
    fn replace_marker_if(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        Layer::replace_marker_if(self, name, expected, data)
    }
    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        Layer::list_markers(self, dir)
    }
    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        Layer::delete_marker(self, name)
    }
    fn local_root(&self) -> Option<&std::path::Path> {
        Layer::local_root(self)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Layer::flush(self)
    }
    fn retry_policy(&self) -> RetryPolicy {
        Layer::retry_policy(self)
    }
}
