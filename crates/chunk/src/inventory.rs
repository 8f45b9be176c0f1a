//! The store's backups: listing them, reading and selecting one, forgetting
//! one, and streaming its entries.
//!
//! One unreadable index must not take its tag down with it: selecting the
//! latest backup skips (and logs) indexes that cannot be read, listings
//! show them with their error, and only GC refuses to go on, because it
//! cannot know what such an index references. Every entry stream, of either
//! format version, goes through the format's validator
//! ([`super::format::tree::TreeReader`], or [`super::format::v1`]).

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::cache::Cache;
use super::format::head::{self, Decoded, Excluded, IndexName};
use super::format::tree::{ChunkRef, Entry, EntryKind, Item, TreeReader};
use super::{with_retry, ChunkError};
use crate::store::{Id, Kind, Store, StoreError};

impl Decoded {
    /// The format version.
    pub fn format(&self) -> u32 {
        match self {
            Decoded::V2(h) => h.format,
            Decoded::V1(i) => i.format,
        }
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        match self {
            Decoded::V2(h) => &h.tag,
            Decoded::V1(i) => &i.tag,
        }
    }

    /// Metadata.
    pub fn meta(&self) -> &serde_json::Map<String, serde_json::Value> {
        match self {
            Decoded::V2(h) => &h.meta,
            Decoded::V1(i) => &i.meta,
        }
    }

    /// The height in the metadata, if any.
    pub fn height(&self) -> Option<u64> {
        self.meta().get("height").and_then(|v| v.as_u64())
    }

    /// When the backup started.
    pub fn created(&self) -> DateTime<Utc> {
        match self {
            Decoded::V2(h) => h.created,
            Decoded::V1(i) => i.created,
        }
    }

    /// The chunk size of its files.
    pub fn chunk_size(&self) -> u64 {
        match self {
            Decoded::V2(h) => h.chunk_size,
            Decoded::V1(i) => i.chunk_size,
        }
    }

    /// What it left out on purpose.
    pub fn excluded(&self) -> &[Excluded] {
        match self {
            Decoded::V2(h) => &h.excluded,
            Decoded::V1(_) => &[],
        }
    }
}

/// A backup as listed.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    /// The index name.
    pub name: String,
    /// The tag.
    pub tag: String,
    /// The format version (absent when unreadable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<u32>,
    /// Metadata (from the index).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Files in the backup.
    pub files: u64,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Bytes in non-empty chunks: what the files occupy on disk when
    /// restored sparse.
    pub disk_bytes: u64,
    /// What it left out on purpose, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
    /// Why the index cannot be read, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl BackupInfo {
    /// Summarise index `name`.
    pub fn of(name: &str, idx: &Decoded) -> Self {
        let (files, logical, disk) = match idx {
            Decoded::V2(h) => (h.totals.files, h.totals.bytes, h.totals.stored_bytes),
            Decoded::V1(i) => i
                .items()
                .fold((0, 0, 0), |(f, l, d), (e, chunks)| match e.kind {
                    EntryKind::File { size } => (
                        f + 1,
                        l + size,
                        d + chunks
                            .iter()
                            .filter(|c| c.hash.is_some())
                            .map(|c| c.len)
                            .sum::<u64>(),
                    ),
                    _ => (f, l, d),
                }),
        };
        BackupInfo {
            name: name.to_owned(),
            tag: idx.tag().to_owned(),
            format: Some(idx.format()),
            meta: idx.meta().clone(),
            files,
            logical_bytes: logical,
            disk_bytes: disk,
            excluded: idx.excluded().to_vec(),
            error: None,
        }
    }

    /// A listing entry for an index that cannot be read.
    pub fn unreadable(name: &IndexName, error: &ChunkError) -> Self {
        BackupInfo {
            name: name.to_string(),
            tag: name.tag.clone(),
            format: None,
            meta: serde_json::Map::new(),
            files: 0,
            logical_bytes: 0,
            disk_bytes: 0,
            excluded: Vec::new(),
            error: Some(error.to_string()),
        }
    }
}

/// Index names in the store, newest first, optionally only those with
/// exactly `tag`. Objects that are not index names are ignored.
pub fn list_backups(store: &dyn Store, tag: Option<&str>) -> Result<Vec<IndexName>, ChunkError> {
    let mut names: Vec<IndexName> = with_retry(store, || store.list_indexes())
        .map_err(|e| ChunkError::store("listing backups", e))?
        .iter()
        .filter_map(|n| IndexName::parse(n))
        .filter(|n| tag.is_none_or(|t| n.tag == t))
        .collect();
    names.sort_by(|a, b| b.cmp(a));
    Ok(names)
}

/// Read and decode one index.
pub fn read_index(store: &dyn Store, name: &str) -> Result<Decoded, ChunkError> {
    let data = with_retry(store, || store.get_index(name)).map_err(|e| match e {
        StoreError::NotFound(_) => {
            ChunkError::NoBackup(format!("no backup named {name} in {}", store.describe()))
        }
        e => ChunkError::store(format!("reading backup {name}"), e),
    })?;
    Ok(head::decode(name, &data)?)
}

/// The newest backup with exactly `tag` (and, with `max_height`, whose
/// metadata height is at most that). Indexes that cannot be read are
/// skipped with a warning; a store failure is an error.
pub fn latest(
    store: &dyn Store,
    tag: &str,
    max_height: Option<u64>,
) -> Result<Option<(String, Decoded)>, ChunkError> {
    latest_where(store, tag, max_height, |_| true)
}

/// [`latest`] among the backups `keep` accepts (`latest --chain`: those
/// of one chain).
pub fn latest_where(
    store: &dyn Store,
    tag: &str,
    max_height: Option<u64>,
    keep: impl Fn(&Decoded) -> bool,
) -> Result<Option<(String, Decoded)>, ChunkError> {
    newest_where(store, list_backups(store, Some(tag))?, max_height, keep)
}

/// [`latest`] among `names`, a listing already made (newest first). A
/// backup forgotten since the listing is passed over.
pub fn newest_readable(
    store: &dyn Store,
    names: Vec<IndexName>,
    max_height: Option<u64>,
) -> Result<Option<(String, Decoded)>, ChunkError> {
    newest_where(store, names, max_height, |_| true)
}

/// [`newest_readable`] among the backups `keep` accepts.
fn newest_where(
    store: &dyn Store,
    names: Vec<IndexName>,
    max_height: Option<u64>,
    keep: impl Fn(&Decoded) -> bool,
) -> Result<Option<(String, Decoded)>, ChunkError> {
    for name in names {
        let name = name.to_string();
        let idx = match read_index(store, &name) {
            Ok(i) => i,
            Err(e @ ChunkError::Index(_)) => {
                tracing::warn!(backup = %name, error = %e, "skipping an unreadable backup");
                continue;
            }
            Err(ChunkError::NoBackup(_)) => continue,
            Err(e) => return Err(e),
        };
        match max_height {
            Some(h) if idx.height().is_none_or(|ih| ih > h) => continue,
            _ if !keep(&idx) => continue,
            _ => return Ok(Some((name, idx))),
        }
    }
    Ok(None)
}

/// Delete the index of backup `name` (its data goes at the next GC). With
/// `dry_run`, only check that it exists.
pub fn forget(store: &dyn Store, name: &str, dry_run: bool) -> Result<(), ChunkError> {
    let exists = with_retry(store, || store.list_indexes())
        .map_err(|e| ChunkError::store("listing backups", e))?
        .iter()
        .any(|n| n == name);
    if !exists {
        return Err(ChunkError::NoBackup(format!(
            "no backup named {name} in {}",
            store.describe()
        )));
    }
    if !dry_run {
        with_retry(store, || store.delete_index(name))
            .map_err(|e| ChunkError::store(format!("deleting backup {name}"), e))?;
    }
    Ok(())
}

/// Fetch a tree segment: from the cache when there, else from the store
/// (and then cached). Its content must match its name.
pub fn fetch_tree(
    store: &dyn Store,
    cache: Option<&Cache>,
    id: &Id,
) -> Result<crate::store::Bytes, ChunkError> {
    if let Some(data) = cache.and_then(|c| c.get(Kind::Tree, id)) {
        return Ok(data);
    }
    let data = with_retry(store, || store.get(Kind::Tree, id))
        .map_err(|e| ChunkError::store(format!("reading tree segment {id}"), e))?;
    if Id::of(&data) != *id {
        return Err(ChunkError::Format(super::format::FormatError::new(
            format!("tree segment {id}"),
            "content does not match its name",
        )));
    }
    if let Some(c) = cache {
        c.put(Kind::Tree, id, &data);
    }
    Ok(data)
}

/// The validated entries of one backup, in walk order (v2) or index order
/// (v1), each file's chunks following it.
pub struct Entries<'a> {
    name: String,
    inner: Inner<'a>,
}

enum Inner<'a> {
    V1 {
        items: std::vec::IntoIter<(Entry, Vec<ChunkRef>)>,
        chunks: Option<Vec<ChunkRef>>,
    },
    V2 {
        store: &'a dyn Store,
        cache: Option<&'a Cache>,
        head: Box<head::Head>,
        next: usize,
        fetched: VecDeque<crate::store::Bytes>,
        reader: Box<TreeReader>,
        connections: usize,
        done: bool,
    },
}

/// Tree segments fetched at once ahead of the reader. A segment is up to
/// 4 MiB decoded (a few hundred KiB stored, typically), so this bounds
/// what a tree costs in memory whatever the number of connections; a
/// segment holds thousands of entries, so a few round trips cover a tree
/// of a million files.
const SEGMENTS_AHEAD: usize = 8;

/// Stream the entries of backup `name`; tree segments are fetched
/// `connections` at a time, at most `SEGMENTS_AHEAD` (8) ahead of the
/// reader.
pub fn entries<'a>(
    store: &'a dyn Store,
    cache: Option<&'a Cache>,
    name: &str,
    index: &Decoded,
    connections: usize,
) -> Entries<'a> {
    let inner = match index {
        Decoded::V1(i) => Inner::V1 {
            items: i.items().collect::<Vec<_>>().into_iter(),
            chunks: None,
        },
        Decoded::V2(h) => Inner::V2 {
            store,
            cache,
            head: Box::new(h.clone()),
            next: 0,
            fetched: VecDeque::new(),
            reader: Box::new(TreeReader::new(h.chunk_size)),
            connections: connections.max(1),
            done: false,
        },
    };
    Entries {
        name: name.to_owned(),
        inner,
    }
}

/// Fetch the next batch of `head`'s segments (from `next`) into `fetched`.
fn fetch_batch(
    store: &dyn Store,
    cache: Option<&Cache>,
    head: &head::Head,
    next: &mut usize,
    fetched: &mut VecDeque<crate::store::Bytes>,
    connections: usize,
) -> Result<(), ChunkError> {
    if *next >= head.trees.len() {
        return Ok(());
    }
    let ahead = (connections * 2).min(SEGMENTS_AHEAD);
    let batch = &head.trees[*next..(*next + ahead).min(head.trees.len())];
    let got = crate::pipeline::pool::map(batch, connections, |id| fetch_tree(store, cache, id));
    for g in got {
        fetched.push_back(g?);
    }
    *next += batch.len();
    Ok(())
}

impl Entries<'_> {
    /// Fetch the first segments now, before the first item is asked for:
    /// a caller with other round trips to wait for overlaps this one with
    /// them. A failure is reported again by [`Entries::next_item`].
    pub fn prefetch(&mut self) {
        if let Inner::V2 {
            store,
            cache,
            head,
            next,
            fetched,
            connections,
            ..
        } = &mut self.inner
        {
            if fetched.is_empty() && *next == 0 {
                let mut got = VecDeque::new();
                let mut at = 0;
                if fetch_batch(*store, *cache, head, &mut at, &mut got, *connections).is_ok() {
                    (*fetched, *next) = (got, at);
                }
            }
        }
    }

    /// The next item; `None` at the end of the stream.
    pub fn next_item(&mut self) -> Result<Option<Item>, ChunkError> {
        let name = &self.name;
        match &mut self.inner {
            Inner::V1 { items, chunks } => {
                if let Some(c) = chunks.take() {
                    if !c.is_empty() {
                        return Ok(Some(Item::Chunks(c)));
                    }
                }
                Ok(items.next().map(|(e, c)| {
                    *chunks = Some(c);
                    Item::Entry(e)
                }))
            }
            Inner::V2 {
                store,
                cache,
                head,
                next,
                fetched,
                reader,
                connections,
                done,
            } => loop {
                if *done {
                    return Ok(None);
                }
                let corrupt = |e: super::format::FormatError| {
                    ChunkError::Index(head::IndexError::Corrupt {
                        name: name.clone(),
                        detail: e.to_string(),
                    })
                };
                if let Some(item) = reader.next_item().map_err(corrupt)? {
                    return Ok(Some(item));
                }
                if fetched.is_empty() {
                    fetch_batch(*store, *cache, head, next, fetched, *connections)?;
                }
                match fetched.pop_front() {
                    Some(seg) => {
                        let what = format!("tree segment of {name}");
                        reader.feed(&seg, &what).map_err(corrupt)?;
                    }
                    None => {
                        let totals = reader.finish().map_err(corrupt)?;
                        if totals != head.totals {
                            return Err(corrupt(super::format::FormatError::new(
                                "totals",
                                "the entries do not match the head's totals",
                            )));
                        }
                        *done = true;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::head::{Head, Totals, FORMAT_VERSION};
    use crate::store::MemStore;
    use chrono::{TimeZone, Utc};

    fn put_head(store: &MemStore, secs: i64) -> IndexName {
        let created = Utc
            .timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .expect("time");
        let name = IndexName::new(created, "t");
        let head = Head {
            format: FORMAT_VERSION,
            created,
            tag: "t".into(),
            chunk_size: 1 << 20,
            meta: serde_json::Map::new(),
            trees: Vec::new(),
            totals: Totals::default(),
            excluded: Vec::new(),
        };
        store
            .put_index(&name.to_string(), &head.encode().expect("encode"))
            .expect("put");
        name
    }

    /// A backup listed, then forgotten before its head was read (a backup
    /// that lists while it takes its lease), is passed over for the next.
    #[test]
    fn newest_readable_passes_over_a_backup_forgotten_since_the_listing() {
        let store = MemStore::new();
        let older = put_head(&store, 0);
        let newer = put_head(&store, 60);
        let names = list_backups(&store, Some("t")).expect("list");
        assert_eq!(names, vec![newer.clone(), older.clone()]);
        store.delete_index(&newer.to_string()).expect("forget");
        let (name, _) = newest_readable(&store, names, None)
            .expect("read")
            .expect("one left");
        assert_eq!(name, older.to_string());
        store.delete_index(&older.to_string()).expect("forget");
        assert!(newest_readable(&store, vec![newer, older], None)
            .expect("read")
            .is_none());
    }
}
