//! Scenarios run identically on btrfs and ZFS: every command, driven
//! through the real `btm` binary against a real filesystem.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::thread::sleep;
use std::time::Duration;

use crate::common::{btm, sh, DaemonProc, Fixture};

/// Instantiate every scenario as a `#[test]` on fixtures made by `$new`.
macro_rules! all_scenarios {
    ($new:path) => {
        all_scenarios!(@each $new;
            snapshot_list_and_existing_height,
            foreign_snapshots_survive_every_command,
            retention_matches_simulate,
            rollback_behaviour,
            rollback_preserve_never_follows_symlinks,
            rollback_keeps_signing_state_by_default,
            rollback_keeps_a_branch_and_undo_returns_to_it,
            a_switch_stopped_after_any_step_is_finished_by_a_rerun,
            clean_keeps_newest,
            protected_snapshots_survive_pruning_and_a_daemon_restart,
            destroy_failures_are_reported_one_by_one,
            detection_only_reads,
            lock_serialises_processes,
        );
    };
    (@each $new:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let fx = $new();
                scenarios::$name(&fx);
            }
        )*
    };
}

fn snapshot(fx: &impl Fixture, h: u64) -> String {
    fx.btm(&["snapshot", "--height", &h.to_string()]).ok()
}

/// Point the library (used directly by some scenarios) at a private dir.
fn lib_runtime() {
    std::env::set_var(
        "BTM_RUNTIME_DIR",
        std::env::temp_dir().join("btm-test-lib-run"),
    );
    std::env::set_var(
        "BTM_STATE_DIR",
        std::env::temp_dir().join("btm-test-lib-state"),
    );
}

fn open(fx: &impl Fixture) -> Box<dyn btm::volume::Volume> {
    lib_runtime();
    btm::volume::open(
        &fx.volume(),
        Some(fx.mode().parse().expect("mode")),
        &btm::dirs::Dirs::from_env(),
    )
    .expect("open volume")
}

pub fn snapshot_list_and_existing_height(fx: &impl Fixture) {
    fx.write("f", "ten");
    assert!(snapshot(fx, 10).contains("created snapshot at height 10"));
    fx.write("f", "twenty");
    snapshot(fx, 20);
    fx.write("f", "changed");
    let again = snapshot(fx, 10);
    assert!(again.contains("already exists"), "{again}");
    assert_eq!(fx.heights(), vec![20, 10]);

    let json: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    assert_eq!(json["mode"], fx.mode());
    let first = &json["snapshots"][0];
    assert_eq!(first["name"], format!("{}@20", fx.volume()));
    assert!(
        first["created"].is_string(),
        "creation time reported: {first}"
    );
    if fx.mode() == "zfs" {
        assert!(first["used"].is_u64(), "zfs reports space used: {first}");
    }
    let table = fx.btm(&["list"]).ok();
    let (p20, p10) = (
        table.find("@20").expect("20"),
        table.find("@10").expect("10"),
    );
    assert!(p20 < p10, "newest first:\n{table}");

    // The existing snapshot was not replaced: it still holds "ten".
    let vol = open(fx);
    let view = vol.view(10).expect("view");
    assert_eq!(
        std::fs::read_to_string(view.path().join("f")).expect("read"),
        "ten"
    );
    assert!(
        std::fs::write(view.path().join("g"), "x").is_err(),
        "snapshot view must be read-only"
    );
    let path = view.path().to_owned();
    view.close().expect("close view");
    if fx.mode() == "zfs" {
        let datasets = crate::common::sh("zfs", &["list", "-H", "-o", "name"]);
        assert!(
            !datasets.contains("btm-view"),
            "temporary clone left: {datasets}"
        );
        assert!(!path.exists(), "view mountpoint left: {}", path.display());
    }
    assert!(matches!(
        vol.view(999),
        Err(btm::volume::Error::NoSuchSnapshot(999))
    ));
}

pub fn foreign_snapshots_survive_every_command(fx: &impl Fixture) {
    snapshot(fx, 10);
    fx.foreign_snapshot("manual");
    fx.foreign_snapshot("010");
    fx.foreign_snapshot("7x");
    snapshot(fx, 20);
    snapshot(fx, 30);
    assert_eq!(
        fx.heights(),
        vec![30, 20, 10],
        "foreign snapshots are not listed"
    );

    fx.btm(&["prune", "-c", "1"]).ok();
    assert_eq!(fx.heights(), vec![30]);
    fx.btm(&["clean"]).ok();
    assert!(fx.heights().is_empty());

    snapshot(fx, 40);
    snapshot(fx, 50);
    fx.btm(&["rollback", "-s", "40", "--yes"]).ok();
    assert_eq!(fx.heights(), vec![40]);

    fx.write("f", "live");
    fx.foreign_snapshot("later");
    let r = fx.btm(&["rollback", "-s", "40", "--yes"]);
    if fx.mode() == "zfs" {
        // `zfs rollback -r` would destroy @later: refuse, change nothing.
        let err = r.fails(1);
        assert!(err.contains("@later"), "{err}");
        assert_eq!(fx.read("f"), "live");
    } else {
        r.ok();
    }
    fx.btm(&["clean"]).ok();
    for s in ["manual", "010", "7x", "later"] {
        assert!(fx.has_snapshot(s), "foreign snapshot @{s} was destroyed");
    }
}

pub fn retention_matches_simulate(fx: &impl Fixture) {
    for h in (2..=200).step_by(2) {
        fx.btm(&[
            "snapshot",
            "--height",
            &h.to_string(),
            "--prune",
            "-i",
            "2",
            "-c",
            "20",
            "-a",
            "fade",
        ])
        .ok();
    }
    let kept = crate::common::simulate_kept(
        fx.scratch(),
        &["-i", "2", "-c", "20", "-a", "fade", "--blocks", "200"],
    );
    assert_eq!(
        fx.heights(),
        kept,
        "the volume holds exactly what simulate predicts"
    );

    let dry = fx.btm(&["prune", "-c", "2", "--dry-run"]).ok();
    assert!(dry.contains("would delete"), "{dry}");
    assert_eq!(fx.heights(), kept, "--dry-run destroys nothing");
    fx.btm(&["prune", "-c", "2", "-a", "FAIR"]).ok();
    assert_eq!(fx.heights(), kept[..2].to_vec());
}

pub fn rollback_behaviour(fx: &impl Fixture) {
    for (h, v) in [(10, "v10"), (20, "v20"), (30, "v30")] {
        fx.write("f", v);
        snapshot(fx, h);
    }
    fx.write("f", "live");

    let err = fx.btm(&["rollback", "-s", "20"]).fails(1);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(fx.read("f"), "live", "nothing happens without confirmation");

    let err = fx.btm(&["rollback", "-s", "25", "-S", "--yes"]).fails(1);
    assert!(err.contains("exactly height 25"), "{err}");

    let state = "data/priv_validator_state.json";
    fx.write(state, "{\"height\":\"31\",\"round\":0}");
    std::fs::set_permissions(
        fx.root().join(state),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let err = fx
        .btm(&[
            "rollback",
            "-s",
            "25",
            "--yes",
            "--preserve",
            "data/missing.json",
        ])
        .fails(1);
    assert!(err.contains("data/missing.json"), "{err}");
    assert_eq!(
        fx.heights(),
        vec![30, 20, 10],
        "a bad --preserve changes nothing"
    );

    let out = fx
        .btm(&["rollback", "-s", "25", "--yes", "--preserve", state])
        .ok();
    assert!(out.contains("closest below is 20"), "{out}");
    assert!(out.contains("1 newer snapshot(s) (30)"), "{out}");
    assert_eq!(fx.read("f"), "v20");
    assert_eq!(fx.read(state), "{\"height\":\"31\",\"round\":0}");
    let mode = std::fs::metadata(fx.root().join(state))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(fx.heights(), vec![20, 10]);

    fx.write("f", "dirty");
    fx.btm(&["rollback", "-s", "-1", "--yes"]).ok();
    assert_eq!(fx.read("f"), "v20", "negative -s means the latest snapshot");

    fx.btm(&["rollback", "-s", "10", "-S", "--yes"]).ok();
    assert_eq!(fx.read("f"), "v10");
    assert_eq!(fx.heights(), vec![10]);

    // Kept branches hold what they were cloned from (ZFS); dropped, the
    // snapshots are free to go.
    fx.btm(&["branches", "drop", "--all", "--yes"]).ok();
    fx.btm(&["clean"]).ok();
    let err = fx.btm(&["rollback", "--yes"]).fails(1);
    assert!(err.contains("no btm snapshots"), "{err}");
}

/// A rollback without flags keeps every validator signing-state
/// file it finds (CometBFT, and a Lighthouse datadir two levels down), names
/// each in its plan, and `--no-preserve` rolls them back too.
pub fn rollback_keeps_signing_state_by_default(fx: &impl Fixture) {
    let state = "data/priv_validator_state.json";
    let lighthouse = ".lighthouse/mainnet/validators/slashing_protection.sqlite";
    fx.write(state, "{\"height\":\"10\"}");
    fx.write(lighthouse, "slashing db at 10");
    fx.write("f", "v10");
    snapshot(fx, 10);
    fx.write(state, "{\"height\":\"31\"}");
    fx.write(lighthouse, "slashing db at 31");
    fx.write("f", "v20");
    snapshot(fx, 20);
    fx.write("f", "live");

    let out = fx.btm(&["rollback", "-s", "10", "-S", "--yes"]).ok();
    assert!(
        out.contains(&format!(
            "Current content kept: {state} (CometBFT/Tendermint signing state"
        )),
        "{out}"
    );
    assert!(out.contains(lighthouse), "{out}");
    assert_eq!(fx.read("f"), "v10");
    assert_eq!(
        fx.read(state),
        "{\"height\":\"31\"}",
        "signing state never goes back"
    );
    assert_eq!(fx.read(lighthouse), "slashing db at 31");

    let err = fx
        .btm(&[
            "rollback",
            "-s",
            "10",
            "--yes",
            "--no-preserve",
            "--preserve",
            "f",
        ])
        .fails(2);
    assert!(err.contains("--no-preserve"), "{err}");
    let out = fx
        .btm(&["rollback", "-s", "10", "-S", "--yes", "--no-preserve"])
        .ok();
    assert!(out.contains("can double-sign"), "{out}");
    assert_eq!(
        fx.read(state),
        "{\"height\":\"10\"}",
        "--no-preserve rolls it back"
    );
    assert_eq!(fx.read(lighthouse), "slashing db at 10");
}

/// `--preserve` resolves every component without following a
/// symlink, on both sides. A `data` symlink in the target snapshot must not
/// make the preserve write outside the volume; a `data` symlink in the live
/// volume must not make it read a file from outside. Either is refused with
/// nothing changed.
pub fn rollback_preserve_never_follows_symlinks(fx: &impl Fixture) {
    let state = "data/priv_validator_state.json";
    let outside = fx.scratch().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("priv_validator_state.json"), "victim").expect("w");
    std::fs::write(outside.join("secret"), "root-only secret").expect("w");

    // The target snapshot has `data` -> outside.
    std::os::unix::fs::symlink(&outside, fx.root().join("data")).expect("ln");
    snapshot(fx, 10);
    std::fs::remove_file(fx.root().join("data")).expect("rm");
    fx.write(state, "{\"height\":\"99\"}");
    fx.write("f", "live");
    snapshot(fx, 20);
    let err = fx
        .btm(&["rollback", "-s", "10", "-S", "--yes", "--preserve", state])
        .fails(1);
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(
        std::fs::read_to_string(outside.join("priv_validator_state.json")).expect("r"),
        "victim",
        "nothing written outside the volume"
    );
    assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 2);
    assert_eq!(fx.read("f"), "live", "nothing changed");
    assert_eq!(fx.heights(), vec![20, 10]);

    // The live volume has `data` -> outside: the preserve would read it.
    std::fs::remove_dir_all(fx.root().join("data")).expect("rm");
    std::os::unix::fs::symlink(&outside, fx.root().join("data")).expect("ln");
    let err = fx
        .btm(&[
            "rollback",
            "-s",
            "20",
            "-S",
            "--yes",
            "--preserve",
            "data/secret",
        ])
        .fails(1);
    assert!(err.contains("symlink"), "{err}");
    assert!(
        !fx.root().join("data").is_dir()
            || std::fs::symlink_metadata(fx.root().join("data"))
                .expect("m")
                .file_type()
                .is_symlink(),
        "volume unchanged"
    );
    assert_eq!(fx.heights(), vec![20, 10]);
    assert_eq!(fx.read("f"), "live");
}

pub fn clean_keeps_newest(fx: &impl Fixture) {
    for h in [10, 20, 30, 40, 50] {
        snapshot(fx, h);
    }
    let dry = fx.btm(&["clean", "-k", "2", "--dry-run"]).ok();
    assert!(
        dry.contains("would destroy 3 snapshot(s): 30 20 10"),
        "{dry}"
    );
    assert_eq!(fx.heights().len(), 5);
    fx.btm(&["clean", "-k", "2"]).ok();
    assert_eq!(fx.heights(), vec![50, 40]);
    fx.btm(&["clean"]).ok();
    assert!(fx.heights().is_empty());
    assert!(fx.btm(&["clean"]).ok().contains("destroyed 0"));
}

/// A protected snapshot is outside fair and fade pruning, in the
/// CLI and in the daemon, across a daemon restart; `clean` keeps it unless
/// asked by label; `release` returns it to retention. On ZFS the label is a
/// user property other tools see.
pub fn protected_snapshots_survive_pruning_and_a_daemon_restart(fx: &impl Fixture) {
    for h in [10, 20, 30] {
        snapshot(fx, h);
    }
    let out = fx
        .btm(&["snapshot", "--height", "20", "--protect", "v2-upgrade"])
        .ok();
    assert!(out.contains("protected as v2-upgrade"), "{out}");
    if fx.mode() == "zfs" {
        let prop = sh(
            "zfs",
            &[
                "get",
                "-H",
                "-o",
                "value",
                "btm:protect",
                &format!("{}@20", fx.volume()),
            ],
        );
        assert_eq!(prop.trim(), "v2-upgrade");
    }
    let list = fx.btm(&["list"]).ok();
    assert!(list.contains("protected: v2-upgrade"), "{list}");
    for algo in ["fair", "fade"] {
        let dry = fx
            .btm(&["prune", "-i", "10", "-c", "1", "-a", algo, "--dry-run"])
            .ok();
        assert!(
            dry.contains("keep: protected (v2-upgrade)"),
            "{algo}: {dry}"
        );
    }
    fx.btm(&["prune", "-i", "10", "-c", "1", "-a", "fair"]).ok();
    assert_eq!(fx.heights(), vec![30, 20]);

    let vol = fx.volume();
    let args = [
        "-p",
        &vol,
        "-m",
        fx.mode(),
        "-i",
        "10",
        "-c",
        "2",
        "-a",
        "fade",
    ];
    for heights in [[40, 50, 60], [70, 80, 90]] {
        // Twice: the protection is stored with the snapshot, not in the
        // daemon.
        let mut d = DaemonProc::start(fx.scratch(), &args, &[]);
        for h in heights {
            d.notify(h);
        }
        assert_eq!(d.stop(), Some(0));
        let hs = fx.heights();
        assert!(hs.contains(&20), "{hs:?}");
        assert_eq!(hs.len(), 3, "cap 2 plus the protected one: {hs:?}");
    }
    fx.btm(&["clean"]).ok();
    assert_eq!(fx.heights(), vec![20]);
    let out = fx.btm(&["release", "v2-upgrade"]).ok();
    assert!(out.contains("released 20"), "{out}");
    let e = fx.btm(&["release", "v2-upgrade"]).fails(1);
    assert!(
        e.contains("no snapshot is protected with label 'v2-upgrade'"),
        "{e}"
    );
    fx.btm(&["clean"]).ok();
    assert!(fx.heights().is_empty());
}

pub fn destroy_failures_are_reported_one_by_one(fx: &impl Fixture) {
    for h in [10, 20, 30] {
        snapshot(fx, h);
    }
    let pin = fx.pin(20);
    let err = fx.btm(&["clean"]).fails(1);
    assert!(err.contains("could not destroy 1 snapshot(s): 20"), "{err}");
    assert_eq!(
        fx.heights(),
        vec![20],
        "the batch fell back to one at a time"
    );
    drop(pin);
    // Unmounting a FUSE or tmpfs pin can leave the snapshot busy briefly.
    for _ in 0..20 {
        if fx.btm(&["clean"]).code == 0 {
            break;
        }
        sleep(Duration::from_millis(250));
    }
    assert!(fx.heights().is_empty());
}

pub fn detection_only_reads(fx: &impl Fixture) {
    let vol = fx.volume();
    let detected = btm(fx.scratch(), &["list", "--json", "-p", &vol]).ok();
    assert!(
        detected.contains(&format!("\"mode\":\"{}\"", fx.mode())),
        "{detected}"
    );

    let typo = format!("{vol}typo");
    let err = btm(fx.scratch(), &["list", "-p", &typo]).fails(1);
    assert!(err.contains("typo"), "{err}");
    btm(fx.scratch(), &["snapshot", "--height", "1", "-p", &typo]).fails(1);
    let other = if fx.mode() == "zfs" { "btrfs" } else { "zfs" };
    btm(fx.scratch(), &["list", "-p", &vol, "-m", other]).fails(1);
    // Nothing was created for the typo.
    let exists = if fx.mode() == "zfs" {
        std::process::Command::new("zfs")
            .args(["list", &typo])
            .output()
            .is_ok_and(|o| o.status.success())
    } else {
        std::path::Path::new(&typo).exists()
    };
    assert!(!exists, "detection created {typo}");
}

pub fn lock_serialises_processes(fx: &impl Fixture) {
    snapshot(fx, 10);
    // The name the lock is keyed on: the dataset, or the canonical path.
    let key = std::fs::canonicalize(fx.volume())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| fx.volume());
    let lock_path = fx
        .scratch()
        .join("run/locks")
        .join(format!("{}.lock", btm::dirs::escape(&key)));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("lock file exists after a command");
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");

    let vol = fx.volume();
    let mut child = crate::common::btm_cmd(
        fx.scratch(),
        &["snapshot", "--height", "20", "-p", &vol, "-m", fx.mode()],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn");
    sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "btm did not wait for the lock"
    );
    assert!(
        !fx.has_snapshot("20"),
        "snapshot taken while another process held the lock"
    );
    drop(held);
    assert!(child.wait().expect("wait").success());
    assert!(fx.has_snapshot("20"));
}

const STATE: &str = "data/priv_validator_state.json";

fn branches_json(fx: &impl Fixture) -> serde_json::Value {
    serde_json::from_str(&fx.btm(&["branches", "--json"]).ok()).expect("branches --json")
}

fn branch_heights(v: &serde_json::Value, i: usize) -> Vec<u64> {
    v["branches"][i]["heights"]
        .as_array()
        .expect("heights")
        .iter()
        .map(|h| h.as_u64().expect("height"))
        .collect()
}

/// Snapshots 10 … 100, each with its content and signing state, then
/// writes after 100.
fn history(fx: &impl Fixture) {
    for h in (10..=100).step_by(10) {
        fx.write("f", &format!("v{h}"));
        fx.write(STATE, &format!("{{\"height\":\"{h}\"}}"));
        snapshot(fx, h);
    }
    fx.write("f", "live");
    fx.write(STATE, "{\"height\":\"105\"}");
}

fn pool_used(fx: &impl Fixture) -> u64 {
    let vol = fx.volume();
    let pool = vol.split('/').next().expect("pool");
    sh("zfs", &["get", "-Hp", "-o", "value", "used", pool])
        .trim()
        .parse()
        .expect("used")
}

/// The issue's plan: roll back to 50, a new 60, undo, drop.
pub fn rollback_keeps_a_branch_and_undo_returns_to_it(fx: &impl Fixture) {
    history(fx);
    let err = fx.btm(&["rollback", "--undo", "--yes"]).fails(1);
    assert!(err.contains("no branch to go back to"), "{err}");
    let out = fx.btm(&["rollback", "-s", "50", "-S", "--yes"]).ok();
    assert!(
        out.contains("5 newer snapshot(s) (60 70 80 90 100)"),
        "{out}"
    );
    assert!(out.contains("Nothing is destroyed"), "{out}");
    assert_eq!(fx.read("f"), "v50");
    assert_eq!(fx.read(STATE), "{\"height\":\"105\"}", "signing state kept");
    assert_eq!(fx.heights(), vec![50, 40, 30, 20, 10]);
    let b = branches_json(fx);
    assert_eq!(b["branches"].as_array().expect("list").len(), 1, "{b}");
    assert_eq!(branch_heights(&b, 0), vec![100, 90, 80, 70, 60]);
    assert_eq!(b["branches"][0]["fork"], 50);
    let list: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    assert_eq!(list["branches"].as_array().expect("branches").len(), 1);

    // The new line takes its own 60; the validator state advances.
    fx.write("f", "new60");
    fx.write(STATE, "{\"height\":\"110\"}");
    snapshot(fx, 60);
    assert_eq!(fx.heights(), vec![60, 50, 40, 30, 20, 10]);
    // Weight on the new line, so its branch holds space.
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(fx.root().join("big"), &big).expect("big");
    sh("sync", &[]);

    let out = fx.btm(&["rollback", "--undo", "--yes"]).ok();
    assert!(out.contains("switched to branch"), "{out}");
    assert_eq!(fx.read("f"), "live", "the exact pre-rollback content");
    assert!(!fx.root().join("big").exists());
    assert_eq!(
        fx.read(STATE),
        "{\"height\":\"110\"}",
        "the newest signing state"
    );
    assert_eq!(fx.heights(), vec![100, 90, 80, 70, 60, 50, 40, 30, 20, 10]);
    let b = branches_json(fx);
    assert_eq!(b["branches"].as_array().expect("list").len(), 1, "{b}");
    assert_eq!(branch_heights(&b, 0), vec![60], "the new line's 60 is kept");
    let name = b["branches"][0]["name"].as_str().expect("name").to_owned();

    // Bad input, one line each, nothing changed.
    let err = fx.btm(&["rollback", "--branch", "nope", "--yes"]).fails(1);
    assert!(err.contains("no branch named 'nope'"), "{err}");
    let err = fx
        .btm(&["rollback", "-s", "90", "--keep-as", &name, "--yes"])
        .fails(1);
    assert!(err.contains("already exists"), "{err}");
    let err = fx.btm(&["branches", "drop", "--all"]).fails(1);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(fx.read("f"), "live");

    let before = (fx.mode() == "zfs").then(|| pool_used(fx));
    let out = fx.btm(&["branches", "drop", "--all", "--yes"]).ok();
    assert!(out.contains(&format!("dropped branch {name}")), "{out}");
    assert!(branches_json(fx)["branches"]
        .as_array()
        .expect("list")
        .is_empty());
    if let Some(before) = before {
        let after = pool_used(fx);
        assert!(
            after + (6 << 20) < before,
            "dropping freed {before} -> {after}"
        );
    }
    assert_eq!(fx.heights(), vec![100, 90, 80, 70, 60, 50, 40, 30, 20, 10]);
}

/// A rollback and an undo each stopped after every step, then run again:
/// the end state is the uninterrupted one.
pub fn a_switch_stopped_after_any_step_is_finished_by_a_rerun(fx: &impl Fixture) {
    history(fx);
    // Every step the driver reports, as the driver names them.
    let dirs = btm::dirs::Dirs::under(fx.scratch());
    let mode = fx.mode().parse().expect("mode");
    let steps = btm::volume::open(&fx.volume(), Some(mode), &dirs)
        .expect("open")
        .switch_steps();
    assert!(steps.len() >= 6, "{steps:?}");
    let vol = fx.volume();
    let with_volume = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-p", &vol, "-m", fx.mode()]);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for step in steps {
        for (cmd, f, heights) in [
            (
                &["rollback", "-s", "50", "--yes"][..],
                "v50",
                vec![50u64, 40, 30, 20, 10],
            ),
            (
                &["rollback", "--undo", "--yes"][..],
                "live",
                vec![100, 90, 80, 70, 60, 50, 40, 30, 20, 10],
            ),
        ] {
            let args = with_volume(cmd);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let err =
                crate::common::btm_env(fx.scratch(), &args, &[("BTM_CRASH_AFTER", step)]).fails(1);
            assert!(
                err.contains(&format!("stopped after step '{step}'")),
                "{step}: {err}"
            );
            let list = fx.btm(&["list"]).ok();
            assert!(list.contains("left half done"), "{step}: {list}");
            let err = fx.btm(&["rollback", "-s", "10", "--yes"]).fails(1);
            assert!(err.contains("half done"), "{step}: {err}");
            let out = fx.btm(cmd).ok();
            assert!(out.contains("Finishing"), "{step}: {out}");
            assert_eq!(fx.read("f"), f, "{step} {cmd:?}");
            assert_eq!(fx.read(STATE), "{\"height\":\"105\"}", "{step}");
            assert_eq!(fx.heights(), heights, "{step} {cmd:?}");
        }
    }
    // Every switch kept its line: one branch per switch, none lost.
    let b = branches_json(fx);
    assert_eq!(
        b["branches"].as_array().expect("list").len(),
        steps.len(),
        "{b}"
    );
}
