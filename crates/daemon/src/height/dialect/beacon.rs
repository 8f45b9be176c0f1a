//! The Ethereum beacon node API (Lighthouse, Prysm, Teku, Nimbus,
//! Lodestar): `/eth/v1/node/syncing` for the head slot, the block header
//! at a slot for its root and state root, and the genesis validators root
//! as the chain's id. Heights are slots; an empty slot has no block.

use btm::family::Dialect;
use serde_json::Value;

use super::super::http::Http;
use super::super::identity::ChainIdentity;
use super::super::{bad, HeightError};
use super::{decimal, hex_hash, same_height, str_at, Tip};

const SRC: &str = "beacon";

pub(in super::super) fn tip(http: &Http, url: &str) -> Result<Tip, HeightError> {
    let url = format!("{}/eth/v1/node/syncing", url.trim_end_matches('/'));
    parse_syncing(&http.call(&url, None)?)
}

pub(in super::super) fn identity(
    http: &Http,
    url: &str,
    slot: u64,
) -> Result<ChainIdentity, HeightError> {
    let base = url.trim_end_matches('/');
    let url = format!("{base}/eth/v1/beacon/headers/{slot}");
    let (status, header) = http.call_any(&url, None)?;
    if status == 404 {
        return Err(bad(
            SRC,
            format!("the node has no block at slot {slot} (an empty slot, or not synced that far)"),
        ));
    }
    if status != 200 {
        return Err(HeightError::Status { url, status });
    }
    let genesis = http.call(&format!("{base}/eth/v1/beacon/genesis"), None)?;
    let mut id = parse_identity(&header, &genesis, slot)?;
    id.client =
        super::ask_get(http, &format!("{base}/eth/v1/node/version")).and_then(|v| parse_client(&v));
    Ok(id)
}

/// The client from `/eth/v1/node/version`: `Lighthouse/v5.3.0-…`.
pub fn parse_client(version: &Value) -> Option<String> {
    super::client_name(version.get("data")?.get("version")?)
}

/// The head slot and sync state in a `/eth/v1/node/syncing` body.
pub fn parse_syncing(body: &str) -> Result<Tip, HeightError> {
    let v: Value = serde_json::from_str(body).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
    let data = v
        .get("data")
        .ok_or_else(|| bad(SRC, "no data in /eth/v1/node/syncing"))?;
    Ok(Tip {
        height: decimal(SRC, "head_slot", data.get("head_slot"))?,
        syncing: data
            .get("is_syncing")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// The identity in a block header body and a genesis body.
pub fn parse_identity(
    header: &str,
    genesis: &str,
    slot: u64,
) -> Result<ChainIdentity, HeightError> {
    let h: Value = serde_json::from_str(header).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
    let g: Value = serde_json::from_str(genesis).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
    let data = h
        .get("data")
        .ok_or_else(|| bad(SRC, "no data in the block header"))?;
    let message = &data["header"]["message"];
    same_height(SRC, slot, decimal(SRC, "slot", message.get("slot"))?)?;
    Ok(ChainIdentity {
        kind: Dialect::Beacon,
        genesis_hash: None,
        client: None,
        pruned: None,
        prune_height: None,
        height: slot,
        block_hash: hex_hash(SRC, "root", str_at(data, &["root"]))?,
        state_hash: Some(hex_hash(
            SRC,
            "state_root",
            str_at(message, &["state_root"]),
        )?),
        chain_id: Some(hex_hash(
            SRC,
            "genesis_validators_root",
            str_at(&g, &["data", "genesis_validators_root"]),
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"execution_optimistic":false,"finalized":true,"data":{"root":"0xcf8e0d4e9587369b2301d0790347320302cc0943d5a1884560367e8208d920f2","canonical":true,
        "header":{"message":{"slot":"8000000","proposer_index":"1","parent_root":"0x1cfedbc04788917c188bdab08bf1ec4e8ff1bd6b6b8a7a9a6f3e0bd1aa5a0f06",
        "state_root":"0x0b8a3b8e1c4e1f1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091","body_root":"0x2b"},"signature":"0x1b"}}}"#;
    const GENESIS: &str = r#"{"data":{"genesis_time":"1606824023","genesis_validators_root":"0x4b363db94e286120d76eb905340fdd4e54bfe9f06bf33ff6cf5ad27f511bfe95","genesis_fork_version":"0x00000000"}}"#;

    #[test]
    fn syncing() {
        let t = parse_syncing(r#"{"data":{"head_slot":"8000123","sync_distance":"0","is_syncing":false,"is_optimistic":false,"el_offline":false}}"#)
            .expect("parses");
        assert_eq!(
            t,
            Tip {
                height: 8_000_123,
                syncing: false
            }
        );
        let t = parse_syncing(
            r#"{"data":{"head_slot":"12","sync_distance":"7999000","is_syncing":true}}"#,
        )
        .expect("parses");
        assert!(t.syncing);
        for broken in [
            "",
            "{}",
            r#"{"data":{"head_slot":"x"}}"#,
            r#"{"code":500,"message":"oops"}"#,
        ] {
            assert!(parse_syncing(broken).is_err(), "{broken}");
        }
    }

    #[test]
    fn identity() {
        let id = parse_identity(HEADER, GENESIS, 8_000_000).expect("parses");
        assert_eq!(id.kind, Dialect::Beacon);
        assert!(id.block_hash.starts_with("0xcf8e"));
        assert!(id
            .chain_id
            .as_deref()
            .is_some_and(|c| c.starts_with("0x4b36")));
        assert!(parse_identity(HEADER, GENESIS, 8_000_001).is_err());
        assert!(parse_identity(HEADER, "{}", 8_000_000).is_err());
        assert!(parse_identity("garbage", GENESIS, 8_000_000).is_err());
    }
}
