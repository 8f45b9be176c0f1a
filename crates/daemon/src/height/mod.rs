//! Where the daemon learns the node's block height when it polls: a node
//! RPC in one of the dialects of [`btm::family::Dialect`], a file, or a
//! command. (In push mode the node tells the daemon instead; see
//! [`btm::client`].) The same RPCs say which chain a height belongs to
//! ([`identity`]) and, for nodes that write their state lazily, force the
//! write before a snapshot ([`node::NodeRpc::flush`]).
//!
//! Each source is a blocking `fetch()` with its own timeout, run by the
//! daemon on a blocking thread. The parsers are pure and unit-tested
//! against real and broken responses; every failure is a [`HeightError`],
//! all of them temporary from the daemon's point of view.

use std::path::PathBuf;
use std::time::Duration;

pub mod dialect;
pub mod http;
pub mod identity;
pub mod node;

pub use dialect::Tip;
pub use http::Auth;
pub use node::NodeRpc;

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
    /// The RPC cookie file could not be read.
    #[error("cannot read the RPC cookie {path}: {detail} (the node writes it while it runs)")]
    Cookie {
        /// The cookie file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The node refused the request for want of (right) credentials.
    #[error("{url} answered HTTP {status}: {}", if *had_credentials { "it refused the credentials (check rpc_cookie, or rpc_user and rpc_password)" } else { "it needs credentials: set rpc_cookie, or rpc_user and rpc_password" })]
    Unauthorized {
        /// The endpoint.
        url: String,
        /// 401 or 403.
        status: u16,
        /// Whether credentials were sent.
        had_credentials: bool,
    },
    /// The node answered with a JSON-RPC error.
    #[error("{source_name} {method}: {message}")]
    Rpc {
        /// Which dialect.
        source_name: String,
        /// The method called.
        method: String,
        /// The error code, when the node gave one.
        code: Option<i64>,
        /// The node's message.
        message: String,
    },
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
            HeightError::Cookie { .. } => "cookie",
            HeightError::Unauthorized { .. } => "unauthorized",
            HeightError::Rpc { .. } => "rpc_error",
        }
    }
}

/// How a polled source is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// The node pushes heights over the control socket.
    Push,
    /// Poll the node's RPC for its tip.
    Rpc(NodeRpc),
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
            SourceSpec::Rpc(rpc) => rpc.dialect.name(),
            SourceSpec::File { .. } => "file",
            SourceSpec::Command { .. } => "command",
        }
    }

    /// Whether the daemon polls this source (everything but push).
    pub fn is_polled(&self) -> bool {
        !matches!(self, SourceSpec::Push)
    }

    /// The node RPC, when the source is one.
    pub fn rpc(&self) -> Option<&NodeRpc> {
        match self {
            SourceSpec::Rpc(rpc) => Some(rpc),
            _ => None,
        }
    }
}

/// A polled height source with its timeout.
#[derive(Debug)]
pub struct Poller {
    spec: SourceSpec,
    timeout: Duration,
    /// The client, kept across polls (an RPC source's credentials; unused
    /// by a file or command source).
    http: http::Http,
}

impl Poller {
    /// A poller for `spec`; `timeout` bounds each command (an RPC source
    /// has its own).
    pub fn new(spec: SourceSpec, timeout: Duration) -> Self {
        let http = spec
            .rpc()
            .map_or_else(|| http::Http::new(timeout, Auth::None), NodeRpc::client);
        Poller {
            spec,
            timeout,
            http,
        }
    }

    /// The source being polled.
    pub fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    /// Read the node's current height once. Blocking; bounded by the timeout.
    pub fn fetch(&self) -> Result<u64, HeightError> {
        match &self.spec {
            SourceSpec::Rpc(rpc) => rpc.tip_via(&self.http).map(|t| t.height),
            SourceSpec::Push => Err(HeightError::BadResponse {
                source_name: "push".into(),
                detail: "push heights arrive over the socket; there is nothing to poll".into(),
            }),
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

pub(crate) fn bad(source_name: &str, detail: impl Into<String>) -> HeightError {
    HeightError::BadResponse {
        source_name: source_name.to_owned(),
        detail: detail.into(),
    }
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
            SourceSpec::Rpc(NodeRpc {
                dialect: btm::family::Dialect::Ethereum,
                url: "http://127.0.0.1:9".into(),
                auth: Auth::None,
                timeout: Duration::from_secs(2),
            }),
            Duration::from_secs(2),
        );
        assert!(matches!(p.fetch(), Err(HeightError::Unreachable { .. })));
    }
}
