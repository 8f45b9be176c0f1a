//! Garbage collection with packs, at library level on a local store: it
//! never deletes what a running backup relies on, waits out the grace
//! period, deletes dead packs and repacks sparse ones, collects the packs a
//! dead writer left unindexed, leaves a valid store when it fails at any
//! step, and never loses data beside concurrent backups. After every step
//! the store checks clean (`check --read-data`) and backups restore exactly.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use btm_chunk::backup::{BackupOptions, BackupSummary};
use btm_chunk::gc::{GcOptions, GcReport};
use btm_chunk::store::{Kind, LocalStore, Store};
use btm_chunk::{ChunkError, Policy, Repo};
use common::{btm, noise};

const MIB: usize = 1 << 20;

fn tree(dir: &Path, files: &[(&str, u64, usize)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, seed, len) in files {
        std::fs::write(dir.join(name), noise(*seed, *len)).expect("write");
    }
}

fn store_at(dir: &Path) -> Arc<LocalStore> {
    Arc::new(LocalStore::open(dir.to_str().expect("utf8")).expect("store"))
}

fn opts(tag: &str) -> BackupOptions {
    let mut o = BackupOptions::new(tag, Policy::NONE);
    o.chunk_size = MIB as u64;
    o
}

/// `store` (a shared handle) without a cache, two requests in flight.
fn repo<S: Store + 'static>(store: &Arc<S>) -> Repo {
    Repo::new(Arc::clone(store) as Arc<dyn Store>)
        .with_cache(None)
        .with_connections(Some(2))
}

fn backup<S: Store + 'static>(
    store: &Arc<S>,
    src: &Path,
    o: &BackupOptions,
) -> Result<BackupSummary, ChunkError> {
    repo(store).backup(src, o)
}

fn gc<S: Store + 'static>(store: &Arc<S>, o: &GcOptions) -> Result<GcReport, ChunkError> {
    repo(store).gc(o)
}

fn gc_with(grace: Duration, dry_run: bool) -> GcOptions {
    GcOptions { grace, dry_run }
}

fn gc_now() -> GcOptions {
    gc_with(Duration::ZERO, false)
}

#[track_caller]
fn check_clean<S: Store + 'static>(store: &Arc<S>) {
    let r = repo(store).check(true).expect("check");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

fn count(store: &dyn Store, kind: Kind) -> usize {
    store.list(kind).expect("list").len()
}

/// Restore `name` with the CLI and compare it with `expected`.
#[track_caller]
fn restore_equals(store: &Path, name: &str, expected: &Path, scratch: &Path) {
    let dst = scratch.join(format!("restore-{}", name.replace(':', "")));
    let _ = std::fs::remove_dir_all(&dst);
    btm(
        scratch,
        &[
            "restore",
            name,
            dst.to_str().expect("utf8"),
            "-s",
            store.to_str().expect("utf8"),
        ],
    )
    .ok();
    common::sh(
        "diff",
        &[
            "-r",
            expected.to_str().expect("utf8"),
            dst.to_str().expect("utf8"),
        ],
    );
}

#[test]
fn gc_never_deletes_chunks_a_running_backup_relies_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    tree(&src, &[("a", 1, 2 * MIB), ("b", 2, 2 * MIB)]);
    let store_dir = dir.path().join("store");
    let store = store_at(&store_dir);

    // Another node's backup of the same bytes, then deleted by retention:
    // its pack is garbage, and GC marks it.
    let first = backup(&store, &src, &opts("other")).expect("backup");
    store.delete_index(&first.name).expect("delete");
    let r = gc(&store, &gc_now()).expect("gc");
    assert!(r.marked >= 1 && r.packs_deleted == 0, "{r:?}");

    // A slow backup now finds those chunks in the store and relies on them
    // without uploading. A sweep while it runs must not delete them.
    let mut slow = opts("node");
    slow.max_rate = Some(MIB as u64);
    let (during, summary) = std::thread::scope(|s| {
        let h = s.spawn(|| backup(&store, &src, &slow));
        sleep(Duration::from_millis(800));
        let during = gc(&store, &gc_now()).expect("gc during backup");
        (during, h.join().expect("join").expect("backup"))
    });
    assert!(during.deferred.is_some(), "sweep must wait: {during:?}");
    assert_eq!(during.packs_deleted, 0);
    assert_eq!(summary.chunks_uploaded, 0, "the chunks were known");

    // Afterwards the sweep runs, re-checks against the new index, and
    // deletes nothing that it references.
    let after = gc(&store, &gc_now()).expect("gc after");
    assert!(after.deferred.is_none(), "{after:?}");
    assert_eq!(
        (after.marks_swept, after.packs_deleted),
        (1, 0),
        "{after:?}"
    );
    check_clean(&store);
    restore_equals(&store_dir, &summary.name, &src, dir.path());
}

#[test]
fn a_live_sweep_makes_backups_wait_for_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    tree(&src, &[("a", 3, 100_000)]);
    let store = Arc::new(store_at(&dir.path().join("store")));
    store
        .put_marker("locks/sweep-othernode-1-1-0", b"{}")
        .expect("marker");
    let remover = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            sleep(Duration::from_secs(3));
            store
                .delete_marker("locks/sweep-othernode-1-1-0")
                .expect("delete");
        })
    };
    let started = Instant::now();
    backup(store.as_ref(), &src, &opts("t")).expect("backup");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the backup did not wait for the sweep ({:?})",
        started.elapsed()
    );
    remover.join().expect("join");
    assert!(store.list_markers("locks").expect("list").is_empty());

    // A backup waiting for a sweep can be cancelled (the daemon stopping).
    store
        .put_marker("locks/sweep-othernode-1-1-1", b"{}")
        .expect("marker");
    let o = opts("t");
    let cancel = Arc::clone(&o.progress);
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| backup(store.as_ref(), &src, &o));
        sleep(Duration::from_millis(500));
        cancel.cancel.cancel();
        h.join().expect("join")
    });
    assert!(
        matches!(result, Err(btm_chunk::ChunkError::Cancelled)),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        store.list_markers("locks").expect("list").len(),
        1,
        "only the sweep's"
    );
}

/// Three backups in their own packs: p0 = {f, g}, p1 = {a, b, d, e},
/// p2 = {c} (a is shared with the last backup). The first two are deleted:
/// p0 is dead, p1 is a quarter live.
#[test]
fn dead_packs_go_and_sparse_packs_are_repacked_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tmp");
    let store_dir = dir.path().join("store");
    let store = store_at(&store_dir);
    let (v0, v1, v2) = (
        dir.path().join("v0"),
        dir.path().join("v1"),
        dir.path().join("v2"),
    );
    tree(&v0, &[("f", 9, MIB), ("g", 8, MIB)]);
    tree(
        &v1,
        &[
            ("a", 10, MIB),
            ("b", 11, MIB),
            ("d", 13, MIB),
            ("e", 14, MIB),
        ],
    );
    tree(&v2, &[("a", 10, MIB), ("c", 12, MIB)]);
    let b0 = backup(&store, &v0, &opts("t0")).expect("b0");
    let b1 = backup(&store, &v1, &opts("t1")).expect("b1");
    let b2 = backup(&store, &v2, &opts("t2")).expect("b2");
    assert_eq!(count(&store, Kind::Pack), 3);
    store.delete_index(&b0.name).expect("retention");
    store.delete_index(&b1.name).expect("retention");

    let day = gc_with(btm_chunk::gc::DEFAULT_GRACE, false);
    let r = gc(&store, &day).expect("gc");
    assert!(
        r.marked >= 2 && r.pending == 0 && r.packs_deleted == 0,
        "{r:?}"
    );
    let r = gc(&store, &day).expect("gc again");
    assert!(
        r.marked == 0 && r.pending >= 2 && r.packs_deleted == 0,
        "{r:?}"
    );
    let dry = gc(&store, &gc_with(Duration::ZERO, true)).expect("dry run");
    assert_eq!((dry.packs_deleted, dry.packs_repacked), (1, 1), "{dry:?}");
    assert_eq!(count(&store, Kind::Pack), 3, "dry run changed the store");
    let r = gc(&store, &gc_now()).expect("gc after grace");
    assert_eq!(
        (r.packs_deleted, r.packs_repacked, r.marks_swept),
        (1, 1, 1),
        "{r:?}"
    );
    assert!(r.bytes_freed >= 5 * MIB as u64, "{r:?}");
    assert_eq!(count(&store, Kind::Pack), 2, "c's pack and a's new one");
    assert!(store.list_markers("gc").expect("list").is_empty());
    check_clean(&store);
    restore_equals(&store_dir, &b2.name, &v2, dir.path());

    // The CLI runs the same code and reports it.
    let out = btm(
        dir.path(),
        &["gc", "-s", store_dir.to_str().expect("utf8"), "--json"],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["referenced"], 2, "{v}");
    btm(
        dir.path(),
        &[
            "gc",
            "-s",
            store_dir.to_str().expect("utf8"),
            "--grace",
            "soon",
        ],
    )
    .fails(2);
    // A mistyped store is an error, not an empty store.
    let err = btm(dir.path(), &["gc", "-s", "/nonexistent/store"]).fails(1);
    assert!(err.contains("no such directory"), "{err}");
    btm(dir.path(), &["backups", "-s", "/nonexistent/store"]).fails(1);
}

/// A lease whose holder died lists a pack it uploaded but never indexed.
/// The next backup of data in it reuses it; GC deletes one nobody adopts.
#[test]
fn packs_a_dead_writer_left_are_adopted_or_collected() {
    let dir = tempfile::tempdir().expect("tmp");
    let store_dir = dir.path().join("store");
    let store = store_at(&store_dir);
    let pack_of = |seed: u64| {
        let data = noise(seed, MIB);
        let mut b = btm_chunk::format::pack::PackBuilder::with_capacity(0);
        let frame = zstd::bulk::compress(&data, 1).expect("zstd");
        b.push(btm_chunk::store::Id::of(&data), MIB as u32, &frame);
        let sealed = b.seal().expect("seal");
        store
            .put(Kind::Pack, &sealed.id, sealed.data.clone())
            .expect("put");
        sealed.id
    };
    let (adoptable, orphan) = (pack_of(60), pack_of(61));
    let body = serde_json::json!({
        "kind": "backup", "host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00Z",
        "pending": [adoptable.to_hex(), orphan.to_hex()],
    });
    let lease = "locks/backup-elsewhere-1-0-0";
    store
        .put_marker(lease, body.to_string().as_bytes())
        .expect("marker");
    // Expire it: eleven minutes old by the store's clock.
    let f = std::fs::File::options()
        .write(true)
        .open(store_dir.join(lease))
        .expect("open");
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(660))
        .expect("mtime");

    // A backup of the data in `adoptable` reuses it.
    let src = dir.path().join("src");
    tree(&src, &[("x", 60, MIB)]);
    let s = backup(&store, &src, &opts("t")).expect("backup");
    assert_eq!(s.chunks_uploaded, 0, "{s:?}");
    assert!(
        store.list_markers("locks").expect("list").is_empty(),
        "the dead lease was settled"
    );
    check_clean(&store);

    // Nobody wants `orphan`: GC finds it through the dead lease... which
    // the adopting backup already settled, so it is not in any index and
    // not in any lease. Make another dead writer that left it.
    store
        .put_marker(
            "locks/backup-elsewhere-2-0-0",
            serde_json::json!({"kind":"backup","host":"elsewhere","pid":2,"started":"2026-01-01T00:00:00Z","pending":[orphan.to_hex()]})
                .to_string()
                .as_bytes(),
        )
        .expect("marker");
    let f = std::fs::File::options()
        .write(true)
        .open(store_dir.join("locks/backup-elsewhere-2-0-0"))
        .expect("open");
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(660))
        .expect("mtime");
    let r = gc(&store, &gc_now()).expect("mark");
    assert!(r.marked >= 1, "{r:?}");
    assert!(store.list_markers("locks").expect("list").is_empty());
    let r = gc(&store, &gc_now()).expect("sweep");
    assert_eq!(r.packs_deleted, 1, "{r:?}");
    assert!(
        store.size(Kind::Pack, &orphan).is_err(),
        "the orphan is gone"
    );
    assert!(
        store.size(Kind::Pack, &adoptable).is_ok(),
        "the adopted pack stays"
    );
    check_clean(&store);
    restore_equals(&store_dir, &s.name, &src, dir.path());
}

/// Old backup {a, b, c} in one pack, new backup {a, d}; the old one is
/// deleted, so its pack is repacked (a is live) and the rest goes. The
/// sweep is made to fail at every put and every delete in turn: each time
/// the store checks clean, the new backup restores exactly, and the next
/// GC finishes the job.
#[test]
fn a_gc_that_fails_at_any_step_leaves_a_valid_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    let base = dir.path().join("base");
    tree(&src, &[("a", 20, MIB), ("b", 21, MIB), ("c", 22, MIB)]);
    let store = store_at(&base);
    let old = backup(&store, &src, &opts("t")).expect("old");
    std::fs::remove_file(src.join("b")).expect("rm");
    std::fs::remove_file(src.join("c")).expect("rm");
    tree(&src, &[("d", 23, MIB)]);
    let new = backup(&store, &src, &opts("t")).expect("new");
    store.delete_index(&old.name).expect("retention");
    gc(&store, &gc_now()).expect("mark");

    // Per kind of injected failure: how many runs failed, and whether the
    // last (largest) budget got through, which proves that every earlier
    // step was made to fail once.
    let mut outcomes: Vec<(bool, bool)> = Vec::new();
    for (puts, deletes) in (0..4)
        .map(|p| (p, i64::MAX))
        .chain((0..8).map(|d| (i64::MAX, d)))
    {
        let copy = dir.path().join(format!("s-{puts}-{deletes}"));
        common::sh(
            "cp",
            &[
                "-a",
                base.to_str().expect("utf8"),
                copy.to_str().expect("utf8"),
            ],
        );
        let faulty = common::FaultyStore::new(&copy, puts, deletes);
        let failed = match gc(&faulty, &gc_now()) {
            Ok(_) => false,
            Err(e) => {
                assert!(e.to_string().contains("injected"), "{e}");
                true
            }
        };
        outcomes.push((puts == i64::MAX, failed));
        let store = store_at(&copy);
        check_clean(&store);
        restore_equals(&copy, &new.name, &src, dir.path());
        let r = gc(&store, &gc_now()).expect("finish");
        assert!(r.deferred.is_none(), "{r:?}");
        assert_eq!(
            count(&store, Kind::Pack),
            2,
            "puts {puts}, deletes {deletes}: {r:?}"
        );
        assert!(store.list_markers("gc").expect("list").is_empty());
        check_clean(&store);
        restore_equals(&copy, &new.name, &src, dir.path());
    }
    for deletes_kind in [false, true] {
        let runs: Vec<bool> = outcomes
            .iter()
            .filter(|(d, _)| *d == deletes_kind)
            .map(|(_, f)| *f)
            .collect();
        assert!(runs[0] && runs[1], "the first steps did not fail: {runs:?}");
        assert!(
            !runs[runs.len() - 1],
            "the budget never covered the whole sweep: {runs:?}"
        );
    }
}

/// A backup forgotten between GC's listing of the heads and its read of
/// that head (a retention prune beside it) references nothing: GC goes on,
/// and the other backup's data stays.
#[test]
fn gc_passes_over_a_backup_forgotten_while_it_marks() {
    let dir = tempfile::tempdir().expect("tmp");
    let store_dir = dir.path().join("store");
    let store = store_at(&store_dir);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    tree(&a, &[("x", 1, MIB)]);
    tree(&b, &[("y", 2, MIB)]);
    let kept = backup(&store, &a, &opts("a")).expect("backup a");
    let gone = backup(&store, &b, &opts("b")).expect("backup b");
    let faulty = common::FaultyStore::new(&store_dir, i64::MAX, i64::MAX);
    *faulty.forget_when_read.lock().expect("lock") = Some(gone.name.clone());
    let r = gc(&faulty, &gc_now()).expect("gc goes on");
    assert_eq!(r.indexes, 1, "{r:?}");
    let r = gc(&store, &gc_now()).expect("gc");
    assert!(r.deferred.is_none(), "{r:?}");
    check_clean(&store);
    restore_equals(&store_dir, &kept.name, &a, dir.path());
}

/// A restore that cannot take a lease (read-only credentials) does not
/// stop a GC: here one repacks the pack the restore is about to read. The
/// restore reloads the chunk map, reads each moved chunk from its new
/// pack, and the tree comes out exact.
#[test]
fn a_leaseless_restore_follows_chunks_a_repack_moved() {
    let dir = tempfile::tempdir().expect("tmp");
    let store_dir = dir.path().join("store");
    let store = store_at(&store_dir);
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    // One pack holding a, b and d; the kept backup needs only a.
    tree(&old, &[("a", 10, MIB), ("b", 11, MIB), ("d", 13, MIB)]);
    tree(&new, &[("a", 10, MIB)]);
    let gone = backup(&store, &old, &opts("old")).expect("old");
    let kept = backup(&store, &new, &opts("new")).expect("new");
    assert_eq!(count(&store, Kind::Pack), 1);
    store.delete_index(&gone.name).expect("retention");

    let faulty = common::FaultyStore::new(&store_dir, i64::MAX, i64::MAX);
    faulty
        .locks_denied
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let repacked = Arc::new(std::sync::Mutex::new(None));
    let seen = Arc::clone(&repacked);
    *faulty.gc_before_pack_read.lock().expect("lock") = Some(Box::new(move |inner| {
        // The first marks what is dead, the second sweeps it.
        let marked = gc(inner, &gc_now()).expect("gc beside the restore");
        let swept = gc(inner, &gc_now()).expect("gc beside the restore");
        *seen.lock().expect("lock") = Some(marked.packs_repacked + swept.packs_repacked);
    }));
    let index = btm_chunk::inventory::read_index(&faulty, &kept.name).expect("head");
    let dst = dir.path().join("restored");
    let ropts = btm_chunk::restore::RestoreOptions::new(Policy::NONE);
    let r = repo(&faulty)
        .with_cache(None)
        .restore(&kept.name, &index, &dst, &ropts)
        .expect("the restore follows the moved chunk");
    assert_eq!(*repacked.lock().expect("lock"), Some(1), "the GC repacked");
    // The read that found the pack gone, then one read of the moved chunk.
    assert_eq!(r.requests, 2, "{r:?}");
    assert_eq!(
        std::fs::read(dst.join("a")).expect("a"),
        std::fs::read(new.join("a")).expect("a")
    );
    check_clean(&store);
}

/// Backups of three tags run again and again, each keeping its newest two,
/// while GC (no grace) runs in a loop: every backup left restores exactly,
/// and the store checks clean.
#[test]
fn repack_gc_is_safe_beside_concurrent_backups() {
    let dir = tempfile::tempdir().expect("tmp");
    let store_dir = dir.path().join("store");
    let store = store_at(&store_dir);
    let done = std::sync::atomic::AtomicBool::new(false);
    let swept = std::sync::atomic::AtomicU64::new(0);
    let states: std::sync::Mutex<Vec<(String, std::path::PathBuf)>> = Default::default();
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (store, states, dir) = (&store, &states, dir.path());
            s.spawn(move || {
                for round in 0..6u64 {
                    let src = dir.join(format!("src-{t}-{round}"));
                    // A file every tag shares, one that changes each round,
                    // and one that changes every other round.
                    tree(
                        &src,
                        &[
                            ("shared", 100, MIB),
                            ("mine", 200 + t * 10 + round, MIB),
                            ("slow", 300 + t * 10 + round / 2, MIB / 2),
                        ],
                    );
                    let b = backup(store, &src, &opts(&format!("t{t}"))).expect("backup");
                    states.lock().expect("lock").push((b.name, src));
                    repo(store).prune(&format!("t{t}"), 2, false).expect("keep");
                    sleep(Duration::from_millis(150 + 100 * t));
                }
            });
        }
        let (store, done, swept) = (&store, &done, &swept);
        s.spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let r = gc(store, &gc_now()).expect("gc");
                swept.fetch_add(
                    r.packs_deleted + r.packs_repacked,
                    std::sync::atomic::Ordering::SeqCst,
                );
                sleep(Duration::from_millis(50));
            }
        });
        // Stop the GC loop once the backups are done.
        let deadline = Instant::now() + Duration::from_secs(120);
        while states.lock().expect("lock").len() < 18 && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    for _ in 0..2 {
        let r = gc(&store, &gc_now()).expect("final gc");
        swept.fetch_add(
            r.packs_deleted + r.packs_repacked,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
    assert!(
        swept.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no sweep ever ran"
    );
    check_clean(&store);
    let left: Vec<String> = btm_chunk::inventory::list_backups(&store, None)
        .expect("list")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(left.len(), 6, "{left:?}");
    for (name, src) in states.lock().expect("lock").iter() {
        if left.contains(name) {
            restore_equals(&store_dir, name, src, dir.path());
        }
    }
}
