//! Ethereum execution JSON-RPC (geth, reth, Erigon, Nethermind, Besu):
//! `eth_blockNumber` for the tip, `eth_getBlockByNumber` for the block
//! hash and state root; what the chain and the node are (`eth_chainId`,
//! block 0's hash, `web3_clientVersion`) where the node answers. Quantities
//! are `0x`-prefixed hex.

use btm::family::Dialect;
use serde_json::{json, Value};

use super::super::http::Http;
use super::super::identity::ChainIdentity;
use super::super::{bad, HeightError};
use super::{client_name, hex_hash, hex_quantity, same_height, str_at, Tip};

const SRC: &str = "ethereum";

pub(in super::super) fn tip(http: &Http, url: &str) -> Result<Tip, HeightError> {
    let v = http.json_rpc(SRC, url, "eth_blockNumber", json!([]))?;
    parse_block_number(&v)
}

pub(in super::super) fn identity(
    http: &Http,
    url: &str,
    height: u64,
) -> Result<ChainIdentity, HeightError> {
    let v = http.json_rpc(
        SRC,
        url,
        "eth_getBlockByNumber",
        json!([format!("0x{height:x}"), false]),
    )?;
    let mut id = parse_block(&v, height)?;
    let ask = |method: &str, params: Value| super::ask(http, SRC, url, method, params);
    id.chain_id = ask("eth_chainId", json!([])).and_then(|v| parse_chain_id(&v).ok());
    id.genesis_hash = ask("eth_getBlockByNumber", json!(["0x0", false]))
        .and_then(|v| parse_block(&v, 0).ok())
        .map(|genesis| genesis.block_hash);
    id.client = ask("web3_clientVersion", json!([])).and_then(|v| client_name(&v));
    Ok(id)
}

/// The chain id in an `eth_chainId` result, in decimal (`1` for mainnet).
pub fn parse_chain_id(result: &Value) -> Result<String, HeightError> {
    Ok(hex_quantity(SRC, "eth_chainId result", result.as_str())?.to_string())
}

/// The tip in an `eth_blockNumber` result.
pub fn parse_block_number(result: &Value) -> Result<Tip, HeightError> {
    Ok(Tip {
        height: hex_quantity(SRC, "eth_blockNumber result", result.as_str())?,
        syncing: false,
    })
}

/// The identity in an `eth_getBlockByNumber` result. `null` (the node
/// does not have the block) is an error.
pub fn parse_block(block: &Value, height: u64) -> Result<ChainIdentity, HeightError> {
    match block {
        Value::Object(_) => {}
        Value::Null => return Err(bad(SRC, format!("the node has no block {height}"))),
        _ => return Err(bad(SRC, "no block object in the answer")),
    }
    same_height(
        SRC,
        height,
        hex_quantity(SRC, "number", str_at(block, &["number"]))?,
    )?;
    Ok(ChainIdentity {
        kind: Dialect::Ethereum,
        height,
        block_hash: hex_hash(SRC, "hash", str_at(block, &["hash"]))?,
        state_hash: Some(hex_hash(SRC, "stateRoot", str_at(block, &["stateRoot"]))?),
        chain_id: None,
        genesis_hash: None,
        client: None,
        pruned: None,
        prune_height: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::super::http::rpc_result;
    use super::*;

    /// [`parse_block`] on a whole JSON-RPC answer.
    pub(crate) fn parse_block_answer(
        body: &str,
        height: u64,
    ) -> Result<ChainIdentity, HeightError> {
        let v: Value =
            serde_json::from_str(body).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
        parse_block(&rpc_result(SRC, "eth_getBlockByNumber", v)?, height)
    }

    pub(crate) const BLOCK: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"number":"0x1b4","hash":"0xdc0818cf78f21a8e70579cb46a43643f78291264dda342ae31049421c82d21ae",
        "parentHash":"0xe99e022112df268087ea7eafaf4790497fd21dbeeb6bd7a1721df161a6657a54",
        "stateRoot":"0xddc8b0234c2e0cad087c8b389aa7ef01f7d79b2570bccb77ce48648aa61c904d","transactions":[]}}"#;

    fn number(body: &str) -> Result<u64, HeightError> {
        let v: Value = serde_json::from_str(body).map_err(|e| bad(SRC, e.to_string()))?;
        parse_block_number(&rpc_result(SRC, "eth_blockNumber", v)?).map(|t| t.height)
    }

    #[test]
    fn block_number() {
        assert_eq!(
            number(r#"{"jsonrpc":"2.0","id":1,"result":"0x1b4"}"#),
            Ok(436)
        );
        assert_eq!(number(r#"{"result":"0x0"}"#), Ok(0));
        for broken in [
            r#"{"result":"0x"}"#,
            r#"{"result":"1b4"}"#,
            r#"{"result":"0xzz"}"#,
            r#"{"result":"0x10000000000000000"}"#,
            r#"{"error":{"code":-32601,"message":"nope"}}"#,
            r#"{"result":436}"#,
            "garbage",
        ] {
            assert!(number(broken).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn chain_and_client() {
        assert_eq!(parse_chain_id(&json!("0x1")), Ok("1".to_owned()));
        assert_eq!(parse_chain_id(&json!("0x539")), Ok("1337".to_owned()));
        for broken in [json!("1"), json!(1), json!(null), json!("0x")] {
            assert!(parse_chain_id(&broken).is_err(), "{broken}");
        }
        assert_eq!(
            client_name(&json!("Geth/v1.14.0-stable/linux-amd64/go1.22.2")).as_deref(),
            Some("Geth/v1.14.0-stable/linux-amd64/go1.22.2")
        );
        for broken in [json!(""), json!(7), json!("a\nb"), json!("x".repeat(201))] {
            assert_eq!(client_name(&broken), None, "{broken}");
        }
    }

    #[test]
    fn block() {
        let id = parse_block_answer(BLOCK, 436).expect("parses");
        assert_eq!(id.kind, Dialect::Ethereum);
        assert!(id.block_hash.starts_with("0xdc0818"));
        assert!(id
            .state_hash
            .as_deref()
            .is_some_and(|s| s.starts_with("0xddc8b0")));
        assert!(parse_block_answer(BLOCK, 437).is_err());
        let e =
            parse_block_answer(r#"{"jsonrpc":"2.0","id":1,"result":null}"#, 9).expect_err("null");
        assert!(e.to_string().contains("no block 9"), "{e}");
        for broken in [
            r#"{"error":{"code":-32601,"message":"nope"}}"#,
            r#"{"result":"0x1"}"#,
            &BLOCK.replace(r#""hash":"0xdc08"#, r#""hash":"0xzz08"#),
            &BLOCK.replace("stateRoot", "stateroot"),
            "garbage",
        ] {
            assert!(parse_block_answer(broken, 436).is_err(), "{broken}");
        }
    }
}
