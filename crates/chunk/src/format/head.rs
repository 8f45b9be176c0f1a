//! Backup index names, and the version 2 head: the small object written
//! last that makes a backup exist and lists its tree segments
//! (`docs/format.md`, "Backup indexes").

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::FormatError;
use crate::store::Id;

/// The format version of heads this code writes for a tree without hard
/// links (read by every btm since version 2 trees).
pub const FORMAT_VERSION: u32 = 2;
/// The format version of heads of trees with hard links: an older btm
/// refuses those rather than restore them without their links.
pub const LINKS_FORMAT_VERSION: u32 = 3;

/// The format version for a head of a tree with these totals.
pub fn format_for(totals: &Totals) -> u32 {
    if totals.links > 0 {
        LINKS_FORMAT_VERSION
    } else {
        FORMAT_VERSION
    }
}
/// The largest decoded head accepted.
const LIMIT: usize = 64 << 20;

/// A tag that is not 1 to 64 of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag '{0}' must be 1 to 64 characters from letters, digits, . _ -")]
pub struct BadTag(pub String);

/// Check a tag, so index names stay portable and unambiguous.
pub fn validate_tag(tag: &str) -> Result<(), BadTag> {
    let ok = (1..=64).contains(&tag.len())
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BadTag(tag.to_owned()))
    }
}

/// The name of an index: `<UTC time, ns precision>--<tag>`, which sorts
/// by time. Parsing splits at the first `--` after the fixed-width time,
/// so tags may themselves contain `--` and are matched exactly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// Counts over a backup's entries, kept in the head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    /// Entries of every kind.
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hard links: names of files counted once in `files` (format 3).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub links: u64,
    /// Sum of file sizes.
    pub bytes: u64,
    /// Sum of the lengths of non-empty chunks.
    pub stored_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Something a backup left out on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Excluded {
    /// The pattern that matched.
    pub pattern: String,
    /// Why it is excluded.
    pub why: String,
    /// How many entries it matched.
    pub matched: u64,
}

/// A version 2 backup head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// When the backup started.
    pub created: DateTime<Utc>,
    /// The tag.
    pub tag: String,
    /// The chunk size of the backup's files.
    pub chunk_size: u64,
    /// Free-form metadata (the daemon puts `height` here).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// The tree segments, in stream order.
    pub trees: Vec<Id>,
    /// Counts over the entries.
    pub totals: Totals,
    /// What was left out on purpose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
}

impl Head {
    /// The stored bytes: zstd-compressed JSON.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let json = serde_json::to_vec(self).map_err(|e| FormatError::new("head", e.to_string()))?;
        super::compress(&json, 3, "head")
    }

    /// The height in the metadata, if any.
    pub fn height(&self) -> Option<u64> {
        self.meta.get("height").and_then(|v| v.as_u64())
    }
}

/// A decoded backup index of either version.
#[derive(Debug, Clone)]
pub enum Decoded {
    /// Version 2: a head; the entries are in its trees.
    V2(Head),
    /// Version 1: the whole index.
    V1(Box<super::v1::Index>),
}

/// Why an index cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Not zstd, not JSON, not an index, or an entry that breaks the rules
    /// (see `docs/format.md`, "What a reader checks").
    #[error("backup {name} is unreadable: {detail}")]
    Corrupt {
        /// The index name.
        name: String,
        /// Why.
        detail: String,
    },
    /// Written by a newer btm.
    #[error(
        "backup {name} has format {found}; this btm reads formats 1 to {LINKS_FORMAT_VERSION}"
    )]
    Version {
        /// The index name.
        name: String,
        /// Its version.
        found: u64,
    },
}

/// Decode the stored bytes of index `name`, of either version. The
/// entries of a version 2 index are validated as they are read from its
/// trees; a version 1 index is validated whole here.
pub fn decode(name: &str, data: &[u8]) -> Result<Decoded, IndexError> {
    let corrupt = |detail: String| IndexError::Corrupt {
        name: name.to_owned(),
        detail,
    };
    let json = super::decompress(data, LIMIT, name).map_err(|e| corrupt(e.detail))?;
    let probe: serde_json::Value =
        serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))?;
    match probe.get("format").and_then(|v| v.as_u64()) {
        Some(1) => {
            let idx: super::v1::Index =
                serde_json::from_value(probe).map_err(|e| corrupt(e.to_string()))?;
            idx.validate().map_err(corrupt)?;
            Ok(Decoded::V1(Box::new(idx)))
        }
        Some(2 | 3) => {
            let head: Head = serde_json::from_value(probe).map_err(|e| corrupt(e.to_string()))?;
            validate_tag(&head.tag).map_err(|e| corrupt(e.to_string()))?;
            if head.format != format_for(&head.totals) {
                return Err(corrupt(format!(
                    "format {} does not match its {} hard links",
                    head.format, head.totals.links
                )));
            }
            if !(1..=super::tree::MAX_CHUNK).contains(&head.chunk_size) {
                return Err(corrupt(format!(
                    "chunk size {} out of range",
                    head.chunk_size
                )));
            }
            Ok(Decoded::V2(head))
        }
        found => Err(IndexError::Version {
            name: name.to_owned(),
            found: found.unwrap_or(0),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(validate_tag("a/b").is_err() && validate_tag(&"x".repeat(65)).is_err());
    }

    #[test]
    fn heads_round_trip_and_junk_is_refused() {
        let head = Head {
            format: FORMAT_VERSION,
            created: Utc::now(),
            tag: "t".into(),
            chunk_size: 1 << 20,
            meta: serde_json::Map::new(),
            trees: vec![Id::of(b"t")],
            totals: Totals::default(),
            excluded: Vec::new(),
        };
        match decode("n", &head.encode().expect("encode")) {
            Ok(Decoded::V2(h)) => assert_eq!(h, head),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode("n", b"junk"),
            Err(IndexError::Corrupt { .. })
        ));
        let future = zstd::bulk::compress(br#"{"format":99}"#, 1).expect("zstd");
        assert!(matches!(
            decode("n", &future),
            Err(IndexError::Version { found: 99, .. })
        ));
        let extra = zstd::bulk::compress(
            br#"{"format":2,"created":"2026-01-01T00:00:00Z","tag":"t","chunk_size":1,"meta":{},"trees":[],"totals":{"entries":0,"files":0,"dirs":0,"symlinks":0,"bytes":0,"stored_bytes":0},"surprise":1}"#,
            1,
        )
        .expect("zstd");
        assert!(matches!(
            decode("n", &extra),
            Err(IndexError::Corrupt { .. })
        ));
    }

    #[test]
    fn hard_links_make_a_format_3_head_and_only_they_do() {
        let head = |format: u32, links: u64| Head {
            format,
            created: Utc::now(),
            tag: "t".into(),
            chunk_size: 1 << 20,
            meta: serde_json::Map::new(),
            trees: vec![],
            totals: Totals {
                links,
                ..Totals::default()
            },
            excluded: Vec::new(),
        };
        assert_eq!(format_for(&head(0, 0).totals), FORMAT_VERSION);
        assert_eq!(format_for(&head(0, 2).totals), LINKS_FORMAT_VERSION);
        let decoded = |h: Head| decode("n", &h.encode().expect("encode"));
        assert!(matches!(decoded(head(3, 2)), Ok(Decoded::V2(h)) if h.totals.links == 2));
        // A head without links keeps version 2, and writes no `links`, so
        // an earlier btm reads it.
        let json = String::from_utf8(
            zstd::bulk::decompress(&head(2, 0).encode().expect("encode"), 1 << 20).expect("zstd"),
        )
        .expect("utf8");
        assert!(!json.contains("\"links\""), "{json}");
        for (format, links) in [(2, 1), (3, 0)] {
            assert!(
                matches!(
                    decoded(head(format, links)),
                    Err(IndexError::Corrupt { .. })
                ),
                "format {format} with {links} links"
            );
        }
    }
}
