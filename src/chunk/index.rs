//! The backup index: one per backup, written last, naming every entry of
//! the backed-up tree and, for files, their chunks. Specified in
//! `docs/format.md`; this module is the single place that reads and
//! writes it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A chunk's address: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hash `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for ChunkHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("'{s}' is not a 64-digit lowercase hex hash"));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(ChunkHash(out))
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One chunk of a file: `len` bytes at `off`, stored under `hash`, or
/// empty (a hole or all zeros, never stored) when `hash` is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Offset in the file.
    #[serde(rename = "o")]
    pub off: u64,
    /// Length in bytes.
    #[serde(rename = "l")]
    pub len: u64,
    /// Hash of the bytes, or `None` for an empty chunk.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<ChunkHash>,
}

/// The kind of a tree entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file and its chunks.
    File {
        /// Size in bytes.
        size: u64,
        /// Chunks covering `0..size` in order, without gaps.
        chunks: Vec<ChunkRef>,
    },
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink {
        /// Where it points (not followed, never resolved at restore).
        target: String,
    },
}

/// One entry of the backed-up tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the backup root, `/`-separated, never absolute and
    /// never containing `.` or `..` components.
    pub path: String,
    /// What it is.
    #[serde(flatten)]
    pub kind: EntryKind,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Change time, nanoseconds since the epoch (unchanged-file rule).
    pub ctime_ns: i64,
    /// Inode number (unchanged-file rule).
    pub ino: u64,
    /// Marked append-only at backup: a restore trusts its existing prefix
    /// and fetches only the missing tail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append_only: bool,
}

/// A backup's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Chunk size used, bytes.
    pub chunk_size: u64,
    /// When the backup started.
    pub created: DateTime<Utc>,
    /// The tag.
    pub tag: String,
    /// Free-form metadata (the daemon puts `height` here).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Entries, parents before children.
    pub entries: Vec<Entry>,
}

/// Errors reading an index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Not zstd, not JSON, or not an index.
    #[error("index {name} is unreadable: {detail}")]
    Corrupt {
        /// The index name.
        name: String,
        /// Why.
        detail: String,
    },
    /// Written by a newer btm.
    #[error("index {name} has format {found}; this btm reads format {FORMAT_VERSION}")]
    Version {
        /// The index name.
        name: String,
        /// Its version.
        found: u32,
    },
}

impl Index {
    /// Serialize: JSON, zstd-compressed. Fails only if compression does;
    /// an index is never written in any other form.
    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        zstd::bulk::compress(&json, 3)
    }

    /// Parse what [`Index::encode`] wrote; `name` is for errors.
    pub fn decode(name: &str, data: &[u8]) -> Result<Self, IndexError> {
        let corrupt = |detail: String| IndexError::Corrupt {
            name: name.to_owned(),
            detail,
        };
        let json = zstd::stream::decode_all(data).map_err(|e| corrupt(e.to_string()))?;
        let probe: serde_json::Value =
            serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))?;
        let found = probe.get("format").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if found != FORMAT_VERSION {
            return Err(IndexError::Version {
                name: name.to_owned(),
                found,
            });
        }
        serde_json::from_value(probe).map_err(|e| corrupt(e.to_string()))
    }

    /// The height in the metadata, if any.
    pub fn height(&self) -> Option<u64> {
        self.meta.get("height").and_then(|v| v.as_u64())
    }
}

/// A tag: 1..=64 of `A-Z a-z 0-9 . _ -`, so index names stay portable and
/// unambiguous.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > 64 {
        return Err(format!("tag '{tag}' must be 1 to 64 characters"));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "tag '{tag}' contains {c:?}; use letters, digits, . _ -"
        ));
    }
    Ok(())
}

/// The name of an index: `<UTC time, ns precision>--<tag>`, which sorts
/// by time. Parsing splits at the first `--` after the fixed-width time,
/// so tags may themselves contain `--` and are matched exactly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexName {
    /// The time part.
    pub time: String,
    /// The tag part.
    pub tag: String,
}

const TIME_FORMAT: &str = "%Y%m%dT%H%M%S%.9fZ";
const TIME_LEN: usize = "20260101T000000.000000000Z".len();

impl IndexName {
    /// The name for a backup with `tag` started at `at`.
    pub fn new(at: DateTime<Utc>, tag: &str) -> Self {
        IndexName {
            time: at.format(TIME_FORMAT).to_string(),
            tag: tag.to_owned(),
        }
    }

    /// Parse a name; `None` for anything that is not an index name.
    pub fn parse(name: &str) -> Option<Self> {
        if name.len() <= TIME_LEN + 2 || !name.is_char_boundary(TIME_LEN) {
            return None;
        }
        let (time, rest) = name.split_at(TIME_LEN);
        let tag = rest.strip_prefix("--")?;
        chrono::NaiveDateTime::parse_from_str(time, TIME_FORMAT).ok()?;
        validate_tag(tag).ok()?;
        Some(IndexName {
            time: time.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl fmt::Display for IndexName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}--{}", self.time, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip() {
        let h = ChunkHash::of(b"hello");
        assert_eq!(h.to_hex().parse::<ChunkHash>(), Ok(h));
        assert!("xyz".parse::<ChunkHash>().is_err());
        assert!(h.to_hex().to_uppercase().parse::<ChunkHash>().is_err());
    }

    #[test]
    fn names_sort_by_time_and_keep_tags_exact() {
        let t1 = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
            .expect("t")
            .to_utc();
        let t2 = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456790Z")
            .expect("t")
            .to_utc();
        let a = IndexName::new(t1, "prod");
        let b = IndexName::new(t2, "a");
        assert!(a.to_string() < b.to_string());
        assert_eq!(IndexName::parse(&a.to_string()), Some(a.clone()));
        let weird = IndexName::new(t1, "x--y");
        assert_eq!(
            IndexName::parse(&weird.to_string()).map(|n| n.tag),
            Some("x--y".into())
        );
        for bad in [
            "",
            "20260102T030405.123456789Z--",
            "2026--prod",
            "20260102T030405.123456789Z-prod",
            "20260102T030405.123456789Z--a/b",
        ] {
            assert_eq!(IndexName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn index_round_trips_and_rejects_junk() {
        let idx = Index {
            format: FORMAT_VERSION,
            chunk_size: 4 << 20,
            created: Utc::now(),
            tag: "t".into(),
            meta: serde_json::Map::new(),
            entries: vec![Entry {
                path: "a".into(),
                kind: EntryKind::File {
                    size: 5,
                    chunks: vec![ChunkRef {
                        off: 0,
                        len: 5,
                        hash: Some(ChunkHash::of(b"hello")),
                    }],
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 1,
                ctime_ns: 2,
                ino: 3,
                append_only: false,
            }],
        };
        assert_eq!(
            Index::decode("n", &idx.encode().expect("encodes")).expect("decodes"),
            idx
        );
        assert!(matches!(
            Index::decode("n", b"junk"),
            Err(IndexError::Corrupt { .. })
        ));
        let future = zstd::bulk::compress(br#"{"format":99}"#, 1).expect("zstd");
        assert!(matches!(
            Index::decode("n", &future),
            Err(IndexError::Version { found: 99, .. })
        ));
    }
}
