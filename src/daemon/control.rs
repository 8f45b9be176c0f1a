//! The control socket: pushed heights and `status` requests, one JSON line
//! each way (see [`crate::protocol`]).
//!
//! A client that connects and sends nothing is dropped after
//! [`READ_TIMEOUT`]; a line longer than [`MAX_LINE`] or that is not a
//! request gets an error answer; at most [`MAX_CLIENTS`] are served at once.
//! None of these can wedge the socket for well-behaved clients.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinSet;

use crate::protocol::{Reply, Request, MAX_LINE};

use super::scheduler::{push_due, Scheduler};
use super::state::State;
use super::DaemonError;

/// How long a client may take to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How many clients are served at once; more wait in the kernel backlog.
pub const MAX_CLIENTS: usize = 64;

/// Bind the socket: refuse if another daemon answers on it, replace a stale
/// file, then set owner group and mode.
pub fn bind(path: &Path, group: Option<&str>, mode: u32) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| DaemonError::Group(group.to_owned()))?
            .gid;
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| err(std::io::Error::from(e)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// Removes the socket file when the server ends.
struct Unlink(PathBuf);
impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serve until `shutdown` fires, then wait for the clients being served.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    scheduler: Arc<Scheduler>,
    state: Arc<State>,
    push: bool,
    mut shutdown: broadcast::Receiver<()>,
) {
    let _unlink = Unlink(path);
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut clients = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.recv() => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (scheduler, state) = (Arc::clone(&scheduler), Arc::clone(&state));
        clients.spawn(async move {
            handle(stream, &scheduler, &state, push).await;
            drop(permit);
        });
        // Reap finished clients so the set stays small.
        while clients.try_join_next().is_some() {}
    }
    drop(listener);
    while clients.join_next().await.is_some() {}
}

async fn handle(stream: UnixStream, scheduler: &Scheduler, state: &State, push: bool) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = String::new();
    let answer = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => {
            tracing::debug!("control client sent nothing; dropped");
            return;
        }
        Ok(Err(e)) => serde_json::to_string(&Reply::<()>::err(format!("bad request: {e}"))),
        Ok(Ok(_)) if line.len() > MAX_LINE => {
            serde_json::to_string(&Reply::<()>::err(format!("bad request: longer than {MAX_LINE} bytes")))
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => serde_json::to_string(&Reply::<()>::err(format!(
                "bad request: {e}; expected {{\"cmd\":\"notify\",\"height\":N}} or {{\"cmd\":\"status\"}}"
            ))),
            Ok(Request::Status) => serde_json::to_string(&Reply::ok(state.status())),
            Ok(Request::Notify { height }) if !push => serde_json::to_string(&Reply::<()>::err(format!(
                "this daemon polls its height source; notify {height} ignored"
            ))),
            Ok(Request::Notify { height }) => {
                state.height_seen(height);
                let reply = match push_due(height, scheduler.cfg().itv) {
                    Ok(()) => scheduler.take(height).await,
                    Err(reason) => {
                        state.count(|c| c.skipped += 1);
                        crate::protocol::NotifyReply {
                            height,
                            outcome: crate::protocol::Outcome::Skipped,
                            reason: Some(reason),
                            snapshot: None,
                            duration_ms: None,
                            pruned: Vec::new(),
                        }
                    }
                };
                serde_json::to_string(&Reply::ok(reply))
            }
        },
    };
    let Ok(mut answer) = answer else { return };
    answer.push('\n');
    // The client may have gone; nothing to do about it.
    let _ = tokio::time::timeout(READ_TIMEOUT, write.write_all(answer.as_bytes())).await;
}
