//! Every command on a real btrfs volume, in a throwaway loop-mounted image.
//! Needs root; fails (never skips) when the filesystem cannot be set up.

mod common;
#[macro_use]
mod scenarios;

all_scenarios!(common::Btrfs::new);

/// With quotas enabled, btrfs reports each snapshot's exclusive bytes.
#[test]
fn space_used_is_reported_with_quotas() {
    use common::{sh, Fixture};
    let fx = common::Btrfs::new();
    sh(
        "btrfs",
        &["quota", "enable", fx.root().to_str().expect("utf8")],
    );
    fx.write("big", &"x".repeat(1 << 20));
    fx.btm(&["snapshot", "--height", "10"]).ok();
    std::fs::remove_file(fx.root().join("big")).expect("rm");
    fx.btm(&["snapshot", "--height", "20"]).ok();
    sh(
        "btrfs",
        &["quota", "rescan", "-w", fx.root().to_str().expect("utf8")],
    );
    let json: serde_json::Value =
        serde_json::from_str(&fx.btm(&["list", "--json"]).ok()).expect("json");
    let used: Vec<u64> = json["snapshots"]
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["used"].as_u64().expect("used reported with quotas on"))
        .collect();
    // Snapshot 10 alone holds the 1 MiB file that was deleted afterwards.
    assert!(used[1] >= 1 << 20, "{json}");
}

/// A subvolume that is itself a mount point cannot be swapped by rename:
/// the rollback says so and leaves the volume and its snapshots as they were.
#[test]
fn rollback_of_a_mounted_subvolume_is_refused_cleanly() {
    use common::{btm, sh, Fixture};
    let fx = common::Btrfs::new();
    fx.write("f", "ten");
    // Mount the `data` subvolume again, inside the same filesystem.
    let parent = fx.root().parent().expect("mnt").join("m");
    std::fs::create_dir(&parent).expect("mkdir");
    let mounted = parent.join("data");
    std::fs::create_dir(&mounted).expect("mkdir");
    let img = fx.scratch().join("fs.img");
    sh(
        "mount",
        &[
            "-o",
            "loop,subvol=data",
            img.to_str().expect("utf8"),
            mounted.to_str().expect("utf8"),
        ],
    );
    let _unmount = common::Guard::new({
        let m = mounted.clone();
        move || {
            let _ = std::process::Command::new("umount").arg(&m).status();
        }
    });
    let vol = mounted.to_str().expect("utf8");
    btm(
        fx.scratch(),
        &["snapshot", "--height", "10", "-p", vol, "-m", "btrfs"],
    )
    .ok();
    fx.write("f", "live");
    let err = btm(
        fx.scratch(),
        &["rollback", "--yes", "-p", vol, "-m", "btrfs"],
    )
    .fails(1);
    assert!(err.contains("mount point"), "{err}");
    assert_eq!(fx.read("f"), "live");
    let left: Vec<String> = std::fs::read_dir(&parent)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.contains("btm-rollback")),
        "scratch left: {left:?}"
    );
    assert!(parent.join("data@10").exists());
}

/// A branch's space is its subvolumes' exclusive bytes when quotas are on;
/// one whose live subvolume was deleted by hand is shown damaged, cannot be
/// entered, and can still be dropped.
#[test]
fn branch_space_with_quotas_and_a_branch_removed_by_hand() {
    use common::{sh, Fixture};
    let fx = common::Btrfs::new();
    let root = fx.root();
    sh("btrfs", &["quota", "enable", root.to_str().expect("utf8")]);
    fx.write("f", "v10");
    fx.btm(&["snapshot", "--height", "10"]).ok();
    fx.write("only-live", &"y".repeat(2 << 20));
    fx.btm(&["rollback", "-s", "10", "--keep-as", "mine", "--yes"])
        .ok();
    sh(
        "btrfs",
        &["quota", "rescan", "-w", root.to_str().expect("utf8")],
    );
    let v: serde_json::Value =
        serde_json::from_str(&fx.btm(&["branches", "--json"]).ok()).expect("json");
    let used = v["branches"][0]["used"]
        .as_u64()
        .expect("used with quotas on");
    assert!(
        used >= 2 << 20,
        "{v}\n{}",
        sh(
            "btrfs",
            &["qgroup", "show", "--raw", root.to_str().expect("utf8")]
        )
    );

    let branch = root.with_file_name("data.btm-branch.mine");
    sh(
        "btrfs",
        &["subvolume", "delete", branch.to_str().expect("utf8")],
    );
    let listed = fx.btm(&["branches"]).ok();
    assert!(listed.contains("DAMAGED"), "{listed}");
    let err = fx.btm(&["rollback", "--branch", "mine", "--yes"]).fails(1);
    assert!(err.contains("removed by hand"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(fx.read("f"), "v10");
    fx.btm(&["branches", "drop", "mine", "--yes"]).ok();
    assert!(fx.btm(&["branches"]).ok().contains("no branches"));
}
