//! The Cosmovisor pre-upgrade hook (`packaging/cosmovisor/btm-preupgrade.sh`),
//! run exactly as Cosmovisor runs a `COSMOVISOR_CUSTOM_PREUPGRADE` script:
//! `$DAEMON_HOME/cosmovisor/<script> <upgrade-name> <upgrade-height>`, from
//! `$DAEMON_HOME`, with Cosmovisor's environment; a non-zero exit fails the
//! upgrade. On a real btrfs volume with a running daemon: the snapshot is
//! taken at the upgrade height (not a multiple of itv) and protected with
//! the upgrade's name, retention keeps it, a failed upgrade is rolled back
//! to it with the signing state kept, and a daemon that is down fails the
//! upgrade.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Btrfs, DaemonProc, Fixture};

/// `$DAEMON_HOME` with the hook installed where Cosmovisor looks for it.
fn daemon_home(scratch: &Path) -> PathBuf {
    let home = scratch.join("gaiad-home");
    std::fs::create_dir_all(home.join("cosmovisor")).expect("mkdir");
    let hook = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("packaging/cosmovisor/btm-preupgrade.sh");
    std::fs::copy(hook, home.join("cosmovisor/btm-preupgrade.sh")).expect("copy hook");
    home
}

/// Run the hook as Cosmovisor does.
fn cosmovisor_runs_hook(home: &Path, socket: &Path, name: &str, height: &str) -> Output {
    let btm_dir = Path::new(env!("CARGO_BIN_EXE_btm"))
        .parent()
        .expect("bin dir")
        .to_owned();
    Command::new(home.join("cosmovisor/btm-preupgrade.sh"))
        .args([name, height])
        .current_dir(home)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", btm_dir.display()))
        .env("DAEMON_HOME", home)
        .env("DAEMON_NAME", "gaiad")
        .env("COSMOVISOR_CUSTOM_PREUPGRADE", "btm-preupgrade.sh")
        .env("DAEMON_RESTART_AFTER_UPGRADE", "true")
        .env("UNSAFE_SKIP_BACKUP", "true")
        .env("BTM_SOCKET", socket)
        .output()
        .expect("the hook runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_pre_upgrade_hook_protects_the_upgrade_snapshot_and_a_rollback_returns_to_it() {
    let fx = Btrfs::new();
    fx.write("data/priv_validator_state.json", "signed up to 25");
    fx.write("data/application.db", "state at 25");
    let home = daemon_home(fx.scratch());
    let vol = fx.volume();
    let args = [
        "-p", &vol, "-m", "btrfs", "-i", "10", "-c", "3", "-a", "fair",
    ];
    let mut d = DaemonProc::start(fx.scratch(), &args, &[]);
    d.notify(10);
    d.notify(20);

    // The chain halts at the upgrade height; Cosmovisor runs the hook.
    let o = cosmovisor_runs_hook(&home, &d.socket, "v2.0-Vega", "25");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("btm rollback --to-protected v2.0-Vega"),
        "{}",
        text(&o)
    );
    let list = fx.btm(&["list"]).ok();
    assert!(list.contains("protected: v2.0-Vega"), "{list}");

    // The new binary runs for a while; retention never touches the
    // upgrade's snapshot.
    for h in [30, 40, 50, 60] {
        d.notify(h);
    }
    assert_eq!(fx.heights(), vec![60, 50, 40, 25]);

    // The upgrade went wrong: stop, roll back to the upgrade's snapshot.
    fx.write("data/priv_validator_state.json", "signed up to 61");
    fx.write("data/application.db", "broken by the upgrade");
    assert_eq!(d.stop(), Some(0));
    let out = fx
        .btm(&["rollback", "--to-protected", "v2.0-Vega", "--yes"])
        .ok();
    assert!(out.contains("to height 25"), "{out}");
    assert_eq!(fx.read("data/application.db"), "state at 25");
    assert_eq!(
        fx.read("data/priv_validator_state.json"),
        "signed up to 61",
        "the signing state is never rolled back"
    );

    // With the daemon down, the hook fails the upgrade.
    let o = cosmovisor_runs_hook(&home, &d.socket, "v3", "70");
    assert!(!o.status.success());
    assert!(text(&o).contains("must not go on"), "{}", text(&o));
    // And it refuses what Cosmovisor would never pass.
    let o = cosmovisor_runs_hook(&home, &d.socket, "v3", "seventy");
    assert!(!o.status.success());
    assert!(text(&o).contains("not a block height"), "{}", text(&o));
}
