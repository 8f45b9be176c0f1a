//! The control socket: pushed heights and `status` requests, one JSON line
//! each way (see [`btm::protocol`]).
//!
//! The socket is bound once and outlives reloads: requests go to the
//! current generation, and a notify that meets a stopping generation waits
//! for the next one, or fails if the daemon is shutting down. A notify is
//! therefore either answered with its snapshot or fails with the reason;
//! it is never refused, dropped or reported done by a reload.
//!
//! No client waits on another. Connections are accepted at once. One that
//! has not sent its request line yet is *idle*: it is dropped after
//! [`READ_TIMEOUT`], and when [`MAX_IDLE`] are idle, the oldest of them is
//! dropped to make room, so a flood of silent connections can only evict
//! itself. A client that has sent its request is never dropped. Lines
//! longer than [`MAX_LINE`], and garbage, get an error answer.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::settings::DaemonSettings;
use btm::protocol::{NotifyReply, Outcome, Reply, Request, MAX_LINE};
use btm::volume::Label;

use super::scheduler::{reply, Taken};
use super::shutdown::{self, Shutdown, Trigger};
use super::{Current, DaemonError, Generation};

/// How long a client may take to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections may be idle (no request line yet) at once; a new
/// one beyond that evicts the oldest.
pub const MAX_IDLE: usize = 64;
/// How many clients with a request may wait for their answers at once;
/// beyond that a request is answered "busy" at once.
pub const MAX_ACTIVE: usize = 1024;

/// Where and how the socket is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The socket's path.
    pub path: PathBuf,
    /// The group owning it.
    pub group: Option<String>,
    /// Its permission bits.
    pub mode: u32,
}

impl Binding {
    /// The binding `settings` ask for.
    pub fn of(settings: &DaemonSettings) -> Self {
        Binding {
            path: settings.socket.clone(),
            group: settings.socket_group.clone(),
            mode: settings.socket_mode,
        }
    }

    fn socket_err(&self, cause: std::io::Error) -> DaemonError {
        DaemonError::Socket {
            path: self.path.clone(),
            cause,
        }
    }

    /// Set the socket file's group and mode.
    fn apply(&self) -> Result<(), DaemonError> {
        if let Some(group) = &self.group {
            let gid = nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(|| DaemonError::Group(group.clone()))?
                .gid;
            nix::unistd::chown(&self.path, None, Some(gid))
                .map_err(|e| self.socket_err(std::io::Error::from(e)))?;
        }
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.mode))
            .map_err(|e| self.socket_err(e))
    }

    /// Bind the socket: refuse if another daemon answers on it, replace a
    /// stale file, then set owner group and mode.
    fn bind(&self) -> Result<UnixListener, DaemonError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.socket_err(e))?;
        }
        if self.path.exists() {
            if std::os::unix::net::UnixStream::connect(&self.path).is_ok() {
                return Err(DaemonError::SocketInUse(self.path.clone()));
            }
            std::fs::remove_file(&self.path).map_err(|e| self.socket_err(e))?;
        }
        let listener = UnixListener::bind(&self.path).map_err(|e| self.socket_err(e))?;
        if let Err(e) = self.apply() {
            let _ = std::fs::remove_file(&self.path);
            return Err(e);
        }
        Ok(listener)
    }
}

/// Removes the socket file when dropped.
struct Unlink(PathBuf);
impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The running control server.
pub struct Server {
    binding: Binding,
    stop: Trigger,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind and serve requests against `current` until stopped.
    /// `process` is the daemon's stop: notifies that cannot be taken then
    /// fail instead of waiting for another generation.
    pub fn start(
        binding: Binding,
        current: Current,
        process: Shutdown,
    ) -> Result<Server, DaemonError> {
        let listener = binding.bind()?;
        let (stop, stopped) = shutdown::channel();
        let task = tokio::spawn(serve(
            listener,
            binding.path.clone(),
            current,
            process,
            stopped,
        ));
        Ok(Server {
            binding,
            stop,
            task,
        })
    }

    /// Where it is bound.
    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    /// Apply a new group and mode to the same path, keeping the socket.
    pub fn rebind(&mut self, binding: Binding) -> Result<(), DaemonError> {
        if binding != self.binding {
            binding.apply()?;
            self.binding = binding;
        }
        Ok(())
    }

    /// Stop accepting and wait until every client being served has its
    /// answer; the socket file is removed.
    pub async fn stop(self) {
        self.stop.fire();
        let _ = self.task.await;
    }

    /// Stop accepting (another server took over); its clients finish on
    /// their own.
    pub fn retire(self) {
        self.stop.fire();
    }
}

/// Connections that have not sent their request line yet, oldest first.
#[derive(Default)]
struct Idle {
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next: AtomicU64,
}

/// A place in [`Idle`]; leaving it (drop) makes the client active.
struct IdleTicket {
    idle: Arc<Idle>,
    id: u64,
    evicted: Arc<Notify>,
}

impl Idle {
    /// Register a new connection, evicting the oldest idle one if full.
    fn admit(self: &Arc<Self>) -> IdleTicket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= MAX_IDLE {
            if let Some((_, oldest)) = q.pop_front() {
                // Stored as a permit if that client is not waiting yet.
                oldest.notify_one();
            }
        }
        q.push_back((id, Arc::clone(&evicted)));
        IdleTicket {
            idle: Arc::clone(self),
            id,
            evicted,
        }
    }
}

impl Drop for IdleTicket {
    fn drop(&mut self) {
        let mut q = self.idle.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(id, _)| *id == self.id) {
            q.remove(i);
        }
    }
}

async fn serve(
    listener: UnixListener,
    path: PathBuf,
    current: Current,
    process: Shutdown,
    mut stopped: Shutdown,
) {
    let unlink = Unlink(path);
    let idle = Arc::new(Idle::default());
    let mut clients = JoinSet::new();
    loop {
        let Some(accepted) = stopped.until(listener.accept()).await else {
            break;
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Reap finished clients so the set stays small.
        while clients.try_join_next().is_some() {}
        let ticket = idle.admit();
        let busy = clients.len() >= MAX_IDLE + MAX_ACTIVE;
        clients.spawn(handle(
            stream,
            ticket,
            current.clone(),
            process.clone(),
            busy,
        ));
    }
    drop(listener);
    drop(unlink);
    while clients.join_next().await.is_some() {}
}

async fn handle(
    stream: UnixStream,
    ticket: IdleTicket,
    current: Current,
    process: Shutdown,
    busy: bool,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = String::new();
    let evicted = Arc::clone(&ticket.evicted);
    let read = tokio::select! {
        _ = evicted.notified() => {
            tracing::debug!("idle control client evicted by a newer connection");
            return;
        }
        r = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)) => r,
    };
    drop(ticket);
    let answer = match read {
        Err(_) => {
            tracing::debug!("control client sent nothing; dropped");
            return;
        }
        Ok(Err(e)) => Reply::<()>::err(format!("bad request: {e}")).to_line(),
        Ok(Ok(_)) if line.len() > MAX_LINE => {
            Reply::<()>::err(format!("bad request: longer than {MAX_LINE} bytes")).to_line()
        }
        Ok(Ok(_)) if busy => Reply::<()>::err("busy: too many clients; try again").to_line(),
        Ok(Ok(_)) => answer(line.trim(), current, process).await,
    };
    let Some(mut answer) = answer else { return };
    answer.push('\n');
    // The client may have gone; nothing to do about it.
    let _ = tokio::time::timeout(READ_TIMEOUT, write.write_all(answer.as_bytes())).await;
}

async fn answer(line: &str, mut current: Current, mut process: Shutdown) -> Option<String> {
    match serde_json::from_str::<Request>(line) {
        Err(e) => Reply::<()>::err(format!(
            "bad request: {e}; expected {{\"cmd\":\"notify\",\"height\":N}} or {{\"cmd\":\"status\"}}"
        ))
        .to_line(),
        Ok(Request::Status) => {
            let generation = current.borrow().clone();
            match generation {
                Some(g) => Reply::ok(g.state.status()).to_line(),
                None => Reply::<()>::err("the daemon is starting; try again").to_line(),
            }
        }
        Ok(Request::Notify { height, protect }) => match notify(
            height,
            protect.as_deref(),
            &mut current,
            &mut process,
        )
        .await
        {
            Ok(r) => Reply::ok(r).to_line(),
            Err(e) => Reply::<()>::err(e).to_line(),
        },
    }
}

fn shutting_down(height: u64) -> NotifyReply {
    reply(
        height,
        Outcome::Failed,
        "the daemon is shutting down; no snapshot was taken".into(),
    )
}

/// Hand `height` to the current generation; if it is stopping, to the next
/// one, unless the daemon itself is stopping.
async fn notify(
    height: u64,
    protect: Option<&str>,
    current: &mut Current,
    process: &mut Shutdown,
) -> Result<NotifyReply, String> {
    let label = protect.map(str::parse::<Label>).transpose()?;
    let mut stale: Option<u64> = None;
    loop {
        let Some(generation) = process.until(next_generation(current, stale)).await else {
            return Ok(shutting_down(height));
        };
        // A protected snapshot (an upgrade's) is taken whatever the source.
        if !generation.push && label.is_none() {
            return Err(format!(
                "this daemon polls its height source; notify {height} ignored"
            ));
        }
        let taken = match &label {
            Some(l) => generation.scheduler.take_protected(height, l.clone()).await,
            None => generation.scheduler.push(height).await,
        };
        match taken {
            Taken::Reply(r) => return Ok(r),
            Taken::Stopping if process.is_set() => return Ok(shutting_down(height)),
            Taken::Stopping => stale = Some(generation.id),
        }
    }
}

/// The current generation, once there is one that is not `stale`.
async fn next_generation(current: &mut Current, stale: Option<u64>) -> Arc<Generation> {
    loop {
        let candidate = current.borrow_and_update().clone();
        if let Some(g) = candidate.filter(|g| Some(g.id) != stale) {
            return g;
        }
        if current.changed().await.is_err() {
            // The daemon is gone; the caller's stop ends the wait.
            std::future::pending::<()>().await;
        }
    }
}
