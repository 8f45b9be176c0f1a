//! install.sh on the host, without systemd: usage, validation of every
//! value (one clear line and exit 2, nothing changed), `--dry-run`, and
//! shellcheck. What it does to a real systemd is in tests/systemd.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Btrfs, Fixture};

/// An unpacked package: install.sh, the test binary and the unit.
fn package_dir(scratch: &Path) -> PathBuf {
    let dir = scratch.join("btm_package");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    for (from, to) in [
        (root.join("install.sh"), "install.sh"),
        (PathBuf::from(env!("CARGO_BIN_EXE_btm")), "btm"),
        (
            root.join("systemd/btm-daemon.service"),
            "btm-daemon.service",
        ),
    ] {
        std::fs::copy(&from, dir.join(to)).expect("copy");
    }
    dir
}

/// `install.sh ARGS`, which must succeed; its output.
fn dry_run(dir: &Path, args: &[&str]) -> String {
    let out = install(dir, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn install(dir: &Path, args: &[&str]) -> Output {
    Command::new(dir.join("install.sh"))
        .args(args)
        .env("BTM_RUNTIME_DIR", dir.join("run"))
        .env("BTM_STATE_DIR", dir.join("state"))
        .output()
        .expect("install.sh runs")
}

#[test]
fn usage_shows_both_styles() {
    let scratch = tempfile::tempdir().expect("tmp");
    let dir = package_dir(scratch.path());
    let out = install(&dir, &["-h"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--snapshot-itv=<ITV>",
        "--snapshot-target=<VOLUME>",
        "-i=4 -c=100 -m=zfs -a=fair -p=zfs/blockchain",
        "--height-source=<SOURCE>",
        "--export-store=<STORE>",
        "--dry-run",
        "--uninstall",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from usage:\n{text}"
        );
    }
}

#[test]
fn every_bad_value_is_refused_with_one_line() {
    let fx = Btrfs::new();
    let dir = package_dir(fx.scratch());
    let vol = format!("-p={}", fx.volume());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-i=abc", &vol], "--snapshot-itv"),
        (vec!["-i=0", &vol], "--snapshot-itv"),
        (vec!["--snapshot-cap=-1", &vol], "--snapshot-cap"),
        (vec!["-m=ext4", &vol], "--snapshot-mode"),
        (vec!["-a=lifo", &vol], "--snapshot-algo"),
        (vec!["-i=10"], "--snapshot-volume"),
        (vec!["-p=/nonexistent/chain"], "/nonexistent/chain"),
        (vec!["-m=zfs", &vol], "cannot be used"),
        (vec!["--height-source=pigeon", &vol], "--height-source"),
        (vec!["--height-source=ethereum", &vol], "--rpc-url"),
        (
            vec!["--height-source=ethereum", "--rpc-url=https://x", &vol],
            "http://",
        ),
        (vec!["--rpc-url=http://x", &vol], "--rpc-kind"),
        (
            vec!["--rpc-url=http://x", "--rpc-kind=tron", &vol],
            "--rpc-kind",
        ),
        (
            vec!["--height-source=dogecoin", "--rpc-url=http://x", &vol],
            "--height-source",
        ),
        (vec!["--rpc-cookie=/c", &vol], "--rpc-cookie"),
        (vec!["--rpc-kind=cometbft", &vol], "--rpc-url"),
        (vec!["--preserve=../secrets", &vol], "preserve"),
        (vec!["--preserve=a,,b", &vol], "empty path"),
        (vec!["--height-source=file", &vol], "--height-file"),
        (vec!["--export-every=100", &vol], "--export-store"),
        (
            vec!["--export-store=/b", "--export-every=15", &vol],
            "multiple",
        ),
        (
            vec!["--export-store=/b", "--export-keep=0", &vol],
            "--export-keep",
        ),
        (vec!["--export-store=ftp://b", &vol], "ftp"),
        (vec!["--export-store=/b", "--export-tag=a/b", &vol], "tag"),
        (vec!["--snapshot-itv", "4", &vol], "needs a value"),
        (vec!["--frobnicate", &vol], "unknown option"),
    ];
    for (args, needle) in cases {
        let mut all = args.clone();
        all.push("--dry-run");
        let out = install(&dir, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err} lacks {needle}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} acted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn dry_run_prints_every_action_and_does_none() {
    let fx = Btrfs::new();
    let dir = package_dir(fx.scratch());
    let touched = [
        "/usr/local/bin/btm",
        "/etc/systemd/system/btm-daemon.service",
        "/etc/btm/btm.toml",
    ];
    let before: Vec<bool> = touched.iter().map(|p| Path::new(p).exists()).collect();
    let vol = format!("--snapshot-volume={}", fx.volume());
    let text = dry_run(
        &dir,
        &[
            "--snapshot-itv=4",
            "--snapshot-cap=100",
            "--snapshot-mode=BTRFS",
            "--snapshot-algo=fade",
            &vol,
            "--export-store=/var/backups/btm",
            "--export-every=1000",
            "--rpc-url=http://127.0.0.1:26657",
            "--rpc-kind=cometbft",
            "--preserve=data/upgrade-info.json,config/extra.toml",
            "--dry-run",
        ],
    );
    assert!(text.contains("+ install -D -m 0755"), "{text}");
    assert!(text.contains("/usr/local/bin/btm"), "{text}");
    // The configuration it would write, checked by btm itself.
    for line in [
        "    rpc_kind = \"cometbft\"",
        "    preserve = [\"data/upgrade-info.json\", \"config/extra.toml\"]",
        "keep the validator signing state",
    ] {
        assert!(text.contains(line), "{line} missing: {text}");
    }
    // A Bitcoin Core node: its dialect and its cookie reach the config,
    // which btm checks.
    let text = dry_run(
        &dir,
        &[
            &vol,
            "--height-source=bitcoin",
            "--rpc-url=http://127.0.0.1:8332",
            "--rpc-cookie=/var/lib/bitcoind/.cookie",
            "--dry-run",
        ],
    );
    for line in [
        "    source = \"bitcoin\"",
        "    rpc_cookie = \"/var/lib/bitcoind/.cookie\"",
    ] {
        assert!(text.contains(line), "{line} missing: {text}");
    }
    let after: Vec<bool> = touched.iter().map(|p| Path::new(p).exists()).collect();
    assert_eq!(before, after, "a dry run changed the system");
}

#[test]
fn the_shell_scripts_are_shellcheck_clean() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let out = Command::new("shellcheck")
        .current_dir(root)
        .args([
            "install.sh",
            "scripts/test.sh",
            "scripts/demo.sh",
            "scripts/pack.sh",
            "scripts/build-release.sh",
            "packaging/build-deb.sh",
            "packaging/deb/postinst",
            "packaging/deb/prerm",
            "packaging/deb/postrm",
            "packaging/cosmovisor/btm-preupgrade.sh",
        ])
        .output()
        .expect("shellcheck runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
