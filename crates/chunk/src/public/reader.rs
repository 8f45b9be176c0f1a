//! A published store as readers see it: a [`Store`] that lists from the
//! catalog instead of the store, checks every head against it, and refuses
//! writes. It is how `btm backups`, `restore`, `verify` and `check` read a
//! web server, a public bucket, or any store given `--trust`: the chunk
//! engine above reads it like any other store and needs no listing.

use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;

use super::catalog::Catalog;
use super::key::PublicKey;
use super::{seen, Access};
use crate::format::packidx;
use crate::store::{Bytes, Id, Kind, Layer, Marker, Store, StoreError, CATALOG};
use crate::with_retry;

/// What the reader knows of the catalog.
struct State {
    catalog: Arc<Catalog>,
    signer: PublicKey,
    /// An object the catalog names was missing: a GC sweep may have
    /// replaced it since the catalog was read, so the next listing reads
    /// the catalog again.
    stale: bool,
}

/// A read-only store over its catalog (`docs/format.md`, "Catalog").
pub struct CatalogStore {
    inner: Arc<dyn Store>,
    access: Access,
    state: Mutex<State>,
}

impl std::fmt::Debug for CatalogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogStore")
            .field("store", &self.inner.describe())
            .field("trust", &self.access.trust)
            .finish()
    }
}

/// Read and check the catalog of `store`: signed as `access` trusts, and
/// fresh (not older than one seen before, not expired, not older than
/// `access.max_age`); the newest accepted is remembered.
fn load(store: &dyn Store, access: &Access) -> Result<(Catalog, PublicKey), StoreError> {
    let data = with_retry(store, || store.get_marker(CATALOG)).map_err(|e| match e {
        StoreError::NotFound(_) => StoreError::Permanent {
            what: format!("reading {}", store.describe()),
            detail: "it has no catalog: it was never published (btm publish), or the URL is wrong"
                .into(),
        },
        e => e,
    })?;
    let refused = |e: super::catalog::CatalogError| StoreError::Refused {
        what: format!("the catalog of {}", store.describe()),
        detail: e.to_string(),
    };
    let (catalog, signer) = Catalog::decode(&data, &access.trust).map_err(refused)?;
    let url = store.describe();
    let seen_dir = access.seen.as_deref();
    let seen = seen_dir.and_then(|d| seen::newest(d, &url, &signer));
    catalog
        .check_fresh(seen, access.max_age, Utc::now())
        .map_err(refused)?;
    if let Some(dir) = seen_dir.filter(|_| seen.is_none_or(|s| catalog.published > s)) {
        if let Err(e) = seen::remember(dir, &url, &signer, catalog.published) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remember the catalog's time; an older copy would not be caught next time");
        }
    }
    Ok((catalog, signer))
}

impl CatalogStore {
    /// Read the catalog of `inner` (one request) and check it: signed by
    /// one of `trust`, or, with `trust` empty, by the key it names
    /// (unauthenticated: the caller says so).
    pub fn open(inner: Arc<dyn Store>, access: &Access) -> Result<Self, StoreError> {
        let (catalog, signer) = load(inner.as_ref(), access)?;
        Ok(CatalogStore {
            inner,
            access: access.clone(),
            state: Mutex::new(State {
                catalog: Arc::new(catalog),
                signer,
                stale: false,
            }),
        })
    }

    /// The key that signed the catalog.
    pub fn signer(&self) -> PublicKey {
        self.state().signer.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The catalog, read again first if an object it named was missing.
    pub fn catalog(&self) -> Result<Arc<Catalog>, StoreError> {
        let mut st = self.state();
        if st.stale {
            let (catalog, signer) = load(self.inner.as_ref(), &self.access)?;
            if signer != st.signer {
                return Err(StoreError::Refused {
                    what: format!("the catalog of {}", self.inner.describe()),
                    detail: format!(
                        "it is now signed by {signer}, not {} as when this run began",
                        st.signer
                    ),
                });
            }
            st.catalog = Arc::new(catalog);
            st.stale = false;
        }
        Ok(st.catalog.clone())
    }

    fn noting_missing<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::NotFound(_)) = &r {
            self.state().stale = true;
        }
        r
    }

    fn read_only<T>(&self, what: impl Into<String>) -> Result<T, StoreError> {
        Err(StoreError::ReadOnly {
            store: self.inner.describe(),
            what: what.into(),
        })
    }
}

impl Layer for CatalogStore {
    fn inner(&self) -> &dyn Store {
        self.inner.as_ref()
    }

    fn put(&self, kind: Kind, id: &Id, _data: Bytes) -> Result<(), StoreError> {
        self.read_only(format!("writing {}", kind.describe(id)))
    }

    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.noting_missing(self.inner.get(kind, id))
    }

    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.noting_missing(self.inner.get_range_into(kind, id, offset, len, buf))
    }

    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        self.noting_missing(self.inner.size(kind, id))
    }

    /// Pack indexes from the catalog; packs from those pack indexes (what
    /// `check` compares the chunk map with); nothing else is published.
    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        let catalog = self.catalog()?;
        match kind {
            Kind::PackIndex => Ok(catalog.packidx.iter().map(|p| (p.id, p.size)).collect()),
            Kind::Pack => {
                let mut packs = Vec::new();
                for p in &catalog.packidx {
                    let data = Layer::get(self, Kind::PackIndex, &p.id)?;
                    let what = Kind::PackIndex.describe(&p.id);
                    let entries =
                        packidx::decode(&data, &what).map_err(|e| StoreError::Permanent {
                            what,
                            detail: e.to_string(),
                        })?;
                    packs.extend(entries.into_iter().map(|e| (e.id, e.len)));
                }
                packs.sort_unstable();
                packs.dedup();
                Ok(packs)
            }
            Kind::Tree | Kind::Chunk => Ok(Vec::new()),
        }
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.read_only(format!("deleting {}", kind.describe(id)))
    }

    fn create_index(&self, name: &str, _data: &[u8]) -> Result<bool, StoreError> {
        self.read_only(format!("writing backup {name}"))
    }

    /// The head, if the catalog names it and its bytes are the ones the
    /// catalog (and the head's signature) hashed.
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let catalog = self.catalog()?;
        let entry = catalog
            .head(name)
            .ok_or_else(|| StoreError::NotFound(format!("backup {name}")))?;
        let data = self.noting_missing(self.inner.get_index(name))?;
        if data.len() as u64 != entry.size || Id::of(&data) != entry.blake3 {
            return Err(StoreError::Refused {
                what: format!("head {name}"),
                detail:
                    "its content does not match the hash the catalog signed (tampered or damaged)"
                        .into(),
            });
        }
        Ok(data)
    }

    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .catalog()?
            .heads
            .iter()
            .map(|h| h.name.clone())
            .collect())
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.read_only(format!("deleting backup {name}"))
    }

    fn put_marker(&self, name: &str, _data: &[u8]) -> Result<(), StoreError> {
        self.read_only(format!("writing {name}"))
    }

    fn replace_marker_if(
        &self,
        name: &str,
        _expected: Option<&[u8]>,
        _data: &[u8],
    ) -> Result<bool, StoreError> {
        self.read_only(format!("writing {name}"))
    }

    /// Nothing: leases and GC marks are the publisher's business, and a
    /// reader cannot list them.
    fn list_markers(&self, _dir: &str) -> Result<Vec<Marker>, StoreError> {
        Ok(Vec::new())
    }

    /// Nothing to do: no marker could have been written through a
    /// read-only store, and deleting an absent one is not an error.
    fn delete_marker(&self, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }
}
