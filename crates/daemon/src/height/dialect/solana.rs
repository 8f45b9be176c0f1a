//! Solana JSON-RPC: `getSlot` for the tip, `getBlock` for the block hash
//! at a slot, and the genesis hash as the cluster's id. Heights are slots;
//! a skipped slot has no block and cannot be verified.

use btm::family::Dialect;
use serde_json::{json, Value};

use super::super::http::Http;
use super::super::identity::ChainIdentity;
use super::super::{bad, HeightError};
use super::{base58_hash, decimal, wrong_height, Tip};

const SRC: &str = "solana";

pub(in super::super) fn tip(http: &Http, url: &str) -> Result<Tip, HeightError> {
    let v = http.json_rpc(SRC, url, "getSlot", json!([]))?;
    Ok(Tip {
        height: decimal(SRC, "getSlot result", Some(&v))?,
        syncing: false,
    })
}

pub(in super::super) fn identity(
    http: &Http,
    url: &str,
    slot: u64,
) -> Result<ChainIdentity, HeightError> {
    let opts = json!({"transactionDetails": "none", "rewards": false, "maxSupportedTransactionVersion": 0});
    let block = http.json_rpc(SRC, url, "getBlock", json!([slot, opts]))?;
    let genesis = http.json_rpc(SRC, url, "getGenesisHash", json!([]))?;
    let mut id = parse_identity(&block, &genesis, slot)?;
    id.client = super::ask(http, SRC, url, "getVersion", json!([])).and_then(|v| parse_client(&v));
    Ok(id)
}

/// The client from `getVersion`: `solana-core 1.18.22`.
pub fn parse_client(version: &Value) -> Option<String> {
    let core = version.get("solana-core")?.as_str()?;
    super::client_name(&Value::String(format!("solana-core {core}")))
}

/// The identity in a `getBlock` result and a `getGenesisHash` result.
/// `getBlock` does not repeat the slot; a parent slot at or above the
/// slot asked is an answer about another block.
pub fn parse_identity(
    block: &Value,
    genesis: &Value,
    slot: u64,
) -> Result<ChainIdentity, HeightError> {
    if block.is_null() {
        return Err(bad(SRC, format!("the node has no block at slot {slot}")));
    }
    let parent = decimal(SRC, "parentSlot", block.get("parentSlot"))?;
    if parent >= slot && slot > 0 {
        return Err(wrong_height(
            SRC,
            slot,
            format!("a block whose parent is slot {parent}"),
        ));
    }
    let genesis = base58_hash(SRC, "genesis hash", genesis.as_str())?;
    Ok(ChainIdentity {
        kind: Dialect::Solana,
        height: slot,
        block_hash: base58_hash(
            SRC,
            "blockhash",
            block.get("blockhash").and_then(Value::as_str),
        )?,
        state_hash: None,
        chain_id: Some(genesis.clone()),
        genesis_hash: Some(genesis),
        client: None,
        pruned: None,
        prune_height: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = r#"{"blockHeight":241234567,"blockTime":1700000000,"blockhash":"5Fx8ZRbqyC2UpAbmDsMtHLsoYNQE7ghsr4Mb3QPjmvP9",
        "parentSlot":259999999,"previousBlockhash":"9Ukmh7PVo8h2S1m3GTfJRqWtXRBCbDeE6bTPDKprUJv1"}"#;
    const GENESIS: &str = "\"5eykt4UsFv8P8NJdTREpY1vzqKqZKvdpKuc147dw2N9d\"";

    #[test]
    fn identity() {
        let block: Value = serde_json::from_str(BLOCK).expect("json");
        let genesis: Value = serde_json::from_str(GENESIS).expect("json");
        let id = parse_identity(&block, &genesis, 260_000_000).expect("parses");
        assert_eq!(id.kind, Dialect::Solana);
        assert!(id.block_hash.starts_with("5Fx8"));
        assert!(id
            .chain_id
            .as_deref()
            .is_some_and(|c| c.starts_with("5eykt")));
        let e = parse_identity(&block, &genesis, 259_999_000).expect_err("wrong slot");
        assert!(e.to_string().contains("asked for 259999000"), "{e}");
        assert!(parse_identity(&Value::Null, &genesis, 1).is_err());
        assert!(parse_identity(&json!({"parentSlot":1,"blockhash":"0OIl"}), &genesis, 2).is_err());
        assert!(parse_identity(&block, &json!(5), 260_000_000).is_err());
    }
}
