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
