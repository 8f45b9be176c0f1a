//! The store contract against the remote backends: S3 through a real
//! S3-compatible server (`s3s-fs`, installed by scripts/test.sh) and Azure
//! through Azurite, both started on loopback. The suite is the engine's
//! own (`crates/chunk/tests/contract`), which runs there against the
//! in-memory and local stores. A backend that cannot be set up fails the
//! run; nothing is skipped.

mod common;
#[path = "../../chunk/tests/contract/mod.rs"]
mod contract;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use contract::contract;

#[test]
fn s3_store_meets_the_contract_and_round_trips_a_backup() {
    let s3 = common::S3::start(&["btm"]);
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    contract(
        btm_chunk::store::open(
            &"s3://btm/suite".parse().expect("url"),
            btm_chunk::store::Open::Write,
        )
        .expect("open s3")
        .as_ref(),
    );

    round_trip_through_cli("s3://btm/backups", &s3.env());
    let dir = tempfile::tempdir().expect("tmp");
    // A bucket that does not exist is a clear failure, not a hang.
    let mut c = common::btm_cmd(dir.path(), &["backups", "-s", "s3://no-such-bucket/x"]);
    c.envs(s3.env());
    let out = c.output().expect("btm");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sparse tree backed up, restored and checked through `store` with the
/// CLI, byte- and hole-exact.
fn round_trip_through_cli(store: &str, env: &[(&'static str, String)]) {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let f = std::fs::File::create(src.join("state.db")).expect("create");
    f.set_len(32 << 20).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 100_000], 5 << 20).expect("write");
    std::fs::write(src.join("small"), b"hello").expect("w");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |args: &[&str]| common::btm_env_ok(dir.path(), args, &env);
    run(&[
        "backup",
        src.to_str().expect("utf8"),
        "-s",
        store,
        "-t",
        "roundtrip",
    ]);
    let dst = dir.path().join("dst");
    run(&[
        "restore",
        "latest",
        dst.to_str().expect("utf8"),
        "-s",
        store,
        "-t",
        "roundtrip",
    ]);
    assert_eq!(std::fs::read(dst.join("small")).expect("read"), b"hello");
    let (a, b) = (
        std::fs::read(src.join("state.db")).expect("a"),
        std::fs::read(dst.join("state.db")).expect("b"),
    );
    assert!(a == b, "state.db differs after the S3 round trip");
    use std::os::unix::fs::MetadataExt;
    let blocks = |p: &Path| std::fs::metadata(p).expect("m").blocks();
    assert!(blocks(&dst.join("state.db")) <= blocks(&src.join("state.db")));
    let check = run(&["check", "-s", store, "--read-data"]);
    assert!(check.contains("0 problems"), "{check}");
}

#[test]
fn azure_store_meets_the_contract_and_round_trips_a_backup() {
    let az = common::Azurite::start(&["btm"]);
    for (k, v) in az.env() {
        std::env::set_var(k, v);
    }
    contract(
        btm_chunk::store::open(
            &"az://btm/suite".parse().expect("url"),
            btm_chunk::store::Open::Write,
        )
        .expect("open azure")
        .as_ref(),
    );
    round_trip_through_cli("az://btm/backups", &az.env());
}

/// A store under test through the CLI: its URL, the environment its
/// clients need, and where its lease markers lie on this machine's disk.
struct Under {
    url: String,
    env: Vec<(&'static str, String)>,
    locks: std::path::PathBuf,
}

impl Under {
    fn local(dir: &Path) -> Self {
        let root = dir.join("store");
        Under {
            url: root.display().to_string(),
            env: Vec::new(),
            locks: root.join("locks"),
        }
    }

    fn s3(s3: &common::S3, prefix: &str) -> Self {
        Under {
            url: format!("s3://btm/{prefix}"),
            env: s3.env(),
            locks: s3.bucket_dir("btm").join(prefix).join("locks"),
        }
    }

    fn cmd(&self, scratch: &Path, args: &[&str]) -> Command {
        let mut all = args.to_vec();
        all.extend(["-s", &self.url]);
        let mut c = common::btm_cmd(scratch, &all);
        c.envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        c
    }

    fn run(&self, scratch: &Path, args: &[&str]) -> common::Run {
        let out = self.cmd(scratch, args).output().expect("btm runs");
        common::Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn gc(&self, scratch: &Path, pid_namespace: bool, env: &[(&str, &str)]) -> serde_json::Value {
        let btm = env!("CARGO_BIN_EXE_btm");
        let mut c = if pid_namespace {
            // A second PID namespace with its own /proc: what a GC run in a
            // container, or on a cloned machine, sees.
            let mut c = Command::new("unshare");
            c.args(["-pf", "--mount-proc", btm]);
            c
        } else {
            Command::new(btm)
        };
        c.args(["gc", "--json", "--grace", "1s", "-s", &self.url])
            .env("BTM_RUNTIME_DIR", scratch.join("run"))
            .env("BTM_STATE_DIR", scratch.join("state"))
            .env("BTM_CACHE_DIR", scratch.join("cache-gc"))
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(env.iter().copied());
        let out = c.output().expect("gc runs");
        assert!(
            out.status.success(),
            "gc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("gc --json")
    }

    /// Wait until a backup's lease lists a pending pack: it has taken its
    /// lease and loaded the store's chunks, and is uploading.
    fn wait_for_pending_pack(&self, backup: &mut std::process::Child) {
        for _ in 0..600 {
            let pending = std::fs::read_dir(&self.locks)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("backup-"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .any(|v| v["pending"].as_array().is_some_and(|p| !p.is_empty()));
            if pending {
                return;
            }
            assert!(
                backup.try_wait().expect("wait").is_none(),
                "the backup ended before it uploaded anything"
            );
            sleep(Duration::from_millis(50));
        }
        panic!("no backup lease listed a pending pack in {:?}", self.locks);
    }
}

/// Four MiB backed up and forgotten, then marked by a GC (its pack is
/// garbage, due after the 1 s grace); then a tree holding the same four
/// MiB and 48 MiB more, for a backup slow enough to pause.
fn marked_garbage_and_a_bigger_tree(store: &Under, scratch: &Path) -> std::path::PathBuf {
    let a = scratch.join("A");
    let b = scratch.join("B");
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::create_dir_all(&b).expect("mkdir");
    let four = common::noise(21, 4 << 20);
    std::fs::write(a.join("a"), &four).expect("write");
    std::fs::write(b.join("a"), &four).expect("write");
    std::fs::write(b.join("z"), common::noise(22, 48 << 20)).expect("write");
    let name = store
        .run(scratch, &["backup", a.to_str().expect("utf8"), "-t", "t1"])
        .ok();
    let name = name.lines().next().expect("the backup's name").to_owned();
    store.run(scratch, &["forget", &name]).ok();
    let marked = store.gc(scratch, false, &[]);
    assert!(marked["marked"].as_u64() >= Some(1), "{marked}");
    sleep(Duration::from_millis(1200));
    b
}

fn stop(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

/// A GC in another PID namespace (a container, a cloned
/// machine with the same host name) cannot prove that a backup of this
/// host is dead, so it defers its sweep; the backup, which reuses a marked
/// pack, ends restorable.
fn a_gc_in_another_pid_namespace_defers_to_a_running_backup(store: &Under, scratch: &Path) {
    let b = marked_garbage_and_a_bigger_tree(store, scratch);
    let mut backup = store
        .cmd(
            scratch,
            &[
                "backup",
                b.to_str().expect("utf8"),
                "-t",
                "t2",
                "--max-rate",
                "8M",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backup starts");
    store.wait_for_pending_pack(&mut backup);
    stop(&backup, nix::sys::signal::Signal::SIGSTOP);
    let gc = store.gc(scratch, true, &[]);
    stop(&backup, nix::sys::signal::Signal::SIGCONT);
    let out = backup.wait_with_output().expect("backup ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        gc["packs_deleted"], 0,
        "a live backup's pack was swept: {gc}"
    );
    assert!(gc["deferred"].is_string(), "{gc}");
    let dst = scratch.join("restored");
    store
        .run(
            scratch,
            &["restore", "latest", dst.to_str().expect("utf8"), "-t", "t2"],
        )
        .ok();
    for f in ["a", "z"] {
        assert!(
            std::fs::read(dst.join(f)).expect("read") == std::fs::read(b.join(f)).expect("read")
        );
    }
    let check = store.run(scratch, &["check", "--read-data"]).ok();
    assert!(check.contains("; 0 problems"), "{check}");
}

/// A backup paused past its lease's TTL (made 4 s here)
/// while a GC swept the pack it reuses must not write a head that
/// references it; one paused as long with nothing swept proves its chunks
/// are all there and succeeds. `store(case)` gives each case a store of
/// its own.
fn a_backup_whose_lease_lapsed_never_writes_a_head_with_swept_chunks(
    store: impl Fn(&str) -> Under,
    scratch: &Path,
) {
    let short = [("BTM_LEASE_TTL", "4s")];
    let paused_backup = |store: &Under, b: &Path| {
        let mut backup = store
            .cmd(
                scratch,
                &[
                    "backup",
                    b.to_str().expect("utf8"),
                    "-t",
                    "t2",
                    "--max-rate",
                    "8M",
                ],
            )
            .envs(short)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("backup starts");
        store.wait_for_pending_pack(&mut backup);
        stop(&backup, nix::sys::signal::Signal::SIGSTOP);
        sleep(Duration::from_secs(5));
        backup
    };

    // Paused past the TTL while a GC sweeps the pack of `a`: it fails, and
    // writes no head.
    let swept = store("swept");
    let b = marked_garbage_and_a_bigger_tree(&swept, &scratch.join("swept"));
    let backup = paused_backup(&swept, &b);
    let gc = swept.gc(scratch, false, &short);
    assert!(
        gc["packs_deleted"].as_u64() >= Some(1),
        "the test needs a sweep: {gc}"
    );
    stop(&backup, nix::sys::signal::Signal::SIGCONT);
    let out = backup.wait_with_output().expect("backup ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "it must fail: {stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("btm: error: ") && last.contains("lease") && last.contains("removed"),
        "{stderr}"
    );
    let listed = swept.run(scratch, &["backups", "-t", "t2", "--json"]).ok();
    assert_eq!(listed.trim(), "[]", "no head may be written");
    let check = swept.run(scratch, &["check", "--read-data"]).ok();
    assert!(check.contains("; 0 problems"), "{check}");

    // Paused as long with nothing swept: it checks, and succeeds.
    let calm = store("calm");
    let b = marked_garbage_and_a_bigger_tree(&calm, &scratch.join("calm"));
    let backup = paused_backup(&calm, &b);
    stop(&backup, nix::sys::signal::Signal::SIGCONT);
    let out = backup.wait_with_output().expect("backup ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dst = scratch.join("calm-restored");
    calm.run(
        scratch,
        &["restore", "latest", dst.to_str().expect("utf8"), "-t", "t2"],
    )
    .ok();
    for f in ["a", "z"] {
        assert!(
            std::fs::read(dst.join(f)).expect("read") == std::fs::read(b.join(f)).expect("read")
        );
    }
}

#[test]
fn local_store_leases_hold_against_a_gc_in_another_pid_namespace() {
    let dir = tempfile::tempdir().expect("tmp");
    a_gc_in_another_pid_namespace_defers_to_a_running_backup(&Under::local(dir.path()), dir.path());
}

#[test]
fn local_store_leases_that_lapsed_never_commit_swept_chunks() {
    let dir = tempfile::tempdir().expect("tmp");
    a_backup_whose_lease_lapsed_never_writes_a_head_with_swept_chunks(
        |case| Under::local(&dir.path().join(case)),
        dir.path(),
    );
}

#[test]
fn s3_store_leases_hold_against_a_gc_in_another_pid_namespace() {
    let s3 = common::S3::start(&["btm"]);
    let dir = tempfile::tempdir().expect("tmp");
    a_gc_in_another_pid_namespace_defers_to_a_running_backup(&Under::s3(&s3, "ns"), dir.path());
}

#[test]
fn s3_store_leases_that_lapsed_never_commit_swept_chunks() {
    let s3 = common::S3::start(&["btm"]);
    let dir = tempfile::tempdir().expect("tmp");
    a_backup_whose_lease_lapsed_never_writes_a_head_with_swept_chunks(
        |case| Under::s3(&s3, case),
        dir.path(),
    );
}
