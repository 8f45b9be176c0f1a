//! The blocking HTTP client every dialect talks through: each request
//! bounded by one timeout, bodies capped, credentials (a cookie file read
//! afresh at each request, or a user and password) sent as HTTP Basic
//! auth, and JSON-RPC errors reported in the node's own words whatever
//! HTTP status they came with (Bitcoin Core answers errors with 500).

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::{bad, HeightError};

/// The largest response body read from an RPC endpoint.
const BODY_LIMIT: u64 = 16 * 1024 * 1024;

/// How a node's RPC wants to be authenticated. `Debug` never shows the
/// password.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A cookie file holding `user:password`, which the node rewrites each
    /// time it starts (Bitcoin Core's `.cookie`): read at every request.
    Cookie(PathBuf),
    /// A fixed user and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => write!(f, "None"),
            Auth::Cookie(path) => f.debug_tuple("Cookie").field(path).finish(),
            Auth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl Auth {
    /// The `Authorization` header value, if any.
    fn header(&self) -> Result<Option<String>, HeightError> {
        let pair = match self {
            Auth::None => return Ok(None),
            Auth::UserPassword { user, password } => format!("{user}:{password}"),
            Auth::Cookie(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| HeightError::Cookie {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                let text = text.trim_end_matches(['\r', '\n']);
                if !text.contains(':') {
                    return Err(HeightError::Cookie {
                        path: path.clone(),
                        detail: "it does not hold user:password".into(),
                    });
                }
                text.to_owned()
            }
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        Ok(Some(format!("Basic {encoded}")))
    }

    /// Whether any credentials are configured.
    pub fn is_set(&self) -> bool {
        !matches!(self, Auth::None)
    }
}

/// A blocking HTTP client for one node RPC endpoint.
#[derive(Debug)]
pub struct Http {
    agent: ureq::Agent,
    auth: Auth,
    timeout: Duration,
}

impl Http {
    /// A client whose every request ends within `timeout`.
    pub fn new(timeout: Duration, auth: Auth) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Http {
            agent,
            auth,
            timeout,
        }
    }

    /// GET `url`, or POST `json_body` to it: the status and the body.
    pub fn call_any(
        &self,
        url: &str,
        json_body: Option<&str>,
    ) -> Result<(u16, String), HeightError> {
        let unreachable = |e: ureq::Error| HeightError::Unreachable {
            url: url.to_owned(),
            detail: match e {
                ureq::Error::Timeout(_) => format!(
                    "timed out: no answer within {}",
                    humantime::format_duration(self.timeout)
                ),
                e => e.to_string(),
            },
        };
        let auth = self.auth.header()?;
        let response = match json_body {
            None => {
                let mut req = self.agent.get(url);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
            Some(body) => {
                let mut req = self
                    .agent
                    .post(url)
                    .header("content-type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send(body)
            }
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(HeightError::Unauthorized {
                url: url.to_owned(),
                status,
                had_credentials: self.auth.is_set(),
            });
        }
        let body = response
            .into_body()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .map_err(unreachable)?;
        Ok((status, body))
    }

    /// GET `url` or POST `json_body`; any status but 200 is an error.
    pub fn call(&self, url: &str, json_body: Option<&str>) -> Result<String, HeightError> {
        let (status, body) = self.call_any(url, json_body)?;
        if status != 200 {
            return Err(HeightError::Status {
                url: url.to_owned(),
                status,
            });
        }
        Ok(body)
    }

    /// Call a JSON-RPC `method` at `url` and return its `result`. An
    /// `error` member is reported with the node's message, whatever the
    /// HTTP status; a non-JSON answer with a status other than 200 is a
    /// status error.
    pub fn json_rpc(
        &self,
        source: &str,
        url: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, HeightError> {
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let (status, text) = self.call_any(url, Some(&body.to_string()))?;
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) if status != 200 => {
                return Err(HeightError::Status {
                    url: url.to_owned(),
                    status,
                })
            }
            Err(e) => return Err(bad(source, format!("{method}: not JSON: {e}"))),
        };
        rpc_result(source, method, v)
    }
}

/// The `result` of a JSON-RPC answer, or its `error` in the node's words.
pub fn rpc_result(source: &str, method: &str, mut v: Value) -> Result<Value, HeightError> {
    match v.get("error") {
        None | Some(Value::Null) => {}
        Some(err) => {
            let said = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| err.to_string(), str::to_owned);
            let code = err.get("code").and_then(Value::as_i64);
            return Err(HeightError::Rpc {
                source_name: source.to_owned(),
                method: method.to_owned(),
                code,
                message: said,
            });
        }
    }
    match v.get_mut("result") {
        Some(r) => Ok(r.take()),
        None => Err(bad(source, format!("{method}: no result in the answer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_told_in_the_nodes_words() {
        let v: Value = serde_json::from_str(
            r#"{"result":null,"error":{"code":-8,"message":"Block height out of range"},"id":1}"#,
        )
        .expect("json");
        let e = rpc_result("bitcoin", "getblockhash", v).expect_err("error");
        assert!(
            e.to_string()
                .contains("getblockhash: Block height out of range"),
            "{e}"
        );
        let ok: Value = serde_json::from_str(r#"{"result":5,"error":null}"#).expect("json");
        assert_eq!(
            rpc_result("bitcoin", "getblockcount", ok).ok(),
            Some(5.into())
        );
    }

    #[test]
    fn the_password_is_never_printed() {
        let a = Auth::UserPassword {
            user: "btm".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("btm") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn a_cookie_is_read_at_each_request_and_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(".cookie");
        let auth = Auth::Cookie(path.clone());
        let e = auth.header().expect_err("missing");
        assert!(e.to_string().contains("cannot read the RPC cookie"), "{e}");
        std::fs::write(&path, "__cookie__:abc\n").expect("write");
        let h = auth.header().expect("header").expect("some");
        assert_eq!(h, "Basic X19jb29raWVfXzphYmM=");
        std::fs::write(&path, "garbage").expect("write");
        assert!(auth.header().is_err());
    }
}
