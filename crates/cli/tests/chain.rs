//! A real chain: ganache (an Ethereum node) persists into the snapshotted
//! volume while the daemon polls `eth_blockNumber`. After stopping the node
//! and rolling back to one of the snapshots, daemon running, the restarted
//! node's height must lie inside the window recorded for that snapshot;
//! after `--undo` it is exactly where it was.
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
        Self::start_seeded(db, block_time, "btm-test")
    }

    /// A node of another chain: the same software with another wallet seed.
    fn start_seeded(db: &Path, block_time: &str, seed: &str) -> Self {
        Self::start_at(db, block_time, seed, common::free_port())
    }

    /// Restarted where its daemon polls it.
    fn restart(db: &Path, block_time: &str, port: u16) -> Self {
        Self::start_at(db, block_time, "btm-test", port)
    }

    fn start_at(db: &Path, block_time: &str, seed: &str, port: u16) -> Self {
        let child = Command::new(ganache_bin())
            .args(["--database.dbPath", db.to_str().expect("utf8")])
            .args(["--miner.blockTime", block_time])
            .args([
                "--server.host",
                "127.0.0.1",
                "--server.port",
                &port.to_string(),
            ])
            .args(["--logging.quiet", "--wallet.seed", seed])
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

    fn block_hash(&self, n: u64) -> Option<String> {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"eth_getBlockByNumber","params":["0x{n:x}",false]}}"#
        );
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
            .args(["--data", &body])
            .arg(self.url())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["result"]["hash"].as_str()?.to_owned())
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

/// A ganache node mining every 0.2 s into `<volume>/ganache`.
fn chain_in_volume(fx: &impl Fixture) -> (PathBuf, Ganache) {
    let db = fx.root().join("ganache");
    std::fs::create_dir_all(&db).expect("mkdir");
    let node = Ganache::start(&db, "0.2");
    (db, node)
}

/// `btm daemon` polling `node` every 100 ms, itv 10, plus `extra` flags.
fn polling_daemon(
    fx: &impl Fixture,
    node: &Ganache,
    extra: &[&str],
    env: &[(&str, &str)],
) -> DaemonProc {
    let vol = fx.volume();
    let url = node.url();
    let mut args = vec![
        "-p",
        &vol,
        "-m",
        fx.mode(),
        "-i",
        "10",
        "--source",
        "ethereum",
        "--rpc-url",
        &url,
        "--poll-interval",
        "100ms",
    ];
    args.extend_from_slice(extra);
    DaemonProc::start(fx.scratch(), &args, env)
}

/// Roll the node back with its daemon running: it restarts inside the
/// snapshot's recorded window and goes on with a new line the daemon
/// follows; `--undo`, daemon still running, brings back the exact height
/// it had before the rollback, with the old line's snapshots.
fn rollback_and_undo_with_the_daemon_running(fx: &impl Fixture) {
    let (db, node) = chain_in_volume(fx);
    let port = node.port;
    let mut daemon = polling_daemon(fx, &node, &[], &[]);
    for _ in 0..300 {
        if fx.heights().len() >= 4 {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    node.stop();
    // The height the node's own files hold, read without mining.
    let node = Ganache::start(&db, "0");
    let before = node.block_number().expect("block number");
    let before_hash = node.block_hash(before).expect("hash");
    node.stop();
    let old_line = fx.heights();

    let listing: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    let snaps = listing["snapshots"].as_array().expect("array");
    assert!(
        snaps.len() >= 4,
        "too few snapshots: {listing}\n{}",
        daemon.log_text()
    );
    // A snapshot from the middle, with its window.
    let target = &snaps[2];
    let h = target["height"].as_u64().expect("height");
    let after = target["height_after"].as_u64().expect("window recorded");
    assert!(after >= h);

    fx.btm(&["rollback", "-s", &h.to_string(), "-S", "--yes"])
        .ok();
    let node = Ganache::restart(&db, "0.2", port);
    let n = node.block_number().expect("block number");
    assert!(
        (h..=after).contains(&n),
        "restored node at {n}, outside the recorded window [{h}, {after}]"
    );
    // The daemon follows the new line: a snapshot above the target.
    let mut new_line = Vec::new();
    for _ in 0..300 {
        new_line = fx.heights();
        if new_line.first().is_some_and(|&top| top > h) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert!(
        new_line.first().is_some_and(|&top| top > h),
        "the daemon took no snapshot on the new line: {new_line:?}\n{}",
        daemon.log_text()
    );
    // The snapshot is listed before the daemon has counted the branches
    // after it (a zfs-fuse listing takes a while): wait for its count.
    let mut status = daemon.status().expect("status");
    for _ in 0..300 {
        if status["branch_count"] == 1 && status["in_progress"].is_null() {
            break;
        }
        sleep(Duration::from_millis(100));
        status = daemon.status().expect("status");
    }
    assert_eq!(
        status["branch_count"], 1,
        "the old line is counted: {status}"
    );
    node.stop();

    fx.btm(&["rollback", "--undo", "--yes"]).ok();
    let node = Ganache::start(&db, "0");
    let n = node.block_number().expect("block number");
    assert_eq!(n, before, "undo restarts the node where it was");
    assert_eq!(node.block_hash(n).expect("hash"), before_hash);
    node.stop();
    let heights = fx.heights();
    assert!(
        old_line.iter().all(|h| heights.contains(h)),
        "the old line's snapshots are back: {old_line:?} vs {heights:?}"
    );
    let status = daemon.status().expect("status");
    assert!(status.get("error").is_none(), "{status}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn ganache_on_btrfs() {
    rollback_and_undo_with_the_daemon_running(&Btrfs::new());
}

#[test]
fn ganache_on_zfs() {
    rollback_and_undo_with_the_daemon_running(&Zfs::new());
}

/// The mission end to end: the daemon polls a live chain, snapshots it and
/// exports to S3; the volume is then destroyed and the node rebuilt from
/// the store. The rebuilt node must be inside the exported height window
/// with the very same block hash as before the loss.
fn a_destroyed_node_is_rebuilt_from_the_store(fx: &impl Fixture) {
    let (db, node) = chain_in_volume(fx);
    let s3 = common::S3::start(&["btm"]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = "s3://btm/nodes";
    let export = [
        "-c",
        "50",
        "--export-store",
        store,
        "--export-every",
        "20",
        "--export-tag",
        "node1",
    ];
    let mut daemon = polling_daemon(fx, &node, &export, &env);
    daemon.wait_status_for("two exports", Duration::from_secs(90), |s| {
        s["counters"]["exports"].as_u64().unwrap_or(0) >= 2 && s["export"].is_null()
    });
    // The status says which chain and client the last export came from.
    let s = daemon.status().expect("status");
    let from = s["last_export"]["chain"].as_str().unwrap_or_default();
    assert!(
        from.contains("chain 1337") && from.to_lowercase().contains("ganache"),
        "{s}"
    );
    assert_eq!(daemon.stop(), Some(0));
    let tip = node.block_number().expect("height");
    let hashes: Vec<String> = (0..=tip)
        .map(|n| node.block_hash(n).expect("hash"))
        .collect();
    node.stop();

    let run = |args: &[&str]| common::btm_env_ok(fx.scratch(), args, &env);
    let backups: serde_json::Value =
        serde_json::from_str(&run(&["backups", "-s", store, "--json"])).expect("json");
    let meta = &backups[0]["meta"];
    let h = meta["height"].as_u64().expect("height");
    let after = meta["height_after"]
        .as_u64()
        .expect("window in the metadata");
    assert!(after >= h, "{meta}");

    // The loss, then the rebuild into a fresh, empty volume.
    fx.recreate();
    assert!(!db.exists());
    let root = fx.root();
    run(&[
        "restore",
        "latest",
        root.to_str().expect("utf8"),
        "-s",
        store,
        "-t",
        "node1",
    ]);
    let check = run(&["check", "-s", store, "--read-data"]);
    assert!(check.contains("0 problems"), "{check}");

    let node = Ganache::start(&db, "0");
    let n = node.block_number().expect("block number");
    assert!(
        (h..=after).contains(&n),
        "rebuilt node at {n}, outside the exported window [{h}, {after}]"
    );
    assert_eq!(
        node.block_hash(n).expect("hash"),
        hashes[n as usize],
        "block {n} differs after the rebuild"
    );
    // The export recorded the chain's identity (the source is the node's
    // RPC); the product itself proves the rebuilt node is on that chain.
    assert_eq!(meta["chain"]["kind"], "ethereum", "{meta}");
    assert_eq!(meta["chain"]["block_hash"], hashes[h as usize].as_str());
    // What chain and client: ganache's default chain id, its block 0, and
    // its own name for itself.
    assert_eq!(meta["chain"]["chain_id"], "1337", "{meta}");
    assert_eq!(meta["chain"]["genesis_hash"], hashes[0].as_str(), "{meta}");
    let client = meta["chain"]["client"].as_str().unwrap_or_default();
    assert!(client.to_lowercase().contains("ganache"), "{meta}");
    let verify = |url: &str| {
        common::btm_env(
            fx.scratch(),
            &[
                "verify",
                "latest",
                "-s",
                store,
                "-t",
                "node1",
                "--rpc-url",
                url,
            ],
            &env,
        )
    };
    let ok = verify(&node.url()).ok();
    assert!(ok.starts_with("verified: "), "{ok}");
    node.stop();

    // Another chain at the same height: same software, another seed.
    let other_db = fx.scratch().join("other-chain");
    let other = Ganache::start_seeded(&other_db, "0.05", "not-the-exported-chain");
    for _ in 0..600 {
        if other.block_number().is_some_and(|n| n >= h) {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    let e = verify(&other.url()).fails(1);
    assert!(
        e.contains("NOT verified") && e.contains("block hash") && e.contains("genesis hash"),
        "{e}"
    );
    other.stop();
}

#[test]
fn rebuild_from_s3_on_btrfs() {
    a_destroyed_node_is_rebuilt_from_the_store(&Btrfs::new());
}

#[test]
fn rebuild_from_s3_on_zfs() {
    a_destroyed_node_is_rebuilt_from_the_store(&Zfs::new());
}
