//! CometBFT / Tendermint RPC: `/status` for the tip (with `catching_up`),
//! `/block?height=H` for the block hash and app hash. Heights are decimal
//! strings; older Tendermint without the `result` wrapper is accepted.

use btm::family::Dialect;
use serde_json::Value;

use super::super::http::Http;
use super::super::identity::ChainIdentity;
use super::super::{bad, HeightError};
use super::{decimal, hex_hash, str_at, Tip};

const SRC: &str = "cometbft";

pub(in super::super) fn tip(http: &Http, url: &str) -> Result<Tip, HeightError> {
    let url = format!("{}/status", url.trim_end_matches('/'));
    parse_status(&http.call(&url, None)?)
}

pub(in super::super) fn identity(
    http: &Http,
    url: &str,
    height: u64,
) -> Result<ChainIdentity, HeightError> {
    let url = format!("{}/block?height={height}", url.trim_end_matches('/'));
    // A pruned or future height is a JSON-RPC error with HTTP 500.
    let (status, body) = http.call_any(&url, None)?;
    if status != 200 && !body.trim_start().starts_with('{') {
        return Err(HeightError::Status { url, status });
    }
    let mut id = parse_block(&body, height)?;
    let base = url_base(&url);
    let node = super::ask_get(http, &format!("{base}/status"));
    let app = super::ask_get(http, &format!("{base}/abci_info"));
    id.client = node.as_ref().and_then(|n| parse_client(n, app.as_ref()));
    Ok(id)
}

/// The node's address in a `/block?height=` URL.
fn url_base(block_url: &str) -> &str {
    block_url
        .rsplit_once("/block?")
        .map_or(block_url, |(b, _)| b)
}

/// The client from `/status` (CometBFT's version) and `/abci_info` (the
/// application's name and version): `GaiaApp v19.0.0 (CometBFT 0.38.12)`.
pub fn parse_client(status: &Value, abci: Option<&Value>) -> Option<String> {
    let engine = str_at(status, &["result", "node_info", "version"])?;
    let app = abci.and_then(|a| {
        let name = str_at(a, &["result", "response", "data"]).filter(|n| !n.is_empty())?;
        let version = str_at(a, &["result", "response", "version"]).unwrap_or_default();
        Some(format!("{name} {version}").trim_end().to_owned())
    });
    let text = match app {
        Some(app) => format!("{app} (CometBFT {engine})"),
        None => format!("CometBFT {engine}"),
    };
    super::client_name(&Value::String(text))
}

/// `result.sync_info.latest_block_height` and `catching_up` from a
/// `/status` body.
pub fn parse_status(body: &str) -> Result<Tip, HeightError> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
    let info = v
        .get("result")
        .unwrap_or(&v)
        .get("sync_info")
        .ok_or_else(|| bad(SRC, "no sync_info in /status"))?;
    Ok(Tip {
        height: decimal(SRC, "latest_block_height", info.get("latest_block_height"))?,
        syncing: info
            .get("catching_up")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    })
}

/// The identity in a `/block?height=H` answer. A JSON-RPC error (a pruned
/// height, a height above the tip) is reported with the node's words.
pub fn parse_block(body: &str, height: u64) -> Result<ChainIdentity, HeightError> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        let said = str_at(err, &["data"])
            .or_else(|| str_at(err, &["message"]))
            .map_or_else(|| err.to_string(), str::to_owned);
        return Err(bad(SRC, format!("no block at height {height}: {said}")));
    }
    let r = v.get("result").unwrap_or(&v);
    let reported = str_at(r, &["block", "header", "height"])
        .ok_or_else(|| bad(SRC, "no block.header.height in /block"))?;
    if reported.parse::<u64>().ok() != Some(height) {
        return Err(super::wrong_height(SRC, height, reported));
    }
    Ok(ChainIdentity {
        kind: Dialect::Cometbft,
        genesis_hash: None,
        client: None,
        pruned: None,
        prune_height: None,
        height,
        block_hash: hex_hash(SRC, "block_id.hash", str_at(r, &["block_id", "hash"]))?,
        state_hash: Some(hex_hash(
            SRC,
            "app_hash",
            str_at(r, &["block", "header", "app_hash"]),
        )?),
        chain_id: str_at(r, &["block", "header", "chain_id"]).map(str::to_owned),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const BLOCK: &str = r#"{"jsonrpc":"2.0","id":-1,"result":{"block_id":{"hash":"6A5C1E29B3F1C0D7E0A8F7E8C1D2B3A4F5E6D7C8B9A0F1E2D3C4B5A697887766","parts":{"total":1,"hash":"AA"}},
        "block":{"header":{"version":{"block":"11"},"chain_id":"cosmoshub-4","height":"19736123","time":"2024-03-01T00:00:00Z",
        "app_hash":"0F1E2D3C4B5A69788796A5B4C3D2E1F00F1E2D3C4B5A69788796A5B4C3D2E1F0"},"data":{"txs":[]}}}}"#;

    #[test]
    fn status() {
        let body = r#"{"jsonrpc":"2.0","id":-1,"result":{"node_info":{"network":"cosmoshub-4"},
            "sync_info":{"latest_block_hash":"AB","latest_block_height":"19736123",
            "latest_block_time":"2024-03-01T00:00:00Z","catching_up":false}}}"#;
        assert_eq!(
            parse_status(body),
            Ok(Tip {
                height: 19_736_123,
                syncing: false
            })
        );
        let syncing = body.replace("\"catching_up\":false", "\"catching_up\":true");
        assert!(parse_status(&syncing).expect("parses").syncing);
        assert_eq!(
            parse_status(r#"{"sync_info":{"latest_block_height":"5"}}"#).map(|t| t.height),
            Ok(5)
        );
        for broken in [
            "",
            "<html>502 Bad Gateway</html>",
            r#"{"result":{"sync_info":{"latest_block_height":"-3"}}}"#,
            r#"{"result":{"sync_info":{}}}"#,
            r#"{"result":{"sync_info":{"latest_block_height":"12"#,
            r#"{"result":{}}"#,
        ] {
            assert!(parse_status(broken).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn block() {
        let id = parse_block(BLOCK, 19_736_123).expect("parses");
        assert_eq!(id.kind, Dialect::Cometbft);
        assert!(id.block_hash.starts_with("6A5C1E"));
        assert!(id
            .state_hash
            .as_deref()
            .is_some_and(|s| s.starts_with("0F1E2D")));
        assert_eq!(id.chain_id.as_deref(), Some("cosmoshub-4"));
        // The wrong height, a pruned height, and broken answers are errors.
        assert!(parse_block(BLOCK, 5).is_err());
        let pruned = r#"{"jsonrpc":"2.0","id":-1,"error":{"code":-32603,"message":"Internal error","data":"height 5 is not available, lowest height is 100"}}"#;
        let e = parse_block(pruned, 5).expect_err("pruned");
        assert!(e.to_string().contains("lowest height is 100"), "{e}");
        for broken in [
            "",
            "<html>502</html>",
            r#"{"result":{}}"#,
            &BLOCK.replace("6A5C1E", "not-hex"),
            &BLOCK.replace(r#""app_hash":"0F1E"#, r#""apphash":"0F1E"#),
        ] {
            assert!(parse_block(broken, 19_736_123).is_err(), "{broken}");
        }
    }
}
