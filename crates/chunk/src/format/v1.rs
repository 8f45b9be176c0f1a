//! Version 1 backup indexes (one zstd JSON document per backup, one store
//! object per chunk), read so that stores written by earlier btm stay
//! restorable and checkable. Nothing writes this format any more.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::tree::{self, ChunkRef, Entry, EntryKind};
use crate::store::Id;

/// A version 1 chunk reference (`o`, `l`, `h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1Chunk {
    /// Offset in the file.
    #[serde(rename = "o")]
    pub off: u64,
    /// Length.
    #[serde(rename = "l")]
    pub len: u64,
    /// Hash, absent for an empty chunk.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<Id>,
}

/// The kind of a version 1 entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum V1Kind {
    /// A file and its chunks.
    File {
        /// Size.
        size: u64,
        /// Chunks.
        chunks: Vec<V1Chunk>,
    },
    /// A directory.
    Dir,
    /// A symlink.
    Symlink {
        /// Its target.
        target: String,
    },
}

/// A version 1 entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1Entry {
    /// Relative path.
    pub path: String,
    /// What it is.
    #[serde(flatten)]
    pub kind: V1Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, ns.
    pub mtime_ns: i64,
    /// Change time, ns.
    pub ctime_ns: i64,
    /// Inode.
    pub ino: u64,
    /// Append-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append_only: bool,
}

/// A version 1 index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Always 1.
    pub format: u32,
    /// Chunk size.
    pub chunk_size: u64,
    /// When the backup started.
    pub created: DateTime<Utc>,
    /// The tag.
    pub tag: String,
    /// Metadata.
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Entries, parents before children.
    pub entries: Vec<V1Entry>,
}

impl Index {
    /// The height in the metadata, if any.
    pub fn height(&self) -> Option<u64> {
        self.meta.get("height").and_then(|v| v.as_u64())
    }

    /// The entries as the version 2 model, with each file's chunks.
    pub fn items(&self) -> impl Iterator<Item = (Entry, Vec<ChunkRef>)> + '_ {
        self.entries.iter().map(|e| {
            let (kind, chunks) = match &e.kind {
                V1Kind::File { size, chunks } => (
                    EntryKind::File { size: *size },
                    chunks
                        .iter()
                        .map(|c| ChunkRef {
                            off: c.off,
                            len: c.len,
                            hash: c.hash,
                        })
                        .collect(),
                ),
                V1Kind::Dir => (EntryKind::Dir, Vec::new()),
                V1Kind::Symlink { target } => (
                    EntryKind::Symlink {
                        target: target.as_bytes().to_vec(),
                    },
                    Vec::new(),
                ),
            };
            (
                Entry {
                    path: e.path.as_bytes().to_vec(),
                    kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    mtime_ns: e.mtime_ns,
                    ctime_ns: e.ctime_ns,
                    ino: e.ino,
                    append_only: e.append_only,
                    linked: false,
                },
                chunks,
            )
        })
    }

    /// The same rules as for version 2 streams: every path plain and
    /// relative, parents (directories) before children, nothing below a
    /// file or symlink, and chunks covering each file exactly. (Version 1
    /// did not require sorted siblings, so order is not checked.)
    pub fn validate(&self) -> Result<(), String> {
        let mut dirs = std::collections::HashSet::new();
        for (e, chunks) in self.items() {
            let bad = |d: &str| format!("entry '{}': {d}", e.display());
            tree::check_path(&e.path).map_err(bad)?;
            if let Some(i) = e.path.iter().rposition(|&c| c == b'/') {
                if !dirs.contains(&e.path[..i]) {
                    return Err(bad(
                        "its parent is not a directory of the backup (a file or symlink on the way?)",
                    ));
                }
            }
            match e.kind {
                EntryKind::Dir => {
                    dirs.insert(e.path.clone());
                }
                EntryKind::File { size } => {
                    let mut off = 0u64;
                    for c in &chunks {
                        if c.off != off || c.len == 0 || c.len > self.chunk_size {
                            return Err(bad("its chunks do not cover the file"));
                        }
                        off += c.len;
                    }
                    if off != size {
                        return Err(bad("its chunks do not cover the file"));
                    }
                }
                // Version 1 has no hard links.
                EntryKind::Symlink { .. } | EntryKind::Link { .. } => {}
            }
        }
        Ok(())
    }
}
