//! Which chain a backup holds and which chain a directory holds, so that
//! a restore never lays one chain's data over another's (a testnet export
//! over a mainnet node, one network's snapshot over another's: the wrong
//! AppHash after a restore that operators meet most often).
//!
//! A backup says its chain in its metadata: an export records the node's
//! identity (`meta.chain`, [`crate::height::identity::ChainIdentity`]),
//! and `btm backup --chain ID` records `meta.chain_id` by hand. A
//! directory's chain comes from btm's record of the last restore into it
//! (kept per user, outside the directory) or, where that is cheap and
//! certain, from the node's own files: a CometBFT home's `genesis.json`.
//!
//! Deciding is pure ([`Chain::differs`]); reading and recording are the
//! functions below it.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What names a chain. Two chains are known to differ when one of these
/// is known on both sides and differs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// The chain's id: CometBFT's chain id, Bitcoin Core's chain name,
    /// Ethereum's chain id, a genesis hash where the dialect names chains
    /// so (Substrate, Solana), the beacon genesis validators root, or what
    /// `btm backup --chain` was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The hash of its block 0, where the node tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genesis: Option<String>,
}

/// Where two chains differ: which field, and each side's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// "chain id" or "genesis hash".
    pub field: &'static str,
    /// This side's value.
    pub ours: String,
    /// The other side's.
    pub theirs: String,
}

impl Chain {
    /// The chain a backup's metadata names, if any: `meta.chain` (an
    /// export's identity of the node) or `meta.chain_id` (by hand).
    pub fn of_meta(meta: &Map<String, Value>) -> Option<Chain> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let recorded = meta.get("chain");
        let chain = Chain {
            id: text(recorded.and_then(|c| c.get("chain_id"))).or(text(meta.get("chain_id"))),
            genesis: text(recorded.and_then(|c| c.get("genesis_hash"))),
        };
        chain.is_known().then_some(chain)
    }

    /// Whether `name` names this chain: its id, or its genesis hash.
    pub fn is(&self, name: &str) -> bool {
        self.id.as_deref() == Some(name)
            || self.genesis.as_deref().is_some_and(|g| same_hash(g, name))
    }

    /// Whether anything names the chain.
    pub fn is_known(&self) -> bool {
        self.id.is_some() || self.genesis.is_some()
    }

    /// Where `self` and `other` are known to differ; `None` when they are
    /// the same chain or nothing says they are not. Hashes compare
    /// ignoring ASCII case and a `0x` prefix, ids exactly.
    pub fn differs(&self, other: &Chain) -> Option<Difference> {
        let both = |a: &Option<String>, b: &Option<String>| Some((a.clone()?, b.clone()?));
        if let Some((ours, theirs)) = both(&self.id, &other.id) {
            if ours != theirs {
                return Some(Difference {
                    field: "chain id",
                    ours,
                    theirs,
                });
            }
        }
        if let Some((ours, theirs)) = both(&self.genesis, &other.genesis) {
            if !same_hash(&ours, &theirs) {
                return Some(Difference {
                    field: "genesis hash",
                    ours,
                    theirs,
                });
            }
        }
        None
    }

    /// "chain cosmoshub-4, genesis 0x…": for one line of output.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = &self.id {
            parts.push(format!("chain {id}"));
        }
        if let Some(g) = &self.genesis {
            parts.push(format!("genesis {g}"));
        }
        parts.join(", ")
    }
}

/// Whether two hashes are the same, whatever their case and `0x`.
fn same_hash(a: &str, b: &str) -> bool {
    let hex = |h: &str| h.trim_start_matches("0x").to_ascii_lowercase();
    hex(a) == hex(b)
}

/// How a directory's chain was learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// btm restored backup `backup` into it last.
    Restored {
        /// The backup.
        backup: String,
    },
    /// Its CometBFT `genesis.json` says so.
    Genesis(PathBuf),
}

impl std::fmt::Display for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Known::Restored { backup } => write!(f, "restored from {backup}"),
            Known::Genesis(p) => write!(f, "{}", p.display()),
        }
    }
}

/// btm's record of the last restore into a directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The directory, as restored into.
    dir: PathBuf,
    /// Its device, inode and birth time (where the file system keeps
    /// one) then: a directory removed and made again is not the one
    /// restored into, even when it gets the same inode back.
    dev: u64,
    ino: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    born: Option<u128>,
    /// The backup restored.
    backup: String,
    /// Its chain.
    chain: Chain,
}

/// Which directory `meta` is: device, inode, and birth time in
/// nanoseconds where the file system records one.
fn identity(meta: &std::fs::Metadata) -> (u64, u64, Option<u128>) {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        // ext4 with small inodes answers 0: no birth time kept.
        .filter(|n| *n > 0);
    (meta.dev(), meta.ino(), born)
}

/// Where the records of restores are kept: `$BTM_STATE_DIR/restored` for
/// root (`/var/lib/btm/restored`), else `$XDG_STATE_HOME/btm/restored`
/// (`~/.local/state/btm/restored`).
pub fn records_dir() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(btm::dirs::state_dir().join("restored"));
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .map(|d| d.join("btm/restored"))
}

/// The record file of `dir` (canonical) under `records`.
fn record_path(records: &Path, dir: &Path) -> PathBuf {
    let key = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    records.join(format!("{}.json", &key[..32]))
}

/// The chain `dir` holds, if it is known: from the record of the last
/// restore into it (under `records`), else from a CometBFT
/// `config/genesis.json` in it. An empty or missing directory holds none.
pub fn of_directory(dir: &Path, records: Option<&Path>) -> Option<(Chain, Known)> {
    let meta = std::fs::metadata(dir).ok()?;
    let empty = std::fs::read_dir(dir).ok()?.next().is_none();
    if !meta.is_dir() || empty {
        return None;
    }
    let canonical = dir.canonicalize().ok()?;
    let recorded = records
        .and_then(|r| std::fs::read(record_path(r, &canonical)).ok())
        .and_then(|data| serde_json::from_slice::<Record>(&data).ok())
        .filter(|r| r.dir == canonical && (r.dev, r.ino, r.born) == identity(&meta));
    // A record of a backup that named no chain says nothing.
    if let Some(r) = recorded.filter(|r| r.chain.is_known()) {
        return Some((r.chain, Known::Restored { backup: r.backup }));
    }
    let genesis = canonical.join("config/genesis.json");
    let id = genesis_chain_id(&genesis)?;
    Some((
        Chain {
            id: Some(id),
            genesis: None,
        },
        Known::Genesis(genesis),
    ))
}

/// The `chain_id` of a CometBFT `genesis.json`, read from its start: the
/// file can be gigabytes (a chain's whole exported state), and CometBFT
/// writes `chain_id` among the first keys, before `app_state`. A key
/// found only after `app_state` starts could be the application's, so it
/// is not taken.
fn genesis_chain_id(path: &Path) -> Option<String> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(64 << 10)
        .read_to_end(&mut head)
        .ok()?;
    let text = String::from_utf8_lossy(&head);
    let at = text.find("\"chain_id\"")?;
    if text.find("\"app_state\"").is_some_and(|app| app < at) {
        return None;
    }
    let rest = text[at + "\"chain_id\"".len()..].trim_start();
    let value = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let id = &value[..value.find('"')?];
    (!id.is_empty()).then(|| id.to_owned())
}

/// Record that `backup` (holding `chain`) was restored into `dir`, so
/// that the next restore into it knows. Replaced atomically.
pub fn record(records: &Path, dir: &Path, backup: &str, chain: &Chain) -> std::io::Result<()> {
    let canonical = dir.canonicalize()?;
    let meta = std::fs::metadata(&canonical)?;
    let (dev, ino, born) = identity(&meta);
    let r = Record {
        dir: canonical.clone(),
        dev,
        ino,
        born,
        backup: backup.to_owned(),
        chain: chain.clone(),
    };
    std::fs::create_dir_all(records)?;
    let path = record_path(records, &canonical);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&r).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(id: Option<&str>, genesis: Option<&str>) -> Chain {
        Chain {
            id: id.map(str::to_owned),
            genesis: genesis.map(str::to_owned),
        }
    }

    #[test]
    fn a_backup_names_its_chain_by_export_or_by_hand() {
        let meta: Map<String, Value> = serde_json::from_str(
            r#"{"chain":{"kind":"ethereum","height":5,"block_hash":"0xab","chain_id":"1","genesis_hash":"0xD4E5"}}"#,
        )
        .expect("json");
        assert_eq!(
            Chain::of_meta(&meta),
            Some(chain(Some("1"), Some("0xD4E5")))
        );
        let meta: Map<String, Value> =
            serde_json::from_str(r#"{"chain_id":"osmosis-1"}"#).expect("json");
        assert_eq!(Chain::of_meta(&meta), Some(chain(Some("osmosis-1"), None)));
        let meta: Map<String, Value> =
            serde_json::from_str(r#"{"chain":{"block_hash":"0xab"},"height":3}"#).expect("json");
        assert_eq!(Chain::of_meta(&meta), None);
    }

    #[test]
    fn chains_differ_only_where_both_sides_know() {
        let a = chain(Some("cosmoshub-4"), None);
        let d = a
            .differs(&chain(Some("theta-testnet-001"), None))
            .expect("differ");
        assert_eq!(
            (d.field, d.ours.as_str(), d.theirs.as_str()),
            ("chain id", "cosmoshub-4", "theta-testnet-001")
        );
        assert_eq!(a.differs(&chain(None, Some("0x01"))), None);
        assert_eq!(a.differs(&Chain::default()), None);
        let g = chain(None, Some("0xABcd"));
        assert_eq!(g.differs(&chain(Some("1"), Some("abCD"))), None);
        assert_eq!(
            g.differs(&chain(None, Some("0xabce"))).map(|d| d.field),
            Some("genesis hash")
        );
    }

    proptest! {
        /// Differing is symmetric, and a chain never differs from itself.
        #[test]
        fn differing_is_symmetric(
            a in proptest::option::of("[a-c]{1,2}"), b in proptest::option::of("[a-c]{1,2}"),
            g in proptest::option::of("(0x)?[aAbB]{1,2}"), h in proptest::option::of("(0x)?[aAbB]{1,2}"),
        ) {
            let x = Chain { id: a, genesis: g };
            let y = Chain { id: b, genesis: h };
            prop_assert_eq!(x.differs(&y).is_some(), y.differs(&x).is_some());
            prop_assert_eq!(x.differs(&x), None);
        }
    }

    #[test]
    fn a_directory_is_known_by_its_record_or_its_genesis() {
        // tmpfs keeps birth times, which tell a directory made again apart
        // from the one restored into even when its inode comes back.
        let t = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tmp");
        let records = t.path().join("records");
        let dir = t.path().join("node");
        std::fs::create_dir_all(dir.join("config")).expect("mkdir");
        assert_eq!(of_directory(&dir, Some(&records)), None, "empty");
        std::fs::write(
            dir.join("config/genesis.json"),
            r#"{ "genesis_time": "2019-12-11T16:11:34Z", "chain_id" : "cosmoshub-4", "app_state": {"chain_id": "x"} }"#,
        )
        .expect("genesis");
        let (c, known) = of_directory(&dir, Some(&records)).expect("genesis");
        assert_eq!(c, chain(Some("cosmoshub-4"), None));
        assert!(matches!(known, Known::Genesis(_)));
        // A record of a restore wins over the files.
        record(&records, &dir, "b1", &chain(Some("osmosis-1"), None)).expect("record");
        let (c, known) = of_directory(&dir, Some(&records)).expect("record");
        assert_eq!(c, chain(Some("osmosis-1"), None));
        assert_eq!(known.to_string(), "restored from b1");
        // The directory removed and made again is not the one restored,
        // even with its inode back: its birth time differs (on file
        // systems that keep one, as ext4, btrfs, XFS and tmpfs do).
        std::fs::remove_dir_all(&dir).expect("rm");
        std::thread::sleep(std::time::Duration::from_millis(2));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("f"), b"x").expect("f");
        let meta = std::fs::metadata(&dir).expect("stat");
        if identity(&meta).2.is_some() {
            assert_eq!(of_directory(&dir, Some(&records)), None);
        }
    }

    #[test]
    fn a_chain_id_found_only_inside_app_state_is_not_taken() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("genesis.json");
        std::fs::write(
            &p,
            r#"{"app_state":{"ibc":{"chain_id":"other"}},"chain_id":"late"}"#,
        )
        .expect("w");
        assert_eq!(genesis_chain_id(&p), None);
        std::fs::write(&p, r#"{"chain_id":""}"#).expect("w");
        assert_eq!(genesis_chain_id(&p), None);
        std::fs::write(&p, "not json at all").expect("w");
        assert_eq!(genesis_chain_id(&p), None);
    }
}
