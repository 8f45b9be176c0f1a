//! A real Bitcoin-Core-family full node: Debian's `litecoind`, in regtest,
//! with its LevelDB block index and chainstate on a btrfs volume, followed
//! by the daemon with `source = "bitcoin"` while it mines and transacts.
//!
//! Bitcoin Core writes its state lazily, so a snapshot of the running node
//! holds its last write, not its tip. With the forced write before each
//! snapshot (the default), a rollback restarts the node exactly at the
//! snapshot's height with the original block hash, an export rebuilds a
//! node at the export's height that `btm verify` proves, and the wallet
//! never reaches the store. With the write turned off, the snapshot holds
//! less than its label, and the daemon says so when the node restarts
//! below it.
//!
//! Needs root and `litecoind` (installed by scripts/test.sh). Fails, never
//! skips, when either is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Btrfs, DaemonProc, Fixture};

/// A regtest `litecoind`, stopped over RPC (or killed by PID) on drop.
struct Litecoind {
    child: Option<Child>,
    datadir: PathBuf,
    rpc_port: u16,
}

impl Litecoind {
    /// Start a node and wait for its RPC. A port taken between
    /// `free_port` and the node's bind is retried on another; any other
    /// early exit fails with the node's own last words from debug.log.
    fn start(datadir: &Path) -> Self {
        std::fs::create_dir_all(datadir).expect("datadir");
        for _attempt in 0..3 {
            let mut node = Self::spawn(datadir);
            let started = Instant::now();
            loop {
                if node.try_cli(&["getblockcount"]).is_some() {
                    return node;
                }
                let child = node.child.as_mut().expect("a child");
                if let Ok(Some(status)) = child.try_wait() {
                    node.child = None;
                    let log = node.log_tail();
                    if log.contains("Unable to bind") {
                        break;
                    }
                    panic!("litecoind exited ({status}) before it answered:\n{log}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "litecoind did not answer on port {}:\n{}",
                    node.rpc_port,
                    node.log_tail()
                );
                sleep(Duration::from_millis(100));
            }
        }
        panic!("litecoind found its RPC port taken three times")
    }

    fn spawn(datadir: &Path) -> Self {
        let rpc_port = common::free_port();
        let child = Command::new("litecoind")
            .arg("-regtest")
            .arg(format!("-datadir={}", datadir.display()))
            .arg(format!("-rpcport={rpc_port}"))
            .args([
                "-server",
                "-listen=0",
                "-daemon=0",
                "-printtoconsole=0",
                "-fallbackfee=0.0001",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("litecoind not found: run scripts/test.sh, which installs it");
        Litecoind {
            child: Some(child),
            datadir: datadir.to_owned(),
            rpc_port,
        }
    }

    /// The last lines of the node's debug.log, to say why it failed.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.datadir.join("regtest/debug.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    fn cookie(&self) -> PathBuf {
        self.datadir.join("regtest/.cookie")
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let options = [
            format!("-datadir={}", self.datadir.display()),
            format!("-rpcport={}", self.rpc_port),
        ];
        common::litecoin_cli(&options, args)
    }

    #[track_caller]
    fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("litecoin-cli {args:?} failed"))
    }

    fn height(&self) -> u64 {
        self.cli(&["getblockcount"]).parse().expect("a height")
    }

    fn hash(&self, height: u64) -> String {
        self.cli(&["getblockhash", &height.to_string()])
    }

    /// Mine `n` blocks, one of them with a payment in it.
    fn mine(&self, n: u64, to: &str) {
        if self.cli(&["getbalance"]).parse::<f64>().unwrap_or(0.0) > 1.0 {
            let payee = self.cli(&["getnewaddress"]);
            self.cli(&["sendtoaddress", &payee, "0.5"]);
        }
        self.cli(&["generatetoaddress", &n.to_string(), to]);
    }

    /// Stop cleanly over RPC and wait for the process to exit.
    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.try_cli(&["stop"]);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Litecoind {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh regtest node in the volume with a wallet and 110 blocks (the
/// first coinbase is spendable from block 101), and its mining address.
fn node_in_volume(fx: &Btrfs) -> (Litecoind, String) {
    let node = Litecoind::start(&fx.root().join("litecoin"));
    node.cli(&["createwallet", "w"]);
    let addr = node.cli(&["getnewaddress"]);
    node.cli(&["generatetoaddress", "110", &addr]);
    (node, addr)
}

/// `btm daemon` following `node` with `source = "bitcoin"`, itv 10.
fn daemon(fx: &Btrfs, node: &Litecoind, extra: &[&str]) -> DaemonProc {
    let vol = fx.volume();
    let url = node.url();
    let cookie = node.cookie();
    let mut args = vec![
        "-p",
        &vol,
        "-m",
        "btrfs",
        "-i",
        "10",
        "--source",
        "bitcoin",
        "--rpc-url",
        &url,
        "--rpc-cookie",
        cookie.to_str().expect("utf8"),
        "--poll-interval",
        "100ms",
    ];
    args.extend_from_slice(extra);
    DaemonProc::start(fx.scratch(), &args, &[])
}

/// Mine in steps of ten, waiting after each for the daemon's snapshot.
fn mine_to(fx: &Btrfs, node: &Litecoind, addr: &str, daemon: &DaemonProc, top: u64) {
    let mut h = node.height();
    while h < top {
        node.mine(10, addr);
        h += 10;
        let started = Instant::now();
        while !fx.heights().contains(&h) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no snapshot at {h}: {}",
                daemon.log_text()
            );
            sleep(Duration::from_millis(100));
        }
    }
}

/// `btm ARGS` on the fixture's volume (list, rollback).
fn run(fx: &Btrfs, args: &[&str]) -> String {
    fx.btm(args).ok()
}

/// `btm ARGS` without a volume (stores, restore, verify).
fn plain(fx: &Btrfs, args: &[&str]) -> common::Run {
    common::btm(fx.scratch(), args)
}

#[test]
fn litecoind_on_btrfs_rolls_back_and_rebuilds_at_its_labels() {
    let fx = Btrfs::new();
    let (node, addr) = node_in_volume(&fx);
    let store = fx.scratch().join("store");
    let store_s = store.to_str().expect("utf8").to_owned();
    let mut d = daemon(
        &fx,
        &node,
        &[
            "--export-store",
            &store_s,
            "--export-every",
            "100",
            "--export-tag",
            "ltc",
        ],
    );
    mine_to(&fx, &node, &addr, &d, 300);
    d.wait_status_for("the export of 300", Duration::from_secs(120), |s| {
        s["last_export"]["height"] == 300 && s["export"].is_null()
    });
    let status = d.status().expect("status");
    assert!(status.get("height_mismatch").is_none(), "{status}");
    assert_eq!(status["counters"]["height_mismatches"], 0, "{status}");
    assert_eq!(status["counters"]["flush_failures"], 0, "{status}");
    assert_eq!(status["last_snapshot"]["durable_height"], 300, "{status}");
    assert_eq!(d.stop(), Some(0));

    // Every snapshot records the height its forced write made durable.
    let list: serde_json::Value =
        serde_json::from_str(&run(&fx, &["list", "--json"])).expect("json");
    for s in list["snapshots"].as_array().expect("snapshots") {
        assert_eq!(s["durable_height"], s["height"], "{s}");
    }
    let original: Vec<(u64, String)> = [0, 200, 250, 300]
        .into_iter()
        .map(|h| (h, node.hash(h)))
        .collect();
    let hash_of = |h: u64| {
        original
            .iter()
            .find(|(x, _)| *x == h)
            .map(|(_, s)| s.clone())
            .expect("recorded")
    };
    node.stop();

    // Rollback to a middle snapshot: the node restarts exactly there, on
    // the same chain, and mines on.
    run(&fx, &["rollback", "-s", "250", "-S", "--yes"]);
    let node = Litecoind::start(&fx.root().join("litecoin"));
    assert_eq!(
        node.height(),
        250,
        "rolled back to the snapshot labelled 250"
    );
    assert_eq!(node.hash(250), hash_of(250));
    node.cli(&["generatetoaddress", "3", &addr]);
    assert_eq!(node.height(), 253);
    node.stop();

    // The exports: labelled, durable and identified alike.
    let backups: serde_json::Value =
        serde_json::from_str(&plain(&fx, &["backups", "-s", &store_s, "--json"]).ok())
            .expect("json");
    let by_height = |h: u64| {
        backups
            .as_array()
            .expect("array")
            .iter()
            .find(|b| b["meta"]["height"] == h)
            .unwrap_or_else(|| panic!("no export of {h}: {backups}"))
            .clone()
    };
    for h in [200, 300] {
        let meta = &by_height(h)["meta"];
        assert_eq!(meta["durable_height"], h, "{meta}");
        assert_eq!(meta["chain"]["kind"], "bitcoin", "{meta}");
        assert_eq!(meta["chain"]["chain_id"], "regtest", "{meta}");
        assert_eq!(meta["chain"]["block_hash"], hash_of(h).as_str(), "{meta}");
        assert_eq!(meta["chain"]["genesis_hash"], hash_of(0).as_str(), "{meta}");
        assert_eq!(meta["chain"]["pruned"], false, "{meta}");
        let client = meta["chain"]["client"].as_str().unwrap_or_default();
        assert!(client.contains("LitecoinCore"), "{meta}");
    }

    // The wallet stayed home: left out by the secrets rules, nothing of it
    // among the backup's entries.
    let latest = by_height(300)["name"].as_str().expect("name").to_owned();
    let shown: serde_json::Value = serde_json::from_str(
        &plain(&fx, &["backups", "show", &latest, "-s", &store_s, "--json"]).ok(),
    )
    .expect("json");
    let excluded = shown["backup"]["excluded"].as_array().expect("excluded");
    assert!(
        excluded
            .iter()
            .any(|x| x["pattern"] == "wallets/" && x["matched"].as_u64() >= Some(1)),
        "{excluded:?}"
    );
    let entries = shown["entries"].as_array().expect("entries");
    assert!(entries
        .iter()
        .any(|e| e["path"] == "litecoin/regtest/chainstate"));
    assert!(
        !entries
            .iter()
            .any(|e| e["path"].as_str().is_some_and(|p| p.contains("wallet"))),
        "a wallet entry was backed up"
    );

    // Rebuilt from the latest export into an empty directory: the node
    // starts at the export's height, and verify proves its chain.
    let rebuilt = fx.scratch().join("rebuilt");
    let rebuilt_s = rebuilt.to_str().expect("utf8");
    plain(
        &fx,
        &["restore", "latest", rebuilt_s, "-s", &store_s, "-t", "ltc"],
    )
    .ok();
    assert!(!rebuilt.join("litecoin/regtest/wallets").exists());
    let node = Litecoind::start(&rebuilt.join("litecoin"));
    assert_eq!(node.height(), 300);
    assert_eq!(node.hash(300), hash_of(300));
    let verify = |node: &Litecoind| {
        let cookie = node.cookie();
        plain(
            &fx,
            &[
                "verify",
                "latest",
                "-s",
                &store_s,
                "-t",
                "ltc",
                "--rpc-url",
                &node.url(),
                "--rpc-cookie",
                cookie.to_str().expect("utf8"),
            ],
        )
    };
    let ok = verify(&node).ok();
    assert!(ok.starts_with("verified: "), "{ok}");
    assert!(ok.contains("chain regtest"), "{ok}");
    node.stop();

    // The rebuilt directory is known to hold regtest: a backup of another
    // chain is refused over it, and nothing of it is written.
    let mainnet = fx.scratch().join("mainnet");
    std::fs::create_dir_all(mainnet.join("litecoin")).expect("mkdir");
    std::fs::write(mainnet.join("litecoin/from-mainnet"), b"x").expect("w");
    let m = mainnet.to_str().expect("utf8");
    plain(
        &fx,
        &["backup", m, "-s", &store_s, "-t", "main", "--chain", "main"],
    )
    .ok();
    let e = plain(
        &fx,
        &["restore", "latest", rebuilt_s, "-s", &store_s, "-t", "main"],
    )
    .fails(1);
    assert!(e.contains("holds chain regtest, genesis"), "{e}");
    assert!(!rebuilt.join("litecoin/from-mainnet").exists());

    // A node rebuilt from the older export is behind the latest one.
    let older = fx.scratch().join("older");
    let name = by_height(200)["name"].as_str().expect("name").to_owned();
    plain(
        &fx,
        &[
            "restore",
            &name,
            older.to_str().expect("utf8"),
            "-s",
            &store_s,
        ],
    )
    .ok();
    let node = Litecoind::start(&older.join("litecoin"));
    assert_eq!(node.height(), 200);
    let e = verify(&node).fails(1);
    assert!(e.contains("behind: at 200, expected 300"), "{e}");
    node.stop();
}

#[test]
fn without_the_flush_a_rolled_back_node_restarts_below_its_label_and_is_reported() {
    let fx = Btrfs::new();
    let (node, addr) = node_in_volume(&fx);
    let metrics_port = common::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut d = daemon(
        &fx,
        &node,
        &["--flush", "false", "--metrics-listen", &metrics],
    );
    mine_to(&fx, &node, &addr, &d, 150);
    let status = d.status().expect("status");
    assert!(
        status["last_snapshot"].get("durable_height").is_none(),
        "{status}"
    );
    assert_eq!(d.stop(), Some(0));
    node.stop();

    run(&fx, &["rollback", "-s", "130", "-S", "--yes"]);
    let node = Litecoind::start(&fx.root().join("litecoin"));
    let restarted = node.height();
    assert!(
        restarted < 130,
        "the lazily written state restarted at {restarted}: the snapshot held its label without a flush"
    );

    // The daemon sees the node below the snapshot it was rolled back to.
    let d = daemon(
        &fx,
        &node,
        &["--flush", "false", "--metrics-listen", &metrics],
    );
    d.wait_status("the mismatch reported", |s| {
        s["height_mismatch"]["snapshot"] == 130 && s["height_mismatch"]["holds"] == restarted
    });
    let status = d.status().expect("status");
    let m = &status["height_mismatch"];
    assert_eq!(m["found_by"], "restart", "{m}");
    assert!(
        m["message"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("held the node's state at {restarted}, not 130"))),
        "{m}"
    );
    assert!(status["counters"]["height_mismatches"].as_u64() >= Some(1));
    let scraped = Command::new("curl")
        .args(["-s", &format!("http://{metrics}/metrics")])
        .output()
        .expect("curl");
    let scraped = String::from_utf8_lossy(&scraped.stdout);
    assert!(
        scraped.contains(&format!("btm_height_mismatch_blocks {}", 130 - restarted)),
        "{scraped}"
    );
    assert!(d.log_text().contains("below the newest snapshot (130)"));

    // Once the node passes the snapshot again, the warning is over.
    node.cli(&["generatetoaddress", &(135 - restarted).to_string(), &addr]);
    d.wait_status("the mismatch cleared", |s| {
        s.get("height_mismatch").is_none()
    });
    drop(d);
    node.stop();
}
