//! One node's RPC endpoint: its dialect, URL, credentials and timeout.
//! Everything btm asks a node (its tip, the block at a height, a forced
//! write of its state) goes through here to the dialect that speaks it.

use std::time::Duration;

use btm::family::{consistency_of, Consistency, Dialect};

use super::dialect::{self, Tip};
use super::http::{Auth, Http};
use super::identity::ChainIdentity;
use super::HeightError;

/// A node's RPC endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRpc {
    /// The dialect it speaks.
    pub dialect: Dialect,
    /// Its URL: the base URL (CometBFT, beacon) or the JSON-RPC endpoint.
    pub url: String,
    /// Its credentials.
    pub auth: Auth,
    /// Bound on each request.
    pub timeout: Duration,
}

impl NodeRpc {
    /// A client for this endpoint, to reuse across requests (polling).
    pub fn client(&self) -> Http {
        Http::new(self.timeout, self.auth.clone())
    }

    /// The node's tip, through `http` (from [`NodeRpc::client`]).
    pub fn tip_via(&self, http: &Http) -> Result<Tip, HeightError> {
        let url = self.url.as_str();
        match self.dialect {
            Dialect::Cometbft => dialect::cometbft::tip(http, url),
            Dialect::Ethereum => dialect::ethereum::tip(http, url),
            Dialect::Bitcoin => dialect::bitcoin::tip(http, url),
            Dialect::Substrate => dialect::substrate::tip(http, url),
            Dialect::Solana => dialect::solana::tip(http, url),
            Dialect::Beacon => dialect::beacon::tip(http, url),
        }
    }

    /// The node's tip. Blocking, bounded by the timeout.
    pub fn tip(&self) -> Result<Tip, HeightError> {
        self.tip_via(&self.client())
    }

    /// Which block the node has at `height`. Blocking, bounded by the
    /// timeout (per request; a dialect makes at most five, the last ones
    /// only to describe the chain and the client).
    pub fn identity(&self, height: u64) -> Result<ChainIdentity, HeightError> {
        let http = self.client();
        let url = self.url.as_str();
        match self.dialect {
            Dialect::Cometbft => dialect::cometbft::identity(&http, url, height),
            Dialect::Ethereum => dialect::ethereum::identity(&http, url, height),
            Dialect::Bitcoin => dialect::bitcoin::identity(&http, url, height),
            Dialect::Substrate => dialect::substrate::identity(&http, url, height),
            Dialect::Solana => dialect::solana::identity(&http, url, height),
            Dialect::Beacon => dialect::beacon::identity(&http, url, height),
        }
    }

    /// Whether the node can be made to write its state: the family table
    /// says its consistency is [`Consistency::Flush`].
    pub fn can_flush(&self) -> bool {
        consistency_of(self.dialect) == Consistency::Flush
    }

    /// Force the node to write its state to disk, within `timeout`, and
    /// return the height the write made durable; `None` when the dialect
    /// has no such call (the node's state is durable at each commit, or
    /// cannot be forced: see [`btm::family::Consistency`]).
    pub fn flush(&self, timeout: Duration) -> Result<Option<u64>, HeightError> {
        let http = Http::new(timeout, self.auth.clone());
        match self.dialect {
            Dialect::Bitcoin => dialect::bitcoin::flush(&http, &self.url).map(Some),
            _ => Ok(None),
        }
    }
}
