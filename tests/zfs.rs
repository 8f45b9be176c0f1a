//! Every command on a real zfs volume (zfs in a throwaway zfs-fuse pool in a file).
//! Needs root; fails (never skips) when the filesystem cannot be set up.

mod common;
mod scenarios;

macro_rules! on_zfs {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let fx = common::Zfs::new();
                scenarios::$name(&fx);
            }
        )*
    };
}

on_zfs!(
    snapshot_list_and_existing_height,
    foreign_snapshots_survive_every_command,
    retention_matches_simulate,
    rollback_behaviour,
    clean_keeps_newest,
    destroy_failures_are_reported_one_by_one,
    detection_only_reads,
    lock_serialises_processes,
);
