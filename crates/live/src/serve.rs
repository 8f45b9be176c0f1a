//! The live restore's run: check the target, prove the backup, make or
//! pick up the skeleton, mount, say "ready", hydrate, and finish when
//! asked.
//!
//! ```text
//! open_target ─▶ load_and_prove ─▶ skeleton (or resume) ─▶ mount ─▶ ready
//!                                                                    │
//!        hydrator ─┐   checkpointer ─┐   control socket ─┐   signals ─┤
//!                  └─────────────────┴───────────────────┴──▶ events ─▶ finish: unmount, plain directory
//! ```
//!
//! Nothing is mounted until the store and the backup have passed the
//! same proof a restore makes, and the target has passed its checks
//! ([`crate::target`]).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use btm_chunk::format::head::Decoded;
use btm_chunk::pipeline::Cancel;
use btm_chunk::Repo;
use crossbeam_channel::{Receiver, Sender};
use nix::sys::stat::Mode;
use serde::Serialize;

use crate::backing::Backing;
use crate::control::{self, FinishLine, Finished};
use crate::files::{Files, Loaded};
use crate::fs::LiveFs;
use crate::mount;
use crate::skeleton;
use crate::source::Source;
use crate::stats::Stats;
use crate::target::{
    clear_tree, remove_state, root_handle, state_dir, write_session, SessionFile, Target,
    STATE_VERSION,
};
use crate::{human, LiveError};

/// How long `finish` waits for a busy mount to become idle.
const BUSY_GRACE: Duration = Duration::from_secs(5);
/// How often what is local is made durable and recorded.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// How a live restore serves.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// How long a read through the mount waits for the store before it
    /// fails with EIO.
    pub read_timeout: Duration,
    /// Use FUSE passthrough for wholly local files where the kernel has it.
    pub passthrough: bool,
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// On SIGTERM or SIGINT with every byte local, finish as `btm live
    /// finish` would, once the node has let go of the directory (a
    /// Kubernetes sidecar is stopped after the node). Otherwise a signal
    /// stops the server, and a rerun resumes.
    pub finish_on_stop: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            read_timeout: Duration::from_secs(30),
            passthrough: true,
            threads: 8,
            finish_on_stop: false,
        }
    }
}

/// What the threads of a run share.
struct Shared {
    files: Arc<Files>,
    dir: String,
    backup: String,
    hydrated: AtomicBool,
    finishing: AtomicBool,
}

impl Shared {
    fn status(&self) -> crate::Status {
        let state = if self.finishing.load(Ordering::Relaxed) {
            "finishing"
        } else if self.hydrated.load(Ordering::Relaxed) {
            "hydrated"
        } else {
            "hydrating"
        };
        let files = &self.files;
        files.stats.status(
            &self.dir,
            &self.backup,
            state,
            files.files_left(),
            files.absent_bytes(),
        )
    }
}

/// What the main loop reacts to.
enum Event {
    Finish(UnixStream),
    Signal(i32),
    Hydrated,
}

/// Serve backup `name` (`index`) of `repo` live at `target` until `btm
/// live finish` (Ok) or a signal or an unmount from outside (Err: run it
/// again to go on).
pub fn serve(
    target: Target,
    repo: Repo,
    name: &str,
    index: &Decoded,
    opts: &LiveOptions,
) -> Result<(), LiveError> {
    let dir = target.dir.clone();
    if let Some(s) = target.resume.as_ref().filter(|s| s.backup != name) {
        return Err(LiveError::OtherBackup {
            dir: dir.display().to_string(),
            found: s.backup.clone(),
            wanted: name.to_owned(),
        });
    }
    // Proof first: nothing is made or mounted for a backup that cannot be
    // restored whole.
    let map = btm_chunk::restore::load_and_prove(&repo, name, index)?;
    let listener = control::listen(&dir)?;
    let started = Instant::now();
    let root_for_fs = target
        .root
        .try_clone()
        .map_err(|e| LiveError::state("duplicating the target's descriptor", e))?;
    // Modes come from the backup and from the node's requests, not from
    // this process.
    nix::sys::stat::umask(Mode::empty());
    let loaded = skeleton_of(&target, &repo, name, index)?;
    let entries = loaded.table.head.entries;
    let backing = Arc::new(Backing::new(target.root, target.open_files));
    let v1 = matches!(index, Decoded::V1(_));
    let files = Arc::new(Files::new(
        loaded,
        Arc::clone(&backing),
        Source::new(repo, map, v1),
        opts.read_timeout,
        Stats::default(),
    )?);
    let shared = Arc::new(Shared {
        files: Arc::clone(&files),
        dir: mount::absolute(&dir).display().to_string(),
        backup: name.to_owned(),
        hydrated: AtomicBool::new(false),
        finishing: AtomicBool::new(false),
    });
    let signals = block_signals();
    let (bg, passthrough) = mount(&dir, backing, Arc::clone(&files), opts)?;
    announce_ready(&dir, name, entries, &files, started, passthrough);

    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_signal_waiter(signals, tx.clone());
    spawn_control(listener, Arc::clone(&shared), tx.clone());
    let stop = Cancel::new();
    let workers = spawn_workers(&files, &stop, tx);
    let outcome = main_loop(&dir, &shared, &rx, &bg, opts.finish_on_stop);
    stop.cancel();
    for w in workers {
        let _ = w.join();
    }
    let last = files.checkpoint();
    let _ = std::fs::remove_file(control::socket_path(&dir));
    match outcome {
        Outcome::Finished(streams) => {
            let _ = bg.join();
            finished(&dir, name, &root_for_fs, last, streams)
        }
        Outcome::Stopped(why) => stopped(&dir, why, last, bg),
    }
}

/// Say on stderr, and to systemd, that `dir` serves backup `name`.
fn announce_ready(
    dir: &Path,
    name: &str,
    entries: u64,
    files: &Files,
    started: Instant,
    passthrough: bool,
) {
    eprintln!(
        "ready: {} serves {name} ({entries} entries, {} of data, {} still to fetch) after {:.1}s; {}",
        dir.display(),
        human(files.stats.total_bytes.load(Ordering::Relaxed)),
        human(files.absent_bytes()),
        started.elapsed().as_secs_f64(),
        if passthrough {
            "local files are passed through to the kernel"
        } else {
            "no FUSE passthrough (Linux 6.9+ has it): every read goes through this server"
        }
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// Stopped before `finish` (a signal, an unmount from outside): leave no
/// mount behind if it can be helped.
fn stopped(
    dir: &Path,
    why: &'static str,
    last: Result<u64, LiveError>,
    bg: fuser::BackgroundSession,
) -> Result<(), LiveError> {
    if let Err(e) = last {
        tracing::error!(error = %e, "the last checkpoint failed");
    }
    // One the node still uses is detached (its reads then fail, as on a
    // lost disk).
    if nix::mount::umount2(dir, nix::mount::MntFlags::empty()).is_err() {
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
    }
    drop(bg);
    Err(LiveError::Interrupted(why))
}

/// The skeleton and the live files' table: made now (the state directory
/// first, a half-made skeleton of a killed run cleared), or picked up.
fn skeleton_of(
    target: &Target,
    repo: &Repo,
    name: &str,
    index: &Decoded,
) -> Result<Loaded, LiveError> {
    let root = &target.root;
    let state = state_dir(root, true)?;
    let chunk_size = index.chunk_size().max(1);
    if let Some(s) = &target.resume {
        if s.skeleton {
            return skeleton::resume(state.as_fd(), chunk_size);
        }
        clear_tree(root)?;
    }
    let mut session = SessionFile {
        backup: name.to_owned(),
        skeleton: false,
        version: STATE_VERSION,
        root: Some(root_handle(root)?),
    };
    write_session(&state, &session)?;
    let walk_ordered = !matches!(index, Decoded::V1(_));
    let loaded = skeleton::build(
        root.as_fd(),
        state.as_fd(),
        repo.entries(name, index),
        chunk_size,
        walk_ordered,
    )?;
    nix::unistd::syncfs(root.as_fd())
        .map_err(|e| LiveError::state("syncing the skeleton", e.into()))?;
    session.skeleton = true;
    write_session(&state, &session)?;
    Ok(loaded)
}

/// Mount the file system over `dir` and serve it on its own threads;
/// whether the kernel agreed to passthrough.
fn mount(
    dir: &Path,
    backing: Arc<Backing>,
    files: Arc<Files>,
    opts: &LiveOptions,
) -> Result<(fuser::BackgroundSession, bool), LiveError> {
    let mount_err = |source: std::io::Error| {
        match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => LiveError::Unsupported(format!(
            "cannot mount {} ({source}): a live restore must run as root (CAP_SYS_ADMIN); in a container, give it /dev/fuse and that capability",
            dir.display()
        )),
        _ => LiveError::Mount {
            dir: dir.display().to_string(),
            source,
        },
    }
    };
    let fs = LiveFs::new(backing, files, opts.passthrough).map_err(mount_err)?;
    let passthrough = fs.passthrough_flag();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(mount::SOURCE.into()),
        fuser::MountOption::Subtype(mount::SOURCE.into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, dir, &config).map_err(mount_err)?;
    let bg = session.spawn().map_err(mount_err)?;
    Ok((bg, passthrough.load(Ordering::Relaxed)))
}

/// Hydration and the checkpointer, on their own threads.
fn spawn_workers(
    files: &Arc<Files>,
    stop: &Cancel,
    tx: Sender<Event>,
) -> [std::thread::JoinHandle<()>; 2] {
    let hydrator = {
        let (files, stop) = (Arc::clone(files), stop.clone());
        std::thread::spawn(move || {
            // The node comes first: hydration (and the fetchers it starts)
            // gets what CPU and disk the node leaves.
            if let Err(e) = btm::sys::lower_thread_priority() {
                tracing::debug!(error = %e, "cannot lower hydration's priority");
            }
            if crate::hydrate::hydrate(&files, &stop) {
                // Durable at once: files leave the live set, and opens from
                // now on are passed through to the kernel.
                if let Err(e) = files.checkpoint() {
                    tracing::error!(error = %e, "checkpoint after hydration failed");
                }
                let _ = tx.send(Event::Hydrated);
            }
        })
    };
    let checkpointer = {
        let (files, stop) = (Arc::clone(files), stop.clone());
        std::thread::spawn(move || checkpoints(&files, &stop))
    };
    [hydrator, checkpointer]
}

/// `finish` unmounted the directory: remove the state directory once every
/// file is local and durable, and tell the clients that wait.
fn finished(
    dir: &Path,
    name: &str,
    root: &OwnedFd,
    last: Result<u64, LiveError>,
    streams: Vec<UnixStream>,
) -> Result<(), LiveError> {
    let cleaned = last.and_then(|left| {
        if left > 0 {
            return Err(LiveError::Refused(format!(
                "{left} files are still not local"
            )));
        }
        remove_state(root)
    });
    let line = match &cleaned {
        Ok(()) => Finished {
            done: true,
            error: None,
        },
        Err(e) => Finished {
            done: false,
            error: Some(e.to_string()),
        },
    };
    for mut s in streams {
        let _ = send_line(&mut s, &FinishLine::Finished(line.clone()));
    }
    cleaned.map(|()| {
        eprintln!(
            "finished: {} is a plain directory holding {name} and what the node wrote",
            dir.display()
        );
    })
}

/// How the main loop ended.
enum Outcome {
    /// Unmounted by `finish`; these clients wait for the last word.
    Finished(Vec<UnixStream>),
    /// Stopped, and why.
    Stopped(&'static str),
}

fn main_loop(
    dir: &Path,
    shared: &Shared,
    rx: &Receiver<Event>,
    bg: &fuser::BackgroundSession,
    finish_on_stop: bool,
) -> Outcome {
    let mut waiting: Vec<UnixStream> = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Finish(s)) => {
                shared.finishing.store(true, Ordering::Relaxed);
                waiting.push(s);
            }
            Ok(Event::Signal(sig)) if finish_on_stop && shared.hydrated.load(Ordering::Relaxed) => {
                tracing::info!(signal = sig, "every byte is local: finishing");
                return finish_now(dir, shared);
            }
            Ok(Event::Signal(sig)) => {
                tracing::warn!(signal = sig, "stopping the live restore");
                return Outcome::Stopped("stopped by a signal");
            }
            Ok(Event::Hydrated) => {
                shared.hydrated.store(true, Ordering::Relaxed);
                eprintln!("hydrated: every byte of {} is local", shared.backup);
            }
            Err(_) => {}
        }
        if bg.guard.is_finished() {
            return Outcome::Stopped("the mount went away");
        }
        if waiting.is_empty() {
            continue;
        }
        if !shared.hydrated.load(Ordering::Relaxed) {
            if last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                let st = shared.status();
                waiting.retain_mut(|s| send_line(s, &FinishLine::Progress(st.clone())).is_ok());
            }
            continue;
        }
        // Everything is local: make it durable, then leave the directory.
        if let Err(e) = shared.files.checkpoint() {
            tracing::error!(error = %e, "checkpoint before finishing failed");
        }
        match unmount_when_idle(dir) {
            Ok(()) => return Outcome::Finished(waiting),
            Err(e) => {
                let why = if e == nix::errno::Errno::EBUSY {
                    format!("{} is busy: stop the node (and anything else using it) first, then run `btm live finish` again", dir.display())
                } else {
                    format!("cannot unmount {}: {e}", dir.display())
                };
                for mut s in waiting.drain(..) {
                    let _ = send_line(
                        &mut s,
                        &FinishLine::Finished(Finished {
                            done: false,
                            error: Some(why.clone()),
                        }),
                    );
                }
                shared.finishing.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// Finish without a client asking (`finish_on_stop`): make everything
/// durable and unmount, or stop as on any signal if that cannot be done.
fn finish_now(dir: &Path, shared: &Shared) -> Outcome {
    shared.finishing.store(true, Ordering::Relaxed);
    if let Err(e) = shared.files.checkpoint() {
        tracing::error!(error = %e, "checkpoint before finishing failed");
        return Outcome::Stopped("stopped by a signal");
    }
    match unmount_when_idle(dir) {
        Ok(()) => Outcome::Finished(Vec::new()),
        Err(e) => {
            tracing::warn!(error = %e, "the directory is still in use: stopped without finishing");
            Outcome::Stopped("stopped by a signal")
        }
    }
}

/// Unmount `dir`, allowing processes that are exiting (the node just
/// stopped) a few seconds to close what they had open; a mount still busy
/// after that is left mounted.
fn unmount_when_idle(dir: &Path) -> Result<(), nix::errno::Errno> {
    let t = Instant::now();
    loop {
        match nix::mount::umount2(dir, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if t.elapsed() < BUSY_GRACE => {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

fn send_line(s: &mut UnixStream, line: &impl Serialize) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    json.push(b'\n');
    s.write_all(&json)
}

/// Every second the rates; every [`CHECKPOINT_EVERY`] a checkpoint.
fn checkpoints(files: &Files, stop: &Cancel) {
    let mut last = Instant::now();
    loop {
        if stop.sleep(Duration::from_secs(1)) {
            return;
        }
        files.stats.tick(Instant::now());
        if last.elapsed() >= CHECKPOINT_EVERY {
            last = Instant::now();
            if let Err(e) = files.checkpoint() {
                tracing::error!(error = %e, "checkpoint failed");
            }
        }
    }
}

fn spawn_control(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    tx: Sender<Event>,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (shared, tx) = (Arc::clone(&shared), tx.clone());
            std::thread::spawn(move || match control::read_request(&conn).as_deref() {
                Some("status") => {
                    let _ = send_line(&mut conn, &shared.status());
                }
                Some("finish") => {
                    let _ = tx.send(Event::Finish(conn));
                }
                _ => {
                    let _ = send_line(
                        &mut conn,
                        &Finished {
                            done: false,
                            error: Some("unknown request".into()),
                        },
                    );
                }
            });
        }
    });
}

/// Block SIGINT and SIGTERM in this thread and every thread it starts
/// from now on (the FUSE and hydration threads are never interrupted);
/// one thread takes them instead (see [`spawn_signal_waiter`]).
fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    set
}

/// The thread that hears SIGINT and SIGTERM, through
/// [`btm::sys::stop_signal_pipe`]: it alone (of the threads started since
/// [`block_signals`]) takes them, so they are heard as a container's PID 1
/// too. Without the pipe, the signals stay blocked and a stop is a kill.
fn spawn_signal_waiter(set: nix::sys::signal::SigSet, tx: Sender<Event>) {
    let pipe = match btm::sys::stop_signal_pipe() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hear stop signals");
            return;
        }
    };
    std::thread::spawn(move || {
        let _ = set.thread_unblock();
        let fd = std::os::fd::AsFd::as_fd(&pipe);
        let mut poll = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        loop {
            if nix::poll::poll(&mut poll, nix::poll::PollTimeout::NONE).is_err() {
                continue;
            }
            let mut byte = [0u8; 1];
            if let Ok(1) = nix::unistd::read(fd, &mut byte) {
                let _ = tx.send(Event::Signal(i32::from(byte[0])));
                return;
            }
        }
    });
}
