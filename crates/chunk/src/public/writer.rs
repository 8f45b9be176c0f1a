//! Keeping a store's catalog (`docs/format.md`, "Catalog"): building it
//! from the store's listings ([`publish`]), and keeping it in step with
//! every head and pack index written or deleted ([`Publishing`]).
//!
//! The rule a reader relies on: the catalog never names an object that is
//! gone, and names every backup once it is complete. So additions reach
//! the catalog after the objects are stored, and deletions before the
//! objects go.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::catalog::{
    head_message, next_expiry, next_published, Catalog, HeadEntry, PackIndexEntry,
};
use super::key::{PublicKey, SigningKey};
use crate::format::head::{self, Decoded};
use crate::store::{Bytes, Id, Kind, Layer, Store, StoreError, CATALOG};
use crate::{with_retry, ChunkError};

/// What [`publish`] did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Backups the catalog names.
    pub heads: usize,
    /// Pack indexes it names.
    pub pack_indexes: usize,
    /// Heads read to make their entries (the others were in the previous
    /// catalog).
    pub heads_read: usize,
    /// Version 1 backups, which are not published.
    pub skipped_v1: Vec<String>,
    /// The key that signed it.
    pub key: String,
}

/// The catalog entry of head `name` stored as `data`, signed with `key`;
/// `None` for a version 1 index (not published).
pub fn head_entry(
    name: &str,
    data: &[u8],
    key: &SigningKey,
) -> Result<Option<HeadEntry>, ChunkError> {
    let Decoded::V2(h) = head::decode(name, data)? else {
        return Ok(None);
    };
    let hash = Id::of(data);
    Ok(Some(HeadEntry {
        name: name.to_owned(),
        tag: h.tag.clone(),
        height: h.height(),
        chain: h.meta.get("chain").cloned(),
        blake3: hash,
        size: data.len() as u64,
        sig: key.sign(&head_message(name, &hash)),
    }))
}

/// The catalog of `store` if it has one that `key` signed; `Ok(None)` if
/// it has none, or one that is damaged or another key's (rebuilt then).
fn current(store: &dyn Store, key: &PublicKey) -> Result<Option<Catalog>, StoreError> {
    match with_retry(store, || store.get_marker(CATALOG)) {
        Ok(data) => match Catalog::decode(&data, std::slice::from_ref(key)) {
            Ok((c, _)) => Ok(Some(c)),
            Err(e) => {
                tracing::warn!(error = %e, "the store's catalog is not one this key signed; rebuilding it from the store");
                Ok(None)
            }
        },
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `store` is published: it has a catalog, which writers that
/// delete must keep right.
pub fn is_published(store: &dyn Store) -> Result<bool, StoreError> {
    match with_retry(store, || store.get_marker(CATALOG)) {
        Ok(_) => Ok(true),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

fn put_catalog(
    store: &dyn Store,
    catalog: &mut Catalog,
    key: &SigningKey,
    now: DateTime<Utc>,
    expires_in: Option<Duration>,
) -> Result<(), ChunkError> {
    catalog.normalize();
    // `catalog` is the one it replaces, edited: its times are the old ones.
    let before = catalog.expires.map(|e| (catalog.published, e));
    catalog.published = next_published(Some(catalog.published), now);
    catalog.expires = next_expiry(catalog.published, expires_in, before);
    let data = catalog.encode(key);
    with_retry(store, || store.put_marker(CATALOG, &data))
        .map_err(|e| ChunkError::store("writing the catalog", e))
}

/// Build the catalog of `store` from its listings, sign it with `key` and
/// write it, valid for `expires_in` if given (else as long as the catalog
/// it replaces allowed). Heads already in the previous catalog (signed by
/// `key`) are not read again: heads are write-once.
pub fn publish(
    store: &dyn Store,
    key: &SigningKey,
    now: DateTime<Utc>,
    expires_in: Option<Duration>,
) -> Result<PublishReport, ChunkError> {
    let (mut catalog, report) = rebuild(store, key, now)?;
    put_catalog(store, &mut catalog, key, now, expires_in)?;
    Ok(report)
}

fn rebuild(
    store: &dyn Store,
    key: &SigningKey,
    now: DateTime<Utc>,
) -> Result<(Catalog, PublishReport), ChunkError> {
    let old =
        current(store, &key.public()).map_err(|e| ChunkError::store("reading the catalog", e))?;
    let mut names = with_retry(store, || store.list_indexes())
        .map_err(|e| ChunkError::store("listing backups", e))?;
    names.retain(|n| head::IndexName::parse(n).is_some());
    names.sort();
    let packidx = with_retry(store, || store.list(Kind::PackIndex))
        .map_err(|e| ChunkError::store("listing pack indexes", e))?;
    // The times of the catalog it replaces, which the new one follows.
    let mut catalog = Catalog::new(old.as_ref().map_or(now, |o| o.published));
    catalog.expires = old.as_ref().and_then(|o| o.expires);
    let mut report = PublishReport {
        heads: 0,
        pack_indexes: packidx.len(),
        heads_read: 0,
        skipped_v1: Vec::new(),
        key: key.public().to_string(),
    };
    for name in names {
        if let Some(e) = old.as_ref().and_then(|c| c.head(&name)) {
            catalog.heads.push(e.clone());
            continue;
        }
        let data = match with_retry(store, || store.get_index(&name)) {
            Ok(d) => d,
            // Forgotten since the listing.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(ChunkError::store(format!("reading backup {name}"), e)),
        };
        report.heads_read += 1;
        match head_entry(&name, &data, key)? {
            Some(e) => catalog.heads.push(e),
            None => report.skipped_v1.push(name),
        }
    }
    report.heads = catalog.heads.len();
    catalog.packidx = packidx
        .into_iter()
        .map(|(id, size)| PackIndexEntry { id, size })
        .collect();
    catalog.normalize();
    Ok((catalog, report))
}

/// Changes made through a [`Publishing`] store, not yet in the catalog.
#[derive(Default)]
struct Changes {
    heads: Vec<HeadEntry>,
    packidx: Vec<PackIndexEntry>,
}

/// A store that keeps its catalog right: heads and pack indexes written
/// through it are added at [`Publishing::commit`] (one read and one write
/// of the catalog), and a head or pack index deleted through it leaves
/// the catalog (with whatever is pending) before it is deleted. A store
/// without a catalog gets one, built from its listings, at the first
/// commit.
pub struct Publishing {
    inner: Arc<dyn Store>,
    key: SigningKey,
    expires_in: Option<Duration>,
    pending: Mutex<Changes>,
}

impl Publishing {
    /// Publish what is written to `inner`, signed with `key`.
    pub fn new(inner: Arc<dyn Store>, key: &SigningKey) -> Self {
        Publishing {
            inner,
            key: key.clone(),
            expires_in: None,
            pending: Mutex::new(Changes::default()),
        }
    }

    /// Sign each catalog written valid for `expires_in` (`--expires`),
    /// instead of as long as the one it replaces allowed.
    pub fn with_expiry(mut self, expires_in: Option<Duration>) -> Self {
        self.expires_in = expires_in;
        self
    }

    fn pending(&self) -> MutexGuard<'_, Changes> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the catalog with every pending change (nothing if there is
    /// none). Returns whether it wrote.
    pub fn commit(&self) -> Result<bool, ChunkError> {
        self.update(|_| ())
    }

    /// Apply pending changes and `edit` to the catalog and write it. The
    /// pending changes stay pending if the write fails.
    fn update(&self, edit: impl FnOnce(&mut Catalog)) -> Result<bool, ChunkError> {
        let mut pending = self.pending();
        let now = Utc::now();
        let (mut catalog, rebuilt) = match current(self.inner.as_ref(), &self.key.public())
            .map_err(|e| ChunkError::store("reading the catalog", e))?
        {
            Some(c) => (c, false),
            // First publish (or a catalog to repair): from the listings,
            // which already show what is pending.
            None => (rebuild(self.inner.as_ref(), &self.key, now)?.0, true),
        };
        let before = catalog.clone();
        catalog.heads.extend(pending.heads.iter().cloned());
        catalog.packidx.extend(pending.packidx.iter().copied());
        edit(&mut catalog);
        catalog.normalize();
        if !rebuilt && catalog.heads == before.heads && catalog.packidx == before.packidx {
            *pending = Changes::default();
            return Ok(false);
        }
        put_catalog(
            self.inner.as_ref(),
            &mut catalog,
            &self.key,
            now,
            self.expires_in,
        )?;
        *pending = Changes::default();
        Ok(true)
    }

    /// [`StoreError`] from a catalog update before a deletion.
    fn before_delete(&self, what: &str, edit: impl FnOnce(&mut Catalog)) -> Result<(), StoreError> {
        self.update(edit).map(|_| ()).map_err(|e| match e {
            ChunkError::Store { cause, .. } => cause,
            e => StoreError::Permanent {
                what: format!("updating the catalog before deleting {what}"),
                detail: e.to_string(),
            },
        })
    }
}

impl Layer for Publishing {
    fn inner(&self) -> &dyn Store {
        self.inner.as_ref()
    }

    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        let size = data.len() as u64;
        self.inner.put(kind, id, data)?;
        if kind == Kind::PackIndex {
            self.pending()
                .packidx
                .push(PackIndexEntry { id: *id, size });
        }
        Ok(())
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        if kind == Kind::PackIndex {
            self.before_delete(&kind.describe(id), |c| c.packidx.retain(|p| p.id != *id))?;
        }
        self.inner.delete(kind, id)
    }

    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        let created = self.inner.create_index(name, data)?;
        if created {
            self.record_head(name, data);
        }
        Ok(created)
    }

    fn put_index(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.inner.put_index(name, data)?;
        self.record_head(name, data);
        Ok(())
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.before_delete(&format!("backup {name}"), |c| {
            c.heads.retain(|h| h.name != name)
        })?;
        self.inner.delete_index(name)
    }
}

impl Publishing {
    fn record_head(&self, name: &str, data: &[u8]) {
        match head_entry(name, data, &self.key) {
            Ok(Some(e)) => self.pending().heads.push(e),
            Ok(None) => {}
            // The writer just encoded it; a failure here is a bug, and the
            // next full publish picks the head up from the listing.
            Err(e) => {
                tracing::warn!(backup = name, error = %e, "cannot catalog a head just written")
            }
        }
    }
}
