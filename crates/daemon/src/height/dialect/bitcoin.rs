//! Bitcoin Core JSON-RPC, for bitcoind, litecoind and their forks:
//! `getblockcount` for the tip, `getblockhash` (plus `getblockchaininfo`'s
//! chain name) for the identity, and `gettxoutsetinfo` as the forced flush.
//!
//! Bitcoin Core writes its block index and chainstate lazily (about once
//! an hour, or when its cache fills), so a crash-consistent snapshot of a
//! running node restarts at the last write, on a young node at genesis.
//! `gettxoutsetinfo` writes both before it answers, and its `height` is
//! the chainstate's height at that write: the height a snapshot taken
//! right after holds. The node needs credentials: a cookie file, or a user
//! and password.

use btm::family::Dialect;
use serde_json::{json, Value};

use super::super::http::Http;
use super::super::identity::ChainIdentity;
use super::super::{bad, HeightError};
use super::{decimal, hex_hash, Tip};

const SRC: &str = "bitcoin";

pub(in super::super) fn tip(http: &Http, url: &str) -> Result<Tip, HeightError> {
    let v = http.json_rpc(SRC, url, "getblockcount", json!([]))?;
    Ok(Tip {
        height: parse_block_count(&v)?,
        syncing: false,
    })
}

pub(in super::super) fn identity(
    http: &Http,
    url: &str,
    height: u64,
) -> Result<ChainIdentity, HeightError> {
    let hash = http.json_rpc(SRC, url, "getblockhash", json!([height]))?;
    let info = http.json_rpc(SRC, url, "getblockchaininfo", json!([]))?;
    let mut id = parse_identity(&hash, &info, height)?;
    let ask = |method: &str, params: Value| super::ask(http, SRC, url, method, params);
    id.genesis_hash = ask("getblockhash", json!([0]))
        .and_then(|v| hex_hash(SRC, "getblockhash result", v.as_str()).ok());
    id.client =
        ask("getnetworkinfo", json!([])).and_then(|v| super::client_name(v.get("subversion")?));
    Ok(id)
}

/// Write the chainstate and block index to disk; the height written.
pub(in super::super) fn flush(http: &Http, url: &str) -> Result<u64, HeightError> {
    // "none" skips hashing the UTXO set (Bitcoin Core 0.21 and later);
    // older nodes take no argument and flush all the same.
    let v = match http.json_rpc(SRC, url, "gettxoutsetinfo", json!(["none"])) {
        Err(HeightError::Rpc {
            code: Some(-1 | -8),
            ..
        }) => http.json_rpc(SRC, url, "gettxoutsetinfo", json!([]))?,
        other => other?,
    };
    parse_flushed(&v)
}

/// The height in a `getblockcount` result.
pub fn parse_block_count(result: &Value) -> Result<u64, HeightError> {
    decimal(SRC, "getblockcount result", Some(result))
}

/// The identity from `getblockhash` and `getblockchaininfo` results.
pub fn parse_identity(
    hash: &Value,
    info: &Value,
    height: u64,
) -> Result<ChainIdentity, HeightError> {
    let block_hash = hex_hash(SRC, "getblockhash result", hash.as_str())?;
    if block_hash.len() != 64 {
        return Err(bad(
            SRC,
            format!("block hash {block_hash:?} is not 32 bytes"),
        ));
    }
    let chain = info
        .get("chain")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(SRC, "no chain in getblockchaininfo"))?;
    Ok(ChainIdentity {
        kind: Dialect::Bitcoin,
        height,
        block_hash,
        state_hash: None,
        chain_id: Some(chain.to_owned()),
        genesis_hash: None,
        client: None,
        pruned: info.get("pruned").and_then(Value::as_bool),
        prune_height: info.get("pruneheight").and_then(Value::as_u64),
    })
}

/// The chainstate height in a `gettxoutsetinfo` result.
pub fn parse_flushed(result: &Value) -> Result<u64, HeightError> {
    decimal(SRC, "gettxoutsetinfo height", result.get("height"))
}

#[cfg(test)]
mod tests {
    use super::super::super::http::rpc_result;
    use super::*;

    fn result(body: &str, method: &str) -> Result<Value, HeightError> {
        let v: Value = serde_json::from_str(body).map_err(|e| bad(SRC, e.to_string()))?;
        rpc_result(SRC, method, v)
    }

    const INFO: &str = r#"{"result":{"chain":"regtest","blocks":5,"headers":5,"bestblockhash":"52a139e5229997d2287649f952821cb2918a21956191e55803d7fe20e2ec363b","initialblockdownload":false},"error":null,"id":1}"#;

    #[test]
    fn block_count() {
        let r = result(r#"{"result":5,"error":null,"id":1}"#, "getblockcount").expect("ok");
        assert_eq!(parse_block_count(&r), Ok(5));
        for broken in [r#"{"result":-1}"#, r#"{"result":"x"}"#, r#"{"result":1.5}"#] {
            let r = result(broken, "getblockcount").expect("result");
            assert!(parse_block_count(&r).is_err(), "{broken}");
        }
        let e = result(
            r#"{"result":null,"error":{"code":-28,"message":"Loading block index..."},"id":1}"#,
            "getblockcount",
        )
        .expect_err("warming up");
        assert!(e.to_string().contains("Loading block index"), "{e}");
    }

    #[test]
    fn identity_names_the_chain() {
        let hash = result(
            r#"{"result":"52a139e5229997d2287649f952821cb2918a21956191e55803d7fe20e2ec363b","error":null,"id":1}"#,
            "getblockhash",
        )
        .expect("ok");
        let info = result(INFO, "getblockchaininfo").expect("ok");
        let id = parse_identity(&hash, &info, 5).expect("parses");
        assert_eq!(id.chain_id.as_deref(), Some("regtest"));
        assert_eq!(id.state_hash, None);
        assert_eq!((id.pruned, id.prune_height), (None, None));
        let pruned = json!({"chain": "main", "pruned": true, "pruneheight": 800000});
        let id = parse_identity(&hash, &pruned, 5).expect("parses");
        assert_eq!((id.pruned, id.prune_height), (Some(true), Some(800_000)));
        assert!(
            parse_identity(&json!("abcd"), &info, 5).is_err(),
            "short hash"
        );
        assert!(parse_identity(&hash, &json!({}), 5).is_err(), "no chain");
        let e = result(
            r#"{"result":null,"error":{"code":-8,"message":"Block height out of range"},"id":1}"#,
            "getblockhash",
        )
        .expect_err("above the tip");
        assert!(e.to_string().contains("Block height out of range"), "{e}");
    }

    #[test]
    fn flushed_height() {
        let r = result(
            r#"{"result":{"height":250,"bestblock":"52a1","transactions":5,"txouts":5,"bogosize":360,"disk_size":0,"total_amount":250.0},"error":null,"id":1}"#,
            "gettxoutsetinfo",
        )
        .expect("ok");
        assert_eq!(parse_flushed(&r), Ok(250));
        assert!(parse_flushed(&json!({"bestblock":"x"})).is_err());
    }
}
