//! Which chain a height belongs to. An export records the node's block hash
//! and state commitment at the exported height (CometBFT `/block`: block
//! hash and app hash; Ethereum `eth_getBlockByNumber`: block hash and state
//! root), and `btm verify` asks a node running on restored data for the
//! same height. Equal hashes prove the rebuilt node is on the exported
//! chain at the exported height; a fork, another network or a corrupt
//! restore answers differently.
//!
//! Fetching is blocking and bounded by the client's timeout. Parsing and
//! comparing are pure and unit-tested against real and broken answers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, HeightError, Http};

/// The RPC dialects btm can ask for a chain identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainKind {
    /// CometBFT / Tendermint RPC.
    Cometbft,
    /// Ethereum JSON-RPC.
    Ethereum,
}

impl ChainKind {
    /// The name used in configuration (`rpc_kind`) and output.
    pub fn name(self) -> &'static str {
        match self {
            ChainKind::Cometbft => "cometbft",
            ChainKind::Ethereum => "ethereum",
        }
    }

    /// Parse a configuration value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cometbft" => Some(ChainKind::Cometbft),
            "ethereum" => Some(ChainKind::Ethereum),
            _ => None,
        }
    }
}

/// A node RPC that can say which block is at a height.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainRpc {
    /// The dialect.
    pub kind: ChainKind,
    /// Base URL (CometBFT) or JSON-RPC endpoint (Ethereum).
    pub url: String,
    /// Bound on each request.
    pub timeout: Duration,
}

/// The chain's identity at one height, as the node reported it.
///
/// Stored as `meta.chain` in an export's index. Hashes are kept as the node
/// printed them and compared ignoring ASCII case (CometBFT prints upper-case
/// hex, Ethereum `0x`-prefixed lower-case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainIdentity {
    /// The dialect that reported it; `verify` asks in the same one.
    pub kind: ChainKind,
    /// The height.
    pub height: u64,
    /// The block's hash.
    pub block_hash: String,
    /// CometBFT: the header's app hash (the application state after the
    /// previous block). Ethereum: the block's state root.
    pub state_hash: String,
    /// CometBFT's chain id, when the header carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<String>,
}

impl ChainIdentity {
    /// What the state hash is called in this dialect.
    pub fn state_hash_name(&self) -> &'static str {
        match self.kind {
            ChainKind::Cometbft => "app hash",
            ChainKind::Ethereum => "state root",
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
    field("block hash", &recorded.block_hash, &found.block_hash);
    field(
        recorded.state_hash_name(),
        &recorded.state_hash,
        &found.state_hash,
    );
    out
}

impl ChainRpc {
    /// Ask the node which block it has at `height`. Blocking, bounded by
    /// the timeout.
    pub fn identity(&self, height: u64) -> Result<ChainIdentity, HeightError> {
        let http = Http::new(self.timeout);
        match self.kind {
            ChainKind::Cometbft => {
                let url = format!("{}/block?height={height}", self.url.trim_end_matches('/'));
                parse_cometbft_block(&http.call(&url, None)?, height)
            }
            ChainKind::Ethereum => {
                let body = format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"eth_getBlockByNumber","params":["0x{height:x}",false]}}"#
                );
                parse_eth_block(&http.call(&self.url, Some(&body))?, height)
            }
        }
    }
}

fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn hash(source: &str, what: &str, s: Option<&str>) -> Result<String, HeightError> {
    let s = s.ok_or_else(|| bad(source, format!("no {what} in the answer")))?;
    let hex = s.strip_prefix("0x").unwrap_or(s);
    if hex.is_empty() || hex.len() > 128 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let shown: String = s.chars().take(40).collect();
        return Err(bad(source, format!("{what} {shown:?} is not a hex hash")));
    }
    Ok(s.to_owned())
}

/// The identity in a CometBFT `/block?height=H` answer. Older Tendermint
/// without the `result` wrapper is accepted; a JSON-RPC error (a pruned
/// height, a height above the tip) is reported with the node's words.
pub fn parse_cometbft_block(body: &str, height: u64) -> Result<ChainIdentity, HeightError> {
    const SRC: &str = "cometbft";
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
        return Err(bad(
            SRC,
            format!("asked for block {height}, got block {reported}"),
        ));
    }
    Ok(ChainIdentity {
        kind: ChainKind::Cometbft,
        height,
        block_hash: hash(SRC, "block_id.hash", str_at(r, &["block_id", "hash"]))?,
        state_hash: hash(SRC, "app_hash", str_at(r, &["block", "header", "app_hash"]))?,
        chain_id: str_at(r, &["block", "header", "chain_id"]).map(str::to_owned),
    })
}

/// The identity in an `eth_getBlockByNumber` answer. A `null` result (the
/// node does not have the block) is an error.
pub fn parse_eth_block(body: &str, height: u64) -> Result<ChainIdentity, HeightError> {
    const SRC: &str = "ethereum";
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad(SRC, format!("not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(bad(SRC, format!("JSON-RPC error {err}")));
    }
    let block = match v.get("result") {
        Some(serde_json::Value::Object(_)) => &v["result"],
        Some(serde_json::Value::Null) => {
            return Err(bad(SRC, format!("the node has no block {height}")))
        }
        _ => return Err(bad(SRC, "no block object in the answer")),
    };
    let number = str_at(block, &["number"])
        .and_then(|n| n.strip_prefix("0x"))
        .and_then(|n| u64::from_str_radix(n, 16).ok());
    if number != Some(height) {
        return Err(bad(
            SRC,
            format!(
                "asked for block {height}, got {}",
                str_at(block, &["number"]).unwrap_or("no number")
            ),
        ));
    }
    Ok(ChainIdentity {
        kind: ChainKind::Ethereum,
        height,
        block_hash: hash(SRC, "hash", str_at(block, &["hash"]))?,
        state_hash: hash(SRC, "stateRoot", str_at(block, &["stateRoot"]))?,
        chain_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMET: &str = r#"{"jsonrpc":"2.0","id":-1,"result":{"block_id":{"hash":"6A5C1E29B3F1C0D7E0A8F7E8C1D2B3A4F5E6D7C8B9A0F1E2D3C4B5A697887766","parts":{"total":1,"hash":"AA"}},
        "block":{"header":{"version":{"block":"11"},"chain_id":"cosmoshub-4","height":"19736123","time":"2024-03-01T00:00:00Z",
        "app_hash":"0F1E2D3C4B5A69788796A5B4C3D2E1F00F1E2D3C4B5A69788796A5B4C3D2E1F0"},"data":{"txs":[]}}}}"#;

    const ETH: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"number":"0x1b4","hash":"0xdc0818cf78f21a8e70579cb46a43643f78291264dda342ae31049421c82d21ae",
        "parentHash":"0xe99e022112df268087ea7eafaf4790497fd21dbeeb6bd7a1721df161a6657a54",
        "stateRoot":"0xddc8b0234c2e0cad087c8b389aa7ef01f7d79b2570bccb77ce48648aa61c904d","transactions":[]}}"#;

    #[test]
    fn cometbft_block() {
        let id = parse_cometbft_block(COMET, 19_736_123).expect("parses");
        assert_eq!(id.kind, ChainKind::Cometbft);
        assert!(id.block_hash.starts_with("6A5C1E"));
        assert!(id.state_hash.starts_with("0F1E2D"));
        assert_eq!(id.chain_id.as_deref(), Some("cosmoshub-4"));
        // The wrong height, a pruned height, and broken answers are errors.
        assert!(parse_cometbft_block(COMET, 5).is_err());
        let pruned = r#"{"jsonrpc":"2.0","id":-1,"error":{"code":-32603,"message":"Internal error","data":"height 5 is not available, lowest height is 100"}}"#;
        let e = parse_cometbft_block(pruned, 5).expect_err("pruned");
        assert!(e.to_string().contains("lowest height is 100"), "{e}");
        for broken in [
            "",
            "<html>502</html>",
            r#"{"result":{}}"#,
            &COMET.replace("6A5C1E", "not-hex"),
            &COMET.replace(r#""app_hash":"0F1E"#, r#""apphash":"0F1E"#),
        ] {
            assert!(
                parse_cometbft_block(broken, 19_736_123).is_err(),
                "{broken}"
            );
        }
    }

    #[test]
    fn ethereum_block() {
        let id = parse_eth_block(ETH, 436).expect("parses");
        assert_eq!(id.kind, ChainKind::Ethereum);
        assert!(id.block_hash.starts_with("0xdc0818"));
        assert!(id.state_hash.starts_with("0xddc8b0"));
        assert!(parse_eth_block(ETH, 437).is_err());
        let e = parse_eth_block(r#"{"jsonrpc":"2.0","id":1,"result":null}"#, 9).expect_err("null");
        assert!(e.to_string().contains("no block 9"), "{e}");
        for broken in [
            r#"{"error":{"code":-32601,"message":"nope"}}"#,
            r#"{"result":"0x1"}"#,
            &ETH.replace(r#""hash":"0xdc08"#, r#""hash":"0xzz08"#),
            &ETH.replace("stateRoot", "stateroot"),
            "garbage",
        ] {
            assert!(parse_eth_block(broken, 436).is_err(), "{broken}");
        }
    }

    #[test]
    fn compare_names_every_difference_and_ignores_hex_case() {
        let a = parse_cometbft_block(COMET, 19_736_123).expect("parses");
        let mut b = a.clone();
        b.block_hash = b.block_hash.to_lowercase();
        assert!(compare(&a, &b).is_empty());
        b.state_hash = "00".into();
        b.chain_id = Some("theta-testnet-001".into());
        let fields: Vec<_> = compare(&a, &b).iter().map(|m| m.field).collect();
        assert_eq!(fields, ["chain id", "app hash"]);
        let e = parse_eth_block(ETH, 436).expect("parses");
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
        let a = parse_eth_block(ETH, 436).expect("parses");
        let v = serde_json::to_value(&a).expect("serializes");
        assert_eq!(v["kind"], "ethereum");
        assert!(v.get("chain_id").is_none());
        let back: ChainIdentity = serde_json::from_value(v).expect("deserializes");
        assert_eq!(back, a);
    }
}
