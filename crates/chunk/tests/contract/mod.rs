//! The store contract, as one suite every backend runs: write-once
//! objects, indexes created once, markers replaced atomically, listings
//! and ranged reads. The in-memory and local stores run it here, without
//! root or servers; the S3 and Azure runs include this file from the CLI's
//! tests, where their servers are started.

#![allow(dead_code)]

use btm_chunk::store::{Bytes, Id, Kind, Store, StoreError};

/// Run the whole contract against `store`, which must start empty.
pub fn contract(store: &dyn Store) {
    for kind in Kind::ALL {
        assert!(store.list(kind).expect("list").is_empty(), "{kind:?}");
    }
    assert!(store.list_indexes().expect("list").is_empty());

    // Write-once objects: a second put under the same id keeps the first,
    // and kinds do not mix.
    let h = Id::of(b"object one");
    for kind in Kind::ALL {
        store
            .put(kind, &h, Bytes::from_static(b"first"))
            .expect("put");
        store
            .put(kind, &h, Bytes::from_static(b"second"))
            .expect("put again is not an error");
        assert_eq!(&store.get(kind, &h).expect("get")[..], b"first", "{kind:?}");
        assert_eq!(store.list(kind).expect("list"), vec![(h, 5)], "{kind:?}");
    }
    let missing = Id::of(b"never stored");
    assert!(matches!(
        store.get(Kind::Pack, &missing),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.size(Kind::Pack, &h).expect("size"), 5);
    assert!(matches!(
        store.size(Kind::Pack, &missing),
        Err(StoreError::NotFound(_))
    ));

    // Ranged reads: exactly the bytes asked for, or an error.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let p = Id::of(&data);
    store
        .put(Kind::Pack, &p, Bytes::from(data.clone()))
        .expect("put pack");
    for (off, len) in [(0, 1), (99_999, 1), (12_345, 40_000), (0, 100_000)] {
        assert_eq!(
            &store.get_range(Kind::Pack, &p, off, len).expect("range")[..],
            &data[off as usize..(off + len) as usize]
        );
    }
    // Into a reused buffer: its old contents are replaced, whatever their
    // length.
    let mut buf = vec![7u8; 50_000];
    for (off, len) in [(12_345, 40_000), (5, 3), (0, 100_000), (99_999, 1)] {
        store
            .get_range_into(Kind::Pack, &p, off, len, &mut buf)
            .expect("range into");
        assert_eq!(buf, &data[off as usize..(off + len) as usize]);
    }
    assert!(
        store.get_range(Kind::Pack, &p, 99_990, 20).is_err(),
        "a range past the end"
    );
    assert!(
        store
            .get_range_into(Kind::Pack, &p, 99_990, 20, &mut buf)
            .is_err(),
        "a range past the end, into a buffer"
    );
    assert!(matches!(
        store.get_range_into(Kind::Pack, &missing, 0, 1, &mut buf),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_range(Kind::Pack, &missing, 0, 1),
        Err(StoreError::NotFound(_))
    ));

    // Racing writers of one object leave one valid copy.
    let h2 = Id::of(b"raced");
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                store
                    .put(Kind::Pack, &h2, Bytes::from_static(b"same bytes"))
                    .expect("racing put")
            });
        }
    });
    assert_eq!(&store.get(Kind::Pack, &h2).expect("get")[..], b"same bytes");

    // Indexes: atomic, write-once, listable, deletable.
    let name = "20260101T000000.000000000Z--suite";
    store.put_index(name, b"index bytes").expect("put index");
    assert!(
        matches!(
            store.put_index(name, b"other"),
            Err(StoreError::Conflict { .. })
        ),
        "an index must never be replaced"
    );
    assert!(!store.create_index(name, b"other").expect("create"));
    // A put repeated after its answer was lost finds its own bytes: done.
    store
        .put_index(name, b"index bytes")
        .expect("the same index again is a success");
    assert_eq!(store.get_index(name).expect("get"), b"index bytes");
    assert_eq!(store.list_indexes().expect("list"), vec![name.to_owned()]);
    assert!(matches!(
        store.get_index("nope"),
        Err(StoreError::NotFound(_))
    ));
    store.delete_index(name).expect("delete");
    store.delete_index(name).expect("deleting twice is fine");
    assert!(store.list_indexes().expect("list").is_empty());

    for kind in Kind::ALL {
        store.delete(kind, &h).expect("delete");
        store.delete(kind, &h).expect("deleting twice is fine");
    }
    let mut packs = store.list(Kind::Pack).expect("list");
    packs.sort();
    let mut want = vec![(p, 100_000), (h2, 10)];
    want.sort();
    assert_eq!(packs, want);
    assert!(store.list(Kind::Tree).expect("list").is_empty());

    // Many objects are listed in one go (pagination on object stores), and
    // a flat kind (pack indexes) lists as well as a fanned-out one.
    for kind in [Kind::Tree, Kind::PackIndex] {
        let many: Vec<Id> = (0..1200u32).map(|i| Id::of(&i.to_le_bytes())).collect();
        std::thread::scope(|s| {
            for part in many.chunks(150) {
                s.spawn(move || {
                    for h in part {
                        store.put(kind, h, Bytes::from_static(b"x")).expect("put");
                    }
                });
            }
        });
        assert_eq!(store.list(kind).expect("list").len(), 1200, "{kind:?}");
    }

    // Markers: replaceable, listed with the store's time, never mixed up
    // with objects or indexes.
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    assert!(store.list_markers("locks").expect("list").is_empty());
    store.put_marker("locks/export-a", b"one").expect("put");
    store.put_marker("locks/export-a", b"two").expect("replace");
    store.put_marker("gc/marks/m1", b"mark").expect("put");
    assert_eq!(store.get_marker("locks/export-a").expect("get"), b"two");
    let locks = store.list_markers("locks").expect("list");
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].name, "locks/export-a");
    assert!(locks[0].modified > before, "{locks:?}");
    let gc = store.list_markers("gc").expect("list");
    assert_eq!(
        gc.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["gc/marks/m1"]
    );
    assert!(matches!(
        store.get_marker("locks/none"),
        Err(StoreError::NotFound(_))
    ));
    for bad in ["indexes/x", "locks/../packs/x", "locks/", "gc/a b"] {
        assert!(store.put_marker(bad, b"x").is_err(), "{bad}");
    }
    // Compare-and-swap on a marker's bytes (how publishers replace the
    // catalog): only over what was read, or over nothing when absent.
    let cas = |expected: Option<&[u8]>, data: &[u8]| {
        store
            .replace_marker_if("catalog", expected, data)
            .expect("replace_marker_if")
    };
    assert!(cas(None, b"v1"), "created when absent");
    assert!(!cas(None, b"v1 again"), "refused: it exists");
    assert!(!cas(Some(b"v0"), b"v2"), "refused: it holds v1");
    assert!(cas(Some(b"v1"), b"v2"), "replaced what was read");
    assert!(!cas(Some(b"v1"), b"v3"), "refused: v1 is gone");
    assert_eq!(store.get_marker("catalog").expect("get"), b"v2");
    store.delete_marker("catalog").expect("delete");
    assert!(!cas(Some(b"v2"), b"v3"), "refused: it was deleted");
    store.delete_marker("locks/export-a").expect("delete");
    store.delete_marker("locks/export-a").expect("twice");
    store.delete_marker("gc/marks/m1").expect("delete");
    assert!(store.list_markers("locks").expect("list").is_empty());
    assert!(store.list_markers("gc").expect("list").is_empty());
    assert_eq!(store.list_indexes().expect("list"), Vec::<String>::new());
    assert_eq!(store.list(Kind::Tree).expect("list").len(), 1200);
}
