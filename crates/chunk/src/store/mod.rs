//! Where backups live: a local directory, or S3, GCS or Azure.
//!
//! [`Store`] is deliberately small: write-once objects addressed by
//! [`Id`] and [`Kind`], named backup indexes, and replaceable markers. The
//! layout it maps them to is in `docs/format.md`. Its contract, which every
//! backend meets and the shared suite (`tests/store.rs`) checks:
//!
//! - **Write-once objects.** `put` stores an object unless one with that
//!   kind and id exists; it never replaces content under a name, because
//!   the name *is* the content's hash. Racing writers leave one copy.
//! - **Ranged reads.** `get_range` returns exactly the bytes asked for, or
//!   an error; never fewer.
//! - **Atomic, write-once indexes.** `create_index` makes the whole index
//!   visible at once or not at all, and never replaces one. `put_index`
//!   builds on it: a put whose answer was lost (a 5xx after the store
//!   committed, a connection cut) is retried, finds its own index there,
//!   and succeeds; an index with other bytes under the name is
//!   [`StoreError::Conflict`].
//! - **Durability, index last.** An index is durable when `put_index`
//!   returns; other objects once [`Store::flush`] returns (object stores:
//!   at `put`). A crash may lose an object put before a flush, but never
//!   leaves a truncated one under its name. Writers flush, then write what
//!   names the objects, so nothing names a missing object.
//! - **Markers.** Small coordination objects under `locks/` and `gc/`: put
//!   replaces atomically, and a listing reports each marker's modification
//!   time *as the store records it*, so protocols compare times on one
//!   clock, the store's.
//! - **Typed failures.** [`StoreError::NotFound`] for a missing object,
//!   `Temporary` for what may work on retry, `Unreachable` for a store that
//!   does not answer, `Permanent` for the rest.
//! - **One attempt per call.** A backend does not retry; callers make
//!   every call through [`RetryPolicy`], which tries the first two kinds
//!   again.

use std::sync::Arc;

mod counting;
mod http;
mod id;
mod layer;
mod local;
mod location;
mod mem;
mod object;
mod retry;

pub use bytes::Bytes;
pub use counting::Counting;
pub use id::{BadId, Id};
pub use layer::Layer;
pub use local::LocalStore;
pub use location::{Cloud, Location, Open};
pub use mem::{Fault, MemStore, Request};
pub use object::ObjectStoreBackend;
pub use retry::RetryPolicy;

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{0} not found in the store")]
    NotFound(String),
    /// Network hiccup, throttling: retrying may work.
    #[error("store temporarily failed on {what}: {detail}")]
    Temporary {
        /// What was being done.
        what: String,
        /// The backend's message.
        detail: String,
    },
    /// The store did not answer in time, or could not be reached at all,
    /// even after retries.
    #[error("the store did not answer {what} ({detail}); is it reachable?")]
    Unreachable {
        /// What was being done.
        what: String,
        /// How long was waited, and how often.
        detail: String,
    },
    /// A write-once name already holds other content.
    #[error("{what} already exists in the store: {detail}")]
    Conflict {
        /// What was being written.
        what: String,
        /// What is there instead.
        detail: String,
    },
    /// Anything else (permissions, bad configuration, corrupt data).
    #[error("store failed on {what}: {detail}")]
    Permanent {
        /// What was being done.
        what: String,
        /// The backend's message.
        detail: String,
    },
    /// The store is read-only: a published store read by URL or without
    /// credentials.
    #[error(
        "{store} is read-only (a published snapshot); {what} must go to the publisher's own store"
    )]
    ReadOnly {
        /// The store.
        store: String,
        /// What was refused.
        what: String,
    },
    /// An object failed a check of a published store (its catalog's
    /// signature or hashes): tampered or damaged, or not trusted.
    #[error("refusing {what}: {detail}")]
    Refused {
        /// The object.
        what: String,
        /// Why.
        detail: String,
    },
    /// The store cannot do what was asked (a conditional write on a
    /// server without `If-Match`).
    #[error("{store} cannot {what}")]
    Unsupported {
        /// The store.
        store: String,
        /// What it cannot do.
        what: String,
    },
    /// The store URL cannot be used.
    #[error("invalid store '{url}': {detail}")]
    InvalidUrl {
        /// As given.
        url: String,
        /// Why.
        detail: String,
    },
}

impl StoreError {
    /// Whether retrying may help (see [`RetryPolicy::may_pass`]).
    pub fn is_temporary(&self) -> bool {
        RetryPolicy::may_pass(self)
    }
}

/// The kinds of write-once objects (see `docs/format.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `packs/`: chunks grouped in a pack.
    Pack,
    /// `packidx/`: which pack holds which chunk.
    PackIndex,
    /// `trees/`: a segment of a backup's entry stream.
    Tree,
    /// `chunks/`: one chunk per object (format version 1; never written
    /// by this version).
    Chunk,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Pack, Kind::PackIndex, Kind::Tree, Kind::Chunk];

    /// The directory (prefix) the kind lives under.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Pack => "packs",
            Kind::PackIndex => "packidx",
            Kind::Tree => "trees",
            Kind::Chunk => "chunks",
        }
    }

    /// Whether objects sit in a two-digit subdirectory (`packs/ab/ab…`).
    pub(crate) fn fanout(self) -> bool {
        !matches!(self, Kind::PackIndex)
    }

    /// The object's path relative to the store root.
    pub fn path(self, id: &Id) -> String {
        let hex = id.to_hex();
        if self.fanout() {
            format!("{}/{}/{hex}", self.dir(), &hex[..2])
        } else {
            format!("{}/{hex}", self.dir())
        }
    }

    /// How errors name an object of this kind.
    pub fn describe(self, id: &Id) -> String {
        let what = match self {
            Kind::Pack => "pack",
            Kind::PackIndex => "pack index",
            Kind::Tree => "tree segment",
            Kind::Chunk => "chunk",
        };
        format!("{what} {id}")
    }
}

/// The operations the chunk engine needs from a store. See the module
/// documentation for the contract.
pub trait Store: Send + Sync {
    /// A human description (URL) for messages.
    fn describe(&self) -> String;
    /// Store `data` as object `id` of `kind`, unless it exists. `data` is
    /// handed over, not copied (a 16 MiB pack per request in flight is
    /// memory enough); a retry clones the handle, not the bytes.
    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError>;
    /// The whole object.
    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError>;
    /// Exactly `len` bytes of the object from `offset`.
    fn get_range(&self, kind: Kind, id: &Id, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let mut buf = Vec::new();
        self.get_range_into(kind, id, offset, len, &mut buf)?;
        Ok(Bytes::from(buf))
    }
    /// [`Store::get_range`] into `buf`, replacing its contents: a caller
    /// that reads many ranges reuses one buffer instead of faulting in a
    /// fresh one each time. On error `buf`'s contents are unspecified.
    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError>;
    /// [`Store::get_range_into`], keeping only bytes that pass `check`
    /// (the caller's check of what it read, a chunk's hash): `check` sees
    /// the bytes of each read that succeeded, and its `Err` (why they are
    /// wrong) makes the call fail with [`StoreError::Refused`]. A store
    /// with several sources of the same objects ([`crate::public::Mirrors`])
    /// instead sets aside the source that served bad bytes and reads the
    /// range again from another, so `check` may see several reads.
    fn get_range_checked(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        check: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        self.get_range_into(kind, id, offset, len, buf)?;
        checked(kind, id, &self.describe(), buf, check)
    }
    /// How many independent places serve this store (1, or a restore's
    /// mirrors): readers keep that many times the requests in flight.
    fn sources(&self) -> usize {
        1
    }
    /// The size of one object (a HEAD request).
    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError>;
    /// Every object of `kind` with its size (one listing, not one request
    /// per object).
    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError>;
    /// Delete an object; absent is not an error.
    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError>;
    /// Atomically create index `name` unless an index of that name exists;
    /// `Ok(false)` if one does (whatever its bytes).
    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError>;
    /// Create index `name` holding `data`: `Ok` if it is created now, or is
    /// there already with exactly these bytes (an earlier attempt of this
    /// put committed before its answer was lost); [`StoreError::Conflict`]
    /// if other bytes are stored under the name.
    fn put_index(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if self.create_index(name, data)? {
            return Ok(());
        }
        same_index(name, &self.get_index(name)?, data)
    }
    /// The bytes of index `name`.
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Names of all objects under `indexes/`, unsorted.
    fn list_indexes(&self) -> Result<Vec<String>, StoreError>;
    /// Delete index `name`; absent is not an error.
    fn delete_index(&self, name: &str) -> Result<(), StoreError>;
    /// Create or atomically replace marker `name` (see [`Marker`]).
    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError>;
    /// The bytes of marker `name`.
    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Replace marker `name` with `data` only if it still holds exactly
    /// `expected` (`None`: only if it is absent), atomically with respect
    /// to other callers of this method: `Ok(true)` if written, `Ok(false)`
    /// if it holds something else now (read it again, redo the change,
    /// retry). [`StoreError::Unsupported`] where the store cannot write
    /// conditionally.
    fn replace_marker_if(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        data: &[u8],
    ) -> Result<bool, StoreError>;
    /// Markers whose name starts with `dir` + `/`, with their store times.
    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError>;
    /// Delete marker `name`; absent is not an error.
    fn delete_marker(&self, name: &str) -> Result<(), StoreError>;
    /// The directory of a local store; `None` for a remote one.
    fn local_root(&self) -> Option<&std::path::Path> {
        None
    }
    /// Make every object put so far durable. Object stores are durable at
    /// put already; the default does nothing.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// How calls to this store are tried again: every caller makes its
    /// calls through it, and the store itself never retries. The default
    /// is [`RetryPolicy::standard`].
    fn retry_policy(&self) -> RetryPolicy {
        *RetryPolicy::standard()
    }
}

/// What `check` says of `buf`, bytes of object `id` of `kind` read from
/// `store` (as it describes itself): its `Err` (why they are wrong) as
/// [`StoreError::Refused`].
pub(crate) fn checked(
    kind: Kind,
    id: &Id,
    store: &str,
    buf: &[u8],
    check: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), StoreError> {
    check(buf).map_err(|detail| StoreError::Refused {
        what: format!("{} from {store}", kind.describe(id)),
        detail,
    })
}

/// `Ok` if the index `there` under `name` holds exactly `data` (an earlier
/// attempt committed), else a [`StoreError::Conflict`].
pub(crate) fn same_index(name: &str, there: &[u8], data: &[u8]) -> Result<(), StoreError> {
    if there == data {
        return Ok(());
    }
    Err(StoreError::Conflict {
        what: format!("index {name}"),
        detail: format!(
            "{} other bytes are stored under this name ({} were to be written)",
            there.len(),
            data.len()
        ),
    })
}

/// A marker as listed: its name relative to the store root, and when the
/// store last wrote it (the store's clock, not ours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// For example `locks/export-...` or `gc/marks/...`.
    pub name: String,
    /// Last write, by the store's clock.
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// The marker name of a published store's catalog (`docs/format.md`).
pub const CATALOG: &str = "catalog";

/// Check a marker name: [`CATALOG`], or `locks/` or `gc/` then
/// `[A-Za-z0-9._-/]`, no `..`.
pub(crate) fn check_marker_name(name: &str) -> Result<(), StoreError> {
    if name == CATALOG {
        return Ok(());
    }
    let ok = (name.starts_with("locks/") || name.starts_with("gc/"))
        && !name.ends_with('/')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with('.'))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Permanent {
            what: format!("marker {name:?}"),
            detail: "not a valid marker name".into(),
        })
    }
}

/// Open the store at `location` for `how` (see [`Open`]). Cloud
/// credentials come from the usual environment variables (`AWS_*`,
/// `GOOGLE_*`, `AZURE_*`); `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) points
/// S3 at a compatible server. A web server or an anonymous bucket cannot
/// be listed: read it through its catalog ([`crate::public::open`]).
pub fn open(location: &Location, how: Open) -> Result<Arc<dyn Store>, StoreError> {
    match (location, how) {
        (Location::Web(url), Open::Read { .. })
        | (Location::Bucket { url, .. }, Open::Read { anonymous: true }) => {
            Ok(Arc::new(ObjectStoreBackend::open_anonymous(url)?))
        }
        (Location::Web(url), _) => Err(StoreError::InvalidUrl {
            url: url.clone(),
            detail: location::WEB_IS_READ_ONLY.into(),
        }),
        (Location::Bucket { url, .. }, _) => Ok(Arc::new(ObjectStoreBackend::open(url)?)),
        (Location::Local(path), Open::Write) => Ok(Arc::new(LocalStore::open(&path_str(path)?)?)),
        (Location::Local(path), _) => {
            let detail = match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => None,
                Ok(_) => Some("it is a file, not a store directory"),
                Err(_) => Some("no such directory"),
            };
            if let Some(detail) = detail {
                return Err(StoreError::InvalidUrl {
                    url: location.to_string(),
                    detail: detail.into(),
                });
            }
            Ok(Arc::new(LocalStore::open(&path_str(path)?)?))
        }
    }
}

fn path_str(path: &std::path::Path) -> Result<String, StoreError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| StoreError::InvalidUrl {
            url: path.display().to_string(),
            detail: "the path is not valid UTF-8".into(),
        })
}
