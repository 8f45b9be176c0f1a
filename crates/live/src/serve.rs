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
//! same proof a restore makes. The state directory (`.btm-live`: the
//! session and the journal) lives in the target itself, on the same file
//! system as the data, so `syncfs` covers both; finishing removes it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use btm_chunk::format::head::Decoded;
use btm_chunk::pipeline::Cancel;
use btm_chunk::Repo;
use crossbeam_channel::{Receiver, Sender};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::control::{self, FinishLine, Finished};
use crate::files::{Files, LiveFile};
use crate::fs::LiveFs;
use crate::journal::{self, Journal};
use crate::mount;
use crate::order::{hydration_order, Candidate};
use crate::skeleton::{self, Built, STATE_DIR};
use crate::source::Source;
use crate::stats::Stats;
use crate::LiveError;

/// The session file in the state directory.
const SESSION: &str = "session.json";
/// How long `finish` waits for a busy mount to become idle.
const BUSY_GRACE: Duration = Duration::from_secs(5);
/// How often what is local is made durable and journalled.
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
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            read_timeout: Duration::from_secs(30),
            passthrough: true,
            threads: 8,
        }
    }
}

/// What the state directory says of the run it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// The backup served.
    pub backup: String,
    /// Whether the skeleton is complete and durable.
    pub skeleton: bool,
}

/// A target directory checked and opened before anything is mounted on it.
#[derive(Debug)]
pub struct Target {
    dir: PathBuf,
    root: OwnedFd,
    resume: Option<SessionFile>,
}

impl Target {
    /// The backup an unfinished live restore here serves: a rerun goes on
    /// with it, whatever `latest` means now.
    pub fn unfinished(&self) -> Option<&str> {
        self.resume.as_ref().map(|s| s.backup.as_str())
    }
}

fn io(dir: &Path, e: impl Into<std::io::Error>) -> LiveError {
    LiveError::Io {
        path: dir.display().to_string(),
        source: e.into(),
    }
}

/// Check `dir` for a live restore: FUSE usable, no mount on it (a dead
/// live-restore mount is cleared), and empty or holding an unfinished live
/// restore. Created if missing.
pub fn open_target(dir: &Path) -> Result<Target, LiveError> {
    mount::check_fuse()?;
    mount::clear_dead(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let root = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(dir, e))?;
    let mut names = Vec::new();
    let mut d = nix::dir::Dir::from_fd(root.try_clone().map_err(|e| io(dir, e))?)
        .map_err(|e| io(dir, e))?;
    for e in d.iter() {
        let e = e.map_err(|e| io(dir, e))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    let resume = if names.iter().any(|n| n == STATE_DIR.as_bytes()) {
        let session =
            read_session(&root).ok_or_else(|| LiveError::NotEmpty(dir.display().to_string()))?;
        Some(session)
    } else if names.is_empty() {
        None
    } else {
        return Err(LiveError::NotEmpty(dir.display().to_string()));
    };
    Ok(Target {
        dir: dir.to_path_buf(),
        root,
        resume,
    })
}

fn state_dir(root: &OwnedFd, create: bool) -> Result<OwnedFd, LiveError> {
    if create {
        match nix::sys::stat::mkdirat(root.as_fd(), STATE_DIR, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(LiveError::state("making the state directory", e.into())),
        }
    }
    openat(
        root.as_fd(),
        STATE_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LiveError::state("opening the state directory", e.into()))
}

fn read_session(root: &OwnedFd) -> Option<SessionFile> {
    let state = state_dir(root, false).ok()?;
    let fd = openat(
        state.as_fd(),
        SESSION,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    serde_json::from_reader(File::from(fd)).ok()
}

/// Replace the session file, durably.
fn write_session(state: &OwnedFd, s: &SessionFile) -> Result<(), LiveError> {
    let err = |e: std::io::Error| LiveError::state("writing the session file", e);
    let tmp = "session.json.tmp";
    let fd = openat(
        state.as_fd(),
        tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| err(e.into()))?;
    let mut f = File::from(fd);
    let json = serde_json::to_vec(s).map_err(|e| err(e.into()))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    nix::fcntl::renameat(state.as_fd(), tmp, state.as_fd(), SESSION).map_err(|e| err(e.into()))?;
    nix::unistd::fsync(state.as_fd()).map_err(|e| err(e.into()))
}

/// Remove everything under `root` but the state directory (a skeleton
/// that a killed run left half made; nothing was served from it).
fn clear_tree(root: &OwnedFd) -> Result<(), LiveError> {
    remove_children(root.as_fd(), true)
        .map_err(|e| LiveError::state("clearing a half-made skeleton", e.into()))
}

fn remove_children(dir: std::os::fd::BorrowedFd<'_>, top: bool) -> Result<(), nix::errno::Errno> {
    let mut d = nix::dir::Dir::from_fd(
        dir.try_clone_to_owned()
            .map_err(|_| nix::errno::Errno::EBADF)?,
    )?;
    let names: Vec<Vec<u8>> = d
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b".." && !(top && n == STATE_DIR.as_bytes()))
        .collect();
    for n in names {
        let name = OsStr::from_bytes(&n);
        let st = nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let sub = openat(
                dir,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            remove_children(sub.as_fd(), false)?;
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir)?;
        } else {
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        }
    }
    Ok(())
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
            files.count() as u64,
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
    repo: Repo<'static>,
    name: &str,
    index: &Decoded,
    opts: &LiveOptions,
) -> Result<(), LiveError> {
    let dir = target.dir.clone();
    if let Some(s) = &target.resume {
        if s.backup != name {
            return Err(LiveError::OtherBackup {
                dir: dir.display().to_string(),
                found: s.backup.clone(),
                wanted: name.to_owned(),
            });
        }
    }
    // Proof first: nothing is made or mounted for a backup that cannot be
    // restored whole.
    let map = btm_chunk::restore::load_and_prove(&repo, name, index)?;
    let listener = control::listen(&dir)?;
    let root = target.root;
    let state = state_dir(&root, true)?;
    let (journal, replayed) = Journal::open(&state)?;
    let chunk_size = index.chunk_size().max(1);
    let started = Instant::now();
    let built = match &target.resume {
        Some(s) if s.skeleton => skeleton::resume(
            root.as_fd(),
            repo.entries(name, index),
            chunk_size,
            &replayed,
        )?,
        resume => {
            if resume.is_some() {
                clear_tree(&root)?;
            }
            let mut session = SessionFile {
                backup: name.to_owned(),
                skeleton: false,
            };
            write_session(&state, &session)?;
            let built = skeleton::build(root.as_fd(), repo.entries(name, index), chunk_size)?;
            nix::unistd::syncfs(root.as_fd())
                .map_err(|e| LiveError::state("syncing the skeleton", e.into()))?;
            session.skeleton = true;
            write_session(&state, &session)?;
            built
        }
    };
    let Built {
        files: live,
        total_bytes,
        entries,
    } = built;
    // Modes and owners come from the requests, not from this process.
    nix::sys::stat::umask(Mode::empty());
    let order = order_of(&live);
    let stats = Stats::default();
    stats.total_bytes.store(total_bytes, Ordering::Relaxed);
    let v1 = matches!(index, Decoded::V1(_));
    let root_for_fs = root
        .try_clone()
        .map_err(|e| LiveError::state("duplicating the target's descriptor", e))?;
    let files = Arc::new(Files::new(
        live,
        Source::new(repo, map, v1),
        journal,
        root,
        opts.read_timeout,
        stats,
    ));
    let shared = Arc::new(Shared {
        files: Arc::clone(&files),
        dir: mount::absolute(&dir).display().to_string(),
        backup: name.to_owned(),
        hydrated: AtomicBool::new(false),
        finishing: AtomicBool::new(false),
    });

    let signals = block_signals();
    let fs = LiveFs::new(&root_for_fs, Arc::clone(&files), opts.passthrough).map_err(|e| {
        LiveError::Mount {
            dir: dir.display().to_string(),
            source: e,
        }
    })?;
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
    let session = fuser::Session::new(fs, &dir, &config).map_err(|e| LiveError::Mount {
        dir: dir.display().to_string(),
        source: e,
    })?;
    let bg = session.spawn().map_err(|e| LiveError::Mount {
        dir: dir.display().to_string(),
        source: e,
    })?;
    eprintln!(
        "ready: {} serves {name} ({entries} entries, {} of data, {} still to fetch) after {:.1}s; {}",
        dir.display(),
        human(total_bytes),
        human(files.absent_bytes()),
        started.elapsed().as_secs_f64(),
        if passthrough.load(Ordering::Relaxed) {
            "local files are passed through to the kernel"
        } else {
            "no FUSE passthrough (Linux 6.9+ has it): every read goes through this server"
        }
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_signal_waiter(signals, tx.clone());
    spawn_control(listener, Arc::clone(&shared), tx.clone());
    let stop = Cancel::new();
    let hydrator = {
        let (files, stop, tx) = (Arc::clone(&files), stop.clone(), tx.clone());
        std::thread::spawn(move || {
            // The node comes first: hydration (and the fetchers it starts)
            // gets what CPU and disk the node leaves.
            if let Err(e) = btm::sys::lower_thread_priority() {
                tracing::debug!(error = %e, "cannot lower hydration's priority");
            }
            if crate::hydrate::hydrate(&files, &order, &stop) {
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
        let (files, stop) = (Arc::clone(&files), stop.clone());
        std::thread::spawn(move || checkpoints(&files, &stop))
    };
    drop(tx);
    let outcome = main_loop(&dir, &shared, &rx, &bg);
    stop.cancel();
    let _ = hydrator.join();
    let _ = checkpointer.join();
    let last = files.checkpoint();
    let _ = std::fs::remove_file(control::socket_path(&dir));
    match outcome {
        Outcome::Finished(streams) => {
            let _ = bg.join();
            let cleaned = last.and_then(|left| {
                if left > 0 {
                    return Err(LiveError::Refused(format!(
                        "{left} files are still not local"
                    )));
                }
                remove_state(&root_for_fs)
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
        Outcome::Stopped(why) => {
            if let Err(e) = last {
                tracing::error!(error = %e, "the last checkpoint failed");
            }
            // A stopped server leaves no mount behind when it can help it;
            // one the node still uses is detached (its reads then fail, as
            // on a lost disk).
            if nix::mount::umount2(&dir, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
            }
            drop(bg);
            Err(LiveError::Interrupted(why))
        }
    }
}

/// Live files in the order hydration should fetch them.
fn order_of(live: &[Arc<LiveFile>]) -> Vec<Arc<LiveFile>> {
    let bytes: Vec<u64> = live.iter().map(|f| f.absent_bytes()).collect();
    let cands: Vec<Candidate<'_>> = live
        .iter()
        .zip(&bytes)
        .map(|(f, b)| Candidate {
            path: f.path.as_bytes(),
            bytes: *b,
            mtime_ns: f.mtime_ns(),
        })
        .collect();
    hydration_order(&cands)
        .into_iter()
        .map(|i| Arc::clone(&live[i]))
        .collect()
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
) -> Outcome {
    let mut waiting: Vec<UnixStream> = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Finish(s)) => {
                shared.finishing.store(true, Ordering::Relaxed);
                waiting.push(s);
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
/// from now on; one thread waits for them instead.
fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    set
}

fn spawn_signal_waiter(set: nix::sys::signal::SigSet, tx: Sender<Event>) {
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            let _ = tx.send(Event::Signal(sig as i32));
        }
    });
}

/// Remove the state directory: the target is a plain directory again.
fn remove_state(root: &OwnedFd) -> Result<(), LiveError> {
    let err = |e: nix::errno::Errno| LiveError::state("removing the state directory", e.into());
    let state = state_dir(root, false)?;
    for name in [journal::NAME, SESSION] {
        match nix::unistd::unlinkat(state.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(err(e)),
        }
    }
    drop(state);
    nix::unistd::unlinkat(
        root.as_fd(),
        STATE_DIR,
        nix::unistd::UnlinkatFlags::RemoveDir,
    )
    .map_err(err)?;
    nix::unistd::syncfs(root.as_fd()).map_err(err)
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
