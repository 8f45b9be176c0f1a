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

/// The catalog object of `store` as it is now (`None`: there is none),
/// the bytes a replacement must find to succeed.
type Read = Option<Vec<u8>>;

/// The catalog of `store`: its bytes, and the catalog if `key` signed it
/// (`None` if there is none, or one that is damaged or another key's:
/// rebuilt then).
fn current(store: &dyn Store, key: &PublicKey) -> Result<(Read, Option<Catalog>), StoreError> {
    match with_retry(store, || store.get_marker(CATALOG)) {
        Ok(data) => match Catalog::decode(&data, std::slice::from_ref(key)) {
            Ok((c, _)) => Ok((Some(data), Some(c))),
            Err(e) => {
                tracing::warn!(error = %e, "the store's catalog is not one this key signed; rebuilding it from the store");
                Ok((Some(data), None))
            }
        },
        Err(StoreError::NotFound(_)) => Ok((None, None)),
        Err(e) => Err(e),
    }
}

/// How many times a writer redoes its change on a catalog that another
/// writer replaced meanwhile before it gives up.
const CATALOG_RACES: u32 = 50;

/// A short random wait before a writer that lost `lost` races in a row
/// tries again, so that racing writers spread out: between half and all of
/// 5 ms per race lost, at most 100 ms (the retry policy's jitter).
fn after_race(lost: u32) {
    let most = Duration::from_millis(5 * u64::from(lost.min(20)));
    let jittered = crate::store::RetryPolicy {
        first_wait: most,
        max_wait: most,
        ..*crate::store::RetryPolicy::standard()
    };
    std::thread::sleep(jittered.wait(1));
}

/// The error of a writer that lost [`CATALOG_RACES`] races in a row.
fn too_contended() -> ChunkError {
    ChunkError::store(
        "writing the catalog",
        StoreError::Temporary {
            what: CATALOG.into(),
            detail: format!(
                "other publishers replaced it {CATALOG_RACES} times while this one tried; run `btm publish` when they are done"
            ),
        },
    )
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

/// Sign `catalog` and write it in place of `replacing` (the bytes read):
/// `Ok(false)` if another writer replaced those meanwhile. A store that
/// cannot write conditionally is said so, once, and written anyway.
fn put_catalog(
    store: &dyn Store,
    catalog: &mut Catalog,
    key: &SigningKey,
    now: DateTime<Utc>,
    expires_in: Option<Duration>,
    replacing: Option<&[u8]>,
) -> Result<bool, ChunkError> {
    catalog.normalize();
    // `catalog` is the one it replaces, edited: its times are the old ones.
    let before = catalog.expires.map(|e| (catalog.published, e));
    catalog.published = next_published(Some(catalog.published), now);
    catalog.expires = next_expiry(catalog.published, expires_in, before);
    let data = catalog.encode(key);
    let written = with_retry(store, || store.replace_marker_if(CATALOG, replacing, &data));
    let failed = |e| ChunkError::store("writing the catalog", e);
    match written {
        Err(StoreError::Unsupported { store: url, what }) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(store = %url, "{url} cannot {what}: the catalog is replaced under a lock object ({CATALOG_LOCK}) instead");
            });
            put_under_lock(store, replacing, &data).map_err(failed)
        }
        other => other.map_err(failed),
    }
}

/// The lock object a publisher holds while it replaces the catalog of a
/// store that cannot write conditionally (`docs/format.md`, "Catalog").
pub const CATALOG_LOCK: &str = "locks/catalog-writer";
/// How long a catalog lock is honoured after it was written, by the
/// store's clock: a holder that died frees it then.
const LOCK_TTL: chrono::TimeDelta = chrono::TimeDelta::seconds(30);
/// How long a writer waits after writing the lock before reading it back:
/// another writer that wrote it at about the same time has overwritten it
/// by then, and exactly one of them finds its own token.
const LOCK_SETTLE: Duration = Duration::from_millis(300);

/// Replace the catalog with `data` if it still holds `replacing`, holding
/// [`CATALOG_LOCK`]: wait while another writer's fresh lock is there,
/// write a token of our own, let it settle, and go on only if the token
/// read back is ours. `Ok(false)`: the catalog changed, or another writer
/// took the lock; read again and retry.
fn put_under_lock(
    store: &dyn Store,
    replacing: Option<&[u8]>,
    data: &[u8],
) -> Result<bool, StoreError> {
    wait_for_lock(store)?;
    let mut token = [0u8; 16];
    getrandom::getrandom(&mut token).map_err(|e| StoreError::Permanent {
        what: CATALOG_LOCK.into(),
        detail: format!("no randomness for a lock token: {e}"),
    })?;
    let token = format!("{} {}", std::process::id(), Id::of(&token).to_hex());
    with_retry(store, || store.put_marker(CATALOG_LOCK, token.as_bytes()))?;
    std::thread::sleep(LOCK_SETTLE);
    let read_back = with_retry(store, || store.get_marker(CATALOG_LOCK));
    if !matches!(&read_back, Ok(b) if b == token.as_bytes()) {
        return Ok(false);
    }
    let replaced = match with_retry(store, || store.get_marker(CATALOG)) {
        Ok(now) if Some(now.as_slice()) == replacing => {
            with_retry(store, || store.put_marker(CATALOG, data)).map(|()| true)
        }
        Err(StoreError::NotFound(_)) if replacing.is_none() => {
            with_retry(store, || store.put_marker(CATALOG, data)).map(|()| true)
        }
        Ok(_) | Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    };
    if let Err(e) = with_retry(store, || store.delete_marker(CATALOG_LOCK)) {
        tracing::warn!(error = %e, "cannot remove the catalog lock; other publishers wait until it expires");
    }
    replaced
}

/// Wait while [`CATALOG_LOCK`] is another writer's and fresh.
fn wait_for_lock(store: &dyn Store) -> Result<(), StoreError> {
    loop {
        let listed = with_retry(store, || store.list_markers("locks"))?;
        let Some(lock) = listed.into_iter().find(|m| m.name == CATALOG_LOCK) else {
            return Ok(());
        };
        let now = with_retry(store, || crate::lease::store_now(store))?;
        if now - lock.modified >= LOCK_TTL {
            return Ok(());
        }
        after_race(10);
    }
}

/// Build the catalog of `store` from its listings, sign it with `key` and
/// write it, valid for `expires_in` if given (else as long as the catalog
/// it replaces allowed), listing `mirrors` if given (else those the
/// catalog it replaces listed). Heads already in the previous catalog
/// (signed by `key`) are not read again: heads are write-once.
pub fn publish(
    store: &dyn Store,
    key: &SigningKey,
    now: DateTime<Utc>,
    expires_in: Option<Duration>,
    mirrors: Option<&[String]>,
) -> Result<PublishReport, ChunkError> {
    for lost in 0..CATALOG_RACES {
        let (read, old) = current(store, &key.public())
            .map_err(|e| ChunkError::store("reading the catalog", e))?;
        let (mut catalog, report) = rebuild(store, key, now, old)?;
        if let Some(m) = mirrors {
            catalog.mirrors = m.to_vec();
        }
        if put_catalog(store, &mut catalog, key, now, expires_in, read.as_deref())? {
            return Ok(report);
        }
        after_race(lost + 1);
    }
    Err(too_contended())
}

/// The catalog of `store` from its listings, reusing what `old` (the
/// catalog it replaces, if this key signed it) says of heads.
fn rebuild(
    store: &dyn Store,
    key: &SigningKey,
    now: DateTime<Utc>,
    old: Option<Catalog>,
) -> Result<(Catalog, PublishReport), ChunkError> {
    let mut names = with_retry(store, || store.list_indexes())
        .map_err(|e| ChunkError::store("listing backups", e))?;
    names.retain(|n| head::IndexName::parse(n).is_some());
    names.sort();
    let packidx = with_retry(store, || store.list(Kind::PackIndex))
        .map_err(|e| ChunkError::store("listing pack indexes", e))?;
    // The times of the catalog it replaces, which the new one follows.
    let mut catalog = Catalog::new(old.as_ref().map_or(now, |o| o.published));
    catalog.expires = old.as_ref().and_then(|o| o.expires);
    catalog.mirrors = old.as_ref().map(|o| o.mirrors.clone()).unwrap_or_default();
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
    ///
    /// Another writer may replace the catalog between this one's read and
    /// its write: the write then fails (compare-and-swap), and the change
    /// is made again on the catalog as it is now.
    fn update(&self, edit: impl Fn(&mut Catalog)) -> Result<bool, ChunkError> {
        let mut pending = self.pending();
        let store = self.inner.as_ref();
        for lost in 0..CATALOG_RACES {
            let now = Utc::now();
            let (read, found) = current(store, &self.key.public())
                .map_err(|e| ChunkError::store("reading the catalog", e))?;
            let (mut catalog, rebuilt) = match found {
                Some(c) => (c, false),
                // First publish (or a catalog to repair): from the
                // listings, which already show what is pending.
                None => (rebuild(store, &self.key, now, None)?.0, true),
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
            let (key, expires) = (&self.key, self.expires_in);
            if put_catalog(store, &mut catalog, key, now, expires, read.as_deref())? {
                *pending = Changes::default();
                return Ok(true);
            }
            after_race(lost + 1);
        }
        Err(too_contended())
    }

    /// [`StoreError`] from a catalog update before a deletion.
    fn before_delete(&self, what: &str, edit: impl Fn(&mut Catalog)) -> Result<(), StoreError> {
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
