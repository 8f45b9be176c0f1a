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
    let crates = cargo_tree(&["-p", "btm", "-e", "normal,build"]);
    let crates: Vec<&str> = crates.iter().map(String::as_str).collect();
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

/// The chunk engine sits on this library's low-level pieces only (syscalls,
/// confined paths, the host's identity, path rules): node policy (which
/// files are keys, which are signing state) is handed to it, never looked
/// up. Its direct dependencies are a known list: a new one is a decision
/// that updates this test, never an accident.
#[test]
fn the_chunk_engine_uses_only_the_low_level_pieces_and_known_crates() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../chunk/src");
    let allowed = ["sys", "confined", "host", "pathrule"];
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for (i, _) in text.match_indices("btm::") {
                let before = text[..i].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let module: String = text[i + 5..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    allowed.contains(&module.as_str()),
                    "{} uses btm::{module}; the engine takes policy in its options",
                    path.display()
                );
            }
        }
    }
    let direct = cargo_tree(&["-p", "btm-chunk", "-e", "normal", "--depth", "1"]);
    let direct: Vec<&str> = direct
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "btm-chunk")
        .collect();
    let known = [
        "async-trait",
        // Publishing: keys and signatures as text (crate::public).
        "base64",
        "blake3",
        "btm",
        "bytes",
        "chrono",
        "crossbeam-channel",
        // Publishing signs catalogs and heads with ed25519; getrandom makes keys.
        "ed25519-dalek",
        "futures",
        "getrandom",
        "http",
        "http-body",
        "humantime",
        "libc",
        "nix",
        "object_store",
        "regex",
        "reqwest",
        "serde",
        "serde_json",
        "tempfile",
        "thiserror",
        "tokio",
        "tracing",
        "zstd",
    ];
    assert_eq!(direct, known, "btm-chunk's direct dependencies changed");
}

/// The crates `cargo tree` lists with `args`, sorted, each once.
fn cargo_tree(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .arg("tree")
        .args(args)
        .args(["--prefix", "none", "--offline", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut crates: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    crates.sort_unstable();
    crates.dedup();
    crates
}
