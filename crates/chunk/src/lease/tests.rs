use super::*;
use judge::holder_of;

fn marker(name: &str, secs_ago: i64, now: DateTime<Utc>) -> Marker {
    Marker {
        name: name.into(),
        modified: now - chrono::Duration::seconds(secs_ago),
    }
}

fn info(host: &str, pid: u32, identity: Identity, ttl_secs: Option<u64>) -> LeaseInfo {
    LeaseInfo {
        kind: LeaseKind::Backup,
        host: host.into(),
        pid,
        started: Utc::now(),
        tag: None,
        pending: vec![Id::of(b"pack")],
        ttl_secs,
        identity,
    }
}

fn put(store: &dyn Store, name: &str, i: &LeaseInfo) {
    store
        .put_marker(name, &serde_json::to_vec(i).expect("encodes"))
        .expect("put");
}

fn states(store: &dyn Store, markers: &[Marker], now: DateTime<Utc>) -> Vec<(String, State)> {
    let mut v: Vec<(String, State)> = judge(store, markers, Some(now), holder::here())
        .into_iter()
        .map(|j| (j.marker.name, j.state))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn liveness_is_judged_on_the_store_clock_and_the_holders_ttl() {
    let store = crate::store::MemStore::new();
    let now = Utc::now();
    let far = Identity::default();
    put(
        &store,
        "locks/backup-far-1-1-0",
        &info("far", 1, far.clone(), None),
    );
    put(
        &store,
        "locks/backup-far-2-1-0",
        &info("far", 2, far.clone(), None),
    );
    // A holder that keeps a longer TTL than ours is live past ours.
    put(
        &store,
        "locks/backup-far-3-1-0",
        &info("far", 3, far.clone(), Some(7200)),
    );
    let markers = [
        marker("locks/backup-far-1-1-0", 10, now),
        marker("locks/backup-far-2-1-0", 601, now),
        marker("locks/backup-far-3-1-0", 3600, now),
        marker("locks/sweep-far-4-1-0", 599, now),
        marker("locks/other", 0, now),
        // From the future (store clocks differ per object on some
        // services): live, never expired.
        marker("locks/restore-far-5-1-0", -30, now),
    ];
    assert_eq!(
        states(&store, &markers, now),
        vec![
            ("locks/backup-far-1-1-0".into(), State::Live),
            ("locks/backup-far-2-1-0".into(), State::Expired),
            ("locks/backup-far-3-1-0".into(), State::Live),
            ("locks/restore-far-5-1-0".into(), State::Live),
            ("locks/sweep-far-4-1-0".into(), State::Live),
        ]
    );
}

#[test]
fn a_markers_name_gives_its_holder() {
    assert_eq!(
        holder_of("locks/backup-my-host-123-1795979739333253790-0"),
        Some(("my-host", 123))
    );
    assert_eq!(holder_of("locks/sweep-h-7-1-2"), Some(("h", 7)));
    assert_eq!(holder_of("locks/backup-h-notapid-1-2"), None);
    assert_eq!(holder_of("locks/backup-1-2"), None);
    assert_eq!(holder_of("gc/clock-h-1-2"), None);
}

/// Only a holder proven gone from here is dead before its lease
/// expires: not one of a clone of this host (another boot id), not one
/// of another PID namespace, not one whose name says another host.
#[test]
fn only_proof_makes_an_unexpired_holder_dead() {
    let store = crate::store::MemStore::new();
    let now = Utc::now();
    let host = btm::host::name();
    let here = holder::here().identity.clone();
    let gone_pid = u32::MAX - 1;
    let me = std::process::id();
    let reused = Identity {
        start_time: here.start_time.map(|t| t + 1),
        ..here.clone()
    };
    let clone = Identity {
        boot_id: Some("another-boot".into()),
        ..here.clone()
    };
    let container = Identity {
        pid_ns: here.pid_ns.map(|n| n + 1),
        ..here.clone()
    };
    let cases = [
        (
            format!("locks/backup-{host}-{gone_pid}-1-0"),
            info(&host, gone_pid, here.clone(), None),
            true,
        ),
        (
            format!("locks/backup-{host}-{me}-2-0"),
            info(&host, me, reused, None),
            true,
        ),
        (
            format!("locks/backup-{host}-{me}-3-0"),
            info(&host, me, here.clone(), None),
            false,
        ),
        (
            format!("locks/backup-{host}-{gone_pid}-4-0"),
            info(&host, gone_pid, clone, None),
            false,
        ),
        (
            format!("locks/backup-{host}-{gone_pid}-5-0"),
            info(&host, gone_pid, container, None),
            false,
        ),
        (
            format!("locks/backup-{host}-{gone_pid}-6-0"),
            info(&host, gone_pid, Identity::default(), None),
            false,
        ),
        // Its body would say "a dead process of this host", but its
        // name says another host: the body is not even read.
        (
            "locks/backup-far-7-7-0".to_string(),
            info(&host, gone_pid, here.clone(), None),
            false,
        ),
    ];
    let mut markers = Vec::new();
    for (name, body, _) in &cases {
        put(&store, name, body);
        markers.push(marker(name, 1, now));
    }
    let judged = judge(&store, &markers, Some(now), holder::here());
    for (name, _, dead) in &cases {
        let j = judged
            .iter()
            .find(|j| &j.marker.name == name)
            .expect("judged");
        assert_eq!(
            matches!(j.state, State::Gone(_)),
            *dead,
            "{name}: {:?}",
            j.state
        );
    }
    let mut dead: Vec<String> = dead_holders(&store, &markers, Some(now))
        .into_iter()
        .map(|(n, i)| {
            assert_eq!(i.pending, vec![Id::of(b"pack")]);
            n
        })
        .collect();
    dead.sort();
    let mut want: Vec<String> = cases.iter().filter(|c| c.2).map(|c| c.0.clone()).collect();
    want.sort();
    assert_eq!(dead, want);
}

/// A refresh after a pause longer than the safe age does not make the
/// lease good again: the loss sticks until it is renewed.
#[test]
fn a_lapse_sticks_until_the_lease_is_renewed() {
    let store = crate::store::MemStore::new();
    let never = Cancel::new();
    with_lease(&store, LeaseKind::Backup, Some("t"), &never, |lease| {
        lease.check()?;
        *lease.last_ok.lock().expect("lock") = clock().saturating_sub(safe_age());
        lease.write()?;
        assert!(matches!(lease.check(), Err(LeaseError::Lapsed { .. })));
        assert!(matches!(lease.check(), Err(LeaseError::Lapsed { .. })));
        lease.renew(&never)?;
        lease.check()?;
        // Removed by another party: taken, noticed at the next refresh
        // (which writes the marker again), and by a confirmation.
        store.delete_marker(lease.name())?;
        lease.refresh()?;
        assert!(matches!(lease.check(), Err(LeaseError::Taken { .. })));
        lease.renew(&never)?;
        lease.check()?;
        store.delete_marker(lease.name())?;
        assert!(matches!(lease.confirm(), Err(LeaseError::Taken { .. })));
        lease.renew(&never)?;
        lease.confirm()
    })
    .expect("the lease works");
}

/// A lease released early is gone from the store at once, is not written
/// again by a refresh, and `with_lease` does not fail for its absence; one
/// that lists pending packs is kept, since its marker is their record.
#[test]
fn a_released_lease_stays_released_and_a_pending_one_is_kept() {
    let store = crate::store::MemStore::new();
    let never = Cancel::new();
    let listed = |store: &crate::store::MemStore| store.list_markers("locks").expect("list").len();
    with_lease(&store, LeaseKind::Restore, None, &never, |lease| {
        assert_eq!(listed(&store), 1);
        lease.release();
        assert_eq!(listed(&store), 0, "released: the marker is deleted");
        lease.refresh()?;
        lease.write()?;
        assert_eq!(listed(&store), 0, "a refresh after release writes nothing");
        lease.check()?;
        lease.release();
        Ok::<(), LeaseError>(())
    })
    .expect("a released lease ends cleanly");
    assert_eq!(listed(&store), 0);
    with_lease(&store, LeaseKind::Backup, None, &never, |lease| {
        lease.add_pending(Id::of(b"pack"))?;
        lease.release();
        assert_eq!(listed(&store), 1, "pending packs keep the marker");
        lease.settle(&[Id::of(b"pack")]);
        Ok::<(), LeaseError>(())
    })
    .expect("the lease works");
    assert_eq!(listed(&store), 0, "settled, it is removed at the end");
}
