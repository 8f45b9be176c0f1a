//! A repository: an opened store with its metadata cache and its
//! connection budget, the one handle every operation on a store takes.
//! Operations used to receive the three separately and pass them down by
//! hand; now they pass the handle.

use std::path::Path;
use std::sync::Arc;

use crate::backup::{BackupOptions, BackupSummary};
use crate::cache::Cache;
use crate::check::CheckReport;
use crate::format::head::Decoded;
use crate::gc::{GcOptions, GcReport};
use crate::restore::{RestoreOptions, RestoreSummary};
use crate::store::Store;
use crate::ChunkError;

/// An opened store, its cache and how many requests it may have in flight.
#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn Store>,
    cache: Option<Cache>,
    connections: Option<usize>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("store", &self.store.describe())
            .field("cache", &self.cache)
            .field("connections", &self.connections)
            .finish()
    }
}

impl Repo {
    /// `store` with the default cache (`~/.cache/btm`, if there is a home)
    /// and each operation's default number of connections.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Repo {
            store,
            cache: Cache::default_dir().map(Cache::new),
            connections: None,
        }
    }

    /// Use `cache` for metadata (`None`: no cache).
    pub fn with_cache(mut self, cache: Option<Cache>) -> Self {
        self.cache = cache;
        self
    }

    /// Keep at most `n` requests in flight (`None`: each operation's
    /// default for this kind of store).
    pub fn with_connections(mut self, n: Option<usize>) -> Self {
        self.connections = n.map(|n| n.max(1));
        self
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The metadata cache, if any.
    pub fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref()
    }

    /// Requests in flight for uploads: packs are large, so few.
    pub fn upload_connections(&self) -> usize {
        let local = self.store.local_root().is_some();
        self.connections.unwrap_or(if local { 2 } else { 4 })
    }

    /// Requests in flight for reads: small and cheap to have in flight,
    /// so more than for uploads; as many per place serving the store
    /// ([`Store::sources`]: a restore's mirrors).
    pub fn read_connections(&self) -> usize {
        let local = self.store.local_root().is_some();
        let sources = self.store.sources().max(1);
        self.connections
            .unwrap_or(if local { 4 } else { 16 } * sources)
    }

    /// The entries of backup `name` (`index`), streamed and validated;
    /// see [`crate::inventory::entries`].
    pub fn entries<'a>(&'a self, name: &str, index: &Decoded) -> crate::inventory::Entries<'a> {
        crate::inventory::entries(
            self.store(),
            self.cache(),
            name,
            index,
            self.read_connections(),
        )
    }

    /// Requests in flight for metadata (pack indexes, tree segments, pack
    /// trailers): small objects whose cost is all round trip, so many at
    /// once. A cold cache over a store of a few hundred pack indexes is
    /// then a handful of round trips, not one per four indexes.
    pub fn metadata_connections(&self) -> usize {
        let local = self.store.local_root().is_some();
        self.connections.unwrap_or(if local { 4 } else { 32 })
    }

    /// Back up `root`; see [`crate::backup`].
    pub fn backup(&self, root: &Path, opts: &BackupOptions) -> Result<BackupSummary, ChunkError> {
        crate::backup::backup(self, root, opts)
    }

    /// Restore backup `name` into `dest`; see [`crate::restore`].
    pub fn restore(
        &self,
        name: &str,
        index: &Decoded,
        dest: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreSummary, ChunkError> {
        crate::restore::restore(self, name, index, dest, opts)
    }

    /// Check the store; see [`crate::check`].
    pub fn check(&self, read_data: bool) -> Result<CheckReport, ChunkError> {
        crate::check::check(
            self.store(),
            read_data,
            self.cache(),
            self.read_connections(),
        )
    }

    /// Collect garbage; see [`crate::gc`].
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport, ChunkError> {
        crate::gc::gc(self, opts)
    }

    /// Forget backup `name` (its head only; GC frees its data).
    pub fn forget(&self, name: &str, dry_run: bool) -> Result<(), ChunkError> {
        crate::inventory::forget(self.store(), name, dry_run)
    }

    /// Forget all but the newest `keep` backups of `tag`; the names
    /// forgotten (or that would be, with `dry_run`).
    pub fn prune(&self, tag: &str, keep: u64, dry_run: bool) -> Result<Vec<String>, ChunkError> {
        crate::keep::prune_backups(self.store(), tag, keep, dry_run)
    }
}
