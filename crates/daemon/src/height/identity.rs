//! Which chain a height belongs to. An export records the node's block hash
//! at the exported height, with its state commitment and chain id where
//! the dialect has them (CometBFT: app hash and chain id; Ethereum: state
//! root; Substrate: state root and genesis hash; Solana: genesis hash;
//! beacon: state root and genesis validators root; Bitcoin Core: the chain
//! name), and `btm verify` asks a node running on restored data for the
//! same height. Equal hashes prove the rebuilt node is on the exported
//! chain at the exported height; a fork, another network or a corrupt
//! restore answers differently.
//!
//! The dialects fetch and parse ([`super::dialect`]); comparing is pure.

use btm::family::Dialect;
use serde::{Deserialize, Serialize};

/// The chain's identity at one height, as the node reported it.
///
/// Stored as `meta.chain` in an export's index. Hashes are kept as the node
/// printed them and compared ignoring ASCII case (CometBFT prints upper-case
/// hex, Ethereum `0x`-prefixed lower-case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainIdentity {
    /// The dialect that reported it; `verify` asks in the same one.
    pub kind: Dialect,
    /// The height.
    pub height: u64,
    /// The block's hash.
    pub block_hash: String,
    /// The state commitment, where the dialect has one: CometBFT's app
    /// hash (the application state after the previous block), the state
    /// root of Ethereum, Substrate and beacon blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_hash: Option<String>,
    /// The chain's id, where the dialect tells: CometBFT's chain id,
    /// Bitcoin Core's chain name, a genesis hash (Substrate, Solana) or
    /// the genesis validators root (beacon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<String>,
    /// The hash of the chain's block 0, where the node tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genesis_hash: Option<String>,
    /// The node's client and version, as it names them
    /// (`Geth/v1.14.0-stable/linux-amd64/go1.22`, `/Satoshi:27.0.0/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Whether the node prunes old blocks, where it tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<bool>,
    /// The lowest block a pruned node still has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_height: Option<u64>,
}

impl ChainIdentity {
    /// "block hash X, app hash Y, chain Z": what the identity holds, for
    /// one line of output.
    pub fn describe(&self) -> String {
        let mut out = format!("block hash {}", self.block_hash);
        if let Some(h) = &self.state_hash {
            out.push_str(&format!(", {} {h}", self.state_hash_name()));
        }
        if let Some(c) = &self.chain_id {
            out.push_str(&format!(", chain {c}"));
        }
        if let Some(c) = &self.client {
            out.push_str(&format!(", client {c}"));
        }
        if self.pruned == Some(true) {
            let from = self.prune_height.map(|h| format!(" from {h}"));
            out.push_str(&format!(", pruned{}", from.unwrap_or_default()));
        }
        out
    }

    /// The chain this identity names, for a restore's check
    /// ([`crate::chain`]).
    pub fn chain(&self) -> crate::chain::Chain {
        crate::chain::Chain {
            id: self.chain_id.clone(),
            genesis: self.genesis_hash.clone(),
        }
    }

    /// What the state hash is called in this dialect.
    pub fn state_hash_name(&self) -> &'static str {
        match self.kind {
            Dialect::Cometbft => "app hash",
            _ => "state root",
        }
    }
}

/// Where a recorded identity and a node's answer differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Which field ("chain id", "block hash", "app hash", "state root").
    pub field: &'static str,
    /// The recorded value.
    pub recorded: String,
    /// The node's value.
    pub found: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} was {} at export, the node says {}",
            self.field, self.recorded, self.found
        )
    }
}

/// Compare what an export recorded with what a node says at the same
/// height. Pure; every differing field is returned, the most telling first.
pub fn compare(recorded: &ChainIdentity, found: &ChainIdentity) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut field = |name: &'static str, a: &str, b: &str| {
        if !a.eq_ignore_ascii_case(b) {
            out.push(Mismatch {
                field: name,
                recorded: a.to_owned(),
                found: b.to_owned(),
            });
        }
    };
    if recorded.kind != found.kind {
        field("RPC kind", recorded.kind.name(), found.kind.name());
    }
    if recorded.height != found.height {
        field(
            "height",
            &recorded.height.to_string(),
            &found.height.to_string(),
        );
    }
    if let (Some(a), Some(b)) = (&recorded.chain_id, &found.chain_id) {
        field("chain id", a, b);
    }
    if let (Some(a), Some(b)) = (&recorded.genesis_hash, &found.genesis_hash) {
        field("genesis hash", a, b);
    }
    field("block hash", &recorded.block_hash, &found.block_hash);
    if let (Some(a), Some(b)) = (&recorded.state_hash, &found.state_hash) {
        field(recorded.state_hash_name(), a, b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::dialect::{cometbft, ethereum};

    #[test]
    fn compare_names_every_difference_and_ignores_hex_case() {
        let a = cometbft::parse_block(cometbft::tests::BLOCK, 19_736_123).expect("parses");
        let mut b = a.clone();
        b.block_hash = b.block_hash.to_lowercase();
        assert!(compare(&a, &b).is_empty());
        b.state_hash = Some("00".into());
        b.chain_id = Some("theta-testnet-001".into());
        let fields: Vec<_> = compare(&a, &b).iter().map(|m| m.field).collect();
        assert_eq!(fields, ["chain id", "app hash"]);
        let e = ethereum::tests::parse_block_answer(ethereum::tests::BLOCK, 436).expect("parses");
        let mut f = e.clone();
        f.block_hash = "0x00".into();
        let m = compare(&e, &f);
        assert_eq!(m.len(), 1);
        assert!(
            m[0].to_string().contains("block hash was 0xdc08"),
            "{}",
            m[0]
        );
    }

    #[test]
    fn identity_round_trips_through_index_metadata() {
        let a = ethereum::tests::parse_block_answer(ethereum::tests::BLOCK, 436).expect("parses");
        let v = serde_json::to_value(&a).expect("serializes");
        assert_eq!(v["kind"], "ethereum");
        assert!(v.get("chain_id").is_none());
        let back: ChainIdentity = serde_json::from_value(v).expect("deserializes");
        assert_eq!(back, a);
    }
}
