//! Substrate / Polkadot SDK JSON-RPC: `chain_getHeader` for the tip,
//! `chain_getBlockHash` and the header for the block hash and state root,
//! and the genesis hash as the chain's id. Numbers are `0x` hex.

use btm::family::Dialect;
use serde_json::{json, Value};

use super::super::http::Http;
use super::super::identity::ChainIdentity;
use super::super::{bad, HeightError};
use super::{hex_hash, hex_quantity, same_height, str_at, Tip};

const SRC: &str = "substrate";

pub(in super::super) fn tip(http: &Http, url: &str) -> Result<Tip, HeightError> {
    let header = http.json_rpc(SRC, url, "chain_getHeader", json!([]))?;
    Ok(Tip {
        height: parse_header(&header)?.0,
        syncing: false,
    })
}

pub(in super::super) fn identity(
    http: &Http,
    url: &str,
    height: u64,
) -> Result<ChainIdentity, HeightError> {
    let hash = http.json_rpc(SRC, url, "chain_getBlockHash", json!([height]))?;
    let hash = block_hash(&hash, height)?;
    let header = http.json_rpc(SRC, url, "chain_getHeader", json!([hash]))?;
    let genesis = http.json_rpc(SRC, url, "chain_getBlockHash", json!([0]))?;
    let genesis = block_hash(&genesis, 0)?;
    let mut id = parse_identity(hash, &header, genesis, height)?;
    let ask = |method: &str| super::ask(http, SRC, url, method, json!([]));
    id.client = match (ask("system_name"), ask("system_version")) {
        (Some(name), Some(version)) => parse_client(&name, &version),
        _ => None,
    };
    Ok(id)
}

/// The client from `system_name` and `system_version`: `Parity Polkadot
/// 1.14.0-…`.
pub fn parse_client(name: &Value, version: &Value) -> Option<String> {
    let text = format!("{} {}", name.as_str()?, version.as_str()?);
    super::client_name(&Value::String(text))
}

/// A `chain_getBlockHash` result: `null` when the node has no such block.
pub fn block_hash(result: &Value, height: u64) -> Result<String, HeightError> {
    if result.is_null() {
        return Err(bad(SRC, format!("the node has no block {height}")));
    }
    hex_hash(SRC, "chain_getBlockHash result", result.as_str())
}

/// A header's number and state root.
pub fn parse_header(header: &Value) -> Result<(u64, String), HeightError> {
    if !header.is_object() {
        return Err(bad(SRC, "no header object in the answer"));
    }
    Ok((
        hex_quantity(SRC, "number", str_at(header, &["number"]))?,
        hex_hash(SRC, "stateRoot", str_at(header, &["stateRoot"]))?,
    ))
}

/// The identity of block `height`: its hash, its header, the genesis hash.
pub fn parse_identity(
    hash: String,
    header: &Value,
    genesis: String,
    height: u64,
) -> Result<ChainIdentity, HeightError> {
    let (number, state_root) = parse_header(header)?;
    same_height(SRC, height, number)?;
    Ok(ChainIdentity {
        kind: Dialect::Substrate,
        height,
        block_hash: hash,
        state_hash: Some(state_root),
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

    const HEADER: &str = r#"{"parentHash":"0x7f1ca4a1e8f0d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c","number":"0x1a2b3c",
        "stateRoot":"0x9c4e1e1e0b5fa6ec1d5f5a0f5c5b0e3f2d1c0b9a8f7e6d5c4b3a291807f6e5d4",
        "extrinsicsRoot":"0x03170a2e7597b7b7e3d84c05391d139a62b157e78786d8c082f29dcf4c111314","digest":{"logs":[]}}"#;

    #[test]
    fn header_and_identity() {
        let header: Value = serde_json::from_str(HEADER).expect("json");
        assert_eq!(parse_header(&header).expect("parses").0, 0x1a2b3c);
        let id = parse_identity("0xab".into(), &header, "0x91b1".into(), 0x1a2b3c).expect("parses");
        assert_eq!(id.kind, Dialect::Substrate);
        assert_eq!(id.chain_id.as_deref(), Some("0x91b1"));
        assert!(id
            .state_hash
            .as_deref()
            .is_some_and(|s| s.starts_with("0x9c4e")));
        let e = parse_identity("0xab".into(), &header, "0x91b1".into(), 7).expect_err("wrong");
        assert!(e.to_string().contains("asked for 7"), "{e}");
        assert!(block_hash(&Value::Null, 9)
            .expect_err("none")
            .to_string()
            .contains("no block 9"));
        for broken in [
            json!("0x12"),
            json!({"number":"12","stateRoot":"0x00"}),
            json!({"number":"0x12"}),
            json!({"number":"0x12","stateRoot":"nothex"}),
        ] {
            assert!(parse_header(&broken).is_err(), "{broken}");
        }
    }
}
