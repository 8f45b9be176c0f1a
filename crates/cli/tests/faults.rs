//! Regression tests for what fault injection once broke, each named after
//! the guarantee that did not hold, plus the interruption tests of the
//! restore pipeline: kill -9, a store that goes away, a full disk, a
//! file that changes while it is read, hostile and unreadable indexes,
//! names that are not UTF-8, a store inside the source, a store that never
//! answers.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use btm_chunk::backup::BackupOptions;
use common::{btm, btm_cmd, noise, S3};

const MIB: usize = 1 << 20;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().expect("tmp"))
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }
    fn s(&self, rel: &str) -> String {
        self.p(rel).to_str().expect("utf8").to_owned()
    }
    fn btm(&self, args: &[&str]) -> common::Run {
        btm(self.0.path(), args)
    }
}

#[track_caller]
fn same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).expect("a"), fs::read(b).expect("b"));
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} differs at byte {i}", b.display());
    }
}

/// Start `btm ARGS` and SIGKILL it after `after`; true if it was still
/// running (so the kill interrupted it).
fn kill_after(scratch: &Path, args: &[&str], env: &[(&str, &str)], after: Duration) -> bool {
    let mut child = btm_cmd(scratch, args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    sleep(after);
    let running = child.try_wait().expect("wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    running
}

/// Back up to `store` a `src` of four 90 MiB files and `small` files of
/// `small_len` bytes, their noise seeded from `seeds` (big, small).
fn back_up_big_and_small_files(d: &Dir, seeds: (u64, u64), small: u64, small_len: usize) {
    fs::create_dir_all(d.p("src/big")).expect("mkdir");
    for i in 0..4 {
        fs::write(
            d.p(&format!("src/big/{i}.sst")),
            noise(seeds.0 + i, 90 * MIB),
        )
        .expect("w");
    }
    fs::create_dir_all(d.p("src/small")).expect("mkdir");
    for i in 0..small {
        fs::write(
            d.p(&format!("src/small/{i}")),
            noise(seeds.1 + i, small_len),
        )
        .expect("w");
    }
    d.btm(&["backup", &d.s("src"), "-s", &d.s("store")]).ok();
}

/// Restore the store's latest backup into `dst` and kill it (SIGKILL) once
/// its journal records a file complete: an interrupted restore, with files
/// its journal says are complete.
fn kill_restore_after_a_checkpoint(d: &Dir, dst: &str) {
    // Run the restore in 3 ms slices with stops in between, until its
    // journal records a complete file (a checkpoint, every 64 MiB written
    // and synced, after one finished: the first may hold only the big
    // files' prefixes); then kill it while it is stopped. Unthrottled, a
    // fast disk finishes the whole restore during the first checkpoint's
    // sync, and there is no moment to kill it in; stopped, it writes
    // nothing new while the kernel's sync catches up. A busy machine can still let it
    // finish first: then start again with longer stops.
    let mut killed = false;
    for stop_ms in [20, 80, 250] {
        let _ = fs::remove_dir_all(dst);
        let mut child = btm_cmd(d.0.path(), &["restore", "latest", dst, "-s", &d.s("store")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let started = Instant::now();
        loop {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop");
            sleep(Duration::from_millis(stop_ms));
            if !journalled_complete(dst).is_empty() {
                killed = true;
                break;
            }
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "no checkpoint"
            );
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("continue");
            sleep(Duration::from_millis(3));
        }
        let _ = child.kill();
        let _ = child.wait();
        if killed {
            break;
        }
    }
    assert!(
        killed,
        "the restore always finished before its first checkpoint was seen"
    );
}

/// The paths an interrupted restore's journal records as complete (none
/// while it has no journal).
fn journalled_complete(dst: &str) -> Vec<String> {
    let journal = fs::read_to_string(Path::new(dst).join(".btm-restore")).unwrap_or_default();
    journal
        .lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("prefix").is_none())
        .filter_map(|v| {
            let hex = v["path"].as_str()?.to_owned();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            String::from_utf8(bytes).ok()
        })
        .collect()
}

/// A file an interrupted restore completed, then changed
/// in place at the same size before the re-run (a preallocated block file,
/// a memory-mapped database), is read and compared again, not trusted by
/// its journal record.
#[test]
fn a_resumed_restore_rereads_a_file_changed_in_place_since_its_record() {
    let d = Dir::new();
    back_up_big_and_small_files(&d, (40, 2000), 300, 64 << 10);
    let dst = d.s("dst");
    kill_restore_after_a_checkpoint(&d, &dst);
    let complete = journalled_complete(&dst);
    let victim = complete.first().expect("a file recorded complete").clone();
    // Changed in place: same size, other bytes in the middle.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(Path::new(&dst).join(&victim))
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &noise(99, 1000), 1000).expect("write");
    drop(f);
    let out = d
        .btm(&["restore", "latest", &dst, "-s", &d.s("store"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    same_file(
        &d.p(&format!("src/{victim}")),
        &Path::new(&dst).join(&victim),
    );
    common::sh("diff", &["-r", &d.s("src"), &dst]);
    assert!(
        v["summary"]["files_trusted"].as_u64() < Some(complete.len() as u64),
        "the changed file was trusted: {out}"
    );
}

/// An append-only file sized before its data arrived, or
/// written but not durable, must never be trusted by a re-run. Killed at
/// several points, the re-run finishes with exact bytes.
#[test]
fn rerun_after_interrupted_append_only_restore_is_exact() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src/data")).expect("mkdir");
    fs::write(d.p("src/data/blocks.log"), noise(1, 300 * MIB)).expect("write");
    d.btm(&[
        "backup",
        &d.s("src"),
        "-s",
        &d.s("store"),
        "-t",
        "ao",
        "--appendonly",
        "data/blocks.log",
    ])
    .ok();
    let mut interrupted_any = false;
    for (i, ms) in [50u64, 150, 400, 900].into_iter().enumerate() {
        let dst = d.s(&format!("dst{i}"));
        let interrupted = kill_after(
            d.0.path(),
            &["restore", "latest", &dst, "-s", &d.s("store"), "-t", "ao"],
            &[],
            Duration::from_millis(ms),
        );
        let out = d
            .btm(&[
                "restore",
                "latest",
                &dst,
                "-s",
                &d.s("store"),
                "-t",
                "ao",
                "--json",
            ])
            .ok();
        same_file(
            &d.p("src/data/blocks.log"),
            &Path::new(&dst).join("data/blocks.log"),
        );
        assert!(
            !Path::new(&dst).join(".btm-restore").exists(),
            "journal left: {out}"
        );
        interrupted_any |= interrupted;
    }
    assert!(interrupted_any, "no restore was interrupted");
    // Restoring over the node's own, intact log fetches only its tail.
    let own = d.s("own");
    fs::create_dir_all(d.p("own/data")).expect("mkdir");
    fs::write(
        d.p("own/data/blocks.log"),
        &noise(1, 300 * MIB)[..250 * MIB],
    )
    .expect("w");
    let out = d
        .btm(&[
            "restore",
            "latest",
            &own,
            "-s",
            &d.s("store"),
            "-t",
            "ao",
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["summary"]["chunks_fetched"], 50, "{out}");
    same_file(&d.p("src/data/blocks.log"), &d.p("own/data/blocks.log"));
    // A log truncated to a larger size (a hole) is not trusted past it.
    let holey = d.s("holey");
    fs::create_dir_all(d.p("holey/data")).expect("mkdir");
    fs::write(
        d.p("holey/data/blocks.log"),
        &noise(1, 300 * MIB)[..100 * MIB],
    )
    .expect("w");
    fs::OpenOptions::new()
        .write(true)
        .open(d.p("holey/data/blocks.log"))
        .and_then(|f| f.set_len(300 * MIB as u64))
        .expect("truncate");
    d.btm(&["restore", "latest", &holey, "-s", &d.s("store"), "-t", "ao"])
        .ok();
    same_file(&d.p("src/data/blocks.log"), &d.p("holey/data/blocks.log"));
}

/// The store goes away mid-restore: a clear error and a
/// non-zero exit; brought back, a re-run completes exactly.
#[test]
fn a_store_failing_mid_restore_fails_clearly_and_a_rerun_completes() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src/data")).expect("mkdir");
    fs::write(d.p("src/data/blocks.log"), noise(2, 200 * MIB)).expect("write");
    for i in 0..300 {
        fs::write(d.p(&format!("src/data/f{i}")), noise(100 + i, 20_000)).expect("w");
    }
    let mut s3 = S3::start(&["bkt"]);
    let env_owned = s3.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut env_timeout = env.clone();
    env_timeout.push(("BTM_STORE_TIMEOUT", "3s"));
    common::btm_env_ok(
        d.0.path(),
        &[
            "backup",
            &d.s("src"),
            "-s",
            "s3://bkt/x",
            "-t",
            "ao",
            "--appendonly",
            "data/blocks.log",
        ],
        &env,
    );
    let mut restore = btm_cmd(
        d.0.path(),
        &[
            "restore",
            "latest",
            &d.s("dst"),
            "-s",
            "s3://bkt/x",
            "-t",
            "ao",
        ],
    );
    let child = restore
        .envs(env_timeout.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Mid restore: once it writes files (a fixed delay, on a loaded
    // machine, could stop the store before the restore even starts).
    let t = std::time::Instant::now();
    while fs::read_dir(d.p("dst/data")).map_or(0, |r| r.count()) < 10 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the restore never started writing"
        );
        sleep(Duration::from_millis(10));
    }
    s3.stop();
    let out = child.wait_with_output().expect("restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a restore without its store succeeded: {err}"
    );
    assert!(
        err.contains("btm: error: restore of") && err.contains("run it again"),
        "{err}"
    );
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("btm: error"))
            .count(),
        1,
        "{err}"
    );
    s3.restart();
    common::btm_env_ok(
        d.0.path(),
        &[
            "restore",
            "latest",
            &d.s("dst"),
            "-s",
            "s3://bkt/x",
            "-t",
            "ao",
        ],
        &env,
    );
    same_file(&d.p("src/data/blocks.log"), &d.p("dst/data/blocks.log"));
    common::sh("diff", &["-r", &d.s("src"), &d.s("dst")]);
}

/// A full disk mid-restore: a clear error; with space freed, a
/// re-run completes exactly.
#[test]
fn a_full_disk_mid_restore_then_rerun_is_exact() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src/data")).expect("mkdir");
    fs::write(d.p("src/data/blocks.log"), noise(3, 150 * MIB)).expect("write");
    d.btm(&[
        "backup",
        &d.s("src"),
        "-s",
        &d.s("store"),
        "-t",
        "ao",
        "--appendonly",
        "data/blocks.log",
    ])
    .ok();
    let mnt = d.p("small");
    common::mount_btrfs_image(&d.p("small.img"), &mnt);
    let _unmount = common::Guard::new({
        let mnt = mnt.clone();
        move || {
            let _ = std::process::Command::new("umount").arg(&mnt).status();
        }
    });
    fs::write(mnt.join("filler"), noise(4, 120 * MIB)).expect("filler");
    let dst = mnt.join("dst");
    let err = d
        .btm(&[
            "restore",
            "latest",
            dst.to_str().expect("utf8"),
            "-s",
            &d.s("store"),
            "-t",
            "ao",
        ])
        .fails(1);
    assert!(
        err.contains("No space left") || err.contains("space"),
        "{err}"
    );
    fs::remove_file(mnt.join("filler")).expect("rm");
    d.btm(&[
        "restore",
        "latest",
        dst.to_str().expect("utf8"),
        "-s",
        &d.s("store"),
        "-t",
        "ao",
    ])
    .ok();
    same_file(&d.p("src/data/blocks.log"), &dst.join("data/blocks.log"));
}

/// Killed at any moment, a restore re-run completes exactly;
/// files an earlier run journalled as complete are not read again.
#[test]
fn kill_9_mid_restore_then_rerun_is_exact_and_skips_completed_files() {
    let d = Dir::new();
    back_up_big_and_small_files(&d, (10, 1000), 500, 4000);
    let dst = d.s("dst");
    let journal = Path::new(&dst).join(".btm-restore");
    kill_restore_after_a_checkpoint(&d, &dst);
    let out = d
        .btm(&["restore", "latest", &dst, "-s", &d.s("store"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        v["summary"]["files_trusted"].as_u64().expect("n") > 0,
        "{out}"
    );
    common::sh("diff", &["-r", &d.s("src"), &dst]);
    assert!(!journal.exists());
    d.btm(&["check", "-s", &d.s("store"), "--read-data"]).ok();
}

/// A backup killed at any moment leaves no index; the re-run
/// reuses what was uploaded, restores exactly, and the store checks clean.
#[test]
fn kill_9_mid_backup_then_rerun_is_exact() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    for i in 0..6 {
        fs::write(d.p(&format!("src/{i}.sst")), noise(20 + i, 40 * MIB)).expect("w");
    }
    let mut interrupted = 0;
    for ms in [50u64, 150, 300] {
        if kill_after(
            d.0.path(),
            &[
                "backup",
                &d.s("src"),
                "-s",
                &d.s("store"),
                "--pack-size",
                "4MiB",
            ],
            &[],
            Duration::from_millis(ms),
        ) {
            interrupted += 1;
            // Killed before it created the store, it left nothing at all.
            if !d.p("store").exists() {
                continue;
            }
            let listed = d.btm(&["backups", "-s", &d.s("store")]).ok();
            assert!(
                listed.trim().is_empty(),
                "a killed backup left an index: {listed}"
            );
        }
    }
    assert!(interrupted > 0, "no backup was interrupted");
    let out = d
        .btm(&[
            "backup",
            &d.s("src"),
            "-s",
            &d.s("store"),
            "--pack-size",
            "4MiB",
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        v["chunks_reused"].as_u64().expect("n") > 0,
        "nothing the killed backups uploaded was reused: {out}"
    );
    d.btm(&["restore", "latest", &d.s("dst"), "-s", &d.s("store")])
        .ok();
    common::sh("diff", &["-r", &d.s("src"), &d.s("dst")]);
    d.btm(&["check", "-s", &d.s("store"), "--read-data"]).ok();
}

/// Fill `path` with `len` bytes all equal to `gen`, in place.
fn write_generation(path: &Path, len: usize, generation: u8) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open");
    let block = vec![generation; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = block.len().min(len - off);
        f.write_all_at(&block[..n], off as u64).expect("write");
        off += n;
    }
}

/// Small files go to the workers many at once (the chunks of up to 64
/// files a batch) and their results come back together: files rewritten
/// while such a batch is read are read again one by one, and none is
/// stored torn or with another file's chunks. Each restored file is one
/// whole generation of itself, at its own length; a backup once they hold
/// still is exact.
#[test]
fn small_files_changing_during_a_batched_backup_are_never_stored_torn() {
    let d = Dir::new();
    let len = |i: usize| 700 + (i * 37) % 7000;
    let path = |i: usize| d.p(&format!("src/{:02}/{i:05}", i % 30));
    // In place, one half then the other: between the two the file is
    // torn (two generations), which no backup may record.
    let write = |i: usize, generation: u8, torn: bool| {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path(i))
            .expect("open");
        let half = len(i) / 2;
        f.write_all_at(&vec![generation; half], 0).expect("write");
        if torn {
            std::thread::yield_now();
        }
        f.write_all_at(&vec![generation; len(i) - half], half as u64)
            .expect("write");
    };
    let files = 3000;
    for i in 0..files {
        if i < 30 {
            fs::create_dir_all(d.p(&format!("src/{i:02}"))).expect("mkdir");
        }
        write(i, 1, false);
    }
    let store = btm_chunk::store::LocalStore::open(&d.s("store")).expect("store");
    let store = btm_chunk::Repo::new(std::sync::Arc::new(store)).with_cache(None);
    let mut opts = BackupOptions::new("small", btm_chunk::Policy::NONE);
    // About 2 s to read the 11 MB, over the 0.9 s of rewriting.
    opts.max_rate = Some(6 * MIB as u64);
    let summary = std::thread::scope(|s| {
        s.spawn(|| {
            // Six rounds 150 ms apart: a file changes between a batch's
            // planning and its reading, but not at every read again.
            for g in 2..8 {
                for i in (0..files).step_by(7) {
                    write(i, g, true);
                }
                sleep(Duration::from_millis(150));
            }
        });
        store.backup(&d.p("src"), &opts)
    })
    .expect("the backup reads changed files again until they hold still");
    assert_eq!(summary.files, files as u64, "{summary:?}");
    assert!(
        summary.files_changed >= 1,
        "nothing was read again: {summary:?}"
    );
    let restore = |to: &str| {
        d.btm(&[
            "restore",
            "latest",
            &d.s(to),
            "-s",
            &d.s("store"),
            "-t",
            "small",
        ])
        .ok();
    };
    restore("dst");
    for i in 0..files {
        let rel = format!("{:02}/{i:05}", i % 30);
        let got = fs::read(d.p(&format!("dst/{rel}"))).expect("restored");
        assert_eq!(got.len(), len(i), "{rel} has another file's length");
        assert!(
            got.iter().all(|&b| b == got[0] && b != 0),
            "{rel} was stored torn"
        );
        if i % 7 != 0 {
            assert_eq!(got[0], 1, "{rel} was never rewritten");
        }
    }
    // Still now: the next backup records every file as it is.
    store.backup(&d.p("src"), &opts).expect("backup");
    restore("dst2");
    for i in 0..files {
        let rel = format!("{:02}/{i:05}", i % 30);
        same_file(&d.p(&format!("src/{rel}")), &d.p(&format!("dst2/{rel}")));
    }
}

/// A file rewritten while it is read is read again, and a
/// backup never records a mix of two generations; the summary counts it.
/// One that never stops changing fails the backup, naming it; one that
/// shrinks under the read is retried, not "failed to fill whole buffer".
#[test]
fn a_file_changing_during_backup_is_never_stored_torn() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    let file = d.p("src/state.db");
    write_generation(&file, 16 * MIB, 0);
    let store = btm_chunk::store::LocalStore::open(&d.s("store")).expect("store");
    let store = btm_chunk::Repo::new(std::sync::Arc::new(store)).with_cache(None);
    let mut opts = BackupOptions::new("live", btm_chunk::Policy::NONE);
    opts.max_rate = Some(8 * MIB as u64);
    // Rewrite the file for 1.5 s, then leave it alone.
    let summary = std::thread::scope(|s| {
        let f = file.clone();
        s.spawn(move || {
            let started = Instant::now();
            let mut g = 1u8;
            while started.elapsed() < Duration::from_millis(1500) {
                write_generation(&f, 16 * MIB, g);
                g = g.wrapping_add(1).max(1);
                sleep(Duration::from_millis(50));
            }
        });
        store.backup(&d.p("src"), &opts)
    })
    .expect("the backup retries until the file holds still");
    assert!(summary.files_changed >= 1, "{summary:?}");
    d.btm(&[
        "restore",
        "latest",
        &d.s("dst"),
        "-s",
        &d.s("store"),
        "-t",
        "live",
    ])
    .ok();
    let restored = fs::read(d.p("dst/state.db")).expect("read");
    assert!(
        restored.iter().all(|&b| b == restored[0]),
        "a torn file was stored"
    );
    same_file(&file, &d.p("dst/state.db"));

    // Never holding still: the backup fails and names the file. It has
    // changed before the backup starts, so the backup cannot reuse the
    // previous record unread however late the writer thread gets going.
    write_generation(&file, 16 * MIB, 200);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let err = std::thread::scope(|s| {
        let (f, stop) = (file.clone(), &stop);
        s.spawn(move || {
            let mut g = 1u8;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                write_generation(&f, 16 * MIB, g);
                g = g.wrapping_add(1).max(1);
                sleep(Duration::from_millis(30));
            }
        });
        let r = store.backup(&d.p("src"), &opts);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    })
    .expect_err("a file that never holds still cannot be backed up");
    let msg = err.to_string();
    assert!(
        msg.contains("state.db") && msg.contains("changed while it was read"),
        "{msg}"
    );

    // Shrinking under the read.
    write_generation(&file, 16 * MIB, 7);
    let shrunk = std::thread::scope(|s| {
        let f = file.clone();
        s.spawn(move || {
            sleep(Duration::from_millis(300));
            fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .and_then(|h| h.set_len(3 * MIB as u64))
                .expect("truncate");
        });
        store.backup(&d.p("src"), &opts)
    });
    match shrunk {
        Ok(s) => assert!(s.files_changed >= 1, "{s:?}"),
        Err(e) => assert!(!e.to_string().contains("fill whole buffer"), "{e}"),
    }
    let out = d
        .btm(&[
            "backup",
            &d.s("src"),
            "-s",
            &d.s("store"),
            "-t",
            "live",
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["files_changed"], 0, "{out}");
}

fn put_v1(store: &btm_chunk::store::LocalStore, name: &str, json: serde_json::Value) {
    use btm_chunk::store::Store;
    let data = zstd::bulk::compress(json.to_string().as_bytes(), 3).expect("zstd");
    store.put_index(name, &data).expect("put");
}

/// Issues 10.8 and 10.10: `check` applies restore's validation (a hostile
/// path, chunks that do not cover a file), and ignores names under
/// `indexes/` that are not index names, as the format says.
#[test]
fn check_applies_restore_validation_and_ignores_foreign_names() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    fs::write(d.p("src/a"), b"hello").expect("w");
    d.btm(&["backup", &d.s("src"), "-s", &d.s("store")]).ok();
    fs::write(d.p("store/indexes/README"), b"not an index").expect("w");
    fs::write(d.p("store/indexes/.partial"), b"junk").expect("w");
    let ok = d.btm(&["check", "-s", &d.s("store")]).ok();
    assert!(ok.contains("0 problems"), "{ok}");

    let store = btm_chunk::store::LocalStore::open(&d.s("store")).expect("store");
    let entry = |path: &str, size: u64| {
        serde_json::json!({"path": path, "type": "file", "size": size, "chunks": [],
            "mode": 420, "uid": 0, "gid": 0, "mtime_ns": 0, "ctime_ns": 0, "ino": 0})
    };
    let index = |entries: serde_json::Value| {
        serde_json::json!({"format": 1, "chunk_size": 1048576, "created": "2026-01-01T00:00:00Z",
            "tag": "evil", "meta": {}, "entries": entries})
    };
    put_v1(
        &store,
        "20260101T000000.000000000Z--evil",
        index(serde_json::json!([entry("../../escape", 0)])),
    );
    put_v1(
        &store,
        "20260101T000001.000000000Z--evil",
        index(serde_json::json!([entry("big", 10)])),
    );
    let out = d.btm(&["check", "-s", &d.s("store")]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("'..' component"), "{}", out.stdout);
    assert!(out.stdout.contains("do not cover"), "{}", out.stdout);
    assert!(out.stdout.contains("2 problems"), "{}", out.stdout);
}

/// One unreadable index does not block its tag: a new backup
/// of the tag, `restore latest --height`, `backups --long` and `--json`
/// go on; GC reports it and deletes nothing; `btm forget` removes it.
#[test]
fn one_unreadable_index_does_not_block_its_tag() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    fs::write(d.p("src/a"), noise(5, 3 * MIB)).expect("w");
    let store = d.s("store");
    d.btm(&[
        "backup",
        &d.s("src"),
        "-s",
        &store,
        "-t",
        "prod",
        "-m",
        "{\"height\":100}",
    ])
    .ok();
    let bad = "20990101T000000.000000000Z--prod";
    fs::write(
        d.p(&format!("store/indexes/{bad}")),
        b"\x28\xb5\x2f\xfd garbage",
    )
    .expect("w");

    fs::write(d.p("src/b"), b"new").expect("w");
    let out = d
        .btm(&[
            "backup",
            &d.s("src"),
            "-s",
            &store,
            "-t",
            "prod",
            "-m",
            "{\"height\":200}",
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        v["files_unchanged"], 1,
        "the previous good backup was the parent: {out}"
    );
    let r = d
        .btm(&[
            "restore",
            "--height",
            "150",
            &d.s("dst"),
            "-s",
            &store,
            "-t",
            "prod",
            "--json",
        ])
        .ok();
    assert!(r.contains("\"name\""), "{r}");
    let long = d.btm(&["backups", "-s", &store, "--long"]).ok();
    assert!(long.contains(&format!("{bad}  UNREADABLE")), "{long}");
    assert_eq!(long.lines().count(), 3, "{long}");
    let json: serde_json::Value =
        serde_json::from_str(&d.btm(&["backups", "-s", &store, "--json"]).ok()).expect("json");
    let listed = json.as_array().expect("array");
    assert!(
        listed
            .iter()
            .any(|b| b["name"] == bad && b["error"].is_string()),
        "{json}"
    );

    let gc = d.btm(&["gc", "-s", &store, "--grace", "1s"]);
    assert_eq!(gc.code, 1, "{}", gc.stdout);
    assert!(gc.stderr.contains("cannot be read"), "{}", gc.stderr);
    assert!(gc.stdout.contains("unreadable"), "{}", gc.stdout);

    d.btm(&["forget", bad, "-s", &store, "--dry-run"]).ok();
    assert!(
        d.p(&format!("store/indexes/{bad}")).exists(),
        "a dry run deleted it"
    );
    let err = d
        .btm(&["forget", "20990101T000000.000000000Z--nope", "-s", &store])
        .fails(1);
    assert!(err.contains("no backup named"), "{err}");
    d.btm(&["forget", bad, "-s", &store]).ok();
    assert!(!d.p(&format!("store/indexes/{bad}")).exists());
    d.btm(&["gc", "-s", &store]).ok();
    d.btm(&["check", "-s", &store, "--read-data"]).ok();
}

/// Names that are not UTF-8 are stored losslessly: files,
/// directories and symlink targets come back byte for byte.
#[test]
fn non_utf8_names_round_trip() {
    let d = Dir::new();
    let src = d.p("src");
    fs::create_dir_all(&src).expect("mkdir");
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9-\xff");
    fs::create_dir(src.join(name)).expect("mkdir");
    fs::write(src.join(name).join(name), b"latin-1 name").expect("w");
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(b"\xfe\xfd"), src.join("link"))
        .expect("ln");
    d.btm(&["backup", &d.s("src"), "-s", &d.s("store")]).ok();
    d.btm(&["restore", "latest", &d.s("dst"), "-s", &d.s("store")])
        .ok();
    assert_eq!(
        fs::read(d.p("dst").join(name).join(name)).expect("read"),
        b"latin-1 name"
    );
    assert_eq!(
        fs::read_link(d.p("dst/link"))
            .expect("link")
            .as_os_str()
            .as_bytes(),
        b"\xfe\xfd"
    );
    common::sh(
        "diff",
        &["-r", "--no-dereference", &d.s("src"), &d.s("dst")],
    );
}

/// A store inside the directory being backed up is refused
/// (it would back itself up), with nothing written.
#[test]
fn a_store_inside_the_source_is_refused() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src/data")).expect("mkdir");
    fs::write(d.p("src/data/a"), b"x").expect("w");
    let err = d
        .btm(&["backup", &d.s("src"), "-s", &d.s("src/backups")])
        .fails(1);
    assert!(
        err.contains("inside") && err.contains("back itself up"),
        "{err}"
    );
    assert!(!d.p("src/backups/indexes").exists());
}

/// A store that accepts connections and never answers fails
/// the backup with a clear message, not a progress line forever.
#[test]
fn a_frozen_store_times_out_with_a_clear_message() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    fs::write(d.p("src/a"), noise(6, MIB)).expect("w");
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", frozen.local_addr().expect("addr"));
    let started = Instant::now();
    let out = btm_cmd(d.0.path(), &["backup", &d.s("src"), "-s", "s3://bkt/x"])
        .envs([
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("BTM_STORE_TIMEOUT", "2s"),
        ])
        .output()
        .expect("btm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not answer"), "{err}");
    // A store that leaves requests unanswered is down, not busy: the call
    // gives up after the policy's unanswered attempts.
    let unanswered = btm_chunk::store::RetryPolicy::UNANSWERED;
    assert!(err.contains(&format!("; {unanswered} attempts")), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    drop(frozen);
}

/// A version 1 store stays readable (backups, restore, check);
/// new backups into it are version 2; GC deletes version 1 chunks once no
/// version 1 index references them, and leaves version 2 alone.
#[test]
fn version_1_stores_stay_readable_and_gc_handles_both() {
    use btm_chunk::store::{Id, Kind, Store};
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    let data = noise(7, 3 * MIB);
    fs::write(d.p("src/a"), &data).expect("w");
    let store = btm_chunk::store::LocalStore::open(&d.s("store")).expect("store");
    let mut chunks = Vec::new();
    for (i, part) in data.chunks(MIB).enumerate() {
        let h = Id::of(part);
        store
            .put(
                Kind::Chunk,
                &h,
                zstd::bulk::compress(part, 1).expect("zstd").into(),
            )
            .expect("put");
        chunks.push(serde_json::json!({"o": i * MIB, "l": part.len(), "h": h.to_hex()}));
    }
    store.flush().expect("flush");
    let meta = fs::metadata(d.p("src/a")).expect("meta");
    use std::os::unix::fs::MetadataExt;
    let v1 = "20250101T000000.000000000Z--old";
    put_v1(
        &store,
        v1,
        serde_json::json!({"format": 1, "chunk_size": MIB, "created": "2025-01-01T00:00:00Z",
            "tag": "old", "meta": {"height": 5}, "entries": [
                {"path": "a", "type": "file", "size": data.len(), "chunks": chunks,
                 "mode": meta.mode() & 0o7777, "uid": meta.uid(), "gid": meta.gid(),
                 "mtime_ns": meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), "ctime_ns": 0, "ino": 0}]}),
    );
    let long = d.btm(&["backups", "-s", &d.s("store"), "--json"]).ok();
    assert!(long.contains("\"format\":1"), "{long}");
    d.btm(&[
        "restore",
        "latest",
        &d.s("dst"),
        "-s",
        &d.s("store"),
        "-t",
        "old",
    ])
    .ok();
    same_file(&d.p("src/a"), &d.p("dst/a"));
    d.btm(&["check", "-s", &d.s("store"), "--read-data"]).ok();

    let out = d
        .btm(&[
            "backup",
            &d.s("src"),
            "-s",
            &d.s("store"),
            "-t",
            "new",
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["packs_uploaded"], 1, "new backups are version 2: {out}");
    d.btm(&["forget", v1, "-s", &d.s("store")]).ok();
    d.btm(&["gc", "-s", &d.s("store"), "--grace", "1s"]).ok();
    sleep(Duration::from_millis(1100));
    let r: serde_json::Value = serde_json::from_str(
        &d.btm(&["gc", "-s", &d.s("store"), "--grace", "1s", "--json"])
            .ok(),
    )
    .expect("json");
    assert_eq!(r["chunks_deleted"], 3, "{r}");
    assert!(store.list(Kind::Chunk).expect("list").is_empty());
    d.btm(&["check", "-s", &d.s("store"), "--read-data"]).ok();
    d.btm(&[
        "restore",
        "latest",
        &d.s("dst2"),
        "-s",
        &d.s("store"),
        "-t",
        "new",
    ])
    .ok();
    same_file(&d.p("src/a"), &d.p("dst2/a"));
}

/// Backup `name` rewritten under a new name with a tree segment per
/// top-level directory at least, as a tree of many more files would have
/// them; returns the new name and its segments, in order.
fn resegmented(
    store: &btm_chunk::store::LocalStore,
    name: &str,
) -> (String, Vec<btm_chunk::store::Id>) {
    use btm_chunk::format::head::{Decoded, Head, IndexName, Totals};
    use btm_chunk::format::tree::{Item, TreeWriter};
    use btm_chunk::store::{Kind, Store};
    let Decoded::V2(old) = btm_chunk::inventory::read_index(store, name).expect("read") else {
        panic!("a version 2 backup");
    };
    let idx = Decoded::V2(old.clone());
    let mut entries = btm_chunk::inventory::entries(store, None, name, &idx, 2);
    let (mut segments, mut totals) = (Vec::new(), Totals::default());
    let mut writer: Option<TreeWriter> = None;
    let mut close = |w: TreeWriter, segments: &mut Vec<_>| {
        let (last, t) = w.finish().expect("finish");
        segments.extend(last);
        totals.entries += t.entries;
        totals.files += t.files;
        totals.dirs += t.dirs;
        totals.symlinks += t.symlinks;
        totals.bytes += t.bytes;
        totals.stored_bytes += t.stored_bytes;
    };
    while let Some(item) = entries.next_item().expect("entries") {
        match item {
            Item::Entry(e) => {
                if !e.path.contains(&b'/') {
                    if let Some(w) = writer.take() {
                        close(w, &mut segments);
                    }
                }
                let w = writer.get_or_insert_with(|| TreeWriter::new(1));
                segments.extend(w.entry(&e).expect("entry"));
            }
            Item::Chunks(c) => {
                let w = writer.as_mut().expect("a file first");
                segments.extend(w.chunks(&c).expect("chunks"));
            }
        }
    }
    if let Some(w) = writer.take() {
        close(w, &mut segments);
    }
    for seg in &segments {
        store
            .put(Kind::Tree, &seg.id, seg.data.clone().into())
            .expect("put segment");
    }
    let created = chrono::Utc::now();
    let new_name = IndexName::new(created, &old.tag).to_string();
    let head = Head {
        created,
        trees: segments.iter().map(|s| s.id).collect(),
        totals,
        ..old
    };
    store
        .put_index(&new_name, &head.encode().expect("encode"))
        .expect("put head");
    (new_name, head.trees)
}

/// Every file under `dir` with its bytes.
fn contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("ls").flatten() {
            let p = e.path();
            if e.file_type().expect("type").is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// A restore over a node from a backup whose last tree
/// segment is gone fails before it writes anything: the node is not left
/// half at one height and half at another.
#[test]
fn a_restore_refuses_a_backup_missing_a_segment_before_writing_anything() {
    let d = Dir::new();
    for dir in 0..12 {
        fs::create_dir_all(d.p(&format!("src/d{dir:02}"))).expect("mkdir");
        for f in 0..300 {
            let p = d.p(&format!("src/d{dir:02}/{f}"));
            fs::write(p, noise(dir * 1000 + f, 1024)).expect("w");
        }
    }
    let store_dir = d.s("store");
    d.btm(&["backup", &d.s("src"), "-s", &store_dir, "-t", "m"])
        .ok();
    let dst = d.s("dst");
    d.btm(&["restore", "latest", &dst, "-s", &store_dir, "-t", "m"])
        .ok();
    let before = contents(Path::new(&dst));
    // One file in seven changes, and is backed up again.
    for dir in 0..12 {
        for f in (0..300).step_by(7) {
            let p = d.p(&format!("src/d{dir:02}/{f}"));
            fs::write(p, noise(77_000 + dir * 1000 + f, 1024)).expect("w");
        }
    }
    let out = d
        .btm(&["backup", &d.s("src"), "-s", &store_dir, "-t", "m"])
        .ok();
    let second = out.lines().next().expect("name").to_owned();
    let store = btm_chunk::store::LocalStore::open(&store_dir).expect("open");
    let (damaged, trees) = resegmented(&store, &second);
    assert!(trees.len() >= 12, "{} segments", trees.len());
    use btm_chunk::store::Store;
    store.delete_index(&second).expect("forget");
    let last = trees.last().expect("a segment");
    store
        .delete(btm_chunk::store::Kind::Tree, last)
        .expect("delete");
    let _ = fs::remove_dir_all(d.p("cache"));

    let run = d.btm(&["restore", &damaged, &dst, "-s", &store_dir]);
    assert!(
        contents(Path::new(&dst)) == before,
        "the node was changed: {}",
        run.stderr
    );
    let err = run.fails(1);
    assert!(
        err.contains("cannot be restored, so nothing was changed")
            && err.contains(&last.to_string()),
        "{err}"
    );
    assert!(!Path::new(&dst).join(".btm-restore").exists());
}

/// A pack index that cannot be read, holding chunks the backup needs: the
/// restore refuses before it writes, naming the missing chunk and the pack
/// index that may have held it.
#[test]
fn a_restore_refuses_a_backup_whose_pack_index_is_damaged_before_writing() {
    let d = Dir::new();
    fs::create_dir_all(d.p("src")).expect("mkdir");
    fs::write(d.p("src/a"), noise(71, 3 * MIB)).expect("w");
    let store_dir = d.s("store");
    d.btm(&["backup", &d.s("src"), "-s", &store_dir]).ok();
    let packidx: Vec<PathBuf> = fs::read_dir(d.p("store/packidx"))
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(packidx.len(), 1, "{packidx:?}");
    fs::write(&packidx[0], b"not a pack index").expect("damage");
    let _ = fs::remove_dir_all(d.p("cache"));
    let dst = d.p("dst");
    fs::create_dir_all(&dst).expect("mkdir");
    fs::write(dst.join("a"), b"the node's own bytes").expect("w");
    let err = d
        .btm(&["restore", "latest", &d.s("dst"), "-s", &store_dir])
        .fails(1);
    assert!(
        err.contains("cannot be restored, so nothing was changed")
            && err.contains("missing from the store")
            && err.contains("a pack index could not be read"),
        "{err}"
    );
    assert_eq!(fs::read(dst.join("a")).expect("r"), b"the node's own bytes");
    assert!(!dst.join(".btm-restore").exists());
}
