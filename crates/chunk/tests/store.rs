//! The store contract against the stores that need no server: in memory
//! and a local directory. The remote backends run the same suite in the
//! CLI's tests, beside their servers.

mod contract;

use std::time::{Duration, Instant};

use btm_chunk::store::{Bytes, Fault, Id, Kind, LocalStore, MemStore, Request, Store};

#[test]
fn mem_store_meets_the_contract() {
    contract::contract(&MemStore::new());
}

#[test]
fn local_store_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s").display().to_string();
    contract::contract(&LocalStore::open(&path).expect("open"));
}

/// The injected faults do what the engine's fault tests rely on: the Nth
/// matching request fails before acting, or acts and then loses its
/// answer, or waits; other requests are untouched.
#[test]
fn mem_store_faults_hit_exactly_the_requests_asked_for() {
    let s = MemStore::new();
    let (a, b, c) = (Id::of(b"a"), Id::of(b"b"), Id::of(b"c"));
    s.inject(Request::Put(Kind::Pack), 2, 1, Fault::Fail);
    s.put(Kind::Pack, &a, Bytes::from_static(b"a"))
        .expect("first put");
    s.put(Kind::Tree, &b, Bytes::from_static(b"b"))
        .expect("another kind");
    let e = s
        .put(Kind::Pack, &b, Bytes::from_static(b"b"))
        .expect_err("second");
    assert!(e.is_temporary(), "{e}");
    assert!(s.get(Kind::Pack, &b).is_err(), "failed before acting");
    s.put(Kind::Pack, &b, Bytes::from_static(b"b"))
        .expect("third");

    s.inject(Request::Put(Kind::Pack), 1, 1, Fault::CommitThenFail);
    let e = s
        .put(Kind::Pack, &c, Bytes::from_static(b"c"))
        .expect_err("lost");
    assert!(e.is_temporary(), "{e}");
    assert_eq!(&s.get(Kind::Pack, &c).expect("landed")[..], b"c");

    s.inject(Request::PutIndex, 1, 1, Fault::CommitThenFail);
    assert!(s.create_index("x", b"1").is_err());
    assert!(!s.create_index("x", b"1").expect("retry"), "already there");

    s.inject(
        Request::Get(Kind::Pack),
        1,
        2,
        Fault::Slow(Duration::from_millis(30)),
    );
    let t = Instant::now();
    s.get(Kind::Pack, &a).expect("slow");
    s.get_range(Kind::Pack, &a, 0, 1).expect("slow");
    s.get(Kind::Pack, &a).expect("fast");
    assert!(t.elapsed() >= Duration::from_millis(60));
    assert_eq!(s.faulted(), 5);
}
