//! What the live-restore tests share: a `btm restore --live` server run
//! by PID (under a descriptor limit if asked), the seeded file-system
//! exerciser and tree digests (`tests/live_fsx.py`), node-like trees, and
//! a ganache node.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const PYTHON: &str = "/usr/bin/python3";
pub const MIB: u64 = 1 << 20;

pub fn fsx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/live_fsx.py")
}

/// A scratch directory on a disk file system (FUSE passthrough and xattrs
/// need one; /tmp may be a tmpfs elsewhere), removed on drop.
pub fn scratch() -> tempfile::TempDir {
    std::fs::create_dir_all("/var/tmp/btm-live-tests").expect("scratch parent");
    tempfile::tempdir_in("/var/tmp/btm-live-tests").expect("scratch")
}

/// A `btm restore --live` server, killed by PID and its mount cleared on
/// drop.
pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(scratch: &Path, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Server {
        Server::spawn(Server::command(scratch, dir, args, env), dir)
    }

    /// [`Server::start`] under a descriptor limit of `soft:hard`, as
    /// `ulimit -Sn SOFT -Hn HARD` would set it.
    pub fn start_limited(
        scratch: &Path,
        dir: &Path,
        args: &[&str],
        (soft, hard): (u64, u64),
    ) -> Server {
        let inner = Server::command(scratch, dir, args, &[]);
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={soft}:{hard}"))
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(Stdio::null());
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        Server::spawn(cmd, dir)
    }

    fn command(scratch: &Path, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Command {
        let mut all = vec!["restore", "--live"];
        all.extend_from_slice(args);
        all.push(dir.to_str().expect("utf8"));
        let mut cmd = super::btm_cmd(scratch, &all);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(mut cmd: Command, dir: &Path) -> Server {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("btm runs");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().expect("log");
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut s = Server {
            child,
            dir: dir.to_path_buf(),
            log,
        };
        let t = Instant::now();
        while !s.log().contains("ready:") {
            if let Ok(Some(code)) = s.child.try_wait() {
                sleep(Duration::from_millis(100));
                panic!(
                    "the live restore exited ({code}) before it was ready: {}",
                    s.log()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "not ready: {}",
                s.log()
            );
            sleep(Duration::from_millis(20));
        }
        s
    }

    /// Descriptors the server holds now.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The server's peak resident memory so far, in bytes.
    pub fn peak_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// `btm live finish`, and the server's exit 0 after it.
    pub fn finish(&mut self, scratch: &Path) {
        let out = super::btm(
            scratch,
            &["live", "finish", self.dir.to_str().expect("utf8")],
        )
        .ok();
        assert!(out.contains("finished"), "{out}");
        assert_eq!(
            self.wait_exit(Duration::from_secs(300)),
            Some(0),
            "{}",
            self.log()
        );
    }

    /// Wait until `btm live status` says every byte is local.
    pub fn wait_hydrated(&self, scratch: &Path, limit: Duration) {
        let t = Instant::now();
        while self.status(scratch)["state"] != "hydrated" {
            assert!(
                t.elapsed() < limit,
                "not hydrated after {limit:?}: {}",
                self.log()
            );
            sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn status(&self, scratch: &Path) -> serde_json::Value {
        let out = super::btm(
            scratch,
            &["live", "status", "--json", self.dir.to_str().expect("utf8")],
        )
        .ok();
        serde_json::from_str(&out).expect("status is JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
    }
}

/// `n` bytes of noise.
pub fn noise(n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .expect("urandom");
    v
}

pub fn write_noise(path: &Path, n: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create");
    let mut left = n;
    while left > 0 {
        let piece = left.min(64 * MIB);
        f.write_all(&noise(piece)).expect("write");
        left -= piece;
    }
}

/// A node-like tree: `work/` (small and medium files, a subdirectory),
/// `cold/` (one big file of `cold` bytes), `misc/` (a sparse file, a
/// symlink, an empty file).
pub fn make_tree(src: &Path, cold: u64) {
    let work = src.join("work/sub");
    std::fs::create_dir_all(&work).expect("work");
    for i in 0..40u64 {
        let dir = if i % 4 == 0 {
            src.join("work/sub")
        } else {
            src.join("work")
        };
        write_noise(&dir.join(format!("f{i:02}")), (i * 37_123) % 2_500_000);
    }
    std::fs::create_dir_all(src.join("cold")).expect("cold");
    write_noise(&src.join("cold/blocks.dat"), cold);
    let misc = src.join("misc");
    std::fs::create_dir_all(&misc).expect("misc");
    let sparse = std::fs::File::create(misc.join("sparse")).expect("sparse");
    sparse.set_len(20 * MIB).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"island", 9 * MIB).expect("island");
    std::fs::write(misc.join("empty"), b"").expect("empty");
    std::os::unix::fs::symlink("sparse", misc.join("link")).expect("symlink");
}

pub fn digest(root: &Path, t0: u128) -> String {
    super::sh(
        PYTHON,
        &[
            fsx().to_str().expect("utf8"),
            "digest",
            root.to_str().expect("utf8"),
            &t0.to_string(),
        ],
    )
}

pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

pub fn env_pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

pub fn is_mount(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let d = dir.to_str().expect("utf8");
    info.lines().any(|l| l.split(' ').nth(4) == Some(d))
}

/// A ganache node.
pub struct Ganache {
    child: Child,
    pub port: u16,
}

impl Ganache {
    pub fn start(db: &Path, block_time: &str) -> Ganache {
        let bin = std::env::var_os("GANACHE_BIN").unwrap_or_else(|| "ganache".into());
        let port = super::free_port();
        let child = Command::new(&bin)
            .args([
                "--database.dbPath",
                db.to_str().expect("utf8"),
                "--miner.blockTime",
                block_time,
            ])
            .args([
                "--server.host",
                "127.0.0.1",
                "--server.port",
                &port.to_string(),
            ])
            .args(["--logging.quiet", "--wallet.seed", "btm-live"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start ganache ({bin:?}): {e}; scripts/test.sh installs it")
            });
        let g = Ganache { child, port };
        let t = Instant::now();
        while g.rpc("eth_blockNumber", "[]").is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "ganache did not answer"
            );
            sleep(Duration::from_millis(50));
        }
        g
    }

    pub fn rpc(&self, method: &str, params: &str) -> Option<serde_json::Value> {
        let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#);
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "5",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                &body,
            ])
            .arg(format!("http://127.0.0.1:{}", self.port))
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["result"].clone()).filter(|r| !r.is_null())
    }

    pub fn height(&self) -> u64 {
        let v = self.rpc("eth_blockNumber", "[]").expect("height");
        u64::from_str_radix(v.as_str().expect("hex").trim_start_matches("0x"), 16).expect("number")
    }

    pub fn block(&self, n: u64) -> serde_json::Value {
        self.rpc("eth_getBlockByNumber", &format!(r#"["0x{n:x}",false]"#))
            .expect("block")
    }

    pub fn wait_height(&self, n: u64) {
        let t = Instant::now();
        while self.height() < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "ganache stuck below {n}"
            );
            sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ganache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha(path: &Path) -> String {
    super::sh("sha256sum", &[path.to_str().expect("utf8")])
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}
