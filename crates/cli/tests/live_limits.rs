//! Live restore at scale and under an ordinary machine's limits, against
//! the real thing (FUSE, a ganache node, a local store):
//!
//! - 100,000 files under `ulimit -Sn 1024` (hard 4096), and 20,000 under
//!   `ulimit -n 256`: the server is ready at once, a node (ganache) runs
//!   and mines on the mount while the seeded exerciser works beside it,
//!   reads of files not yet local are right, the descriptors it holds
//!   stay under the soft limit it started with, and `finish` leaves the
//!   tree exact;
//! - a million small files: time to ready and peak memory printed, memory
//!   within 128 MiB through hydration, and a plain directory after
//!   `finish`;
//! - hydration that fills the disk waits, says so in `btm live status`,
//!   and goes on once space is freed; the result is exact;
//! - a limit too low to serve at all is refused with one line.
//!
//! Needs root, /dev/fuse, ganache and python3 (scripts/test.sh installs
//! them). Fails, never skips, without them.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::live::*;

/// `n` small files (about 60 bytes each, each its own chunk) under `dir`,
/// in directories of 1000, made on two threads; their paths.
fn small_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    let dirs = n.div_ceil(1000);
    let make = |part: usize| {
        let mut made = Vec::new();
        for d in (part..dirs).step_by(2) {
            let sub = dir.join(format!("d{d:04}"));
            std::fs::create_dir_all(&sub).expect("mkdir");
            for f in 0..(n - d * 1000).min(1000) {
                let p = sub.join(format!("f{f:04}"));
                let body = format!("file {f:04} of dir {d:04}, ").repeat(2);
                std::fs::write(&p, body).expect("write");
                made.push(p);
            }
        }
        made
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| make(0));
        let b = s.spawn(|| make(1));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    let mut all = a;
    all.extend(b);
    all.sort();
    all
}

/// Every `step`th of `files` (under `src`) reads the same under `other`.
fn same_sample(src: &Path, other: &Path, files: &[PathBuf], step: usize) {
    for p in files.iter().step_by(step) {
        let rel = p.strip_prefix(src).expect("under src");
        let want = std::fs::read(p).expect("source");
        let got = std::fs::read(other.join(rel))
            .unwrap_or_else(|e| panic!("{} through the mount: {e}", rel.display()));
        assert_eq!(got, want, "{} differs", rel.display());
    }
}

/// Files under `dir` that still carry the live restore's mark.
fn marks_left(dir: &Path) -> usize {
    let count = common::sh(
        PYTHON,
        &[
            "-c",
            "import os, sys\nprint(sum(1 for d, _, fs in os.walk(sys.argv[1]) for f in fs if 'user.btm.live' in os.listxattr(os.path.join(d, f), follow_symlinks=False)))",
            dir.to_str().expect("utf8"),
        ],
    );
    count.trim().parse().expect("a count")
}

/// The soft and hard descriptor limits of process `pid`.
fn limits(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

/// Run `work` while recording the most descriptors `server` held.
fn watching_descriptors<T>(server: &Server, work: impl FnOnce() -> T) -> (T, usize) {
    let pid = server.child.id();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let peak = s.spawn(|| {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                peak = peak.max(n);
                sleep(Duration::from_millis(20));
            }
            peak
        });
        let out = work();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, peak.join().expect("watcher"))
    })
}

/// A node's tree of `files` small files beside a ganache database and an
/// exerciser's corner, served live under descriptor limit `nofile`: the
/// node and the exerciser work through the mount during hydration, and
/// `finish` leaves the tree exact.
fn serve_under_limit(files: usize, nofile: (u64, u64)) {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    let state = small_files(&src.join("state"), files);
    make_tree(&src, 16 * MIB);
    let node = Ganache::start(&src.join("ganache"), "0.05");
    node.wait_height(20);
    let h = node.height();
    let hashes: Vec<String> = (0..=h)
        .map(|n| node.block(n)["hash"].as_str().expect("hash").to_owned())
        .collect();
    node.stop();
    let store = s.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();
    let reference = s.join("ref");
    common::btm(
        s,
        &[
            "restore",
            "latest",
            reference.to_str().expect("utf8"),
            "-s",
            store,
        ],
    )
    .ok();

    let live = s.join("live");
    let started = Instant::now();
    let mut server = Server::start_limited(s, &live, &["-s", store], nofile);
    let ready = started.elapsed();
    assert_eq!(
        limits(server.child.id()),
        (nofile.1, nofile.1),
        "the soft limit is raised to the hard one"
    );
    let t0 = now_ns();
    let (first_answer, peak_fds) = watching_descriptors(&server, || {
        // A node on the mount, while hydration goes on.
        let node = Ganache::start(&live.join("ganache"), "0.1");
        let first_answer = started.elapsed();
        assert!(node.height() >= h, "the node restarted below its height");
        // Reads of the small files, some not local yet.
        same_sample(&src, &live, &state, 97);
        // The same seeded operations on the mount and on a plain restore.
        let run = |root: &Path| {
            common::sh(
                PYTHON,
                &[
                    fsx().to_str().expect("utf8"),
                    "run",
                    root.join("work").to_str().expect("utf8"),
                    "11",
                    "120",
                ],
            )
        };
        assert_eq!(run(&live), run(&reference), "the exerciser saw other bytes");
        node.wait_height(h + 5);
        node.stop();
        first_answer
    });
    let peak_rss = server.peak_rss();
    server.finish(s);
    assert!(
        peak_fds < nofile.0 as usize,
        "the server held {peak_fds} descriptors, at or over the soft limit {} it started with",
        nofile.0
    );
    assert!(!live.join(".btm-live").exists(), "state left behind");
    assert_eq!(marks_left(&live), 0, "marks left behind");
    for sub in ["state", "cold", "misc"] {
        assert_eq!(
            digest(&live.join(sub), t0),
            digest(&src.join(sub), t0),
            "{sub} differs"
        );
    }
    assert_eq!(
        digest(&live.join("work"), t0),
        digest(&reference.join("work"), t0)
    );
    let node = Ganache::start(&live.join("ganache"), "0");
    assert!(node.height() >= h + 5, "blocks mined on the mount are gone");
    for n in [0, h / 2, h] {
        assert_eq!(
            node.block(n)["hash"].as_str(),
            Some(hashes[n as usize].as_str())
        );
    }
    node.stop();
    eprintln!(
        "{files} files under ulimit -n {}:{}: ready after {:.2}s, the node's first answer after {:.2}s, at most {peak_fds} descriptors, peak RSS {} MiB",
        nofile.0,
        nofile.1,
        ready.as_secs_f64(),
        first_answer.as_secs_f64(),
        peak_rss >> 20
    );
}

#[test]
fn a_hundred_thousand_files_serve_under_the_usual_limit_of_1024() {
    serve_under_limit(100_000, (1024, 4096));
}

#[test]
fn twenty_thousand_files_serve_under_a_limit_of_256() {
    serve_under_limit(20_000, (256, 256));
}

#[test]
fn a_million_files_serve_within_128_mib() {
    let tmp = scratch();
    let s = tmp.path();
    // Source, store and target in memory (some 8 GiB, gone at once when
    // unmounted): what is measured is the server's own memory and
    // descriptors, which no disk changes; the tests above use a disk.
    let ram = s.join("ram");
    let _unmount = tmpfs(&ram, "size=12g,nr_inodes=3m");
    let src = ram.join("src");
    let files = small_files(&src, 1_000_000);
    let store = ram.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();
    let live = ram.join("live");
    let started = Instant::now();
    let mut server = Server::start_limited(s, &live, &["-s", store], (1024, 4096));
    let ready = started.elapsed();
    same_sample(&src, &live, &files, 9973);
    server.wait_hydrated(s, Duration::from_secs(900));
    let hydrated = started.elapsed();
    let (peak_rss, fds) = (server.peak_rss(), server.open_files());
    server.finish(s);
    eprintln!(
        "1,000,000 files: ready after {:.1}s, hydrated after {:.1}s, peak RSS {:.1} MiB, {fds} descriptors once hydrated",
        ready.as_secs_f64(),
        hydrated.as_secs_f64(),
        peak_rss as f64 / (1 << 20) as f64
    );
    assert!(
        peak_rss <= 128 << 20,
        "peak RSS {} MiB over 128 MiB",
        peak_rss >> 20
    );
    assert!(!live.join(".btm-live").exists(), "state left behind");
    let count = common::sh(
        "sh",
        &["-c", &format!("find {} -type f | wc -l", live.display())],
    );
    assert_eq!(count.trim(), "1000000");
    same_sample(&src, &live, &files, 997);
    assert_eq!(marks_left(&live), 0, "marks left behind");
}

/// A tmpfs with mount options `options` at `dir`, unmounted on drop.
fn tmpfs(dir: &Path, options: &str) -> common::Guard {
    std::fs::create_dir_all(dir).expect("mountpoint");
    common::sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            options,
            "tmpfs",
            dir.to_str().expect("utf8"),
        ],
    );
    let d = dir.to_path_buf();
    common::Guard::new(move || {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&d)
            .stderr(Stdio::null())
            .status();
    })
}

#[test]
fn hydration_that_fills_the_disk_waits_says_so_and_goes_on_once_space_is_freed() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(&src).expect("src");
    for i in 0..4 {
        write_noise(&src.join(format!("part{i}")), 8 * MIB);
    }
    let store = s.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();
    // 48 MiB, of which something else holds 24: the backup's 32 do not fit
    // until it goes.
    let disk = s.join("disk");
    let _unmount = tmpfs(&disk, "size=48m");
    let other = disk.join("other.img");
    std::fs::File::create(&other)
        .and_then(|mut f| f.write_all(&noise(24 * MIB)))
        .expect("filler");
    let live = disk.join("node");
    let mut server = Server::start(s, &live, &["-s", store, "--read-timeout", "2s"], &[]);
    let t = Instant::now();
    let waiting = loop {
        let st = server.status(s);
        if let Some(w) = st["waiting"]
            .as_str()
            .filter(|w| w.contains("disk is full"))
        {
            break w.to_owned();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "status never said the disk is full: {st}"
        );
        sleep(Duration::from_millis(200));
    };
    assert!(waiting.contains("space is freed"), "{waiting}");
    // What the node reads meanwhile is right or fails: never other bytes.
    for i in 0..4 {
        let f = std::fs::File::open(live.join(format!("part{i}"))).expect("open");
        let want = std::fs::read(src.join(format!("part{i}"))).expect("source");
        let mut buf = vec![0u8; 4096];
        match f.read_exact_at(&mut buf, 6 * MIB) {
            Ok(()) => assert_eq!(buf, want[6 << 20..(6 << 20) + 4096], "part{i}"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "part{i}: {e}"),
        }
    }
    assert_eq!(server.status(s)["state"], "hydrating");
    std::fs::remove_file(&other).expect("free space");
    server.wait_hydrated(s, Duration::from_secs(120));
    server.finish(s);
    for i in 0..4 {
        let name = format!("part{i}");
        assert_eq!(sha(&live.join(&name)), sha(&src.join(&name)), "{name}");
    }
}

#[test]
fn a_limit_too_low_to_serve_is_refused_with_one_line() {
    let tmp = scratch();
    let s = tmp.path();
    let src = s.join("src");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(src.join("a"), b"data").expect("a");
    let store = s.join("store");
    let store = store.to_str().expect("utf8");
    common::btm(s, &["backup", src.to_str().expect("utf8"), "-s", store]).ok();
    let live = s.join("live");
    let out = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_btm"))
        .args([
            "restore",
            "--live",
            "-s",
            store,
            live.to_str().expect("utf8"),
        ])
        .env("BTM_RUNTIME_DIR", s.join("run"))
        .stdin(Stdio::null())
        .output()
        .expect("btm");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("64 files") && err.contains("LimitNOFILE"),
        "{err}"
    );
    assert!(!is_mount(&live), "mounted anyway");
}
