//! How a command reaches a node's RPC: its URL check and credentials,
//! shared by `verify` (which asks a restored node) and `backup --rpc-url`
//! (which records the chain's identity at the backup's height).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use btm::family::Dialect;
use btm_daemon::height::{Auth, NodeRpc};

/// Credentials and bound for a node's RPC.
#[derive(Debug, Args)]
pub(super) struct RpcAuthArgs {
    /// The node's RPC cookie file (Bitcoin Core's `.cookie`)
    #[arg(
        long,
        value_name = "PATH",
        env = "BTM_RPC_COOKIE",
        conflicts_with = "rpc_user"
    )]
    rpc_cookie: Option<std::path::PathBuf>,
    /// The node's RPC user; the password is read from $BTM_RPC_PASSWORD
    #[arg(long, value_name = "USER", env = "BTM_RPC_USER")]
    rpc_user: Option<String>,
    /// Bound on each request to the node, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

impl RpcAuthArgs {
    /// A client of the node at `url`, in `dialect`. Plain http only, as the
    /// daemon: btm asks the node's local endpoint.
    pub(super) fn node(&self, dialect: Dialect, url: &str) -> Result<NodeRpc> {
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            bail!(
                "--rpc-url '{url}' is not an http:// URL (https is not supported; ask the node's local endpoint)"
            );
        }
        Ok(NodeRpc {
            dialect,
            url: url.to_owned(),
            auth: self.auth()?,
            timeout: Duration::from_secs(self.timeout),
        })
    }

    /// The credentials the flags and `$BTM_RPC_PASSWORD` give.
    fn auth(&self) -> Result<Auth> {
        Ok(match (&self.rpc_cookie, &self.rpc_user) {
            (Some(path), _) => Auth::Cookie(path.clone()),
            (None, Some(user)) => Auth::UserPassword {
                user: user.clone(),
                password: std::env::var("BTM_RPC_PASSWORD").map_err(|_| {
                    anyhow::anyhow!("--rpc-user needs the password in $BTM_RPC_PASSWORD")
                })?,
            },
            (None, None) => Auth::None,
        })
    }
}

/// `--rpc-kind`: one of the dialects btm speaks.
pub(super) fn parse_dialect(s: &str) -> Result<Dialect, String> {
    Dialect::parse(s).ok_or_else(|| format!("'{s}' is not an RPC kind: {}", Dialect::names()))
}
