//! What a node that embeds btm relies on: the seed's library snippet
//! compiles unchanged against this crate, and the crate stays light (no
//! async runtime, no cloud SDK, at most 40 crates built).

use std::process::Command;

use btm::{BtmCfg, SnapAlgo, SnapMode};

/// The original btm README's library usage, verbatim. Compiled, not run:
/// it needs a ZFS pool named zroot.
#[allow(dead_code, unused_must_use, clippy::unwrap_used)]
fn seed_snippet() {
    let cfg = BtmCfg {
        itv: 10,
        cap: 100,
        mode: SnapMode::Zfs,
        algo: SnapAlgo::Fade,
        volume: "zroot/data".to_owned(),
    };

    // Generate snapshots in some threads.
    cfg.snapshot(0).unwrap();
    cfg.snapshot(1).unwrap();
    cfg.snapshot(11).unwrap();

    // Print all existing snapshots.
    cfg.list_snapshots();

    // Rollback to the state of the last snapshot.
    cfg.rollback(None, false).unwrap();

    // Rollback to the state of a custom snapshot.
    cfg.rollback(Some(11), true).unwrap();
}

#[test]
fn defaults_are_the_seeds_and_an_empty_volume_is_refused() {
    let cfg = BtmCfg::default();
    assert_eq!((cfg.itv, cfg.cap, cfg.algo), (10, 100, SnapAlgo::Fair));
    let e = cfg.list_snapshots().expect_err("no volume");
    assert!(e.to_string().contains("volume"), "{e}");
}

#[test]
fn the_library_builds_few_crates_and_no_runtime_or_cloud_sdk() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "btm",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .args(["--offline", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut crates: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    crates.sort_unstable();
    crates.dedup();
    for banned in [
        "tokio",
        "object_store",
        "futures",
        "reqwest",
        "hyper",
        "ureq",
    ] {
        assert!(!crates.contains(&banned), "{banned} in {crates:?}");
    }
    assert!(
        !crates.iter().any(|c| c.starts_with("aws")),
        "an AWS crate in {crates:?}"
    );
    assert!(crates.len() <= 40, "{} crates: {crates:?}", crates.len());
}
