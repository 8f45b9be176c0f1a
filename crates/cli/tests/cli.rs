//! Bad input never panics, never runs anything, and gets one line and a
//! non-zero exit; `simulate` matches the fade definition; output to a
//! closed pipe is not an error. None of this needs a filesystem.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use common::{btm, btm_cmd};

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn hostile_volume_names_run_nothing() {
    let dir = scratch();
    let marker = dir.path().join("pwned");
    let m = marker.to_str().expect("utf8");
    let hostile = [
        format!("pool/x; touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("pool/x|touch {m}"),
        format!("pool/x && touch {m}"),
        format!("pool/x\ntouch {m}"),
        "-rf".to_owned(),
        "pool/data@5".to_owned(),
        "pool/da ta".to_owned(),
    ];
    for name in &hostile {
        for verb in [
            vec!["list"],
            vec!["snapshot", "--height", "1"],
            vec!["prune"],
            vec!["rollback", "--yes"],
            vec!["clean"],
        ] {
            let mut args = verb.clone();
            let flag = format!("--volume={name}");
            args.push(&flag);
            let err = btm(dir.path(), &args).fails(2);
            assert!(err.contains("invalid volume name"), "{name:?}: {err}");
        }
        // Through the environment too.
        let out = btm_cmd(dir.path(), &["list"])
            .env("BTM_VOLUME", name)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{name:?}");
    }
    assert!(!marker.exists(), "a hostile name executed a command");
}

#[test]
fn bad_arguments_get_one_line_and_exit_2() {
    let dir = scratch();
    let cases: &[&[&str]] = &[
        &["list"],                                           // no volume
        &["snapshot", "-p", "pool/data"],                    // no height
        &["snapshot", "-p", "pool/data", "--height", "abc"], // non-numeric
        &["snapshot", "-p", "pool/data", "--height", "-5"],
        &[
            "snapshot",
            "-p",
            "pool/data",
            "--height",
            "18446744073709551616",
        ],
        &["prune", "-p", "pool/data", "-i", "0"],
        &["prune", "-p", "pool/data", "-c", "0"],
        &["prune", "-p", "pool/data", "-a", "lifo"],
        &["list", "-p", "pool/data", "-m", "ext4"],
        &["snapshot", "-p", "pool/data", "--height", "5", "-c", "3"], // -c needs --prune
        &["rollback", "-p", "pool/data", "-s", "x"],
        &["rollback", "-p", "pool/data", "--preserve", "/etc/passwd"],
        &["rollback", "-p", "pool/data", "--preserve", "../escape"],
        &["clean", "-p", "pool/data", "-k", "-1"],
        &["simulate", "--itv", "0", "--cap", "5", "--blocks", "100"],
        &["simulate", "--itv", "10", "--cap", "0", "--blocks", "100"],
        &["simulate", "--itv", "10"],
        &["frobnicate"],
        &["list", "-p", "pool/data", "--log-level", "loud[["],
    ];
    for args in cases {
        btm(dir.path(), args).fails(2);
    }
}

#[test]
fn missing_volumes_fail_cleanly() {
    let dir = scratch();
    let err = btm(dir.path(), &["list", "-p", "/nonexistent/btm/volume"]).fails(1);
    assert!(err.contains("does not exist"), "{err}");
    let err = btm(
        dir.path(),
        &["list", "-p", "/nonexistent/btm/volume", "-m", "btrfs"],
    )
    .fails(1);
    assert!(err.contains("does not exist"), "{err}");
    // A directory that is not a subvolume (the temp dir is not btrfs here,
    // or if it is, it is not a subvolume root).
    let err = btm(
        dir.path(),
        &[
            "list",
            "-p",
            dir.path().to_str().expect("utf8"),
            "-m",
            "btrfs",
        ],
    )
    .fails(1);
    assert!(err.contains("not a btrfs volume"), "{err}");
    // A relative path that is nothing says what to do.
    let err = btm(dir.path(), &["list", "-p", "relative/not/here"]).fails(1);
    assert!(err.contains("absolute path"), "{err}");
    assert!(err.contains("current directory"), "{err}");
}

/// `--check-config` checks the volume as the daemon would.
#[test]
fn check_config_checks_the_volume() {
    let dir = scratch();
    for args in [
        &[
            "daemon",
            "--check-config",
            "-m",
            "btrfs",
            "-p",
            "/does/not/exist",
        ][..],
        &["daemon", "--check-config", "-m", "zfs", "-p", "nopool/none"][..],
        &["daemon", "--check-config", "-p", "/does/not/exist"][..],
    ] {
        let err = btm(dir.path(), args).fails(1);
        assert!(!err.contains("configuration OK"), "{args:?}: {err}");
    }
}

/// A store path that is a file is called a file.
#[test]
fn a_store_that_is_a_file_is_named_as_such() {
    let dir = scratch();
    let file = dir.path().join("store");
    std::fs::write(&file, b"x").expect("w");
    let f = file.to_str().expect("utf8");
    for args in [&["backups", "-s", f][..], &["check", "-s", f][..]] {
        let err = btm(dir.path(), args).fails(1);
        assert!(err.contains("is a file"), "{args:?}: {err}");
    }
    let err = btm(dir.path(), &["backups", "-s", &format!("{f}-missing")]).fails(1);
    assert!(err.contains("no such directory"), "{err}");
}

fn simulate_kept(args: &[&str]) -> Vec<u64> {
    common::simulate_kept(scratch().path(), args)
}

/// `simulate --protect H=LABEL` shows what `btm snapshot --protect` does
/// to a policy: the height is kept, outside the cap.
#[test]
fn simulate_shows_protected_heights() {
    let out = btm(
        scratch().path(),
        &[
            "simulate",
            "-i",
            "10",
            "-c",
            "3",
            "-a",
            "fair",
            "--blocks",
            "100",
            "--protect",
            "20=v2-upgrade",
        ],
    )
    .ok();
    assert!(out.contains("20  keep: protected (v2-upgrade)"), "{out}");
    assert!(out.contains("4 snapshot(s) kept"), "{out}");
    let e = btm(
        scratch().path(),
        &["simulate", "--blocks", "100", "--protect", "20"],
    )
    .fails(2);
    assert!(e.contains("H=LABEL"), "{e}");
}

#[test]
fn simulate_matches_the_definitions() {
    // fade, itv 10, cap 20: T = 10 tiers of q = 2 (worked example in README).
    assert_eq!(
        simulate_kept(&["-i", "10", "-c", "20", "-a", "fade", "--blocks", "2000"]),
        vec![2000, 1990, 1900, 1000, 10]
    );
    assert_eq!(
        simulate_kept(&["--itv", "10", "--cap", "3", "--algo", "fair", "--blocks", "95"]),
        vec![90, 80, 70]
    );
    assert!(simulate_kept(&["-i", "10", "-c", "5", "--blocks", "9"]).is_empty());
    let dir = scratch();
    let text = btm(
        dir.path(),
        &[
            "simulate", "-i", "10", "-c", "20", "-a", "fade", "--blocks", "2000",
        ],
    )
    .ok();
    assert!(text.contains("keep: tier 2, slot 19"), "{text}");
    let err = btm(
        dir.path(),
        &["simulate", "-i", "1", "-c", "5", "--blocks", "99999999999"],
    )
    .fails(1);
    assert!(err.contains("limit"), "{err}");
}

#[test]
fn closed_stdout_is_not_an_error() {
    let dir = scratch();
    let mut child = btm_cmd(
        dir.path(),
        &["simulate", "-i", "1", "-c", "5000", "--blocks", "5000"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    // The reader is dropped here, like `btm … | head -1`.
    let out = child.wait_with_output().expect("wait");
    assert!(first.contains("keep"), "{first}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn help_and_version_succeed() {
    let dir = scratch();
    for args in [&["--help"][..], &["--version"], &["rollback", "--help"]] {
        let r = btm(dir.path(), args);
        assert_eq!(r.code, 0, "{args:?}");
    }
    assert!(Path::new(env!("CARGO_BIN_EXE_btm")).exists());
}

#[test]
fn daemon_config_typos_fail_at_start_naming_the_key() {
    let dir = scratch();
    let conf = dir.path().join("btm.toml");
    let c = conf.to_str().expect("utf8");
    for (text, key) in [
        ("volume = \"tank/data\"\nitvv = 10\n", "itvv"),
        ("volume = \"tank/data\"\nalgo = \"fadee\"\n", "fadee"),
        ("volume = \"tank/data\"\nsource = \"ethereum\"\n", "rpc_url"),
        ("volume = \"tank/data\"\npoll_interval = 5\n", "line 2"),
        (
            "volume = \"tank/data\"\n[hooks]\npre_snapshot = \"x\"\n",
            "line 3",
        ),
    ] {
        std::fs::write(&conf, text).expect("write");
        let err = btm(dir.path(), &["daemon", "--config", c]).fails(1);
        assert!(err.contains(key), "{text:?}: {err}");
    }
    let err = btm(dir.path(), &["daemon", "--config", "/nonexistent/btm.toml"]).fails(1);
    assert!(err.contains("/nonexistent/btm.toml"), "{err}");
    btm(
        dir.path(),
        &["daemon", "--poll-interval", "soon", "-p", "x"],
    )
    .fails(2);
}

#[test]
fn notify_and_status_without_a_daemon_fail_cleanly() {
    let dir = scratch();
    let sock = dir.path().join("none.sock");
    let s = sock.to_str().expect("utf8");
    let err = btm(dir.path(), &["notify", "--height", "10", "--socket", s]).fails(1);
    assert!(err.contains("is `btm daemon` running?"), "{err}");
    btm(dir.path(), &["status", "--socket", s]).fails(1);
    btm(dir.path(), &["notify", "--height", "ten"]).fails(2);
}

/// Logs written to a pipe (CI, `2>file`, cron mail, a log shipper) carry no
/// terminal escape codes.
#[test]
fn logs_to_a_pipe_are_plain_text() {
    let dir = scratch();
    let vol = dir.path().join("plain");
    std::fs::create_dir_all(&vol).expect("mkdir");
    let r = btm(
        dir.path(),
        &[
            "--log-level",
            "debug",
            "list",
            "-p",
            vol.to_str().expect("utf8"),
            "-m",
            "btrfs",
        ],
    );
    assert!(r.stderr.contains("DEBUG"), "{}", r.stderr);
    assert!(!r.stderr.contains('\u{1b}'), "{:?}", r.stderr);
}
