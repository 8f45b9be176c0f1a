//! A real chain: ganache (an Ethereum node) persists into the snapshotted
//! volume while the daemon polls `eth_blockNumber`. After stopping the node
//! and rolling back to one of the snapshots, the restarted node's height
//! must lie inside the window recorded for that snapshot.
//!
//! Needs root and ganache (`$GANACHE_BIN`, or `ganache` on PATH; installed
//! by scripts/test.sh). Fails, never skips, when either is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::{Btrfs, DaemonProc, Fixture, Zfs};

fn ganache_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GANACHE_BIN") {
        return PathBuf::from(p);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v ganache"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.expect("ganache not found: set GANACHE_BIN or run scripts/test.sh, which installs it")
}

/// A ganache node, killed by PID on drop.
struct Ganache {
    child: Child,
    port: u16,
}

impl Ganache {
    fn start(db: &Path, block_time: &str) -> Self {
        let port = common::free_port();
        let child = Command::new(ganache_bin())
            .args(["--database.dbPath", db.to_str().expect("utf8")])
            .args(["--miner.blockTime", block_time])
            .args([
                "--server.host",
                "127.0.0.1",
                "--server.port",
                &port.to_string(),
            ])
            .args(["--logging.quiet", "--wallet.seed", "btm-test"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ganache");
        let g = Ganache { child, port };
        for _ in 0..300 {
            if g.block_number().is_some() {
                return g;
            }
            sleep(Duration::from_millis(100));
        }
        panic!("ganache did not answer on port {port}");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn block_number(&self) -> Option<u64> {
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "2",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
            ])
            .args([
                "--data",
                r#"{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}"#,
            ])
            .arg(self.url())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        u64::from_str_radix(v["result"].as_str()?.strip_prefix("0x")?, 16).ok()
    }

    /// SIGTERM (ganache flushes its database), then wait.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
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

fn rollback_lands_in_the_recorded_window(fx: &impl Fixture) {
    let db = fx.root().join("ganache");
    std::fs::create_dir_all(&db).expect("mkdir");
    let node = Ganache::start(&db, "0.2");
    let vol = fx.volume();
    let mut daemon = DaemonProc::start(
        fx.scratch(),
        &[
            "-p",
            &vol,
            "-m",
            fx.mode(),
            "-i",
            "10",
            "--source",
            "ethereum",
            "--rpc-url",
            &node.url(),
            "--poll-interval",
            "100ms",
        ],
        &[],
    );
    for _ in 0..300 {
        if fx.heights().len() >= 4 {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert_eq!(daemon.stop(), Some(0));
    node.stop();

    let listing: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    let snaps = listing["snapshots"].as_array().expect("array");
    assert!(
        snaps.len() >= 4,
        "too few snapshots: {listing}\n{}",
        daemon.log_text()
    );
    // A snapshot from the middle, with its window.
    let target = &snaps[1];
    let h = target["height"].as_u64().expect("height");
    let after = target["height_after"].as_u64().expect("window recorded");
    assert!(after >= h);

    fx.btm(&["rollback", "-s", &h.to_string(), "-S", "--yes"])
        .ok();
    // Restart without automatic mining, so the height is what was restored.
    let node = Ganache::start(&db, "0");
    let n = node.block_number().expect("block number");
    assert!(
        (h..=after).contains(&n),
        "restored node at {n}, outside the recorded window [{h}, {after}]"
    );
    node.stop();
}

#[test]
fn ganache_on_btrfs() {
    rollback_lands_in_the_recorded_window(&Btrfs::new());
}

#[test]
fn ganache_on_zfs() {
    rollback_lands_in_the_recorded_window(&Zfs::new());
}
