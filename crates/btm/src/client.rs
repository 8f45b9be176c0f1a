//! Talking to a running daemon: what `btm notify` and `btm status` use, and
//! what a Rust node calls at its commit boundary instead of shelling out.
//! Blocking and dependency-free on purpose, so a node need not run tokio.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::protocol::{NotifyReply, Reply, Request, Status};

/// How long `notify` waits for its answer by default: long enough for a
/// snapshot with hooks and pruning on a busy pool.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(300);

/// The default control socket: `$BTM_RUNTIME_DIR/btm.sock`, normally
/// `/run/btm/btm.sock`.
pub fn default_socket() -> PathBuf {
    crate::dirs::runtime_dir().join("btm.sock")
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens there: the daemon is not running, or runs elsewhere.
    #[error("cannot connect to the btm daemon at {path}: {cause} (is `btm daemon` running?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// The exchange failed part-way (timeout included).
    #[error("talking to the btm daemon at {path}: {cause}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// The daemon answered something that is not the protocol.
    #[error("unexpected answer from the btm daemon: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("the btm daemon refused: {0}")]
    Refused(String),
}

/// Tell the daemon the node reached `height`, and wait for the snapshot (or
/// the reason there is none) for up to `timeout`.
pub fn notify(socket: &Path, height: u64, timeout: Duration) -> Result<NotifyReply, ClientError> {
    call(
        socket,
        &Request::Notify {
            height,
            protect: None,
        },
        timeout,
    )
}

/// Ask the daemon to snapshot `height` now, protected with `label` (an
/// upgrade's snapshot), whatever the interval; returns once it exists.
pub fn notify_protected(
    socket: &Path,
    height: u64,
    label: &str,
    timeout: Duration,
) -> Result<NotifyReply, ClientError> {
    call(
        socket,
        &Request::Notify {
            height,
            protect: Some(label.to_owned()),
        },
        timeout,
    )
}

/// Ask the daemon for its state.
pub fn status(socket: &Path, timeout: Duration) -> Result<Status, ClientError> {
    call(socket, &Request::Status, timeout)
}

fn call<T: DeserializeOwned>(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<T, ClientError> {
    let io = |cause| ClientError::Io {
        path: socket.to_owned(),
        cause,
    };
    let mut stream = UnixStream::connect(socket).map_err(|cause| ClientError::Connect {
        path: socket.to_owned(),
        cause,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line =
        serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new((&stream).take(1024 * 1024))
        .read_line(&mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol(
            "connection closed without an answer".into(),
        ));
    }
    match serde_json::from_str::<Reply<T>>(&answer) {
        Ok(Reply::Ok { result, .. }) => Ok(result),
        Ok(Reply::Err { error, .. }) => Err(ClientError::Refused(error)),
        Err(e) => Err(ClientError::Protocol(format!("{e}: {}", answer.trim()))),
    }
}
