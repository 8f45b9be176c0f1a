//! The RPC dialects, one file each. Every dialect answers three questions
//! of a node: its tip ([`Tip`]), which block it has at a height
//! ([`super::identity::ChainIdentity`]), and, where the node writes its state lazily, a
//! forced write that says which height it made durable. A dialect is a
//! few calls plus pure parsers, unit-tested against real and broken
//! answers; [`super::node::NodeRpc`] picks the dialect.

use super::{bad, HeightError};

pub(super) mod beacon;
pub(super) mod bitcoin;
pub(super) mod cometbft;
pub(super) mod ethereum;
pub(super) mod solana;
pub(super) mod substrate;

/// A node's tip as its RPC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    /// Its height (block number or slot).
    pub height: u64,
    /// Whether it says it is still syncing, where the dialect tells.
    pub syncing: bool,
}

pub(super) fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// A client's name and version as a node printed it: one line of at most
/// 200 printable characters.
pub(super) fn client_name(result: &serde_json::Value) -> Option<String> {
    let s = result.as_str()?.trim();
    let ok = !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_control);
    ok.then(|| s.to_owned())
}

/// A JSON-RPC call whose answer only describes the node or its chain: an
/// export is still good without it (a node without that namespace), so a
/// failure is logged and answered `None`.
pub(super) fn ask(
    http: &super::http::Http,
    source: &str,
    url: &str,
    method: &str,
    params: serde_json::Value,
) -> Option<serde_json::Value> {
    http.json_rpc(source, url, method, params)
        .map_err(|e| tracing::debug!(method, error = %e, "the node did not say"))
        .ok()
}

/// [`ask`] for a REST endpoint: the JSON body of a GET of `url`.
pub(super) fn ask_get(http: &super::http::Http, url: &str) -> Option<serde_json::Value> {
    http.call(url, None)
        .map_err(|e| tracing::debug!(url, error = %e, "the node did not say"))
        .ok()
        .and_then(|body| serde_json::from_str(&body).ok())
}

/// A hex hash as the node printed it (`0x`-prefixed or not).
pub(super) fn hex_hash(source: &str, what: &str, s: Option<&str>) -> Result<String, HeightError> {
    let s = s.ok_or_else(|| bad(source, format!("no {what} in the answer")))?;
    let hex = s.strip_prefix("0x").unwrap_or(s);
    if hex.is_empty() || hex.len() > 128 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let shown: String = s.chars().take(40).collect();
        return Err(bad(source, format!("{what} {shown:?} is not a hex hash")));
    }
    Ok(s.to_owned())
}

/// A base58 hash (Solana), checked for its alphabet and length.
pub(super) fn base58_hash(
    source: &str,
    what: &str,
    s: Option<&str>,
) -> Result<String, HeightError> {
    const ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let s = s.ok_or_else(|| bad(source, format!("no {what} in the answer")))?;
    if s.len() < 32 || s.len() > 88 || !s.bytes().all(|b| ALPHABET.contains(&b)) {
        let shown: String = s.chars().take(40).collect();
        return Err(bad(
            source,
            format!("{what} {shown:?} is not a base58 hash"),
        ));
    }
    Ok(s.to_owned())
}

/// A `0x`-prefixed hex quantity of at most 64 bits.
pub(super) fn hex_quantity(source: &str, what: &str, s: Option<&str>) -> Result<u64, HeightError> {
    let s = s.ok_or_else(|| bad(source, format!("no {what} in the answer")))?;
    s.strip_prefix("0x")
        .filter(|h| !h.is_empty() && h.len() <= 16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| bad(source, format!("{what} {s:?} is not a hex quantity")))
}

/// A decimal height given as a JSON string or number.
pub(super) fn decimal(
    source: &str,
    what: &str,
    v: Option<&serde_json::Value>,
) -> Result<u64, HeightError> {
    match v {
        Some(serde_json::Value::String(s)) => s
            .parse()
            .map_err(|_| bad(source, format!("{what} {s:?} is not a number"))),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad(source, format!("{what} {n} is not a height"))),
        _ => Err(bad(source, format!("no {what} in the answer"))),
    }
}

/// The error for an answer about another height than the one asked for.
pub(super) fn wrong_height(source: &str, asked: u64, got: impl std::fmt::Display) -> HeightError {
    bad(
        source,
        format!("asked for {asked}, the node answered for {got}"),
    )
}

/// Check that an identity answer is for the height asked.
pub(super) fn same_height(source: &str, asked: u64, got: u64) -> Result<(), HeightError> {
    if asked == got {
        Ok(())
    } else {
        Err(wrong_height(source, asked, got))
    }
}
