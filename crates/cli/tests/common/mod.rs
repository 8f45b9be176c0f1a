//! Throwaway real filesystems for integration tests, and helpers to run the
//! `btm` binary against them.
//!
//! Each fixture creates its own loop-mounted btrfs image or zfs-fuse pool in
//! a fresh temporary directory and destroys it on drop, also when the test
//! panics. These tests need root, btrfs-progs and a running zfs-fuse; if
//! any is missing they fail loudly rather than skip (see `.ci/run`).

#![allow(dead_code)]

pub mod http_faults;
pub mod live;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::Duration;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// zfs-fuse can deadlock when pools are created and mounted concurrently
/// right after it starts, so ZFS tests in one process take turns.
static ZFS_SERIAL: Mutex<()> = Mutex::new(());

/// Pools are named `btmtest<pid>x<n>`; destroy those whose test process is
/// gone (killed before its fixtures could drop).
fn sweep_dead_test_pools() {
    let Ok(out) = Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .output()
    else {
        return;
    };
    for pool in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = pool
            .strip_prefix("btmtest")
            .and_then(|r| r.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("zpool").args(["destroy", "-f", pool]).status();
        }
    }
}

/// Run a setup command and panic with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "real-filesystem tests need root (loop devices, zfs-fuse); run them as root, e.g. via .ci/run"
    );
}

/// The result of one `btm` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panic unless the run succeeded; return stdout.
    #[track_caller]
    pub fn ok(self) -> String {
        assert_eq!(self.code, 0, "btm failed: {}{}", self.stdout, self.stderr);
        self.stdout
    }

    /// Panic unless the run failed with `code` and a single-line error.
    #[track_caller]
    pub fn fails(self, code: i32) -> String {
        assert_eq!(
            self.code, code,
            "stdout: {} stderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.stderr.trim().lines().count(),
            1,
            "not one line: {}",
            self.stderr
        );
        assert!(self.stderr.starts_with("btm: error: "), "{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self.stderr
    }
}

/// `litecoin-cli -regtest OPTIONS ARGS`: its trimmed output if it
/// succeeded.
pub fn litecoin_cli(options: &[String], args: &[&str]) -> Option<String> {
    let out = Command::new("litecoin-cli")
        .arg("-regtest")
        .args(options)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Run the `btm` binary with a private runtime and state directory.
pub fn btm(runtime: &Path, args: &[&str]) -> Run {
    btm_cmd(runtime, args)
        .output()
        .map(Run::from)
        .expect("btm binary runs")
}

/// The heights `btm simulate --json ARGS` keeps, newest first.
pub fn simulate_kept(scratch: &Path, args: &[&str]) -> Vec<u64> {
    let mut all = vec!["simulate", "--json"];
    all.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&btm(scratch, &all).ok()).expect("json");
    v["kept"]
        .as_array()
        .expect("kept")
        .iter()
        .map(|h| h.as_u64().expect("u64"))
        .collect()
}

/// A `btm` command ready to spawn, with private directories and no terminal.
pub fn btm_cmd(runtime: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_btm"));
    c.args(args)
        .env("BTM_RUNTIME_DIR", runtime.join("run"))
        .env("BTM_STATE_DIR", runtime.join("state"))
        .env("BTM_CACHE_DIR", runtime.join("cache"))
        .env_remove("BTM_VOLUME")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    c
}

/// What scenarios need from a filesystem under test.
pub trait Fixture {
    /// The `-p` argument for the volume.
    fn volume(&self) -> String;
    /// `zfs` or `btrfs`.
    fn mode(&self) -> &'static str;
    /// Where the live files are.
    fn root(&self) -> PathBuf;
    /// A private directory for btm's runtime and state files.
    fn scratch(&self) -> &Path;
    /// Make a snapshot the way another tool would, with this suffix.
    fn foreign_snapshot(&self, suffix: &str);
    /// Whether a snapshot with this suffix exists (btm's or not).
    fn has_snapshot(&self, suffix: &str) -> bool;
    /// Make the btm snapshot at `height` impossible to destroy until the
    /// returned guard is dropped.
    fn pin(&self, height: u64) -> Guard;
    /// Destroy the volume and all its snapshots, and create it again empty.
    fn recreate(&self);

    /// Run `btm ARGS -p VOLUME -m MODE`.
    fn btm(&self, args: &[&str]) -> Run {
        let vol = self.volume();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-p", &vol, "-m", self.mode()]);
        btm(self.scratch(), &all)
    }

    /// Heights from `btm list --json`, newest first.
    fn heights(&self) -> Vec<u64> {
        let out = self.btm(&["list", "--json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&out).expect("list --json is JSON");
        v["snapshots"]
            .as_array()
            .expect("snapshots array")
            .iter()
            .map(|s| s["height"].as_u64().expect("height"))
            .collect()
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).expect("read")
    }
}

/// Create a 256 MiB btrfs image at `img` and loop-mount it on `mnt`
/// (created if missing). The caller unmounts it.
pub fn mount_btrfs_image(img: &Path, mnt: &Path) {
    std::fs::create_dir_all(mnt).expect("mkdir");
    sh("truncate", &["-s", "256M", img.to_str().expect("utf8")]);
    sh("mkfs.btrfs", &["-q", img.to_str().expect("utf8")]);
    sh(
        "mount",
        &[
            "-o",
            "loop",
            img.to_str().expect("utf8"),
            mnt.to_str().expect("utf8"),
        ],
    );
}

/// A btrfs filesystem in a loop-mounted image, with a subvolume `data`.
pub struct Btrfs {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Btrfs {
    pub fn new() -> Self {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        mount_btrfs_image(&dir.path().join("fs.img"), &mnt);
        let fx = Btrfs { dir, mnt };
        sh(
            "btrfs",
            &["subvolume", "create", fx.root().to_str().expect("utf8")],
        );
        fx
    }

    pub fn sibling(&self, suffix: &str) -> PathBuf {
        self.mnt.join(format!("data@{suffix}"))
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let mnt = self.mnt.to_str().unwrap_or_default().to_owned();
        for attempt in 0..20 {
            let ok = Command::new("umount")
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            if attempt == 19 {
                let _ = Command::new("umount").args(["-l", &mnt]).status();
            }
            sleep(Duration::from_millis(250));
        }
    }
}

impl Fixture for Btrfs {
    fn recreate(&self) {
        for entry in std::fs::read_dir(&self.mnt).expect("ls").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "data" || name.starts_with("data@") {
                sh(
                    "btrfs",
                    &["subvolume", "delete", entry.path().to_str().expect("utf8")],
                );
            }
        }
        sh(
            "btrfs",
            &["subvolume", "create", self.root().to_str().expect("utf8")],
        );
    }
    fn volume(&self) -> String {
        self.root().to_str().expect("utf8").to_owned()
    }
    fn mode(&self) -> &'static str {
        "btrfs"
    }
    fn root(&self) -> PathBuf {
        self.mnt.join("data")
    }
    fn scratch(&self) -> &Path {
        self.dir.path()
    }
    fn foreign_snapshot(&self, suffix: &str) {
        sh(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                "-r",
                &self.volume(),
                self.sibling(suffix).to_str().expect("utf8"),
            ],
        );
    }
    fn has_snapshot(&self, suffix: &str) -> bool {
        self.sibling(suffix).exists()
    }
    fn pin(&self, height: u64) -> Guard {
        // btrfs refuses to delete the default subvolume.
        let target = self.sibling(&height.to_string());
        sh(
            "btrfs",
            &["subvolume", "set-default", target.to_str().expect("utf8")],
        );
        let mnt = self.mnt.clone();
        Guard::new(move || {
            let _ = Command::new("btrfs")
                .args(["subvolume", "set-default", "5"])
                .arg(&mnt)
                .status();
        })
    }
}

/// Runs its closure when dropped, also on panic.
pub struct Guard(Option<Box<dyn FnOnce()>>);

impl Guard {
    pub fn new(f: impl FnOnce() + 'static) -> Self {
        Guard(Some(Box::new(f)))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A zfs-fuse pool in a file, with a filesystem dataset `<pool>/data`.
pub struct Zfs {
    dir: tempfile::TempDir,
    pub pool: String,
    _serial: MutexGuard<'static, ()>,
}

impl Zfs {
    pub fn new() -> Self {
        require_root();
        let serial = ZFS_SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let ready = Command::new("zpool").arg("list").output();
        assert!(
            ready.as_ref().is_ok_and(|o| o.status.success()),
            "zfs-fuse is not running or zfs tools are missing ({:?}); start it as root: `zfs-fuse` (see .ci/run)",
            ready.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
        sweep_dead_test_pools();
        let dir = tempfile::tempdir().expect("tempdir");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pool = format!("btmtest{}x{n}", std::process::id());
        let img = dir.path().join("pool.img");
        sh("truncate", &["-s", "128M", img.to_str().expect("utf8")]);
        let mp = dir.path().join("mnt");
        sh(
            "zpool",
            &[
                "create",
                "-m",
                mp.to_str().expect("utf8"),
                &pool,
                img.to_str().expect("utf8"),
            ],
        );
        let fx = Zfs {
            dir,
            pool,
            _serial: serial,
        };
        sh("zfs", &["create", &fx.volume()]);
        fx
    }
}

impl Drop for Zfs {
    fn drop(&mut self) {
        for _ in 0..40 {
            let ok = Command::new("zpool")
                .args(["destroy", "-f", &self.pool])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            sleep(Duration::from_millis(250));
        }
        eprintln!("warning: could not destroy test pool {}", self.pool);
    }
}

impl Fixture for Zfs {
    fn recreate(&self) {
        for _ in 0..40 {
            let ok = Command::new("zfs")
                .args(["destroy", "-r", &self.volume()])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            sleep(Duration::from_millis(250));
        }
        sh("zfs", &["create", &self.volume()]);
    }
    fn volume(&self) -> String {
        format!("{}/data", self.pool)
    }
    fn mode(&self) -> &'static str {
        "zfs"
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("mnt/data")
    }
    fn scratch(&self) -> &Path {
        self.dir.path()
    }
    fn foreign_snapshot(&self, suffix: &str) {
        sh("zfs", &["snapshot", &format!("{}@{suffix}", self.volume())]);
    }
    fn has_snapshot(&self, suffix: &str) -> bool {
        Command::new("zfs")
            .args([
                "list",
                "-H",
                "-o",
                "name",
                &format!("{}@{suffix}", self.volume()),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }
    fn pin(&self, height: u64) -> Guard {
        // A dependent clone makes `zfs destroy` of the snapshot fail.
        let clone = format!("{}/pin{height}", self.pool);
        sh(
            "zfs",
            &["clone", &format!("{}@{height}", self.volume()), &clone],
        );
        Guard::new(move || {
            for _ in 0..40 {
                let ok = Command::new("zfs")
                    .args(["destroy", &clone])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    return;
                }
                sleep(Duration::from_millis(250));
            }
        })
    }
}

/// A loopback TCP port nobody listens on right now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A `btm daemon` child process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct DaemonProc {
    pub child: std::process::Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl DaemonProc {
    /// Start `btm daemon ARGS` with private directories; wait until its
    /// socket answers `status`.
    pub fn start(scratch: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = scratch.join("run/btm.sock");
        let log = scratch.join(format!(
            "daemon-{}.log",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut all = vec!["daemon", "--log-level", "debug"];
        all.extend_from_slice(args);
        let mut cmd = btm_cmd(scratch, &all);
        cmd.envs(env.iter().copied())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            );
        let child = cmd.spawn().expect("spawn daemon");
        let mut d = DaemonProc { child, socket, log };
        for _ in 0..200 {
            if d.status().is_some() {
                return d;
            }
            if let Ok(Some(code)) = d.child.try_wait() {
                panic!("daemon exited early ({code}): {}", d.log_text());
            }
            sleep(Duration::from_millis(50));
        }
        panic!("daemon did not come up: {}", d.log_text());
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_btm"))
            .args(["status", "--json", "--socket", self.socket.to_str()?])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    /// Wait (up to 5 s) until the daemon's status satisfies `pred`.
    #[track_caller]
    pub fn wait_status(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        self.wait_status_for(what, Duration::from_secs(5), pred)
    }

    /// Wait up to `limit` until the daemon's status satisfies `pred`.
    #[track_caller]
    pub fn wait_status_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) {
        for _ in 0..(limit.as_millis() / 25).max(1) {
            if self.status().is_some_and(|s| pred(&s)) {
                return;
            }
            sleep(Duration::from_millis(25));
        }
        panic!(
            "timed out waiting for {what}: {:?}\n{}",
            self.status(),
            self.log_text()
        );
    }

    pub fn notify(&self, height: u64) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_btm"))
            .args([
                "notify",
                "--json",
                "--height",
                &height.to_string(),
                "--socket",
            ])
            .arg(&self.socket)
            .output()
            .expect("notify runs");
        assert!(
            out.status.success(),
            "notify {height}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("notify --json")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// SIGTERM and wait; the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit()
    }

    /// Wait (up to 10 s, then SIGKILL) for the daemon to exit; the code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        for _ in 0..400 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A tiny HTTP server on loopback answering every request with whatever
/// `respond` returns for the request's first line; for fake node RPCs.
pub struct FakeRpc {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRpc {
    pub fn start(respond: impl Fn(&str) -> (u16, String) + Send + 'static) -> Self {
        Self::start_with_body(move |first, _| respond(first))
    }

    /// As [`FakeRpc::start`], answering from the first line and the body
    /// (a JSON-RPC method).
    pub fn start_with_body(respond: impl Fn(&str, &str) -> (u16, String) + Send + 'static) -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut reader = BufReader::new(&stream);
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let (code, text) = respond(first.trim(), &String::from_utf8_lossy(&body));
                let mut w = &stream;
                let _ = write!(
                    w,
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        FakeRpc {
            port,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeRpc {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A local store with injected faults: puts of packs, pack indexes and
/// tree segments, and deletes of any object, fail (temporarily) once their
/// budget is spent. `i64::MAX` means never. A backup named in
/// `forget_when_read` is deleted just before its head is read, as if a
/// prune beside the reader had forgotten it after its listing. With
/// `locks_denied`, lease markers cannot be written (read-only
/// credentials). `gc_before_pack_read` runs once, on the inner store, just
/// before the first ranged read of a pack, as a GC beside the reader.
pub struct FaultyStore {
    pub inner: std::sync::Arc<btm_chunk::store::LocalStore>,
    pub puts_left: std::sync::atomic::AtomicI64,
    pub deletes_left: std::sync::atomic::AtomicI64,
    pub forget_when_read: std::sync::Mutex<Option<String>>,
    pub locks_denied: std::sync::atomic::AtomicBool,
    #[allow(clippy::type_complexity)]
    pub gc_before_pack_read: std::sync::Mutex<
        Option<Box<dyn FnOnce(&std::sync::Arc<btm_chunk::store::LocalStore>) + Send>>,
    >,
}

impl FaultyStore {
    pub fn new(path: &Path, puts: i64, deletes: i64) -> std::sync::Arc<Self> {
        let inner = btm_chunk::store::LocalStore::open(path.to_str().expect("utf8")).expect("open");
        std::sync::Arc::new(FaultyStore {
            inner: std::sync::Arc::new(inner),
            puts_left: puts.into(),
            deletes_left: deletes.into(),
            forget_when_read: std::sync::Mutex::new(None),
            locks_denied: false.into(),
            gc_before_pack_read: std::sync::Mutex::new(None),
        })
    }
}

fn spend(
    budget: &std::sync::atomic::AtomicI64,
    what: String,
) -> Result<(), btm_chunk::store::StoreError> {
    if budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
        return Err(btm_chunk::store::StoreError::Temporary {
            what,
            detail: "connection reset (injected)".into(),
        });
    }
    Ok(())
}

use btm_chunk::store::{Bytes, Id, Kind, StoreError};

impl btm_chunk::store::Layer for FaultyStore {
    fn inner(&self) -> &dyn btm_chunk::store::Store {
        self.inner.as_ref()
    }

    fn describe(&self) -> String {
        "faulty".into()
    }

    /// The standard attempts, with waits of a millisecond: a test counts
    /// what fails without waiting out a real store's patience.
    fn retry_policy(&self) -> btm_chunk::store::RetryPolicy {
        btm_chunk::store::RetryPolicy {
            first_wait: std::time::Duration::from_millis(1),
            max_wait: std::time::Duration::from_millis(2),
            ..*btm_chunk::store::RetryPolicy::standard()
        }
    }

    fn put(&self, kind: Kind, id: &Id, d: Bytes) -> Result<(), StoreError> {
        spend(&self.puts_left, kind.describe(id))?;
        self.inner().put(kind, id, d)
    }

    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        off: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        if kind == Kind::Pack {
            let gc = self.gc_before_pack_read.lock().expect("lock").take();
            if let Some(gc) = gc {
                gc(&self.inner);
            }
        }
        self.inner().get_range_into(kind, id, off, len, buf)
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        spend(&self.deletes_left, kind.describe(id))?;
        self.inner().delete(kind, id)
    }

    fn get_index(&self, n: &str) -> Result<Vec<u8>, StoreError> {
        let forget = self.forget_when_read.lock().expect("lock").as_deref() == Some(n);
        if forget {
            self.inner().delete_index(n)?;
        }
        self.inner().get_index(n)
    }

    fn put_marker(&self, n: &str, d: &[u8]) -> Result<(), StoreError> {
        if n.starts_with("locks/") && self.locks_denied.load(Ordering::SeqCst) {
            return Err(StoreError::Permanent {
                what: n.into(),
                detail: "access denied (injected)".into(),
            });
        }
        self.inner().put_marker(n, d)
    }
}

/// An s3s-fs server on a free loopback port, killed by PID on drop.
pub struct S3 {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl S3 {
    pub fn start(buckets: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        for b in buckets {
            std::fs::create_dir(dir.path().join(b)).expect("bucket");
        }
        let mut s3 = S3 {
            child: None,
            port: free_port(),
            dir,
        };
        s3.restart();
        s3
    }

    /// Stop the server (by its PID), as if the store went away.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the server again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let bin = std::env::var_os("S3S_FS_BIN").unwrap_or_else(|| "s3s-fs".into());
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", "btmtest", "--secret-key", "btmtestsecret"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start s3s-fs ({bin:?}): {e}; scripts/test.sh installs it")
            });
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        panic!("s3s-fs did not listen on port {}", self.port);
    }

    /// Where s3s-fs keeps the objects of `bucket`: `<key>` is a file under
    /// it, so a test can look at a store's markers without a client.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.dir.path().join(bucket)
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_via(&format!("http://127.0.0.1:{}", self.port))
    }

    /// The environment of a client reaching the server at `url` (a proxy
    /// in front of it).
    pub fn env_via(&self, url: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "btmtest".into()),
            ("AWS_SECRET_ACCESS_KEY", "btmtestsecret".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", url.to_owned()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An Azurite blob emulator on a free loopback port, killed by PID on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Azurite's fixed development account and key (public, documented by
/// Microsoft; object_store uses the same pair in emulator mode).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Creates a container with a SharedKey-signed request. object_store has no
/// "create container" call, and Azurite refuses anonymous requests, so the
/// signing is done here by node (already needed for Azurite itself).
const CREATE_CONTAINER_JS: &str = r#"
const [port, account, key, container] = process.argv.slice(1);
const crypto = require('crypto'), http = require('http');
const date = new Date().toUTCString(), version = '2021-08-06';
const sts = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}\nx-ms-version:${version}`,
  `/${account}/${account}/${container}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(sts).digest('base64');
const req = http.request({ host: '127.0.0.1', port, method: 'PUT',
  path: `/${account}/${container}?restype=container`,
  headers: { 'x-ms-date': date, 'x-ms-version': version, 'Content-Length': 0,
             Authorization: `SharedKey ${account}:${sig}` } }, res => {
  let body = ''; res.on('data', d => body += d);
  res.on('end', () => { if (res.statusCode !== 201) { console.error(res.statusCode, body); process.exit(1); } });
});
req.on('error', e => { console.error(e.message); process.exit(1); });
req.end();
"#;

impl Azurite {
    pub fn start(containers: &[&str]) -> Self {
        let bin = std::env::var_os("AZURITE_BIN").unwrap_or_else(|| "azurite-blob".into());
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck", "--loose"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start azurite ({bin:?}): {e}; scripts/test.sh installs it")
            });
        let az = Azurite {
            child,
            port,
            _dir: dir,
        };
        // Node starts slowly on a loaded machine; this waits for it, it
        // does not time anything.
        let mut up = false;
        for _ in 0..1200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            sleep(Duration::from_millis(50));
        }
        assert!(up, "azurite did not listen on port {port}");
        for c in containers {
            let out = Command::new("node")
                .args(["-e", CREATE_CONTAINER_JS])
                .args([&port.to_string(), AZURITE_ACCOUNT, AZURITE_KEY, c])
                .output()
                .expect("node");
            assert!(
                out.status.success(),
                "creating container {c}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        az
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_via(&format!("http://127.0.0.1:{}", self.port))
    }

    /// The environment of a client reaching the emulator at `url` (a
    /// proxy in front of it).
    pub fn env_via(&self, url: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", url.to_owned()),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[path = "../../../chunk/tests/common/noise.rs"]
mod noise;
#[allow(unused_imports)]
pub use noise::noise;

/// Run `btm ARGS` with extra environment (store credentials); panic
/// unless it succeeds; return stdout.
#[track_caller]
pub fn btm_env_ok(scratch: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    btm_env(scratch, args, env).ok()
}

/// `btm ARGS` with extra environment variables (store credentials).
pub fn btm_env(scratch: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    btm_cmd(scratch, args)
        .envs(env.iter().copied())
        .output()
        .map(Run::from)
        .expect("btm runs")
}
