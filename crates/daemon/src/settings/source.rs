//! The height source's keys: which source, the node's RPC and its
//! credentials, resolved together because each depends on the others.

use std::path::PathBuf;
use std::time::Duration;

use super::{invalid, ConfigError};
use crate::height::SourceSpec;
use crate::height::{Auth, NodeRpc};
use btm::family::Dialect;

/// The RPC keys, as given.
pub(super) struct Rpc<'a> {
    pub(super) url: Option<String>,
    pub(super) kind: Option<&'a str>,
    pub(super) auth: Auth,
    pub(super) timeout: Duration,
}

/// `rpc_cookie`, or `rpc_user` with `rpc_password`, or neither.
pub(super) fn resolve_auth(
    cookie: Option<PathBuf>,
    user: Option<String>,
    password: Option<String>,
) -> Result<Auth, ConfigError> {
    match (cookie, user, password) {
        (None, None, None) => Ok(Auth::None),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(invalid(
            "rpc_cookie",
            "set rpc_cookie, or rpc_user and rpc_password, not both",
        )),
        (Some(path), None, None) => Ok(Auth::Cookie(path)),
        (None, Some(user), Some(password)) => {
            if user.contains(':') {
                return Err(invalid("rpc_user", "must not contain ':'"));
            }
            Ok(Auth::UserPassword { user, password })
        }
        (None, Some(_), None) => Err(ConfigError::Missing {
            key: "rpc_password",
            hint: " with rpc_user (in the configuration file)",
        }),
        (None, None, Some(_)) => Err(ConfigError::Missing {
            key: "rpc_user",
            hint: " with rpc_password",
        }),
    }
}

/// The height source, and the node RPC that can name the chain at a
/// height and force a write (the source's own RPC, or `rpc_url` with
/// `rpc_kind` beside another source).
pub(super) fn resolve_source(
    kind: &str,
    rpc: Rpc<'_>,
    height_file: Option<PathBuf>,
    height_command: Option<Vec<String>>,
) -> Result<(SourceSpec, Option<NodeRpc>), ConfigError> {
    let unused = |key: &'static str| {
        invalid(
            key,
            format!("is set, but source is '{kind}', which does not use it"),
        )
    };
    if height_file.is_some() && kind != "file" {
        return Err(unused("height_file"));
    }
    if height_command.is_some() && kind != "command" {
        return Err(unused("height_command"));
    }
    let spec = match kind {
        "push" => SourceSpec::Push,
        "file" => SourceSpec::File {
            path: height_file.ok_or(ConfigError::Missing {
                key: "height_file",
                hint: " for source 'file' (--height-file)",
            })?,
        },
        "command" => {
            let argv = height_command.ok_or(ConfigError::Missing {
                key: "height_command",
                hint: " for source 'command' (--height-command)",
            })?;
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err(invalid("height_command", "the command is empty"));
            }
            SourceSpec::Command { argv }
        }
        other => match Dialect::parse(other) {
            Some(dialect) => {
                if rpc.kind.is_some_and(|k| k != other) {
                    return Err(invalid(
                        "rpc_kind",
                        format!("differs from source '{other}', which already names the RPC kind"),
                    ));
                }
                SourceSpec::Rpc(NodeRpc {
                    dialect,
                    url: check_rpc_url(rpc.url.clone())?,
                    auth: rpc.auth.clone(),
                    timeout: rpc.timeout,
                })
            }
            None => {
                return Err(invalid(
                    "source",
                    format!(
                    "unknown source '{other}' (expected push, file, command, or a node RPC: {})",
                    Dialect::names()
                ),
                ))
            }
        },
    };
    let node = node_rpc(&spec, rpc)?;
    Ok((spec, node))
}

/// The node RPC beside the source: the source's own, or `rpc_url` with
/// `rpc_kind`; credentials or a URL with no RPC to use them are errors.
fn node_rpc(spec: &SourceSpec, rpc: Rpc<'_>) -> Result<Option<NodeRpc>, ConfigError> {
    Ok(match (spec, rpc.kind) {
        (SourceSpec::Rpc(n), _) => Some(n.clone()),
        (_, Some(k)) => Some(NodeRpc {
            dialect: Dialect::parse(k).ok_or_else(|| {
                invalid(
                    "rpc_kind",
                    format!("unknown RPC kind '{k}' (expected {})", Dialect::names()),
                )
            })?,
            url: check_rpc_url(rpc.url)?,
            auth: rpc.auth,
            timeout: rpc.timeout,
        }),
        (_, None) if rpc.url.is_some() => {
            return Err(ConfigError::Missing {
                key: "rpc_kind",
                hint: " (the RPC's dialect) when rpc_url is set beside a push, file or command source",
            })
        }
        (_, None) if rpc.auth.is_set() => {
            return Err(invalid(
                "rpc_cookie",
                "credentials are set, but there is no node RPC (an RPC source, or rpc_url with rpc_kind)",
            ))
        }
        (_, None) => None,
    })
}

/// `rpc_url`: present, and a plain http:// URL.
fn check_rpc_url(rpc_url: Option<String>) -> Result<String, ConfigError> {
    let url = rpc_url.ok_or(ConfigError::Missing {
        key: "rpc_url",
        hint: " for this source (--rpc-url)",
    })?;
    if url.starts_with("https://") {
        return Err(invalid(
            "rpc_url",
            "https is not supported: the daemon runs on the node's machine; use the node's local http:// endpoint",
        ));
    }
    if !url.starts_with("http://") || url.len() <= "http://".len() {
        return Err(invalid("rpc_url", format!("'{url}' is not an http:// URL")));
    }
    Ok(url)
}
