//! Every command on a real ZFS volume, in a throwaway zfs-fuse pool in a file.
//! Needs root; fails (never skips) when the filesystem cannot be set up.

mod common;
#[macro_use]
mod scenarios;

all_scenarios!(common::Zfs::new);

/// zfs-fuse has no `.zfs` directory, so views are temporary clones. One
/// left by a process that died (here: a pid that cannot exist) is removed
/// by the next view; a foreign clone with a similar name is not.
#[test]
fn stale_view_clones_are_cleaned_up() {
    use common::{sh, Fixture};
    let fx = common::Zfs::new();
    fx.btm(&["snapshot", "--height", "10"]).ok();
    let snap = format!("{}@10", fx.volume());
    let stale = format!("{}/btm-view.{}.data.10.4194305", fx.pool, fx.pool);
    let foreign = format!("{}/btm-view-mine", fx.pool);
    sh("zfs", &["clone", "-o", "mountpoint=none", &snap, &stale]);
    sh("zfs", &["clone", "-o", "mountpoint=none", &snap, &foreign]);

    let dirs = btm::dirs::Dirs::under(fx.scratch());
    let vol = btm::volume::open(&fx.volume(), Some(btm::SnapMode::Zfs), &dirs).expect("open");
    let view = vol.view(10).expect("view");
    drop(view);
    let left = sh("zfs", &["list", "-H", "-o", "name", "-r", &fx.pool]);
    assert!(!left.contains(&stale), "stale clone survived: {left}");
    assert!(
        left.contains(&foreign),
        "a clone btm did not make was destroyed: {left}"
    );
    assert!(
        !left.contains("btm-view."),
        "view clone not destroyed on drop: {left}"
    );
    sh("zfs", &["destroy", &foreign]);
}

/// What a rollback cannot do safely on ZFS is refused before the first
/// step, in one line naming what is in the way, and changes nothing: child
/// datasets, a dataset cloned from something btm did not make, and a pool
/// with no room left for the clone.
#[test]
fn unsafe_rollbacks_are_refused_before_anything_changes() {
    use common::{sh, Fixture};
    let fx = common::Zfs::new();
    let vol = fx.volume();
    fx.write("f", "v10");
    fx.btm(&["snapshot", "--height", "10"]).ok();
    fx.write("f", "live");
    let unchanged = |fx: &common::Zfs| {
        assert_eq!(fx.read("f"), "live");
        assert_eq!(fx.heights(), vec![10]);
        let names = sh("zfs", &["list", "-H", "-o", "name", "-r", &fx.pool]);
        assert!(!names.contains("btm-"), "{names}");
    };

    let child = format!("{vol}/child");
    sh("zfs", &["create", &child]);
    let err = fx.btm(&["rollback", "-s", "10", "--yes"]).fails(1);
    assert!(
        err.contains("child datasets") && err.contains(&child),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    unchanged(&fx);
    destroy_when_not_busy(&child);

    let fill = fx.root().join("fill");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=400", "status=none"])
        .stderr(std::process::Stdio::null())
        .arg(format!("of={}", fill.display()))
        .status();
    let err = fx.btm(&["rollback", "-s", "10", "--yes"]).fails(1);
    assert!(err.contains("bytes available"), "{err}");
    assert_eq!(fx.read("f"), "live");
    std::fs::remove_file(&fill).expect("rm");
    sh("sync", &[]);

    let src = format!("{}/src", fx.pool);
    let clone = format!("{}/cl", fx.pool);
    sh("zfs", &["create", &src]);
    sh("zfs", &["snapshot", &format!("{src}@x")]);
    sh("zfs", &["clone", &format!("{src}@x"), &clone]);
    let c = common::btm(
        fx.scratch(),
        &["snapshot", "--height", "5", "-p", &clone, "-m", "zfs"],
    );
    c.ok();
    let err = common::btm(
        fx.scratch(),
        &["rollback", "-s", "5", "--yes", "-p", &clone, "-m", "zfs"],
    )
    .fails(1);
    assert!(err.contains(&format!("clone of {src}@x")), "{err}");
    destroy_when_not_busy(&clone);
    destroy_when_not_busy(&src);
    fx.btm(&["rollback", "-s", "10", "--yes"]).ok();
    assert_eq!(fx.read("f"), "v10");
}

/// `zfs destroy -r NAME`, tried again while zfs-fuse says it is busy (a
/// just-mounted dataset is, for a moment).
fn destroy_when_not_busy(name: &str) {
    for _ in 0..50 {
        let out = std::process::Command::new("zfs")
            .args(["destroy", "-r", name])
            .output()
            .expect("zfs");
        if out.status.success() {
            return;
        }
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("busy"),
            "zfs destroy {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{name} stayed busy");
}
