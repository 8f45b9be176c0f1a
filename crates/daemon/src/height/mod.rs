//! Where the daemon learns the node's block height when it polls: a
//! CometBFT `/status`, an Ethereum `eth_blockNumber`, a file, or a command.
//! (In push mode the node tells the daemon instead; see [`btm::client`].)
//! The same RPCs also say which chain a height belongs to: see [`identity`].
//!
//! Each source is a blocking `fetch()` with its own timeout, run by the
//! daemon on a blocking thread. The parsers are pure and unit-tested
//! against real and broken responses; every failure is a [`HeightError`],
//! all of them temporary from the daemon's point of view.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub mod identity;

/// The largest response body read from an RPC endpoint.
const BODY_LIMIT: u64 = 1024 * 1024;

/// Why a height could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeightError {
    /// The node could not be reached (refused, DNS, timeout).
    #[error("cannot reach {url}: {detail}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The node answered with an HTTP error status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The answer did not contain a usable height.
    #[error("bad answer from {source_name}: {detail}")]
    BadResponse {
        /// Which source.
        source_name: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The height file could not be read.
    #[error("cannot read height file {path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// The height command failed.
    #[error(transparent)]
    Command(#[from] btm::exec::ExecError),
}

impl HeightError {
    /// A short stable label for status output and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HeightError::Unreachable { .. } => "unreachable",
            HeightError::Status { .. } => "http_status",
            HeightError::BadResponse { .. } => "bad_response",
            HeightError::File { .. } => "file",
            HeightError::Command(_) => "command",
        }
    }
}

/// How a polled source is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceSpec {
    /// The node pushes heights over the control socket.
    Push,
    /// Poll a CometBFT RPC `GET <url>/status`.
    Cometbft {
        /// Base RPC URL, e.g. `http://127.0.0.1:26657`.
        url: String,
    },
    /// Poll an Ethereum JSON-RPC `eth_blockNumber`.
    Ethereum {
        /// RPC URL, e.g. `http://127.0.0.1:8545`.
        url: String,
    },
    /// Read a file holding the height.
    File {
        /// The file.
        path: PathBuf,
    },
    /// Run a command that prints the height.
    Command {
        /// Argument vector; no shell.
        argv: Vec<String>,
    },
}

impl SourceSpec {
    /// The source's name as used in configuration and status.
    pub fn name(&self) -> &'static str {
        match self {
            SourceSpec::Push => "push",
            SourceSpec::Cometbft { .. } => "cometbft",
            SourceSpec::Ethereum { .. } => "ethereum",
            SourceSpec::File { .. } => "file",
            SourceSpec::Command { .. } => "command",
        }
    }

    /// Whether the daemon polls this source (everything but push).
    pub fn is_polled(&self) -> bool {
        !matches!(self, SourceSpec::Push)
    }
}

/// A polled height source with its timeout.
#[derive(Debug)]
pub struct Poller {
    spec: SourceSpec,
    timeout: Duration,
    http: Http,
}

impl Poller {
    /// A poller for `spec`; `timeout` bounds each HTTP request or command.
    pub fn new(spec: SourceSpec, timeout: Duration) -> Self {
        Poller {
            spec,
            timeout,
            http: Http::new(timeout),
        }
    }

    /// The source being polled.
    pub fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    /// Read the node's current height once. Blocking; bounded by the timeout.
    pub fn fetch(&self) -> Result<u64, HeightError> {
        match &self.spec {
            SourceSpec::Push => Err(HeightError::BadResponse {
                source_name: "push".into(),
                detail: "push heights arrive over the socket; there is nothing to poll".into(),
            }),
            SourceSpec::Cometbft { url } => {
                let url = format!("{}/status", url.trim_end_matches('/'));
                parse_cometbft_status(&self.http.call(&url, None)?)
            }
            SourceSpec::Ethereum { url } => {
                let body = r#"{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}"#;
                parse_eth_block_number(&self.http.call(url, Some(body))?)
            }
            SourceSpec::File { path } => {
                let text = std::fs::read_to_string(path).map_err(|e| HeightError::File {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                parse_height_text(&text, "file")
            }
            SourceSpec::Command { argv } => {
                let out = btm::exec::run(argv, &[], self.timeout)?;
                parse_height_text(&out, "command")
            }
        }
    }
}

/// A blocking HTTP client for node RPCs: every request bounded by one
/// timeout, bodies capped at [`BODY_LIMIT`], any status but 200 an error.
#[derive(Debug)]
pub(crate) struct Http {
    agent: ureq::Agent,
}

impl Http {
    pub(crate) fn new(timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Http { agent }
    }

    /// GET `url`, or POST `json_body` to it, and read the body.
    pub(crate) fn call(&self, url: &str, json_body: Option<&str>) -> Result<String, HeightError> {
        let unreachable = |e: ureq::Error| HeightError::Unreachable {
            url: url.to_owned(),
            detail: e.to_string(),
        };
        let response = match json_body {
            None => self.agent.get(url).call(),
            Some(body) => self
                .agent
                .post(url)
                .header("content-type", "application/json")
                .send(body),
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(HeightError::Status {
                url: url.to_owned(),
                status,
            });
        }
        response
            .into_body()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .map_err(unreachable)
    }
}

fn bad(source_name: &str, detail: impl Into<String>) -> HeightError {
    HeightError::BadResponse {
        source_name: source_name.to_owned(),
        detail: detail.into(),
    }
}

/// `result.sync_info.latest_block_height` (a decimal string) from a
/// CometBFT `/status` body. Older Tendermint without the `result` wrapper
/// is accepted too.
pub fn parse_cometbft_status(body: &str) -> Result<u64, HeightError> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad("cometbft", format!("not JSON: {e}")))?;
    let info = v
        .get("result")
        .unwrap_or(&v)
        .get("sync_info")
        .ok_or_else(|| bad("cometbft", "no sync_info in /status"))?;
    match info.get("latest_block_height") {
        Some(serde_json::Value::String(s)) => s.parse().map_err(|_| {
            bad(
                "cometbft",
                format!("latest_block_height {s:?} is not a number"),
            )
        }),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| {
            bad(
                "cometbft",
                format!("latest_block_height {n} is not a height"),
            )
        }),
        _ => Err(bad("cometbft", "no latest_block_height in sync_info")),
    }
}

/// The hex quantity in an `eth_blockNumber` JSON-RPC response.
pub fn parse_eth_block_number(body: &str) -> Result<u64, HeightError> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad("ethereum", format!("not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(bad("ethereum", format!("JSON-RPC error {err}")));
    }
    let s = v
        .get("result")
        .and_then(|r| r.as_str())
        .ok_or_else(|| bad("ethereum", "no string result"))?;
    let hex = s
        .strip_prefix("0x")
        .filter(|h| !h.is_empty() && h.len() <= 16)
        .ok_or_else(|| bad("ethereum", format!("result {s:?} is not a hex quantity")))?;
    u64::from_str_radix(hex, 16)
        .map_err(|_| bad("ethereum", format!("result {s:?} is not a hex quantity")))
}

/// A height as text: decimal, or `0x`-prefixed hex, surrounded by
/// whitespace at most.
pub fn parse_height_text(text: &str, source_name: &str) -> Result<u64, HeightError> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    };
    parsed.ok_or_else(|| {
        let shown: String = t.chars().take(40).collect();
        bad(source_name, format!("{shown:?} is not a block height"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cometbft_status() {
        let body = r#"{"jsonrpc":"2.0","id":-1,"result":{"node_info":{"network":"cosmoshub-4"},
            "sync_info":{"latest_block_hash":"AB","latest_block_height":"19736123",
            "latest_block_time":"2024-03-01T00:00:00Z","catching_up":false}}}"#;
        assert_eq!(parse_cometbft_status(body), Ok(19_736_123));
        assert_eq!(
            parse_cometbft_status(r#"{"sync_info":{"latest_block_height":"5"}}"#),
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
            assert!(parse_cometbft_status(broken).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn eth_block_number() {
        assert_eq!(
            parse_eth_block_number(r#"{"jsonrpc":"2.0","id":1,"result":"0x1b4"}"#),
            Ok(436)
        );
        assert_eq!(parse_eth_block_number(r#"{"result":"0x0"}"#), Ok(0));
        for broken in [
            r#"{"result":"0x"}"#,
            r#"{"result":"1b4"}"#,
            r#"{"result":"0xzz"}"#,
            r#"{"result":"0x10000000000000000"}"#,
            r#"{"error":{"code":-32601,"message":"nope"}}"#,
            r#"{"result":436}"#,
            "garbage",
        ] {
            assert!(parse_eth_block_number(broken).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn height_text() {
        assert_eq!(parse_height_text(" 123\n", "file"), Ok(123));
        assert_eq!(parse_height_text("0x10", "file"), Ok(16));
        for broken in ["", "12 13", "-1", "abc", "1.5"] {
            assert!(parse_height_text(broken, "file").is_err(), "{broken:?}");
        }
    }

    #[test]
    fn unreachable_rpc_is_an_error_not_a_hang() {
        // Port 9 (discard) on loopback is closed here: connection refused.
        let p = Poller::new(
            SourceSpec::Ethereum {
                url: "http://127.0.0.1:9".into(),
            },
            Duration::from_secs(2),
        );
        assert!(matches!(p.fetch(), Err(HeightError::Unreachable { .. })));
    }
}
