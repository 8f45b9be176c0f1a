//! Where chunked backups live: a local directory, or S3, GCS or Azure.
//!
//! [`Store`] is deliberately small. Its contract, which every backend meets
//! and the shared test suite (`tests/store.rs`) checks:
//!
//! - **Write-once chunks.** `put_chunk` stores a chunk unless one with that
//!   hash exists; it never replaces different content under a name, because
//!   the name *is* the content's hash. Two writers racing on one chunk
//!   leave one valid copy.
//! - **Atomic, write-once indexes.** `put_index` makes the whole index
//!   visible at once or not at all, and fails if the name exists.
//! - **Durability.** An index is durable when `put_index` returns; chunks
//!   are durable once [`Store::flush`] returns. Before that a crash may
//!   lose a chunk, but never leave a truncated one under its name. The
//!   chunk engine flushes after the last chunk and only then writes the
//!   index, so an index never points at a missing chunk.
//! - **Typed failures.** [`StoreError::NotFound`] for a missing object,
//!   `Temporary` for what may work on retry, `Permanent` for the rest.

mod local;
mod object;

use crate::chunk::index::ChunkHash;

pub use local::LocalStore;
pub use object::ObjectStoreBackend;

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{0} not found in the store")]
    NotFound(String),
    /// Network hiccup, throttling, timeout: retrying may work.
    #[error("store temporarily failed on {what}: {detail}")]
    Temporary {
        /// What was being done.
        what: String,
        /// The backend's message.
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
    /// Whether retrying may help.
    pub fn is_temporary(&self) -> bool {
        matches!(self, StoreError::Temporary { .. })
    }
}

/// The operations the chunk engine needs from a store. See the module
/// documentation for the contract.
pub trait Store: Send + Sync {
    /// A human description (URL) for messages.
    fn describe(&self) -> String;
    /// Store the compressed bytes of chunk `hash`, unless it exists.
    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), StoreError>;
    /// The compressed bytes of chunk `hash`.
    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, StoreError>;
    /// Every chunk hash in the store (one listing, not one request each).
    fn list_chunks(&self) -> Result<Vec<ChunkHash>, StoreError>;
    /// Delete a chunk (garbage collection); absent is not an error.
    fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), StoreError>;
    /// Atomically create index `name`; fails if it exists.
    fn put_index(&self, name: &str, data: &[u8]) -> Result<(), StoreError>;
    /// The bytes of index `name`.
    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Names of all objects under `indexes/`, unsorted.
    fn list_indexes(&self) -> Result<Vec<String>, StoreError>;
    /// Delete index `name`; absent is not an error.
    fn delete_index(&self, name: &str) -> Result<(), StoreError>;
    /// Make every chunk put so far durable. Object stores are durable at
    /// put already; the default does nothing.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Relative object path of a chunk: `chunks/<first 2 hex>/<hex>`.
pub fn chunk_path(hash: &ChunkHash) -> String {
    let hex = hash.to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

/// Open the store named by `url`: a path or `file://…` (local), or
/// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
/// Cloud credentials come from the usual environment variables
/// (`AWS_*`, `GOOGLE_*`, `AZURE_*`); `AWS_ENDPOINT_URL` (or
/// `AWS_ENDPOINT`) points S3 at a compatible server.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    let invalid = |detail: &str| StoreError::InvalidUrl {
        url: url.to_owned(),
        detail: detail.to_owned(),
    };
    if url.is_empty() {
        return Err(invalid("it is empty"));
    }
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Box::new(LocalStore::open(path)?));
    }
    match url.split_once("://") {
        None => Ok(Box::new(LocalStore::open(url)?)),
        Some(("s3" | "gs" | "az", _)) => Ok(Box::new(ObjectStoreBackend::open(url)?)),
        Some((scheme, _)) => Err(invalid(&format!(
            "unknown scheme '{scheme}://' (use a path, file://, s3://, gs:// or az://)"
        ))),
    }
}
