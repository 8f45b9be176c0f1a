//! Exports (garbage collection is tested in `gc.rs`).
//!
//! - `btm export` on real btrfs and zfs-fuse volumes: reads the snapshot,
//!   not the live files; incremental across snapshots (the unchanged-file
//!   rule holds on both filesystems); pins the snapshot against pruning;
//!   one export at a time.
//! - The daemon: periodic exports, status and metrics, SIGKILL mid-export,
//!   and a store that is down.
//! - Verified exports: the chain identity recorded from a CometBFT-style
//!   RPC, and `btm verify` against the same chain, a fork and no node.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::Duration;

use common::{btm, noise, Btrfs, DaemonProc, FakeRpc, Fixture, Zfs};

const MIB: usize = 1 << 20;

fn tree(dir: &Path, files: &[(&str, u64, usize)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, seed, len) in files {
        std::fs::write(dir.join(name), noise(*seed, *len)).expect("write");
    }
}

fn restore_equals(store: &str, name: &str, expected: &Path, scratch: &Path) {
    let dst = scratch.join(format!("restore-{}", name.replace(':', "")));
    btm(
        scratch,
        &["restore", name, dst.to_str().expect("utf8"), "-s", store],
    )
    .ok();
    common::sh(
        "diff",
        &[
            "-r",
            expected.to_str().expect("utf8"),
            dst.to_str().expect("utf8"),
        ],
    );
}

/// Files for export tests: random data, a sparse file, a block log.
fn fill(root: &Path) {
    tree(root, &[("state.db", 40, 3 * MIB), ("peers", 41, 1000)]);
    let sparse = std::fs::File::create(root.join("sparse.img")).expect("create");
    sparse.set_len(64 << 20).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&sparse, &noise(42, 100_000), 10 << 20)
        .expect("write");
    std::fs::create_dir_all(root.join("blocks")).expect("mkdir");
    std::fs::write(root.join("blocks/log"), noise(43, 2 * MIB)).expect("log");
}

/// The second state: `peers` rewritten, one block appended to the log.
fn change(root: &Path) {
    std::fs::write(root.join("peers"), b"live change").expect("write");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("blocks/log"))
        .expect("open");
    std::io::Write::write_all(&mut f, b"one more block").expect("append");
}

fn export_json(fx: &impl Fixture, store: &str, extra: &[&str]) -> serde_json::Value {
    let vol = fx.volume();
    let mut args = vec![
        "export",
        "-p",
        &vol,
        "-m",
        fx.mode(),
        "--export-store",
        store,
        "--export-tag",
        "node1",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&btm(fx.scratch(), &args).ok()).expect("export --json")
}

fn export_is_incremental_and_reads_the_snapshot(fx: &impl Fixture) {
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8");
    let (v1, v2) = (fx.scratch().join("v1"), fx.scratch().join("v2"));
    fill(&v1);
    fill(&v2);
    change(&v2);
    fill(&fx.root());
    fx.btm(&["snapshot", "--height", "100"]).ok();
    // Changes after the snapshot must not reach its export.
    std::fs::write(fx.root().join("peers"), b"live change").expect("write");

    let first = export_json(fx, store, &["--height", "100"]);
    let b = &first["backup"];
    // Holes and zeros are never uploaded (zfs-fuse may not report holes,
    // so reads are not checked here).
    assert!(
        b["bytes_uploaded"].as_u64().expect("n") < 6 * MIB as u64,
        "{first}"
    );
    let name1 = b["name"].as_str().expect("name").to_owned();
    restore_equals(store, &name1, &v1, fx.scratch());

    // A small change, a new snapshot: only the changed files are read.
    change(&fx.root());
    fx.btm(&["snapshot", "--height", "200"]).ok();
    let second = export_json(fx, store, &[]);
    let b = &second["backup"];
    assert_eq!(second["height"], 200);
    // state.db and the sparse file are reused unread: the unchanged-file
    // rule (size, mtime, ctime, inode) holds across snapshots.
    assert_eq!(b["files_unchanged"], 2, "{second}");
    assert!(
        b["bytes_read"].as_u64().expect("n") <= 2 * MIB as u64 + 100,
        "{second}"
    );
    let name2 = b["name"].as_str().expect("name").to_owned();
    restore_equals(store, &name2, &v2, fx.scratch());

    // The metadata says where the backup came from.
    let list: serde_json::Value =
        serde_json::from_str(&btm(fx.scratch(), &["backups", "-s", store, "--json"]).ok())
            .expect("json");
    let meta = &list[0]["meta"];
    assert_eq!(meta["height"], 200, "{list}");
    assert_eq!(meta["volume"], fx.volume());
    assert_eq!(meta["mode"], fx.mode());
    assert_eq!(meta["snapshot"], format!("{}@200", fx.volume()));
    assert!(meta["host"].is_string() && meta["btm_version"].is_string());

    // Exporting the same snapshot again does nothing.
    let again = export_json(fx, store, &["--height", "200"]);
    assert_eq!(again["already_exported"], name2.as_str());
    // A missing snapshot is a clear error.
    let vol = fx.volume();
    btm(
        fx.scratch(),
        &[
            "export",
            "-p",
            &vol,
            "--export-store",
            store,
            "--height",
            "150",
        ],
    )
    .fails(1);
    // No view clone or pin is left behind.
    // (Only this fixture's: other tests run beside this one.)
    let views = fx.scratch().join("run/views");
    assert!(!common::sh("sh", &["-c", "mount"]).contains(views.to_str().expect("utf8")));
    assert_eq!(std::fs::read_dir(&views).map(|d| d.count()).unwrap_or(0), 0);
    let pins = fx.scratch().join("run/pins");
    assert_eq!(std::fs::read_dir(pins).map(|d| d.count()).unwrap_or(0), 0);
}

#[test]
fn export_on_btrfs() {
    export_is_incremental_and_reads_the_snapshot(&Btrfs::new());
}

#[test]
fn export_on_zfs() {
    export_is_incremental_and_reads_the_snapshot(&Zfs::new());
}

/// A config file with a slow export (so tests can act while it runs).
fn slow_config(fx: &impl Fixture, store: &str, rate: &str) -> PathBuf {
    let path = fx.scratch().join("btm.toml");
    std::fs::write(
        &path,
        format!(
            "volume = \"{}\"\nmode = \"{}\"\nitv = 10\ncap = 1\n\n[export]\nstore = \"{store}\"\nevery = 10\ntag = \"node1\"\nmax_rate = \"{rate}\"\nconcurrency = 2\npack_size = \"1MiB\"\n",
            fx.volume(),
            fx.mode()
        ),
    )
    .expect("config");
    path
}

#[test]
fn a_running_export_pins_its_snapshot_and_runs_alone() {
    let fx = Btrfs::new();
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    tree(&fx.root(), &[("state.db", 50, 4 * MIB)]);
    fx.btm(&["snapshot", "--height", "10"]).ok();
    let config = slow_config(&fx, &store, "1MiB");
    let config = config.to_str().expect("utf8");
    let exporter = common::btm_cmd(fx.scratch(), &["export", "--config", config])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn export");
    let pins = fx.scratch().join("run/pins");
    for _ in 0..100 {
        if std::fs::read_dir(&pins).is_ok_and(|mut d| d.next().is_some()) {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    fx.btm(&["snapshot", "--height", "20"]).ok();
    // cap 1 would delete 10, but it is being exported.
    let plan = fx.btm(&["prune", "-c", "1", "--dry-run"]).ok();
    assert!(plan.contains("pinned"), "{plan}");
    fx.btm(&["prune", "-c", "1"]).ok();
    assert_eq!(fx.heights(), vec![20, 10]);
    let err = fx.btm(&["clean", "-k", "1"]).fails(1);
    assert!(err.contains("pinned"), "{err}");
    let err = btm(fx.scratch(), &["export", "--config", config]).fails(1);
    assert!(err.contains("another export"), "{err}");

    let out = exporter.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fx.btm(&["prune", "-c", "1"]).ok();
    assert_eq!(
        fx.heights(),
        vec![20],
        "the pin is gone once the export ends"
    );
}

fn daemon_args<'a>(fx: &'a impl Fixture, vol: &'a str, store: &'a str) -> Vec<&'a str> {
    vec![
        "-p",
        vol,
        "-m",
        fx.mode(),
        "-i",
        "10",
        "-c",
        "20",
        "--export-store",
        store,
        "--export-every",
        "20",
        "--export-tag",
        "node1",
        "--export-keep",
        "2",
    ]
}

#[test]
fn the_daemon_exports_every_n_blocks_and_keeps_k() {
    let fx = Btrfs::new();
    tree(&fx.root(), &[("state.db", 60, MIB)]);
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    let vol = fx.volume();
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut args = daemon_args(&fx, &vol, &store);
    args.extend(["--metrics-listen", &addr]);
    let daemon = DaemonProc::start(fx.scratch(), &args, &[]);
    let exported = |h: u64| {
        move |s: &serde_json::Value| s["last_export"]["height"] == h && s["export"].is_null()
    };
    for h in [10, 20, 30, 40, 50, 60] {
        std::fs::write(fx.root().join("height"), h.to_string()).expect("write");
        daemon.notify(h);
        if h % 20 == 0 || h == 10 {
            daemon.wait_status_for(
                &format!("export of {h}"),
                Duration::from_secs(30),
                exported(h),
            );
        }
    }
    let s = daemon.status().expect("status");
    assert_eq!(s["counters"]["exports"], 4, "{s}");
    assert_eq!(s["counters"]["export_failures"], 0, "{s}");
    let names: Vec<serde_json::Value> =
        serde_json::from_str(&btm(fx.scratch(), &["backups", "-s", &store, "--json"]).ok())
            .expect("json");
    let heights: Vec<u64> = names
        .iter()
        .map(|b| b["meta"]["height"].as_u64().expect("height"))
        .collect();
    assert_eq!(heights, vec![60, 40], "keep 2");
    let text = common::btm(
        fx.scratch(),
        &["status", "--socket", daemon.socket.to_str().expect("utf8")],
    )
    .ok();
    assert!(text.contains("last export:    height 60"), "{text}");
    let metrics = common::sh(
        "curl",
        &["-s", "-m", "5", &format!("http://{addr}/metrics")],
    );
    for line in [
        "btm_last_export_height 60",
        "btm_exports_total 4",
        "btm_export_running 0",
        "btm_errors_total{kind=\"export\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[test]
fn the_daemon_removes_views_left_by_a_killed_exporter() {
    let fx = Zfs::new();
    tree(&fx.root(), &[("a", 90, 1000)]);
    fx.btm(&["snapshot", "--height", "10"]).ok();
    // What a daemon killed mid-export leaves: a read-only clone named after
    // its (now dead) pid.
    let dead_pid = 4_194_000 + std::process::id() % 100;
    let stale = format!(
        "{}/btm-view.{}.10.{dead_pid}",
        fx.pool,
        fx.volume().replace('/', ".")
    );
    common::sh(
        "zfs",
        &[
            "clone",
            "-o",
            "readonly=on",
            &format!("{}@10", fx.volume()),
            &stale,
        ],
    );
    let exists = |name: &str| {
        std::process::Command::new("zfs")
            .args(["list", "-H", "-o", "name", name])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(exists(&stale));
    let vol = fx.volume();
    let mut daemon = DaemonProc::start(fx.scratch(), &["-p", &vol, "-m", "zfs"], &[]);
    assert!(
        !exists(&stale),
        "stale view clone survived the daemon's start"
    );
    assert!(fx.has_snapshot("10"));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn sigkill_mid_export_leaves_no_index_and_the_next_export_resumes() {
    let fx = Btrfs::new();
    tree(&fx.root(), &[("a", 70, 3 * MIB), ("b", 71, 3 * MIB)]);
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    let config = slow_config(&fx, &store, "1MiB");
    let config = config.to_str().expect("utf8").to_owned();
    let daemon = DaemonProc::start(fx.scratch(), &["--config", &config], &[]);
    daemon.notify(10);
    daemon.wait_status_for("some upload", Duration::from_secs(20), |s| {
        s["export"]["bytes_uploaded"].as_u64().unwrap_or(0) > 0
    });
    // Snapshots stay on time during an export, and a due export finding
    // one running is skipped, not queued.
    let reply = daemon.notify(20);
    assert_eq!(reply["outcome"], "created", "{reply}");
    assert!(reply["duration_ms"].as_u64().expect("ms") < 2000, "{reply}");
    let s = daemon.status().expect("status");
    assert_eq!(s["counters"]["exports_skipped"], 1, "{s}");
    assert_eq!(s["export"]["height"], 10, "{s}");
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    drop(daemon);
    let listed = btm(fx.scratch(), &["backups", "-s", &store, "--json"]).ok();
    assert_eq!(listed.trim(), "[]", "a partial export left an index");
    let uploaded_before = common::sh("find", &[&format!("{store}/packs"), "-type", "f"])
        .lines()
        .count();
    assert!(uploaded_before > 0, "nothing was uploaded before the kill");

    // Restart at full speed: the same bucket is due again and reuses what
    // was uploaded.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("1MiB", "1GiB"),
    )
    .expect("config");
    let daemon = DaemonProc::start(fx.scratch(), &["--config", &config], &[]);
    assert_eq!(daemon.notify(20)["outcome"], "exists");
    daemon.wait_status_for("export after restart", Duration::from_secs(30), |s| {
        s["last_export"]["height"] == 20
    });
    let s = daemon.status().expect("status");
    let uploaded = s["last_export"]["bytes_uploaded"].as_u64().expect("n");
    assert!(
        uploaded < 6 * MIB as u64,
        "uploaded {uploaded}: chunks of the killed export were not reused"
    );
    let check = btm(fx.scratch(), &["check", "-s", &store, "--read-data"]).ok();
    assert!(check.contains("0 problems"), "{check}");
}

#[test]
fn a_store_that_is_down_fails_exports_but_never_snapshots() {
    let fx = Btrfs::new();
    tree(&fx.root(), &[("a", 80, 100_000)]);
    let vol = fx.volume();
    // A path under a regular file can never be created.
    let store = "/dev/null/btm-store";
    let daemon = DaemonProc::start(fx.scratch(), &daemon_args(&fx, &vol, store), &[]);
    // Exports are due at 10, 20 and 40. Each is let fail before the next
    // is due: on a loaded machine one still running would skip the next
    // (that is tested apart).
    for (h, failed) in [(10, 1), (20, 2), (30, 2), (40, 3)] {
        let reply = daemon.notify(h);
        assert_eq!(reply["outcome"], "created", "{reply}");
        daemon.wait_status("the due export to fail", |s| {
            s["counters"]["export_failures"].as_u64() == Some(failed)
        });
    }
    daemon.wait_status("export failures", |s| {
        s["counters"]["export_failures"].as_u64() == Some(3) && s["export"].is_null()
    });
    let s = daemon.status().expect("status");
    assert_eq!(s["counters"]["snapshots"], 4, "{s}");
    let errors = s["recent_errors"].to_string();
    assert!(errors.contains("export of 40"), "{errors}");
    assert!(daemon
        .log_text()
        .contains("export failed; will retry at the next due height"));
}

#[test]
fn on_btrfs_a_file_changed_in_place_is_read_only_where_it_changed() {
    let fx = Btrfs::new();
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    let expected = fx.scratch().join("expected");
    let mut content = noise(95, 16 * MIB);
    let write_both = |content: &[u8]| {
        std::fs::create_dir_all(&expected).expect("mkdir");
        std::fs::write(expected.join("big.db"), content).expect("write");
    };
    std::fs::write(fx.root().join("big.db"), &content).expect("write");
    write_both(&content);
    fx.btm(&["snapshot", "--height", "100"]).ok();
    export_json(&fx, &store, &[]);

    // 1 MiB rewritten in place (same inode, no truncation), as a database
    // page cache would.
    let patch = noise(96, MIB);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.root().join("big.db"))
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &patch, 5 * MIB as u64).expect("pwrite");
    f.sync_all().expect("sync");
    drop(f);
    content[5 * MIB..6 * MIB].copy_from_slice(&patch);
    write_both(&content);
    fx.btm(&["snapshot", "--height", "200"]).ok();
    let second = export_json(&fx, &store, &[]);
    let b = &second["backup"];
    assert!(
        b["bytes_read"].as_u64().expect("n") <= 4 * MIB as u64,
        "only the changed chunk should be read: {second}"
    );
    let name = b["name"].as_str().expect("name").to_owned();
    restore_equals(&store, &name, &expected, fx.scratch());

    // Without the previous snapshot there is nothing to compare with: the
    // changed file is read whole, and the result is just as right.
    fx.btm(&["clean", "-k", "0"]).ok();
    let patch = noise(97, 10);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.root().join("big.db"))
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &patch, 100).expect("pwrite");
    drop(f);
    content[100..110].copy_from_slice(&patch);
    write_both(&content);
    fx.btm(&["snapshot", "--height", "300"]).ok();
    let third = export_json(&fx, &store, &[]);
    assert_eq!(third["backup"]["bytes_read"], 16 * MIB, "{third}");
    let name = third["backup"]["name"].as_str().expect("name").to_owned();
    restore_equals(&store, &name, &expected, fx.scratch());
}

#[test]
fn a_reload_lets_a_running_export_finish() {
    let fx = Btrfs::new();
    tree(&fx.root(), &[("a", 98, 3 * MIB), ("b", 99, 3 * MIB)]);
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    let config = slow_config(&fx, &store, "2MiB");
    let config = config.to_str().expect("utf8").to_owned();
    let mut daemon = DaemonProc::start(fx.scratch(), &["--config", &config], &[]);
    daemon.notify(10);
    daemon.wait_status("the export to start", |s| s["export"]["height"] == 10);
    let before = daemon.status().expect("status")["started_at"].clone();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    // The new generation reports the export that is still running...
    daemon.wait_status("the reload", |s| {
        s["started_at"] != before && s["export"]["height"] == 10
    });
    // ...and it finishes, with its backup written.
    daemon.wait_status_for("the export to finish", Duration::from_secs(20), |s| {
        s["last_export"]["height"] == 10 && s["export"].is_null()
    });
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&btm(fx.scratch(), &["backups", "-s", &store, "--json"]).ok())
            .expect("json");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(!daemon.log_text().contains("export cancelled"));
    assert_eq!(daemon.stop(), Some(0));
}

/// A CometBFT-style node answering `/block?height=H`: block and app hashes
/// derived from the height, or from a fork of it once `fork` is set.
fn comet_blocks(fork: Arc<AtomicBool>) -> FakeRpc {
    FakeRpc::start(move |req| {
        // The tip, which `verify` asks for first.
        if req.starts_with("GET /status ") {
            return (
                200,
                r#"{"jsonrpc":"2.0","id":-1,"result":{"sync_info":{"latest_block_height":"12","catching_up":false}}}"#.into(),
            );
        }
        let Some(h) = req
            .strip_prefix("GET /block?height=")
            .and_then(|r| r.split(' ').next())
            .and_then(|h| h.parse::<u64>().ok())
        else {
            return (404, "{}".into());
        };
        let salt = if fork.load(Ordering::SeqCst) { 7 } else { 0 };
        (
            200,
            format!(
                r#"{{"jsonrpc":"2.0","id":-1,"result":{{"block_id":{{"hash":"{:064X}"}},"block":{{"header":{{"chain_id":"testchain-1","height":"{h}","app_hash":"{:064X}"}}}}}}}}"#,
                h * 1_000_003 + salt,
                h * 7919
            ),
        )
    })
}

/// The daemon in push mode asks `rpc_url` for the chain's identity at the
/// exported height and records it; `backups --long/--json` show it, and
/// `verify` passes against the same chain and fails on a fork, on a node
/// that cannot answer, and on a backup without an identity.
#[test]
fn exports_record_the_chain_identity_and_verify_checks_it() {
    let fx = Btrfs::new();
    tree(&fx.root(), &[("state.db", 4, MIB)]);
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    let fork = Arc::new(AtomicBool::new(false));
    let rpc = comet_blocks(fork.clone());
    let url = rpc.url();
    let vol = fx.volume();
    let mut args = daemon_args(&fx, &vol, &store);
    args.extend(["--rpc-url", &url, "--rpc-kind", "cometbft"]);
    let daemon = DaemonProc::start(fx.scratch(), &args, &[]);
    daemon.notify(10);
    daemon.wait_status_for("export of 10", Duration::from_secs(30), |s| {
        s["last_export"]["height"] == 10 && s["export"].is_null()
    });
    drop(daemon);

    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&btm(fx.scratch(), &["backups", "-s", &store, "--json"]).ok())
            .expect("json");
    let chain = &listed[0]["meta"]["chain"];
    assert_eq!(chain["kind"], "cometbft", "{chain}");
    assert_eq!(chain["height"], 10);
    assert_eq!(chain["block_hash"], format!("{:064X}", 10 * 1_000_003));
    assert_eq!(chain["state_hash"], format!("{:064X}", 10 * 7919));
    assert_eq!(chain["chain_id"], "testchain-1");
    let long = btm(fx.scratch(), &["backups", "-s", &store, "--long"]).ok();
    assert!(
        long.contains(&format!(
            "cometbft at height 10: block hash {:064X}, app hash",
            10 * 1_000_003
        )),
        "{long}"
    );

    let verify = |url: &str| {
        btm(
            fx.scratch(),
            &[
                "verify",
                "latest",
                "-t",
                "node1",
                "-s",
                &store,
                "--rpc-url",
                url,
            ],
        )
    };
    let ok = verify(&url).ok();
    assert!(
        ok.starts_with("verified: backup ")
            && ok.contains("--node1 is on the node's chain at height 10"),
        "{ok}"
    );
    fork.store(true, Ordering::SeqCst);
    let e = verify(&url).fails(1);
    assert!(
        e.contains("NOT verified") && e.contains("block hash"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    drop(rpc);
    let e = verify(&url).fails(1);
    assert!(
        e.contains("cannot verify backup") && e.contains(&url),
        "{e}"
    );

    // A backup made without a node RPC has nothing to verify against.
    btm(
        fx.scratch(),
        &[
            "backup",
            "-s",
            &store,
            "-t",
            "plain",
            fx.root().to_str().expect("utf8"),
        ],
    )
    .ok();
    let e = btm(
        fx.scratch(),
        &["verify", "-t", "plain", "-s", &store, "--rpc-url", &url],
    )
    .fails(1);
    assert!(e.contains("recorded no chain identity"), "{e}");
}

/// `[export] publish`: the daemon keeps the store's signed catalog after
/// every export, and retention and GC sweeps (which replace pack indexes
/// and delete packs) keep it right: it names exactly the heads and pack
/// indexes the store has, and a reader trusting the key restores from it.
#[test]
fn the_daemon_publishes_each_export_and_gc_keeps_the_catalog_right() {
    let fx = Btrfs::new();
    tree(&fx.root(), &[("state.db", 61, MIB), ("small", 62, 1000)]);
    let store = fx.scratch().join("store");
    let store = store.to_str().expect("utf8").to_owned();
    let key = fx.scratch().join("publisher.key");
    let out = btm(
        fx.scratch(),
        &["key", "generate", key.to_str().expect("utf8")],
    )
    .ok();
    let public = out.trim().lines().last().expect("public key").to_owned();
    let vol = fx.volume();
    let mut args = daemon_args(&fx, &vol, &store);
    args.extend([
        "--export-publish",
        "--export-signing-key",
        key.to_str().expect("utf8"),
        "--export-gc-grace",
        "1s",
    ]);
    let daemon = DaemonProc::start(fx.scratch(), &args, &[]);
    let catalog_of = || -> btm_chunk::public::Catalog {
        let data = std::fs::read(Path::new(&store).join("catalog")).expect("a catalog");
        let trusted: btm_chunk::public::PublicKey = public.parse().expect("key");
        btm_chunk::public::Catalog::decode(&data, &[trusted])
            .expect("signed by the key")
            .0
    };
    let names_in = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(Path::new(&store).join(dir))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let mut first_packidx = Vec::new();
    for (i, h) in [10u64, 20, 40, 60, 80].into_iter().enumerate() {
        // Each export rewrites the database: the old versions become
        // garbage that GC marks, then sweeps a second later.
        std::fs::write(fx.root().join("state.db"), noise(70 + i as u64, MIB)).expect("write");
        daemon.notify(h);
        daemon.wait_status_for(&format!("export of {h}"), Duration::from_secs(30), |s| {
            s["last_export"]["height"] == h && s["export"].is_null()
        });
        // After every export the catalog is exactly the store.
        let st = daemon.status().expect("status");
        assert!(
            Path::new(&store).join("catalog").exists(),
            "no catalog after {h}: {st}"
        );
        let c = catalog_of();
        let heads: Vec<String> = c.heads.iter().map(|e| e.name.clone()).collect();
        assert_eq!(heads, names_in("indexes"), "after {h}");
        let mut packidx: Vec<String> = c.packidx.iter().map(|p| p.id.to_hex()).collect();
        packidx.sort();
        assert_eq!(packidx, names_in("packidx"), "after {h}");
        assert_eq!(c.heads.last().and_then(|e| e.height), Some(h), "after {h}");
        if h == 10 {
            first_packidx = names_in("packidx");
        }
        sleep(Duration::from_millis(1100));
    }
    let s = daemon.status().expect("status");
    assert_eq!(s["counters"]["export_failures"], 0, "{s}");
    drop(daemon);

    // The GC swept: the first export's pack index is gone (replaced when
    // its packs were), and the catalog never named it after (checked
    // above, after every export).
    let now = names_in("packidx");
    assert!(
        first_packidx.iter().all(|p| !now.contains(p)),
        "{first_packidx:?} still in {now:?}"
    );
    let c = catalog_of();
    assert_eq!(
        c.heads.iter().map(|e| e.height).collect::<Vec<_>>(),
        vec![Some(60), Some(80)]
    );
    let check = btm(
        fx.scratch(),
        &["check", "--read-data", "-s", &store, "--trust", &public],
    )
    .ok();
    assert!(check.contains(" 0 problems"), "{check}");
    let dst = fx.scratch().join("from-catalog");
    btm(
        fx.scratch(),
        &[
            "restore",
            "latest",
            "-t",
            "node1",
            dst.to_str().expect("utf8"),
            "-s",
            &store,
            "--trust",
            &public,
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read(dst.join("state.db")).expect("restored"),
        std::fs::read(fx.root().join("state.db")).expect("source")
    );
    // Forgetting by hand needs the key, and keeps the catalog right.
    let oldest = c.heads[0].name.clone();
    let e = btm(fx.scratch(), &["forget", "-s", &store, &oldest]).fails(1);
    assert!(e.contains("--signing-key"), "{e}");
    btm(
        fx.scratch(),
        &[
            "forget",
            "-s",
            &store,
            &oldest,
            "--signing-key",
            key.to_str().expect("utf8"),
        ],
    )
    .ok();
    assert_eq!(catalog_of().heads.len(), 1);
    assert_eq!(names_in("indexes").len(), 1);
}
