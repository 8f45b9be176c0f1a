//! Live restore (`btm restore --live`) against the real thing: a FUSE
//! mount served from s3s-fs behind a proxy that adds 20 ms per request and
//! caps each connection's rate, so hydration is still running while the
//! tests work on the mount.
//!
//! - a seeded random exerciser (writes, truncates, holes, renames, links,
//!   mmap) on the live mount during hydration and on a plain restore ends
//!   with identical trees and reads identical bytes; LMDB commits through
//!   a shared writable mmap all survive `btm live finish`;
//! - ganache on LevelDB serves and mines on a live restore with 1 GiB of
//!   cold data beside it, survives a kill -9 of the server and a rerun,
//!   and after `finish` restarts on the plain directory with every block,
//!   verified against the export's chain identity;
//! - the store taken down mid-hydration: EIO to readers, never wrong
//!   bytes, and completion once it is back;
//! - bad targets are refused with one line, and nothing is mounted.
//!
//! Needs root, /dev/fuse, s3s-fs, ganache and Debian's python3-lmdb
//! (scripts/test.sh installs them). Fails, never skips, without them.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::http_faults::FaultProxy;
use common::live::*;

/// Python's lmdb: `op` is "fill N", "add FROM TO" (one committed,
/// synced transaction each, through a shared writable map) or "count".
fn lmdb(path: &Path, op: &str) -> String {
    let script = r#"
import lmdb, sys
path, op, args = sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]]
env = lmdb.open(path, map_size=256 << 20, writemap=True, metasync=True, sync=True)
if op == "fill":
    with env.begin(write=True) as t:
        for i in range(args[0]):
            t.put(b"old%06d" % i, (b"v%06d" % i) * 50)
elif op == "add":
    for i in range(args[0], args[1]):
        with env.begin(write=True) as t:
            t.put(b"new%06d" % i, (b"n%06d" % i) * 200)
else:
    with env.begin() as t:
        old = sum(1 for k, v in t.cursor() if k.startswith(b"old") and v == (b"v" + k[3:]) * 50)
        new = sum(1 for k, v in t.cursor() if k.startswith(b"new") and v == (b"n" + k[3:]) * 200)
    print(old, new)
"#;
    let mut args = vec!["-c", script, path.to_str().expect("utf8")];
    args.extend(op.split(' '));
    common::sh(PYTHON, &args)
}

#[test]
fn a_live_mount_behaves_as_a_local_file_system_during_hydration() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    make_tree(&src, 256 * MIB);
    std::fs::create_dir_all(src.join("lmdb")).expect("lmdb dir");
    lmdb(&src.join("lmdb"), "fill 3000");
    // A checkpoint-like directory of hard links: one inode per file, on
    // the mount as after it.
    std::fs::create_dir_all(src.join("ck")).expect("ck");
    for (at, to) in [
        ("cold/blocks.dat", "ck/blocks.dat"),
        ("misc/sparse", "ck/sparse"),
    ] {
        std::fs::hard_link(src.join(at), src.join(to)).expect("link");
    }
    let same_inode = |root: &Path| {
        ["blocks.dat", "sparse"].map(|n| {
            let a = std::fs::metadata(root.join("ck").join(n)).expect("m");
            let b = std::fs::metadata(
                root.join(if n == "sparse" { "misc" } else { "cold" })
                    .join(n),
            )
            .expect("m");
            (a.ino() == b.ino(), a.nlink())
        })
    };

    let s3 = common::S3::start(&["btm"]);
    let direct = s3.env();
    let store = "s3://btm/live";
    common::btm_env_ok(
        s,
        &[
            "backup",
            src.to_str().expect("utf8"),
            "-s",
            store,
            "-t",
            "a",
        ],
        &env_pairs(&direct),
    );
    let reference = s.join("ref");
    common::btm_env_ok(
        s,
        &[
            "restore",
            "latest",
            reference.to_str().expect("utf8"),
            "-s",
            store,
            "-t",
            "a",
        ],
        &env_pairs(&direct),
    );

    // 1 MB/s per connection: hydration of 256 MiB takes about 16 s.
    let proxy = FaultProxy::start_far(s3.port, MIB, Duration::from_millis(20));
    let far = s3.env_via(&proxy.url());
    let live = s.join("live");
    let server = Server::start(s, &live, &["-s", store, "-t", "a"], &far);
    let st = server.status(s);
    assert_eq!(st["state"], "hydrating", "{st}");
    assert!(
        st["present_bytes"].as_u64() < st["total_bytes"].as_u64(),
        "{st}"
    );
    assert_eq!(same_inode(&live), [(true, 2); 2], "links on the mount");
    let page_at_100_mib = |path: &Path| {
        let mut page = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(path).expect("open"),
            &mut page,
            100 * MIB,
        )
        .expect("read");
        page
    };
    assert!(
        page_at_100_mib(&live.join("ck/blocks.dat"))
            == page_at_100_mib(&src.join("cold/blocks.dat")),
        "a read through a link differs"
    );
    // The node holds a file open from before it is local.
    let cold = live.join("cold/blocks.dat");
    let held = std::fs::File::open(&cold).expect("open");

    // The same seeded operations on the live mount and on a plain restore.
    let t0 = now_ns();
    let run = |root: &Path| {
        common::sh(
            PYTHON,
            &[
                fsx().to_str().expect("utf8"),
                "run",
                root.join("work").to_str().expect("utf8"),
                "7",
                "160",
            ],
        )
    };
    let on_live = run(&live);
    let on_ref = run(&reference);
    assert_eq!(
        on_live, on_ref,
        "reads through the live mount differ from a plain restore's"
    );
    assert!(
        on_live.lines().filter(|l| l.contains(" read ")).count() > 10,
        "{on_live}"
    );
    // LMDB: each transaction committed (and synced) through its map.
    lmdb(&live.join("lmdb"), "add 0 150");
    let st = server.status(s);
    assert!(
        st["demand_fetches"].as_u64().unwrap_or(0) > 0 || st["state"] == "hydrated",
        "reads went through without fetching on demand: {st}"
    );

    // The kernel fixes an open's mode when it opens and refuses to mix
    // them: an open beside the one from before hydration is served too;
    // once those close, the next open is passed through to the kernel.
    server.wait_hydrated(s, Duration::from_secs(120));
    let opens = || {
        let st = server.status(s);
        (
            st["opens_served"].as_u64().expect("served"),
            st["opens_passed_through"].as_u64().expect("passed through"),
        )
    };
    let before = opens();
    let beside = std::fs::File::open(&cold).expect("open");
    assert_eq!(opens(), (before.0 + 1, before.1), "beside an earlier open");
    drop((held, beside));
    let t = Instant::now();
    let reopened = loop {
        let before = opens();
        let f = std::fs::File::open(&cold).expect("open");
        // The kernel tells of a close after close(2) returns.
        match opens() {
            (_, p) if p == before.1 + 1 => break f,
            _ => {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "never passed through: {:?}",
                    opens()
                );
                drop(f);
                sleep(Duration::from_millis(100));
            }
        }
    };
    let mut got = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&reopened, &mut got, 200 * MIB).expect("read");
    let mut want = vec![0u8; 1 << 20];
    let src_cold = std::fs::File::open(src.join("cold/blocks.dat")).expect("open");
    std::os::unix::fs::FileExt::read_exact_at(&src_cold, &mut want, 200 * MIB).expect("read");
    assert!(got == want, "a passed-through read differs");
    drop(reopened);

    let mut server = server;
    server.finish(s);
    assert!(!is_mount(&live), "still mounted after finish");
    assert!(!live.join(".btm-live").exists(), "state left behind");
    assert_eq!(same_inode(&live), [(true, 2); 2], "links after finishing");

    assert_eq!(
        lmdb(&live.join("lmdb"), "count").trim(),
        "3000 150",
        "LMDB lost a committed transaction"
    );
    for sub in ["work", "cold", "misc"] {
        assert_eq!(
            digest(&live.join(sub), t0),
            digest(&reference.join(sub), t0),
            "{sub} differs"
        );
    }
    // Untouched data is exactly the source's, with its times.
    assert_eq!(
        digest(&live.join("cold"), t0),
        digest(&src.join("cold"), t0)
    );
    drop(proxy);
}

#[test]
fn ganache_runs_on_a_live_restore_survives_a_kill_and_finishes_verified() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(src.join("cold")).expect("cold");
    write_noise(&src.join("cold/archive.dat"), 1024 * MIB);
    let node = Ganache::start(&src.join("ganache"), "0.05");
    node.wait_height(40);
    let node_url = format!("http://127.0.0.1:{}", node.port);
    let h = node.height();
    let block = node.block(h);
    let hashes: Vec<String> = (0..=h)
        .map(|n| node.block(n)["hash"].as_str().expect("hash").to_owned())
        .collect();
    node.stop();
    let meta = serde_json::json!({
        "height": h,
        "chain": {"kind": "ethereum", "height": h, "block_hash": block["hash"], "state_hash": block["stateRoot"]},
    });

    let s3 = common::S3::start(&["btm"]);
    let direct = s3.env();
    let store = "s3://btm/node";
    common::btm_env_ok(
        s,
        &[
            "backup",
            src.to_str().expect("utf8"),
            "-s",
            store,
            "-t",
            "node",
            "-m",
            &meta.to_string(),
        ],
        &env_pairs(&direct),
    );

    // 20 ms per request, 2 MB/s per connection: 1 GiB takes about half a
    // minute to hydrate, and the node is up long before.
    let proxy = FaultProxy::start_far(s3.port, 2 * MIB, Duration::from_millis(20));
    let far = s3.env_via(&proxy.url());
    let live = s.join("live");
    let args = ["-s", store, "-t", "node"];
    let started = Instant::now();
    let mut server = Server::start(s, &live, &args, &far);
    let node = Ganache::start(&live.join("ganache"), "0.1");
    let first_answer = started.elapsed();
    assert!(
        node.height() >= h,
        "the node restarted below the exported height"
    );
    node.wait_height(h + 10);
    let st = server.status(s);
    assert_eq!(
        st["state"], "hydrating",
        "hydration ended before the node even mined: {st}"
    );
    // Something the node writes and syncs.
    let marker = live.join("ganache/fsynced-marker");
    common::sh(PYTHON, &["-c", &format!("import os\nf=os.open('{}', os.O_CREAT|os.O_WRONLY)\nos.write(f, b'durable')\nos.fsync(f)", marker.display())]);
    let partial = server.status(s);

    // kill -9 mid-hydration: the node's reads fail, as on a lost disk.
    server.kill9();
    let read = std::fs::read(live.join("cold/archive.dat"));
    assert!(read.is_err(), "a read after the server died succeeded");
    drop(node);
    drop(server);
    // The same command again clears the dead mount and goes on.
    let mut server = Server::start(s, &live, &args, &far);
    assert_eq!(
        std::fs::read(&marker).expect("marker"),
        b"durable",
        "an fsynced write was lost"
    );
    let node = Ganache::start(&live.join("ganache"), "0.1");
    node.wait_height(h + 15);
    node.stop();
    server.finish(s);
    assert!(!is_mount(&live));

    // The second run fetched what the first had not made durable, not all
    // of it again.
    let second = server.log();
    assert!(second.contains("still to fetch"), "{second}");
    let present_before = partial["present_bytes"].as_u64().expect("present");
    assert!(present_before > 0, "{partial}");

    assert_eq!(
        sha(&live.join("cold/archive.dat")),
        sha(&src.join("cold/archive.dat")),
        "cold data differs"
    );
    let node = Ganache::start(&live.join("ganache"), "0");
    assert!(
        node.height() >= h + 15,
        "blocks mined during the live restore are gone"
    );
    for n in [0, h / 2, h] {
        assert_eq!(
            node.block(n)["hash"].as_str(),
            Some(hashes[n as usize].as_str()),
            "block {n}"
        );
    }
    let url = format!("http://127.0.0.1:{}", node.port);
    let v = common::btm_env(
        s,
        &[
            "verify",
            "latest",
            "-s",
            store,
            "-t",
            "node",
            "--rpc-url",
            &url,
        ],
        &env_pairs(&direct),
    )
    .ok();
    assert!(v.starts_with("verified: "), "{v}");
    node.stop();
    let _ = node_url;
    eprintln!("first answer after {first_answer:?}");
}

#[test]
fn a_store_that_goes_away_gives_eio_never_wrong_bytes_and_hydration_resumes() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    make_tree(&src, 96 * MIB);
    let mut s3 = common::S3::start(&["btm"]);
    let store = "s3://btm/down";
    common::btm_env_ok(
        s,
        &["backup", src.to_str().expect("utf8"), "-s", store],
        &env_pairs(&s3.env()),
    );
    let proxy = FaultProxy::start_far(s3.port, MIB / 2, Duration::from_millis(20));
    let far = s3.env_via(&proxy.url());
    let live = s.join("live");
    let mut server = Server::start(s, &live, &["-s", store, "--read-timeout", "2s"], &far);
    s3.stop();
    // The end of the cold file comes late in hydration's order.
    let cold = live.join("cold/blocks.dat");
    let t = Instant::now();
    let f = std::fs::File::open(&cold).expect("open");
    let mut buf = vec![0u8; 4096];
    let got = std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 95 * MIB);
    let err = got.expect_err("a read with the store gone succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the read waited {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    loop {
        let st = server.status(s);
        if st["waiting"].as_str().is_some_and(|w| w.contains("store")) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "status never said hydration waits: {st}"
        );
        sleep(Duration::from_millis(200));
    }
    s3.restart();
    // A file still open on the mount keeps `finish` from unmounting under
    // it; once closed, finish goes through.
    let busy = common::btm(s, &["live", "finish", live.to_str().expect("utf8")]);
    assert_eq!(busy.code, 1, "{}", busy.stderr);
    let last = busy.stderr.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("busy") && last.contains("stop the node"),
        "{}",
        busy.stderr
    );
    drop(f);
    server.finish(s);
    assert_eq!(digest(&live, 0), digest(&src, 0));
    drop(proxy);
}

#[test]
fn bad_targets_are_refused_with_one_line_and_nothing_is_mounted() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(src.join("a"), b"data").expect("a");
    let store = s.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();

    let live = |dir: &Path, extra: &[&str]| {
        let mut a = vec!["restore", "--live", "-s", store];
        a.extend_from_slice(extra);
        a.push(dir.to_str().expect("utf8"));
        common::btm(s, &a)
    };
    // Not empty.
    let e = live(&src, &[]).fails(1);
    assert!(
        e.contains("not empty") && e.contains("plain `btm restore`"),
        "{e}"
    );
    // Already served by a live restore.
    let served = s.join("served");
    let server = Server::start(s, &served, &["-s", store], &[]);
    let e = live(&served, &[]).fails(1);
    assert!(e.contains("already a FUSE mount"), "{e}");
    drop(server);
    // A backup that does not exist, a store that does not: nothing mounted.
    let empty = s.join("empty");
    let e = live(&empty, &["no-such-backup"]).fails(1);
    assert!(e.contains("no-such-backup"), "{e}");
    assert!(!is_mount(&empty));
    let e = common::btm(
        s,
        &[
            "restore",
            "--live",
            "-s",
            &format!("{store}-missing"),
            empty.to_str().expect("utf8"),
        ],
    )
    .fails(1);
    assert!(!is_mount(&empty), "{e}");
    // Nothing serves a plain directory.
    let e = common::btm(s, &["live", "status", empty.to_str().expect("utf8")]).fails(1);
    assert!(e.contains("no live restore serves"), "{e}");
}

#[test]
fn a_corrupt_chunk_is_never_served() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(&src).expect("src");
    write_noise(&src.join("data"), 3 * MIB);
    let store = s.join("store");
    common::btm(
        s,
        &[
            "backup",
            src.to_str().expect("utf8"),
            "-s",
            store.to_str().expect("utf8"),
        ],
    )
    .ok();
    // Flip bytes in the middle of every pack: the frames no longer match
    // their hashes (nothing checks pack contents before mounting).
    let packs = common::sh(
        "find",
        &[store.join("packs").to_str().expect("utf8"), "-type", "f"],
    );
    for p in packs.lines() {
        let mut bytes = std::fs::read(p).expect("pack");
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(p, bytes).expect("corrupt");
    }
    let live = s.join("live");
    let server = Server::start(
        s,
        &live,
        &["-s", store.to_str().expect("utf8"), "--read-timeout", "5s"],
        &[],
    );
    let t = Instant::now();
    let got = std::fs::read(live.join("data"));
    let err = got.expect_err("corrupt data was served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    eprintln!("EIO after {:?}", t.elapsed());
    let st = server.status(s);
    assert!(
        st["demand_failures"].as_u64().unwrap_or(0) > 0 || st["waiting"].is_string(),
        "{st}"
    );
}

#[test]
fn a_full_disk_gives_enospc_to_the_writer_and_corrupts_nothing() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(&src).expect("src");
    write_noise(&src.join("data"), 16 * MIB);
    let store = s.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();
    // A 24 MiB file system: the backup's 16 MiB and the node's 16 MiB do
    // not both fit.
    let small = s.join("small");
    std::fs::create_dir_all(&small).expect("small");
    common::sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=24m",
            "tmpfs",
            small.to_str().expect("utf8"),
        ],
    );
    let _unmount = common::Guard::new({
        let m = small.clone();
        move || {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stderr(Stdio::null())
                .status();
        }
    });
    // The target is the file system's own mount point, as a dataset's is.
    let live = small.clone();
    let mut server = Server::start(s, &live, &["-s", store], &[]);
    let t = Instant::now();
    while server.status(s)["state"] != "hydrated" {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "hydration of 16 MiB from a local store stalled"
        );
        sleep(Duration::from_millis(50));
    }
    let big = live.join("node-file");
    let err = std::fs::write(&big, noise(16 * MIB)).expect_err("16 MiB more fit in 24 MiB");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    std::fs::remove_file(&big).expect("remove");
    server.finish(s);
    assert_eq!(
        sha(&live.join("data")),
        sha(&src.join("data")),
        "the backup's data was damaged"
    );
}

/// `--finish-on-stop` (a Kubernetes sidecar's stop, after the node's): a
/// SIGTERM before every byte is local stops the server to resume later;
/// a SIGTERM once hydrated, with nothing using the directory, finishes it
/// as `btm live finish` would: exit 0, no mount, no state, exact data.
#[test]
fn a_hydrated_server_told_to_finish_on_stop_finishes_on_sigterm() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(src.join("d")).expect("src");
    write_noise(&src.join("d/big"), 8 << 20);
    std::fs::write(src.join("small"), b"small").expect("small");
    let store = s.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();
    let dir = s.join("served");
    let sigterm = |server: &Server| {
        let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    };

    let mut server = Server::start(s, &dir, &["-s", store, "--finish-on-stop"], &[]);
    server.wait_hydrated(s, Duration::from_secs(120));
    sigterm(&server);
    assert_eq!(
        server.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        server.log()
    );
    assert!(server.log().contains("finished:"), "{}", server.log());
    assert!(!is_mount(&dir));
    assert!(!dir.join(".btm-live").exists(), "the state is gone");
    assert_eq!(sha(&dir.join("d/big")), sha(&src.join("d/big")));
    assert_eq!(std::fs::read(dir.join("small")).expect("small"), b"small");

    // Busy (a reader holds a file open): stopped, to resume, not finished.
    let busy = s.join("busy");
    let mut server = Server::start(s, &busy, &["-s", store, "--finish-on-stop"], &[]);
    server.wait_hydrated(s, Duration::from_secs(120));
    let held = std::fs::File::open(busy.join("small")).expect("open");
    sigterm(&server);
    assert_ne!(
        server.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        server.log()
    );
    drop(held);
    assert!(!is_mount(&busy), "{}", server.log());
    assert!(
        busy.join(".btm-live").exists(),
        "kept to resume: {}",
        server.log()
    );
}
