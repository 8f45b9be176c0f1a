//! Node families as data. One row per family of node software says how btm
//! learns its height and proves its chain (the RPC [`Dialect`]), which of
//! its files hold signing state (kept across rollback, never lowered by a
//! restore), which hold key material (never exported by default), and what
//! makes a snapshot of it hold the height it is labelled with
//! ([`Consistency`]).
//!
//! A new family is a new row (and, if its RPC is new, a dialect); nothing
//! else in btm names a family. [`crate::validator`] applies the file rules;
//! the daemon speaks the dialects. `docs/nodes.md` and `docs/validators.md`
//! are this table in prose, with a tested recipe per family.

pub use crate::pathrule::Rule;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// An RPC dialect btm can follow a height in and ask for a chain's
/// identity at a height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// CometBFT / Tendermint RPC (`/status`, `/block`).
    Cometbft,
    /// Ethereum execution JSON-RPC (`eth_blockNumber`, `eth_getBlockByNumber`).
    Ethereum,
    /// Bitcoin Core JSON-RPC (`getblockcount`, `getblockhash`), with a
    /// cookie or user and password.
    Bitcoin,
    /// Substrate / Polkadot SDK JSON-RPC (`chain_getHeader`,
    /// `chain_getBlockHash`).
    Substrate,
    /// Solana JSON-RPC (`getSlot`, `getBlock`): heights are slots.
    Solana,
    /// Ethereum consensus: the beacon node API. Heights are slots.
    Beacon,
}

impl Dialect {
    /// Every dialect, in the order configuration errors list them.
    pub const ALL: [Dialect; 6] = [
        Dialect::Cometbft,
        Dialect::Ethereum,
        Dialect::Bitcoin,
        Dialect::Substrate,
        Dialect::Solana,
        Dialect::Beacon,
    ];

    /// The name used in configuration (`source`, `rpc_kind`) and output.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Cometbft => "cometbft",
            Dialect::Ethereum => "ethereum",
            Dialect::Bitcoin => "bitcoin",
            Dialect::Substrate => "substrate",
            Dialect::Solana => "solana",
            Dialect::Beacon => "beacon",
        }
    }

    /// Parse a configuration value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The names, for error messages: "cometbft, ethereum, … or beacon".
    pub fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|d| d.name()).collect();
        let (last, rest) = names.split_last().unwrap_or((&"", &[]));
        format!("{} or {last}", rest.join(", "))
    }

    /// What one unit of height is called in messages.
    pub fn unit(self) -> &'static str {
        match self {
            Dialect::Solana | Dialect::Beacon => "slot",
            _ => "block",
        }
    }
}

/// What a crash-consistent snapshot of a running node restarts at, and
/// what btm does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// The node's database commits each block atomically: a snapshot
    /// restarts at the last block committed before it.
    EachCommit,
    /// The node keeps recent state in memory and writes it lazily; btm
    /// forces a write through the dialect's RPC before each snapshot and
    /// records the height the write made durable.
    Flush,
    /// The node keeps recent state in memory and has no RPC to write it; a
    /// snapshot of the running node restarts at its last write, possibly
    /// far below the label. Exact labels need the node stopped around the
    /// snapshot (hooks).
    LastPersisted,
    /// The node restarts from its newest local state snapshot and replays
    /// its ledger from there, up to what the ledger holds.
    Replay,
}

/// One family of node software.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// Short name, as in `docs/nodes.md`.
    pub name: &'static str,
    /// The software it covers.
    pub title: &'static str,
    /// The RPC the daemon follows and `btm verify` asks; `None` where btm
    /// speaks none yet (use a `command` source).
    pub dialect: Option<Dialect>,
    /// What a snapshot of the running node restarts at.
    pub consistency: Consistency,
    /// Signing state: never rolled back or lowered by default.
    pub signing_state: &'static [Rule],
    /// Key material: left out of backups and exports by default.
    pub secrets: &'static [Rule],
}

const fn rule(pattern: &'static str, stack: &'static str) -> Rule {
    Rule { pattern, stack }
}

// Patterns that more than one family uses, named once so every family
// reports them alike.
const KEYSTORE: Rule = rule(
    "keystore/",
    "keystore (geth, Nethermind, Substrate session keys)",
);
const NODEKEY: Rule = rule("nodekey", "node (p2p) key (geth, Erigon)");
const WALLETS: Rule = rule("wallets/", "wallets (Bitcoin Core, Lighthouse)");
const JWT: [Rule; 3] = [
    rule("jwtsecret", "engine API JWT secret"),
    rule("jwt.hex", "engine API JWT secret"),
    rule("jwt-secret", "engine API JWT secret"),
];

/// The families btm knows. The order is the order of `docs/nodes.md`.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "cometbft",
        title: "CometBFT / Cosmos SDK",
        dialect: Some(Dialect::Cometbft),
        consistency: Consistency::EachCommit,
        signing_state: &[
            rule(
                "data/priv_validator_state.json",
                "CometBFT/Tendermint signing state",
            ),
            rule("state/*-consensus.json", "TMKMS signing state"),
        ],
        secrets: &[
            rule("config/priv_validator_key.json", "CometBFT validator key"),
            rule("config/node_key.json", "CometBFT node key"),
            rule("keyring-file/", "Cosmos SDK keyring"),
            rule("keyring-test/", "Cosmos SDK keyring"),
        ],
    },
    Family {
        name: "geth",
        title: "go-ethereum (geth)",
        dialect: Some(Dialect::Ethereum),
        consistency: Consistency::LastPersisted,
        secrets: &[NODEKEY, KEYSTORE, JWT[0], JWT[1]],
        signing_state: &[],
    },
    Family {
        name: "reth",
        title: "reth",
        dialect: Some(Dialect::Ethereum),
        consistency: Consistency::LastPersisted,
        secrets: &[rule("discovery-secret", "reth node (p2p) key"), JWT[1]],
        signing_state: &[],
    },
    Family {
        name: "erigon",
        title: "Erigon",
        dialect: Some(Dialect::Ethereum),
        consistency: Consistency::EachCommit,
        secrets: &[NODEKEY, JWT[1]],
        signing_state: &[],
    },
    Family {
        name: "nethermind",
        title: "Nethermind",
        dialect: Some(Dialect::Ethereum),
        consistency: Consistency::Replay,
        secrets: &[KEYSTORE, JWT[2]],
        signing_state: &[],
    },
    Family {
        name: "besu",
        title: "Hyperledger Besu",
        dialect: Some(Dialect::Ethereum),
        consistency: Consistency::EachCommit,
        secrets: &[rule("key", "Besu node (p2p) key"), JWT[0], JWT[1]],
        signing_state: &[],
    },
    Family {
        name: "beacon",
        title: "Ethereum consensus: Lighthouse, Prysm, Teku, Nimbus, Lodestar",
        dialect: Some(Dialect::Beacon),
        consistency: Consistency::EachCommit,
        signing_state: &[
            rule(
                "validators/slashing_protection.sqlite",
                "Lighthouse slashing protection",
            ),
            rule(
                "validators/slashing_protection.sqlite3",
                "Nimbus slashing protection",
            ),
            rule("validator.db", "Prysm slashing protection"),
            rule("validator/slashprotection/", "Teku slashing protection"),
        ],
        secrets: &[
            rule("validator_keys/", "Ethereum validator keystores"),
            rule("voting-keystore.json", "Lighthouse validator keystore"),
            WALLETS,
            rule(
                "validator_definitions.yml",
                "Lighthouse validator definitions (may hold passwords)",
            ),
            rule("secrets/", "validator keystore passwords"),
            rule("direct/accounts/", "Prysm wallet keystore"),
            rule("validator/key-manager/", "Teku key manager"),
            rule("validators/*/keystore.json", "Nimbus validator keystore"),
            rule("keystores/", "Lodestar validator keystores"),
            rule("beacon/network/key", "Lighthouse node (p2p) key"),
            JWT[0],
            JWT[1],
        ],
    },
    Family {
        name: "bitcoin",
        title: "Bitcoin Core family: bitcoind, litecoind and forks",
        dialect: Some(Dialect::Bitcoin),
        consistency: Consistency::Flush,
        signing_state: &[],
        secrets: &[
            WALLETS,
            rule("wallet.dat", "Bitcoin Core wallet"),
            rule(".cookie", "Bitcoin Core RPC cookie"),
        ],
    },
    Family {
        name: "substrate",
        title: "Substrate / Polkadot SDK",
        dialect: Some(Dialect::Substrate),
        consistency: Consistency::EachCommit,
        signing_state: &[],
        secrets: &[
            KEYSTORE,
            rule("network/secret_ed25519", "Substrate node (p2p) key"),
        ],
    },
    Family {
        name: "solana",
        title: "Solana (Agave, Firedancer)",
        dialect: Some(Dialect::Solana),
        consistency: Consistency::Replay,
        signing_state: &[rule("tower-*.bin", "Solana vote tower")],
        secrets: &[
            rule("*keypair*.json", "Solana keypair"),
            rule("identity.json", "Solana identity keypair"),
        ],
    },
    Family {
        name: "sui",
        title: "Sui",
        dialect: None,
        consistency: Consistency::EachCommit,
        signing_state: &[],
        secrets: &[
            rule("sui.keystore", "Sui keystore"),
            rule("*.key", "Sui key pair"),
        ],
    },
    Family {
        name: "aptos",
        title: "Aptos",
        dialect: None,
        consistency: Consistency::EachCommit,
        signing_state: &[rule("secure-data.json", "Aptos safety rules")],
        secrets: &[
            rule("private-keys.yaml", "Aptos private keys"),
            rule("validator-identity.yaml", "Aptos validator identity"),
            rule(
                "validator-full-node-identity.yaml",
                "Aptos full node identity",
            ),
            rule("secure-data.json", "Aptos secure storage"),
        ],
    },
];

/// The family named `name`.
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The consistency of a node followed in `dialect`: the weakest among the
/// families speaking it, since btm cannot tell which of them it is.
pub fn consistency_of(dialect: Dialect) -> Consistency {
    let rank = |c: Consistency| match c {
        Consistency::Flush => 0,
        Consistency::EachCommit => 1,
        Consistency::Replay => 2,
        Consistency::LastPersisted => 3,
    };
    FAMILIES
        .iter()
        .filter(|f| f.dialect == Some(dialect))
        .map(|f| f.consistency)
        .max_by_key(|c| rank(*c))
        .unwrap_or(Consistency::EachCommit)
}

/// Every family's signing-state rules, each pattern once. Built once: a
/// restore asks about every file it finds in place.
pub fn signing_state() -> &'static [&'static Rule] {
    static ALL: OnceLock<Vec<&'static Rule>> = OnceLock::new();
    ALL.get_or_init(|| unique(FAMILIES.iter().flat_map(|f| f.signing_state)))
}

/// Every family's key-material rules, each pattern once.
pub fn secrets() -> &'static [&'static Rule] {
    static ALL: OnceLock<Vec<&'static Rule>> = OnceLock::new();
    ALL.get_or_init(|| unique(FAMILIES.iter().flat_map(|f| f.secrets)))
}

fn unique(rules: impl Iterator<Item = &'static Rule>) -> Vec<&'static Rule> {
    let mut seen = std::collections::HashSet::new();
    rules.filter(|r| seen.insert(r.pattern)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pathrule::wild;
    use proptest::prelude::*;

    #[test]
    fn dialects_round_trip_through_their_names() {
        for d in Dialect::ALL {
            assert_eq!(Dialect::parse(d.name()), Some(d));
            let json = serde_json::to_string(&d).expect("json");
            assert_eq!(json, format!("\"{}\"", d.name()));
        }
        assert_eq!(Dialect::parse("dogecoin"), None);
        assert!(Dialect::names().ends_with("solana or beacon"));
    }

    #[test]
    fn every_family_named_in_the_issue_is_a_row() {
        for name in ["cometbft", "geth", "reth", "erigon", "nethermind", "besu"] {
            assert!(family(name).is_some(), "{name}");
        }
        for d in Dialect::ALL {
            assert!(
                FAMILIES.iter().any(|f| f.dialect == Some(d)),
                "{} has no family",
                d.name()
            );
        }
        assert_eq!(consistency_of(Dialect::Bitcoin), Consistency::Flush);
        assert_eq!(consistency_of(Dialect::Cometbft), Consistency::EachCommit);
        // geth and Nethermind write state lazily: the dialect is as weak.
        assert_eq!(
            consistency_of(Dialect::Ethereum),
            Consistency::LastPersisted
        );
    }

    #[test]
    fn the_key_files_of_every_family_are_secrets() {
        let secret = |p: &str| {
            secrets()
                .iter()
                .any(|r| r.names(p.as_bytes()) || r.matches(p.as_bytes()))
        };
        for key in [
            "regtest/wallets/w",
            "wallet.dat",
            "validator-keypair.json",
            "ledger/vote-account-keypair.json",
            "chains/polkadot/keystore",
            "chains/polkadot/network/secret_ed25519",
            "geth/nodekey",
            "geth/jwtsecret",
            "jwt.hex",
            "teku/validator/key-manager",
            "nimbus/validators/0xabc/keystore.json",
            "lighthouse/wallets",
            "lighthouse/validators/validator_definitions.yml",
            "lodestar/keystores",
            "sui/sui.keystore",
            "sui/protocol.key",
            "aptos/private-keys.yaml",
            "aptos/validator-identity.yaml",
        ] {
            assert!(secret(key), "{key} is not a secret");
        }
        for data in [
            "geth/chaindata/000123.ldb",
            "regtest/chainstate/000005.ldb",
            "validators/0xabc/keystore.json.bak",
            "data/application.db/CURRENT",
            "keystore.txt",
        ] {
            assert!(!secret(data), "{data} is taken for a secret");
        }
    }

    #[test]
    fn every_rule_is_documented() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/validators.md"
        ))
        .expect("docs/validators.md");
        for r in secrets().iter().chain(signing_state()) {
            assert!(
                doc.contains(&format!("`{}`", r.pattern)),
                "{} ({}) is not in docs/validators.md",
                r.pattern,
                r.stack
            );
        }
    }

    #[test]
    fn wildcards_stay_in_one_component() {
        assert!(wild(b"*.key", b"protocol.key"));
        assert!(!wild(b"*.key", b"protocol.keys"));
        assert!(wild(b"tower-*.bin", b"tower-1_9-AbC.bin"));
        assert!(wild(b"*keypair*.json", b"keypair.json"));
        assert!(wild(b"a*b*c", b"abbbc"));
        assert!(!wild(b"a*b*c", b"acb"));
        let r = rule("validators/*/keystore.json", "x");
        assert!(r.matches(b"validators/0x1/keystore.json"));
        assert!(!r.matches(b"validators/a/b/keystore.json"));
    }

    proptest! {
        /// `names` and `matches` are exactly "the last components match"
        /// and "a proper prefix of the components is named", checked
        /// against a plain component-list model.
        #[test]
        fn matching_is_by_whole_components(
            comps in proptest::collection::vec("(a|b|keystore|x\\.key|wallets)", 0..5),
            rule in 0..12usize,
        ) {
            let all = secrets();
            let rule = all[rule % all.len()];
            let rel = comps.join("/");
            let want: Vec<&str> = rule.pattern.trim_end_matches('/').split('/').collect();
            let model_names = |c: &[String]| {
                c.len() >= want.len()
                    && c[c.len() - want.len()..]
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| wild(w.as_bytes(), g.as_bytes()))
            };
            prop_assert_eq!(rule.names(rel.as_bytes()), !comps.is_empty() && model_names(&comps));
            let model_matches = if rule.is_dir() {
                (1..comps.len()).any(|n| model_names(&comps[..n]))
            } else {
                !comps.is_empty() && model_names(&comps)
            };
            prop_assert_eq!(rule.matches(rel.as_bytes()), model_matches);
        }

        /// Without a star, `wild` is equality; a lone star matches all.
        #[test]
        fn wild_without_stars_is_equality(a in "[a-z.]{0,6}", b in "[a-z.]{0,6}") {
            prop_assert_eq!(wild(a.as_bytes(), b.as_bytes()), a == b);
            prop_assert!(wild(b"*", b.as_bytes()));
            let prefixed = format!("{a}*");
            prop_assert_eq!(wild(prefixed.as_bytes(), b.as_bytes()), b.starts_with(&a));
        }
    }
}
