//! `btm daemon` against real volumes: push and polled sources, systemd
//! notifications, bad inputs, reload and shutdown. Needs root.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{btm, Btrfs, DaemonProc, FakeRpc, Fixture, Zfs};
use nix::sys::signal::Signal;

fn push_policies(fx: &impl Fixture) {
    let vol = fx.volume();
    // fair: cap 3, every answer arrives after its snapshot exists.
    let d = DaemonProc::start(
        fx.scratch(),
        &["-p", &vol, "-m", fx.mode(), "-i", "10", "-c", "3"],
        &[],
    );
    let skipped = d.notify(15);
    assert_eq!(skipped["outcome"], "skipped");
    assert!(skipped["reason"]
        .as_str()
        .expect("reason")
        .contains("not a multiple"));
    for h in (10..=60).step_by(10) {
        let r = d.notify(h);
        assert_eq!(r["outcome"], "created", "{r}");
        assert!(
            fx.has_snapshot(&h.to_string()),
            "answer for {h} came before the snapshot"
        );
    }
    assert_eq!(d.notify(60)["outcome"], "exists");
    assert_eq!(fx.heights(), vec![60, 50, 40]);
    let st = d.status().expect("status");
    assert_eq!(st["last_snapshot"]["height"], 60);
    assert_eq!(st["snapshot_count"], 3);
    assert_eq!(st["next_due"], 70);
    drop(d);
    fx.btm(&["clean"]).ok();

    // fade: the volume ends up exactly as `btm simulate` predicts.
    let d = DaemonProc::start(
        fx.scratch(),
        &[
            "-p",
            &vol,
            "-m",
            fx.mode(),
            "-i",
            "2",
            "-c",
            "20",
            "-a",
            "fade",
        ],
        &[],
    );
    for h in (2..=120).step_by(2) {
        d.notify(h);
    }
    assert_eq!(
        fx.heights(),
        common::simulate_kept(
            fx.scratch(),
            &["-i", "2", "-c", "20", "-a", "fade", "--blocks", "120"]
        )
    );
}

#[test]
fn push_on_btrfs() {
    push_policies(&Btrfs::new());
}

#[test]
fn push_on_zfs() {
    push_policies(&Zfs::new());
}

/// READY=1, then WATCHDOG=1 at half of WATCHDOG_USEC, then STOPPING=1.
#[test]
fn tells_systemd_the_truth() {
    let fx = Btrfs::new();
    let sock_path = fx.scratch().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let vol = fx.volume();
    let started = Instant::now();
    let mut d = DaemonProc::start(
        fx.scratch(),
        &["-p", &vol],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().expect("utf8")),
            ("WATCHDOG_USEC", "600000"),
        ],
    );
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1"), "{first}");
    assert!(first.contains("STATUS="), "{first}");
    let mut pings = Vec::new();
    while pings.len() < 3 {
        let m = recv();
        if m.contains("WATCHDOG=1") {
            pings.push(started.elapsed());
        }
    }
    // Three pings at ~300 ms intervals: neither missing nor flooding.
    let span = pings[2] - pings[0];
    assert!(
        span >= Duration::from_millis(400) && span <= Duration::from_millis(1500),
        "{pings:?}"
    );
    d.signal(Signal::SIGTERM);
    let mut stopping = false;
    for _ in 0..10 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    // One signal: a second would mean "stop waiting".
    assert_eq!(d.wait_exit(), Some(0));
}

/// A fake CometBFT node: heights advance, then garbage, an outage, a
/// backwards step; the daemon snapshots each new bucket once, records the
/// height window, stays up and says what is wrong.
#[test]
fn follows_cometbft_through_bad_answers() {
    let fx = Btrfs::new();
    let height = Arc::new(AtomicU64::new(3));
    let mode = Arc::new(AtomicU64::new(0)); // 0 ok, 1 garbage, 2 truncated, 3 http 500
    let (h2, m2) = (height.clone(), mode.clone());
    let rpc = FakeRpc::start(move |req| {
        assert!(req.starts_with("GET /status "), "{req}");
        let h = h2.load(Ordering::SeqCst);
        match m2.load(Ordering::SeqCst) {
            1 => (200, "<html>bad gateway</html>".into()),
            2 => (200, format!("{{\"result\":{{\"sync_info\":{{\"latest_block_height\":\"{h}")),
            3 => (500, "{}".into()),
            _ => (
                200,
                format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":-1,\"result\":{{\"node_info\":{{\"network\":\"test\"}},\"sync_info\":{{\"latest_block_height\":\"{h}\",\"catching_up\":false}}}}}}"
                ),
            ),
        }
    });
    let vol = fx.volume();
    let d = DaemonProc::start(
        fx.scratch(),
        &[
            "-p",
            &vol,
            "-i",
            "10",
            "--source",
            "cometbft",
            "--rpc-url",
            &rpc.url(),
            "--poll-interval",
            "50ms",
        ],
        &[],
    );
    d.wait_status("first snapshot", |s| s["last_snapshot"]["height"] == 3);
    for h in 4..=35 {
        height.store(h, Ordering::SeqCst);
        sleep(Duration::from_millis(30));
    }
    d.wait_status("height 35", |s| s["last_height"] == 35);
    d.wait_status("idle", |s| s["in_progress"].is_null());
    let heights = fx.heights();
    let buckets: Vec<u64> = heights.iter().map(|h| h / 10).collect();
    assert_eq!(
        buckets,
        vec![3, 2, 1, 0],
        "one snapshot per bucket: {heights:?}"
    );
    let listing: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    for s in listing["snapshots"].as_array().expect("array") {
        let (h, after) = (s["height"].as_u64().expect("h"), s["height_after"].as_u64());
        assert!(after.is_some_and(|a| a >= h), "window recorded for {s}");
    }

    for bad in [1, 2, 3] {
        mode.store(bad, Ordering::SeqCst);
        d.wait_status("source failure", |s| !s["source_failing_since"].is_null());
        mode.store(0, Ordering::SeqCst);
        d.wait_status("recovery", |s| s["source_failing_since"].is_null());
    }
    let st = d.status().expect("status");
    let kinds: Vec<&str> = st["recent_errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    assert!(kinds.contains(&"source"), "{st}");

    // Backwards: no snapshot, no crash, then onwards again.
    height.store(12, Ordering::SeqCst);
    d.wait_status("backwards height", |s| s["last_height"] == 12);
    sleep(Duration::from_millis(300));
    assert_eq!(fx.heights().len(), 4, "no snapshot while going backwards");
    height.store(41, Ordering::SeqCst);
    d.wait_status("snapshot after recovering", |s| {
        s["last_snapshot"]["height"] == 41
    });
    assert!(d.log_text().contains("height went backwards"));
}

#[test]
fn unreachable_rpc_keeps_the_daemon_up() {
    let fx = Btrfs::new();
    // Bind and drop to find a port nobody listens on.
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let vol = fx.volume();
    let mut d = DaemonProc::start(
        fx.scratch(),
        &[
            "-p",
            &vol,
            "--source",
            "ethereum",
            "--rpc-url",
            &url,
            "--poll-interval",
            "50ms",
        ],
        &[],
    );
    sleep(Duration::from_millis(500));
    let st = d.status().expect("still answering");
    assert!(!st["source_failing_since"].is_null(), "{st}");
    assert!(st["counters"]["source_errors"].as_u64().expect("n") >= 1);
    // Rate-limited: the first failure is logged, the rest are counted.
    let logged = d
        .log_text()
        .matches("cannot read the node's height")
        .count();
    assert!(logged <= 2, "log flooded: {logged} lines");
    assert_eq!(d.stop(), Some(0));
}

/// Clients that send nothing or garbage never wedge the socket.
#[test]
fn silent_and_garbage_clients_do_not_wedge_the_socket() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let fx = Btrfs::new();
    let vol = fx.volume();
    let d = DaemonProc::start(fx.scratch(), &["-p", &vol], &[]);
    let silent: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    for garbage in [
        &b"garbage\n"[..],
        b"{\"cmd\":\"notify\",\"height\":-4}\n",
        &[0xff; 10000][..],
        b"{}",
    ] {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let _ = s.read_to_string(&mut answer);
        assert!(answer.contains("\"ok\":false"), "{answer:?}");
    }
    assert_eq!(d.notify(10)["outcome"], "created");
    drop(silent);
    assert_eq!(d.notify(20)["outcome"], "created");
}

/// SIGTERM while a snapshot is in flight: it completes, its client gets the
/// answer, and the daemon exits 0.
#[test]
fn sigterm_finishes_the_snapshot_in_flight() {
    let fx = Btrfs::new();
    let (_, mut d) = with_config(
        &fx,
        &format!(
            "volume = \"{}\"\n[hooks]\npre_snapshot = [\"sleep\", \"1\"]\ntimeout = \"10s\"\n",
            fx.volume()
        ),
    );
    let socket = d.socket.clone();
    let client = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_btm"))
            .args(["notify", "--json", "--height", "10", "--socket"])
            .arg(&socket)
            .output()
            .expect("notify")
    });
    sleep(Duration::from_millis(400));
    assert_eq!(d.status().expect("status")["in_progress"], 10);
    assert_eq!(d.stop(), Some(0));
    let out = client.join().expect("client");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(reply["outcome"], "created");
    assert!(fx.has_snapshot("10"));
    assert!(!d.socket.exists(), "socket file removed");
}

/// A failing pre-snapshot hook skips that snapshot and says why; the
/// hook sees BTM_HEIGHT and BTM_VOLUME.
#[test]
fn hooks() {
    let fx = Btrfs::new();
    let marker = fx.scratch().join("post");
    let (_, d) = with_config(
        &fx,
        &format!(
            "volume = \"{}\"\n[hooks]\npre_snapshot = [\"sh\", \"-c\", \"test $BTM_HEIGHT != 20\"]\npost_snapshot = [\"sh\", \"-c\", \"echo $BTM_HEIGHT $BTM_VOLUME >> {}\"]\n",
            fx.volume(),
            marker.display()
        ),
    );
    assert_eq!(d.notify(10)["outcome"], "created");
    let r = d.notify(20);
    assert_eq!(r["outcome"], "skipped");
    assert!(
        r["reason"]
            .as_str()
            .expect("reason")
            .contains("pre-snapshot hook"),
        "{r}"
    );
    assert_eq!(fx.heights(), vec![10]);
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("post hook ran")
            .trim(),
        format!("10 {}", fx.volume())
    );
}

/// A node that writes its state lazily is made to write it before each
/// snapshot (rpc_kind bitcoin beside push heights). A write that fails or
/// outlasts the hook timeout skips the snapshot, saying why in one line; a
/// write that makes another height durable is recorded and warned about.
#[test]
fn a_failed_flush_skips_the_snapshot_and_a_short_one_is_recorded() {
    let fx = Btrfs::new();
    // 0: durable at the label; 1: an RPC error; 2: no answer; 3: durable
    // two blocks lower than the label.
    let mode = Arc::new(AtomicU64::new(0));
    let label = Arc::new(AtomicU64::new(10));
    let (m2, l2) = (mode.clone(), label.clone());
    let rpc = FakeRpc::start(move |req| {
        assert!(req.starts_with("POST / "), "{req}");
        let h = l2.load(Ordering::SeqCst);
        match m2.load(Ordering::SeqCst) {
            1 => (
                500,
                r#"{"result":null,"error":{"code":-28,"message":"Verifying blocks..."},"id":1}"#
                    .into(),
            ),
            2 => {
                // Past the 1 s hook timeout; the server answers one
                // request at a time, so not much longer.
                sleep(Duration::from_millis(1500));
                (200, "{}".into())
            }
            3 => (
                200,
                format!(r#"{{"result":{{"height":{}}},"error":null,"id":1}}"#, h - 2),
            ),
            _ => (
                200,
                format!(r#"{{"result":{{"height":{h}}},"error":null,"id":1}}"#),
            ),
        }
    });
    let (_, d) = with_config(
        &fx,
        &format!(
            "volume = \"{}\"\nrpc_url = \"{}\"\nrpc_kind = \"bitcoin\"\nrpc_user = \"u\"\nrpc_password = \"p\"\n[hooks]\ntimeout = \"1s\"\n",
            fx.volume(),
            rpc.url()
        ),
    );
    assert_eq!(d.notify(10)["outcome"], "created");
    for (m, h, why) in [(1, 20, "Verifying blocks"), (2, 30, "timed out")] {
        mode.store(m, Ordering::SeqCst);
        label.store(h, Ordering::SeqCst);
        let r = d.notify(h);
        assert_eq!(r["outcome"], "skipped", "{r}");
        let reason = r["reason"].as_str().expect("reason");
        assert!(
            reason.contains("did not write its state") && reason.contains(why),
            "{reason}"
        );
        assert!(!reason.contains('\n'), "{reason}");
    }
    sleep(Duration::from_millis(600)); // the slow answer is over
    mode.store(3, Ordering::SeqCst);
    label.store(40, Ordering::SeqCst);
    assert_eq!(d.notify(40)["outcome"], "created");
    let s = d.status().expect("status");
    assert_eq!(s["counters"]["flush_failures"], 2, "{s}");
    assert_eq!(s["height_mismatch"]["snapshot"], 40, "{s}");
    assert_eq!(s["height_mismatch"]["holds"], 38, "{s}");
    assert_eq!(s["height_mismatch"]["found_by"], "flush", "{s}");
    assert_eq!(fx.heights(), vec![40, 10]);
    let list: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    let durable: Vec<_> = list["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| (s["height"].clone(), s["durable_height"].clone()))
        .collect();
    assert_eq!(
        durable,
        [(40.into(), 38.into()), (10.into(), 10.into())],
        "{list}"
    );
    let listing = fx.btm(&["list"]).ok();
    assert!(
        listing.contains("WARNING: holds the node's state at 38"),
        "{listing}"
    );
    // The rollback plan says where the node will restart (not confirmed:
    // nothing happens).
    let plan = fx.btm(&["rollback", "-s", "40", "-S"]);
    assert_ne!(plan.code, 0);
    assert!(
        plan.stdout
            .contains("holds the node's state at height 38 (the write forced before it said so): the node will restart at 38"),
        "{}",
        plan.stdout
    );
    // A snapshot whose write matches its label ends the warning.
    mode.store(0, Ordering::SeqCst);
    label.store(50, Ordering::SeqCst);
    assert_eq!(d.notify(50)["outcome"], "created");
    assert!(d.status().expect("status").get("height_mismatch").is_none());
}

/// SIGHUP: a broken file is refused and the old settings stay; a good one
/// takes over.
#[test]
fn sighup_reloads_only_a_valid_config() {
    let fx = Btrfs::new();
    let conf = fx.scratch().join("btm.toml");
    let write = |itv: &str| {
        std::fs::write(
            &conf,
            format!("volume = \"{}\"\nitv = {itv}\n", fx.volume()),
        )
        .expect("write")
    };
    write("10");
    let d = DaemonProc::start(
        fx.scratch(),
        &["--config", conf.to_str().expect("utf8")],
        &[],
    );
    assert_eq!(d.notify(10)["outcome"], "created");
    write("\"ten\"");
    d.signal(Signal::SIGHUP);
    sleep(Duration::from_millis(500));
    assert_eq!(d.status().expect("still up")["itv"], 10);
    assert!(
        d.log_text().contains("new configuration rejected"),
        "{}",
        d.log_text()
    );
    write("5");
    d.signal(Signal::SIGHUP);
    d.wait_status("the reloaded itv", |s| s["itv"] == 5);
    assert_eq!(d.notify(15)["outcome"], "created");
}

/// The Prometheus endpoint reports heights, snapshots and errors by kind.
#[test]
fn metrics_endpoint() {
    let fx = Btrfs::new();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let vol = fx.volume();
    let d = DaemonProc::start(fx.scratch(), &["-p", &vol, "--metrics-listen", &addr], &[]);
    d.notify(10);
    d.notify(20);
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "btm_last_height 20",
        "btm_last_snapshot_height 20",
        "btm_snapshots_taken_total 2",
        "btm_snapshots 2",
        "btm_prunes_total 2",
        "btm_errors_total{kind=\"source\"} 0",
        "# TYPE btm_snapshot_duration_seconds_sum counter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    // Prometheus's own parser takes the page. Its linter objects only to
    // two names kept from before it was run (renaming a series breaks the
    // dashboards and rules that query it).
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test.sh installs Debian's prometheus package)");
    std::io::Write::write_all(check.stdin.as_mut().expect("stdin"), &out.stdout).expect("write");
    let checked = check.wait_with_output().expect("promtool");
    let said = String::from_utf8_lossy(&checked.stderr).into_owned()
        + &String::from_utf8_lossy(&checked.stdout);
    let kept = [
        "btm_snapshot_duration_seconds_sum ",
        "btm_prune_duration_seconds_sum ",
    ];
    for line in said.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            kept.iter().any(|k| line.starts_with(k)) && line.contains("suffix"),
            "promtool check metrics: {said}"
        );
    }
    assert!(matches!(checked.status.code(), Some(0 | 3)), "{said}");
    // A second daemon cannot take the same metrics port: clear error, exit 1.
    let other = fx.scratch().join("other");
    let r = btm(&other, &["daemon", "-p", &vol, "--metrics-listen", &addr]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("metrics_listen"), "{}", r.stderr);
}

/// A `zfs` or `btrfs` command that never returns (here
/// a snapshot on a frozen filesystem, as on a suspended pool) is killed
/// after `command_timeout`; the height is answered as failed, `status` and
/// the metrics report the volume stalled, the daemon keeps answering
/// meanwhile, and once the filesystem thaws it snapshots again and stops
/// cleanly.
#[test]
fn a_frozen_filesystem_times_out_snapshots_and_the_daemon_keeps_answering() {
    let fx = Btrfs::new();
    let mnt = fx.root().parent().expect("mount point").to_path_buf();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let vol = fx.volume();
    let mut d = DaemonProc::start(
        fx.scratch(),
        &[
            "-p",
            &vol,
            "--command-timeout",
            "2s",
            "--metrics-listen",
            &addr,
        ],
        &[],
    );
    assert_eq!(d.notify(10)["outcome"], "created");
    let frozen = mnt.to_str().expect("utf8").to_owned();
    common::sh("fsfreeze", &["-f", &frozen]);
    let thaw = common::Guard::new(move || {
        let _ = std::process::Command::new("fsfreeze")
            .args(["-u", &frozen])
            .status();
    });
    let socket = d.socket.clone();
    let started = Instant::now();
    let notify = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_btm"))
            .args(["notify", "--json", "--height", "20", "--socket"])
            .arg(&socket)
            .output()
            .expect("notify runs")
    });
    // While the snapshot hangs, the daemon answers.
    sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let during = d.status().expect("status while a snapshot hangs");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(during["in_progress"], 20, "{during}");
    let out = notify.join().expect("notify");
    let took = started.elapsed();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(reply["outcome"], "failed", "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not finish within 2s")),
        "{reply}"
    );
    assert!(took < Duration::from_secs(15), "the height waited {took:?}");
    let stalled = d.status().expect("status");
    assert!(stalled["volume_stalled_since"].is_string(), "{stalled}");
    assert!(
        stalled["counters"]["volume_timeouts"].as_u64() >= Some(1),
        "{stalled}"
    );
    let metrics = std::process::Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(text.lines().any(|l| l == "btm_volume_stalled 1"), "{text}");
    let human = btm(
        fx.scratch(),
        &["status", "--socket", d.socket.to_str().expect("utf8")],
    )
    .ok();
    assert!(human.contains("NOT ANSWERING"), "{human}");

    drop(thaw);
    d.wait_status_for("the volume to answer", Duration::from_secs(20), |s| {
        s["in_progress"].is_null()
    });
    assert_eq!(d.notify(30)["outcome"], "created");
    let answered = d.status().expect("status");
    assert!(answered["volume_stalled_since"].is_null(), "{answered}");
    assert_eq!(d.stop(), Some(0));
}

/// The `file` and `command` sources, end to end: the command source reads
/// the same file through `cat`, so both follow the same heights.
#[test]
fn file_and_command_sources() {
    for source in ["file", "command"] {
        let fx = Btrfs::new();
        let hfile = fx.scratch().join("height");
        std::fs::write(&hfile, "7\n").expect("write");
        let h = hfile.to_str().expect("utf8");
        let vol = fx.volume();
        let cmd = format!("cat {h}");
        let mut args = vec![
            "-p",
            vol.as_str(),
            "-i",
            "10",
            "--poll-interval",
            "50ms",
            "--source",
            source,
        ];
        if source == "file" {
            args.extend(["--height-file", h]);
        } else {
            args.extend(["--height-command", cmd.as_str()]);
        }
        let d = DaemonProc::start(fx.scratch(), &args, &[]);
        for height in [7, 12, 25, 26, 31] {
            std::fs::write(&hfile, format!("{height}\n")).expect("write");
            // Seen, and its bucket snapshotted: the next due height is past
            // it. (The height alone is in the status before its snapshot
            // starts; on a loaded machine the next write could overtake it.)
            d.wait_status_for(
                &format!("{source}: height {height}"),
                Duration::from_secs(20),
                |s| {
                    s["last_height"] == height
                        && s["in_progress"].is_null()
                        && s["next_due"].as_u64().is_some_and(|n| n > height)
                },
            );
        }
        // Garbage in the file: reported, not fatal.
        std::fs::write(&hfile, "not a height\n").expect("write");
        for _ in 0..100 {
            if d.status()
                .is_some_and(|s| !s["source_failing_since"].is_null())
            {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        let st = d.status().expect("status");
        assert!(!st["source_failing_since"].is_null(), "{source}: {st}");
        assert_eq!(
            fx.heights(),
            vec![31, 25, 12, 7],
            "{source}: one snapshot per bucket"
        );
    }
}

/// Start `btm daemon ARGS` without waiting for it to be ready.
fn spawn_daemon(scratch: &std::path::Path, args: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(scratch.join("spawned.log")).expect("log");
    let mut all = vec!["daemon", "--log-level", "debug"];
    all.extend_from_slice(args);
    common::btm_cmd(scratch, &all)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn daemon")
}

fn send(child: &std::process::Child, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

/// Wait up to `limit` for `child` to exit; kill it and fail if it does not.
#[track_caller]
fn exits_within(child: &mut std::process::Child, limit: Duration, what: &str) -> Option<i32> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the daemon did not exit within {limit:?} after {what}");
}

/// A SIGTERM, or a SIGHUP then a SIGTERM, at any moment of
/// start-up ends the daemon. The height source here never answers: a
/// command that sleeps, and an RPC endpoint that accepts connections and
/// says nothing; the first read would block for a minute.
#[test]
fn a_signal_during_start_up_is_never_lost() {
    let fx = Btrfs::new();
    let vol = fx.volume();
    let socket = fx.scratch().join("run/btm.sock");
    // Bound but never accepted: the kernel completes the handshake, and the
    // request is never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let rpc = format!("http://{}", silent.local_addr().expect("addr"));
    let configs = [
        (
            "command",
            format!("volume = \"{vol}\"\nsource = \"command\"\nheight_command = [\"sleep\", \"100\"]\nsource_timeout = \"60s\"\n"),
        ),
        (
            "cometbft",
            format!("volume = \"{vol}\"\nsource = \"cometbft\"\nrpc_url = \"{rpc}\"\nsource_timeout = \"60s\"\n"),
        ),
    ];
    for (name, text) in configs {
        let conf = fx.scratch().join(format!("{name}.toml"));
        std::fs::write(&conf, text).expect("write");
        let conf = conf.to_str().expect("utf8");
        let delays: &[u64] = if name == "command" {
            &[50, 300, 1000, 3000]
        } else {
            &[1000]
        };
        for &delay in delays {
            for reload_first in [false, true] {
                let what =
                    format!("{name} source, signal at {delay} ms, reload first: {reload_first}");
                let mut child = spawn_daemon(fx.scratch(), &["--config", conf]);
                sleep(Duration::from_millis(delay));
                if reload_first {
                    send(&child, Signal::SIGHUP);
                    sleep(Duration::from_millis(300));
                }
                send(&child, Signal::SIGTERM);
                // Before its handlers are installed the signal's default
                // action ends the process: no code. Otherwise a clean 0.
                let code = exits_within(&mut child, Duration::from_secs(10), &what);
                assert!(code.is_none() || code == Some(0), "{what}: exit {code:?}");
                assert!(!socket.exists(), "{what}: socket left behind");
            }
        }
    }
    drop(silent);
}

/// Connections that never send anything do not make a notify
/// wait; when too many are idle, the oldest are dropped to make room.
#[test]
fn idle_clients_never_delay_a_notify() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let fx = Btrfs::new();
    let vol = fx.volume();
    let d = DaemonProc::start(fx.scratch(), &["-p", &vol], &[]);
    let mut idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    let started = Instant::now();
    assert_eq!(d.notify(10)["outcome"], "created");
    let waited = started.elapsed();
    // The bug made every notify wait out the idle clients' 10 s read
    // timeout; half of it separates the two without timing anything.
    assert!(
        waited < Duration::from_secs(5),
        "notify waited {waited:?} behind idle clients"
    );
    // The oldest idle connection was dropped: it reads end-of-file.
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert_eq!(
        idle[0].read(&mut buf).expect("read"),
        0,
        "oldest idle client not evicted"
    );
    assert_eq!(d.notify(20)["outcome"], "created");
}

/// `btm notify --json` as a process: (exit code, parsed answer if any, stderr).
fn notify_cli(socket: &std::path::Path, height: u64) -> (i32, Option<serde_json::Value>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_btm"))
        .args([
            "notify",
            "--json",
            "--height",
            &height.to_string(),
            "--socket",
        ])
        .arg(socket)
        .output()
        .expect("notify runs");
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).ok(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reloads keep the socket and hand waiting notifies to the
/// next generation: 200 notifies, 4 at a time, during a storm of SIGHUPs,
/// all get their snapshot. A SIGTERM with notifies in flight: each either
/// has its snapshot or fails with "shutting down"; none exits 0 without one.
#[test]
fn a_reload_never_drops_or_fakes_a_notify() {
    let fx = Btrfs::new();
    let base = format!("volume = \"{}\"\nitv = 10\ncap = 100\n", fx.volume());
    let (conf, mut d) = with_config(&fx, &base);
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut sent = 0;
            while sent < 20 || !done.load(Ordering::SeqCst) {
                let _ = nix::sys::signal::kill(pid, Signal::SIGHUP);
                sent += 1;
                sleep(Duration::from_millis(20));
            }
            sent
        })
    };
    for round in 1..=50u64 {
        let h = round * 10;
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let socket = d.socket.clone();
                std::thread::spawn(move || notify_cli(&socket, h))
            })
            .collect();
        let mut created = 0;
        for c in clients {
            let (code, reply, err) = c.join().expect("client");
            assert_eq!(code, 0, "notify {h} failed during reloads: {err}");
            let outcome = reply.as_ref().map(|r| r["outcome"].clone());
            assert!(
                matches!(
                    outcome.as_ref().and_then(|o| o.as_str()),
                    Some("created" | "exists")
                ),
                "notify {h}: {reply:?}"
            );
            created += usize::from(outcome.as_ref().and_then(|o| o.as_str()) == Some("created"));
        }
        assert_eq!(created, 1, "height {h} created exactly once");
    }
    done.store(true, Ordering::SeqCst);
    assert!(storm.join().expect("storm") >= 20);
    assert_eq!(fx.heights().len(), 50);

    // Slow snapshots, so that several notifies are queued at SIGTERM.
    std::fs::write(
        &conf,
        format!("{base}[hooks]\npre_snapshot = [\"sleep\", \"0.5\"]\ntimeout = \"10s\"\n"),
    )
    .expect("write");
    let reloads = |d: &DaemonProc| d.log_text().matches("configuration reloaded").count();
    let before = reloads(&d);
    d.signal(Signal::SIGHUP);
    d.wait_status_for("the reload", Duration::from_secs(10), |_| {
        reloads(&d) > before
    });
    sleep(Duration::from_millis(300));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let socket = d.socket.clone();
            std::thread::spawn(move || notify_cli(&socket, 510))
        })
        .collect();
    sleep(Duration::from_millis(200));
    assert_eq!(d.stop(), Some(0));
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (code, reply, err) = c.join().expect("client");
        if code == 0 {
            let outcome = reply.as_ref().map(|r| r["outcome"].clone());
            assert!(
                matches!(
                    outcome.as_ref().and_then(|o| o.as_str()),
                    Some("created" | "exists")
                ),
                "exit 0 without a snapshot: {reply:?}"
            );
            ok += 1;
        } else {
            assert!(err.contains("shutting down"), "{err}");
            failed += 1;
        }
    }
    assert!(ok >= 1 && failed >= 1, "{ok} succeeded, {failed} failed");
    assert!(fx.has_snapshot("510"));
}

/// In push mode a height below the newest snapshot, above
/// 2^53-1, or too far ahead is refused with a reason and no snapshot. After
/// a rollback the newer snapshots are gone, so the restarted node's lower
/// heights are taken again.
#[test]
fn push_refuses_heights_that_go_backwards_or_are_absurd() {
    let fx = Btrfs::new();
    let vol = fx.volume();
    let d = DaemonProc::start(fx.scratch(), &["-p", &vol, "-i", "10", "-a", "fair"], &[]);
    for h in (10..=200).step_by(10) {
        assert_eq!(d.notify(h)["outcome"], "created");
    }
    for (h, why) in [
        (0, "backwards"),
        (150, "backwards"),
        (u64::MAX, "which no chain reaches"),
        (1u64 << 53, "which no chain reaches"),
        (200 + 10_000_010, "max_height_jump"),
    ] {
        let (code, reply, err) = notify_cli(&d.socket, h);
        assert_ne!(code, 0, "notify {h} succeeded: {reply:?}");
        assert_eq!(
            reply.as_ref().map(|r| r["outcome"].clone()),
            Some("refused".into()),
            "{h}"
        );
        assert!(err.contains("refused") && err.contains(why), "{h}: {err}");
        assert_eq!(fx.heights().len(), 20, "a snapshot at refused height {h}");
        assert_eq!(fx.heights()[0], 200);
    }
    assert!(!fx.has_snapshot("0"));
    let st = d.status().expect("status");
    assert_eq!(st["next_due"], 210);
    assert_eq!(st["counters"]["refused"], 5);
    assert!(d.log_text().contains("height refused"), "{}", d.log_text());

    // A rollback (while the daemon runs) makes 160 legitimate again.
    fx.btm(&["rollback", "-s", "150", "--yes"]).ok();
    assert_eq!(d.notify(160)["outcome"], "created");
    assert_eq!(fx.heights()[0], 160);
}

/// A daemon started with `toml` as its configuration file (returned, for
/// tests that rewrite it).
fn with_config(fx: &Btrfs, toml: &str) -> (std::path::PathBuf, DaemonProc) {
    let conf = fx.scratch().join("btm.toml");
    std::fs::write(&conf, toml).expect("write");
    let d = DaemonProc::start(
        fx.scratch(),
        &["--config", conf.to_str().expect("utf8")],
        &[],
    );
    (conf, d)
}
