//! The engine end to end at library level, on the in-memory and local
//! stores, without root: backup then restore gives the same tree; an
//! incremental backup and restore move only what changed; an interrupted
//! restore resumes; GC beside a running backup keeps what it needs; and
//! the store's faults (a failed request, an answer lost after the write,
//! a slow link) never cost a byte of the backup.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use btm_chunk::backup::BackupOptions;
use btm_chunk::gc::GcOptions;
use btm_chunk::restore::RestoreOptions;
use btm_chunk::store::{Fault, Kind, LocalStore, MemStore, Request, RetryPolicy, Store};
use btm_chunk::{inventory, ChunkError, Policy, Repo};
use common::*;

#[track_caller]
fn check_clean<S: Store + Clone + 'static>(store: &S) {
    let report = repo(store).check(true).expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// The store checks clean, and its newest backup of `node` restores into
/// `dir/dest` as exactly `src`.
#[track_caller]
fn restores_exactly<S: Store + Clone + 'static>(store: &S, src: &Path, dir: &Path) {
    check_clean(store);
    let dest = dir.join("dest");
    restore(store, "node", &dest).expect("restore");
    assert_same_tree(src, &dest);
}

fn local_store(dir: &Path) -> Arc<LocalStore> {
    Arc::new(LocalStore::open(&dir.join("store").display().to_string()).expect("store"))
}

#[test]
fn a_backup_restores_exactly_from_memory_and_from_a_directory() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    fn round_trip<S: Store + Clone + 'static>(store: &S, src: &Path, dest: &Path) {
        let b = backup(store, src, "node").expect("backup");
        assert_eq!(b.files, 202, "{b:?}");
        assert!(b.chunks_empty > 0, "the hole is not stored: {b:?}");
        let r = restore(store, "node", dest).expect("restore");
        assert_eq!(r.files, 202);
        assert_same_tree(src, dest);
        check_clean(store);
    }
    round_trip(&MemStore::new(), &src, &t.path().join("dest0"));
    round_trip(&local_store(t.path()), &src, &t.path().join("dest1"));
}

#[test]
fn an_incremental_backup_and_restore_move_only_what_changed() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    let first = backup(&store, &src, "node").expect("first");
    let old = t.path().join("old");
    restore(&store, "node", &old).expect("restore the first");
    // Ten tables rewritten, one new, the log appended to.
    for i in 0..10u64 {
        write_tree(&src, &[(&format!("db/{i:06}.sst"), 5000 + i, 4 * KIB)]);
    }
    write_tree(&src, &[("db/new.sst", 9999, 10 * KIB)]);
    let mut log = std::fs::read(src.join("blocks/log")).expect("log");
    log.extend(noise(77, 100 * KIB));
    std::fs::write(src.join("blocks/log"), &log).expect("append");

    let second = backup(&store, &src, "node").expect("second");
    assert!(second.files_unchanged >= 190, "{second:?}");
    assert!(
        second.bytes_uploaded * 20 < first.bytes_uploaded,
        "uploads only the change: {} of {}",
        second.bytes_uploaded,
        first.bytes_uploaded
    );
    let r = restore(&store, "node", &old).expect("restore over the old copy");
    assert_same_tree(&src, &old);
    assert!(r.chunks_reused > 0, "{r:?}");
    assert!(r.chunks_fetched <= 15, "fetches only what changed: {r:?}");
    check_clean(&store);
}

/// A week later, the restore into the same directory trusts what the
/// last one recorded: files unchanged since are not read, a file rewritten
/// in place on the publisher fetches only its changed chunks without
/// reading the old copy, and a local file changed in place at the same
/// size between the two restores is caught.
#[test]
fn the_next_restore_reads_nothing_the_last_one_recorded() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    backup(&store, &src, "node").expect("first");
    let (dest, records) = (t.path().join("dest"), t.path().join("records"));
    let run = |records: Option<&Path>| {
        let (name, index) = newest(&store, "node");
        let mut o = RestoreOptions::new(Policy::NONE);
        o.delete = true;
        o.workers = 2;
        o.records = records.map(Path::to_owned);
        repo(&store)
            .restore(&name, &index, &dest, &o)
            .expect("restore")
    };
    let first = run(Some(&records));
    assert_eq!(first.files_known, 0);
    assert_eq!(std::fs::read_dir(&records).expect("records").count(), 1);

    // The publisher: ten tables rewritten, 64 KiB of the state file
    // rewritten in place, the log appended to.
    for i in 0..10u64 {
        write_tree(&src, &[(&format!("db/{i:06}.sst"), 5000 + i, 4 * KIB)]);
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("state.db"))
            .expect("open");
        f.write_all_at(&noise(8, 64 * KIB), 6 * MIB as u64)
            .expect("rewrite");
    }
    let mut log = std::fs::read(src.join("blocks/log")).expect("log");
    log.extend(noise(77, 100 * KIB));
    std::fs::write(src.join("blocks/log"), &log).expect("append");
    backup(&store, &src, "node").expect("second");
    // The local copy: a table changed in place at the same size.
    let local = dest.join("db/000150.sst");
    let mut bytes = std::fs::read(&local).expect("read");
    bytes[100] ^= 0xff;
    std::fs::write(&local, &bytes).expect("change in place");

    let second = run(Some(&records));
    assert_same_tree(&src, &dest);
    assert!(second.files_known >= 199, "{second:?}");
    // Only the changed table is read to compare (3 KiB and a bit); the
    // state file's unchanged 8 MiB and the others are not.
    assert!(second.bytes_verified < 16 * KIB as u64, "{second:?}");
    assert!(second.chunks_fetched <= 15, "{second:?}");
    // Without a record the same restore reads the copy to compare it.
    let third = run(None);
    assert_eq!(third.files_known, 0);
    assert!(third.bytes_verified > 2 * MIB as u64, "{third:?}");
}

#[test]
fn an_interrupted_restore_resumes_and_fetches_less() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    write_tree(
        &src,
        &(0..24)
            .map(|i| (format!("f{i:02}"), i as u64, 256 * KIB))
            .collect::<Vec<_>>()
            .iter()
            .map(|(n, s, l)| (n.as_str(), *s, *l))
            .collect::<Vec<_>>(),
    );
    let store = MemStore::new();
    backup(&store, &src, "t").expect("backup");
    let (name, index) = newest(&store, "t");
    let dest = t.path().join("dest");
    // Slow reads, and a stop once a third is written: an operator's
    // Ctrl-C, or a machine that went away.
    store.inject(
        Request::Get(Kind::Pack),
        1,
        u64::MAX,
        Fault::Slow(Duration::from_millis(20)),
    );
    let mut o = RestoreOptions::new(Policy::NONE);
    o.workers = 2;
    let progress = Arc::clone(&o.progress);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while progress.done.load(Ordering::Relaxed) < 2 * 1024 * 1024 {
                std::thread::sleep(Duration::from_millis(5));
            }
            progress.cancel.cancel();
        });
        repo(&store)
            .with_connections(Some(2))
            .restore(&name, &index, &dest, &o)
    });
    assert!(matches!(r, Err(ChunkError::Cancelled)), "{r:?}");
    let again = restore(&store, "t", &dest).expect("resumed");
    assert_same_tree(&src, &dest);
    assert!(
        again.chunks_reused > 0,
        "what the first run wrote is kept: {again:?}"
    );
    assert!(again.chunks_fetched < 96, "{again:?}");
}

#[test]
fn gc_beside_a_running_backup_keeps_what_it_needs() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    let old = backup(&store, &src, "node").expect("first");
    write_tree(&src, &[("db/extra.sst", 4242, 300 * KIB)]);
    store.hold_writes();
    let now = GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
    };
    let mut opts = BackupOptions::new("node", Policy::NONE);
    opts.chunk_size = 64 * KIB as u64;
    opts.pack_size = 256 * KIB;
    opts.workers = 2;
    let progress = Arc::clone(&opts.progress);
    let second = std::thread::scope(|s| {
        let running = s.spawn(|| repo(&store).backup(&src, &opts));
        // The backup has its lease, has read its parent (its pipeline
        // reads files) and is uploading (held). Waiting for a write alone
        // is not enough: on a loaded machine the first held write can come
        // before the parent is read, and the forget below would take it.
        while store.writes() == 0 || progress.done.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The first backup is forgotten: everything the running one reuses
        // from it is garbage to a GC that does not respect the lease.
        repo(&store).forget(&old.name, false).expect("forget");
        for _ in 0..2 {
            let _ = repo(&store).gc(&now);
        }
        store.release_writes();
        running.join().expect("join")
    })
    .expect("the backup completes");
    assert!(second.chunks_reused > 0, "{second:?}");
    check_clean(&store);
    let dest = t.path().join("dest");
    restore(&store, "node", &dest).expect("restore");
    assert_same_tree(&src, &dest);
    // And once nothing runs, GC frees what only the first backup held.
    repo(&store).gc(&now).expect("mark");
    repo(&store).gc(&now).expect("sweep");
    check_clean(&store);
}

/// A restore lists the pack indexes while it takes its lease, and trusts
/// that listing only as far as it proves the backup (`docs/format.md`,
/// "Restore lease"). Here a sweep runs, and ends, after that listing and
/// before the restore's lease is written: it deletes the pack index the
/// listing named and writes the one holding the repacked chunks. The
/// restore must list again, under its lease, and restore exactly; with no
/// sweep, it lists once.
#[test]
fn a_sweep_ending_while_the_restore_lease_is_taken_costs_a_listing_not_the_restore() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    write_tree(&src, &[("a.sst", 1, MIB), ("b.sst", 2, MIB)]);
    let store = MemStore::new();
    let old = backup(&store, &src, "node").expect("first");
    // Only a.sst's first chunk is still used: its pack is a repack
    // candidate, the others are dead.
    let mut kept = std::fs::read(src.join("a.sst")).expect("read");
    kept[64 * KIB..].copy_from_slice(&noise(3, MIB - 64 * KIB));
    std::fs::write(src.join("a.sst"), kept).expect("write");
    std::fs::remove_file(src.join("b.sst")).expect("rm");
    backup(&store, &src, "node").expect("second");
    repo(&store).forget(&old.name, false).expect("forget");
    let now = GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
    };
    repo(&store).gc(&now).expect("mark");

    // Each listing of pack indexes meets a (harmless) injected fault, so
    // that `faulted` counts them.
    let count_listings = |store: &MemStore| {
        store.inject(
            Request::List(Kind::PackIndex),
            1,
            100,
            Fault::Slow(Duration::ZERO),
        );
    };
    let after_sweep = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let seen = Arc::clone(&after_sweep);
    store.before_marker_put("locks/restore-", move |s| {
        // The early listing is made beside the lease: it is done (or
        // running) before the lease's marker is written.
        let started = std::time::Instant::now();
        while s.faulted() == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the pack indexes were not listed while the lease was taken"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        s.clear_faults();
        let swept = repo(s).gc(&GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        });
        let swept = swept.expect("sweep");
        assert!(
            swept.packs_deleted > 0 && swept.packs_repacked > 0,
            "{swept:?}"
        );
        count_listings(s);
        seen.store(s.faulted(), Ordering::SeqCst);
    });
    count_listings(&store);
    let dest = t.path().join("dest");
    restore(&store, "node", &dest).expect("restore");
    assert_same_tree(&src, &dest);
    let before = after_sweep.load(Ordering::SeqCst);
    assert_ne!(before, u64::MAX, "the sweep ran");
    assert_eq!(
        store.faulted() - before,
        1,
        "listed again, once, under the lease"
    );
    check_clean(&store);

    // Nothing in between: one listing.
    store.clear_faults();
    count_listings(&store);
    let before = store.faulted();
    let dest = t.path().join("again");
    restore(&store, "node", &dest).expect("restore");
    assert_same_tree(&src, &dest);
    assert_eq!(store.faulted() - before, 1, "listed once");

    // A restore that waited for a sweep drops its early listing: whatever
    // the sweep did, the map is listed again under the lease.
    store
        .put_marker("locks/sweep-othernode-1-1-0", b"{}")
        .expect("marker");
    let before = store.faulted();
    let dest = t.path().join("after-waiting");
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(2500));
            store
                .delete_marker("locks/sweep-othernode-1-1-0")
                .expect("delete");
        });
        restore(&store, "node", &dest).expect("restore");
    });
    assert_same_tree(&src, &dest);
    assert_eq!(store.faulted() - before, 2, "listed early, then again");
}

#[test]
fn answers_lost_after_the_write_cost_nothing() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    store.inject(Request::Put(Kind::Pack), 2, 1, Fault::CommitThenFail);
    store.inject(Request::Put(Kind::PackIndex), 1, 1, Fault::CommitThenFail);
    store.inject(Request::PutIndex, 1, 1, Fault::CommitThenFail);
    backup(&store, &src, "node").expect("retries find their writes landed");
    assert_eq!(store.faulted(), 3);
    assert_eq!(
        inventory::list_backups(&store, Some("node"))
            .expect("list")
            .len(),
        1
    );
    restores_exactly(&store, &src, t.path());
}

#[test]
fn a_store_that_keeps_failing_leaves_no_backup_and_the_next_one_works() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    // From the third pack on, every put fails: the retries run out.
    store.inject(Request::Put(Kind::Pack), 3, u64::MAX, Fault::Fail);
    let e = backup(&store, &src, "node").expect_err("fails");
    assert!(e.to_string().contains("connection reset"), "{e}");
    assert!(store.list_indexes().expect("list").is_empty(), "no head");
    store.clear_faults();
    let b = backup(&store, &src, "node").expect("the next one works");
    assert_eq!(b.files, 202, "{b:?}");
    restores_exactly(&store, &src, t.path());
}

/// A call that keeps failing makes the store's attempts and no more, on
/// the write path and the read path alike: nothing retries on top of the
/// policy.
#[test]
fn a_failing_call_makes_the_policys_attempts_once() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    write_tree(&src, &[("a", 1, 100 * KIB)]);
    let store = MemStore::new();
    let attempts = u64::from(store.retry_policy().attempts);
    assert_eq!(attempts, u64::from(RetryPolicy::ATTEMPTS));
    let mut o = BackupOptions::new("node", Policy::NONE);
    o.workers = 1;
    store.inject(Request::Put(Kind::Pack), 1, u64::MAX, Fault::Fail);
    let backing_up = Repo::new(Arc::new(store.clone()))
        .with_cache(None)
        .with_connections(Some(1));
    let e = backing_up.backup(&src, &o).expect_err("fails");
    assert!(
        e.to_string().contains(&format!("{attempts} attempts")),
        "{e}"
    );
    assert_eq!(store.faulted(), attempts);

    store.clear_faults();
    backup(&store, &src, "node").expect("backup");
    store.inject(Request::Get(Kind::Pack), 1, u64::MAX, Fault::Fail);
    let e = restore(&store, "node", &t.path().join("dest")).expect_err("fails");
    assert!(
        e.to_string().contains(&format!("{attempts} attempts")),
        "{e}"
    );
    // One pack, so one read that fails.
    assert_eq!(store.faulted(), 2 * attempts);
}

#[test]
fn a_slow_store_is_only_slow() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    store.inject(
        Request::Any,
        1,
        u64::MAX,
        Fault::Slow(Duration::from_millis(2)),
    );
    backup(&store, &src, "node").expect("backup");
    restores_exactly(&store, &src, t.path());
}

#[test]
fn key_material_the_policy_names_stays_out_and_signing_state_stays_put() {
    use btm::pathrule::Rule;
    static KEY: Rule = Rule {
        pattern: "config/node_key.json",
        stack: "a node key",
    };
    static KEYS: [&Rule; 1] = [&KEY];
    let policy = Policy {
        secrets: &KEYS,
        signing_state: |rel| rel == b"data/sign_state.json",
    };
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    write_tree(
        &src,
        &[
            ("config/node_key.json", 1, 100),
            ("data/sign_state.json", 2, 100),
            ("data/db", 3, 10 * KIB),
        ],
    );
    let store = MemStore::new();
    let o = BackupOptions::new("v", policy);
    repo(&store).backup(&src, &o).expect("backup");
    let (name, index) = newest(&store, "v");
    let dest = t.path().join("dest");
    write_tree(
        &dest,
        &[
            ("data/sign_state.json", 9, 50),
            ("config/node_key.json", 8, 10),
        ],
    );
    let mut ro = RestoreOptions::new(policy);
    ro.delete = true;
    let r = repo(&store)
        .restore(&name, &index, &dest, &ro)
        .expect("restore");
    assert_eq!(
        r.signing_state_kept,
        vec!["data/sign_state.json".to_owned()]
    );
    assert_eq!(
        std::fs::read(dest.join("data/sign_state.json")).expect("kept"),
        noise(9, 50)
    );
    assert_eq!(
        std::fs::read(dest.join("config/node_key.json")).expect("kept"),
        noise(8, 10)
    );
    assert_eq!(
        std::fs::read(dest.join("data/db")).expect("db"),
        noise(3, 10 * KIB)
    );
    let mut all = Vec::new();
    let mut entries = inventory::entries(&store, None, &name, &index, 2);
    while let Some(item) = entries.next_item().expect("item") {
        if let btm_chunk::format::tree::Item::Entry(e) = item {
            all.push(String::from_utf8_lossy(&e.path).into_owned());
        }
    }
    assert!(!all.iter().any(|p| p.ends_with("node_key.json")), "{all:?}");
}

/// `restore_found` looks its backup up while the lease is taken (the
/// lookup here waits until the restore's lease marker is in the store,
/// so a restore that took the lease only after the lookup would never
/// start), restores it exactly and says which it was; a lookup that
/// fails or refuses fails the restore before anything is written.
#[test]
fn a_restore_looks_its_backup_up_while_the_lease_is_taken() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    node_tree(&src);
    let store = MemStore::new();
    backup(&store, &src, "node").expect("backup");
    let lease_taken = |store: &MemStore| {
        store
            .list_markers("locks")
            .expect("list")
            .iter()
            .any(|m| m.name.starts_with("locks/restore-"))
    };
    let find = || {
        let started = std::time::Instant::now();
        while !lease_taken(&store) {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(ChunkError::Invalid("the lease was never taken".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(newest(&store, "node"))
    };
    let dest = t.path().join("dest");
    let found = btm_chunk::restore::restore_found(
        &repo(&store),
        find,
        &dest,
        &RestoreOptions::new(Policy::NONE),
    );
    let summary = found.result.expect("restored");
    assert_eq!(summary.files, 202);
    assert_same_tree(&src, &dest);
    let (name, _) = found.backup.expect("the backup found");
    assert_eq!(name, newest(&store, "node").0);
    assert!(!lease_taken(&store), "the lease is released");

    let dest = t.path().join("refused");
    let found = btm_chunk::restore::restore_found(
        &repo(&store),
        || Err(ChunkError::Invalid("not this one".into())),
        &dest,
        &RestoreOptions::new(Policy::NONE),
    );
    assert!(
        matches!(&found.result, Err(ChunkError::Invalid(m)) if m == "not this one"),
        "{:?}",
        found.result.err()
    );
    assert!(found.backup.is_none());
    assert!(!dest.exists(), "nothing written for a refused lookup");
    assert!(!lease_taken(&store), "the lease is released");
}
