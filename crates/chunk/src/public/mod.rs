//! Published stores: a store that strangers read from a static web server,
//! a CDN or a public bucket, with no listing and no credentials, and trust
//! because its catalog and heads are signed (`docs/publishing.md`; the
//! catalog's format is in `docs/format.md`).
//!
//! - [`key`]: ed25519 signing and public keys, as text;
//! - [`catalog`]: the catalog's encoding and checks (pure);
//! - [`reader`]: a read-only store over the catalog, for readers;
//! - [`writer`]: building the catalog and keeping it right as writers add
//!   and delete.

pub mod catalog;
pub mod key;
pub mod mirrors;
pub mod reader;
mod seen;
pub mod writer;

pub use catalog::Catalog;
pub use key::{KeyError, PublicKey, SigningKey};
pub use mirrors::Mirrors;
pub use reader::CatalogStore;
pub use writer::{publish, PublishReport, Publishing};

use std::sync::Arc;

use crate::store::{Location, Open, Store, StoreError};

/// How a reader opens a store.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Read buckets without credentials (`--no-sign-request`).
    pub anonymous: bool,
    /// Accept only what these keys signed (`--trust`, `trust = [...]`).
    pub trust: Vec<PublicKey>,
    /// Refuse a catalog published longer ago than this (`--max-age`).
    pub max_age: Option<std::time::Duration>,
    /// Where the newest catalog accepted from each store and key is
    /// remembered, to refuse an older one (`<cache>/catalogs`); `None`
    /// remembers nothing.
    pub seen: Option<std::path::PathBuf>,
}

/// A store opened to be read.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Read through its catalog, and with no trusted key: a caller warns
    /// that what it reads is unauthenticated.
    pub unauthenticated: bool,
}

/// Open `location` for reading. A web server, an anonymous bucket, or any
/// store when keys are trusted, is read through its catalog
/// ([`CatalogStore`]); anything else is the operator's own store, read
/// as it is.
pub fn open(location: &Location, access: &Access) -> Result<Opened, StoreError> {
    let how = Open::Read {
        anonymous: access.anonymous,
    };
    let inner = crate::store::open(location, how)?;
    let public = location.is_web() || access.anonymous;
    if !public && access.trust.is_empty() {
        return Ok(Opened {
            store: inner,
            unauthenticated: false,
        });
    }
    let store = CatalogStore::open(inner, access).map_err(|e| explain_first_read(e, access))?;
    Ok(Opened {
        store: Arc::new(store),
        unauthenticated: access.trust.is_empty(),
    })
}

/// An error of the first request of a read (the catalog's), said in
/// terms of what most often causes it.
fn explain_first_read(e: StoreError, access: &Access) -> StoreError {
    match e {
        // A refusal of an anonymous read is most often a bucket that does
        // not allow them.
        StoreError::Permanent { what, detail } if access.anonymous => StoreError::Permanent {
            what,
            detail: format!(
                "{detail} (does the bucket allow anonymous reads? see docs/publishing.md)"
            ),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::head::{Head, IndexName, Totals};
    use crate::store::{Bytes, Id, Kind, MemStore, CATALOG};
    use proptest::prelude::*;

    fn head_bytes(height: u64) -> Vec<u8> {
        Head {
            format: 2,
            created: chrono::DateTime::from_timestamp(1_800_000_000 + height as i64, 0)
                .expect("must succeed"),
            tag: "t".into(),
            chunk_size: 1 << 20,
            meta: serde_json::json!({"height": height})
                .as_object()
                .expect("must succeed")
                .clone(),
            trees: Vec::new(),
            totals: Totals::default(),
            excluded: Vec::new(),
        }
        .encode()
        .expect("must succeed")
    }

    fn name(height: u64) -> String {
        IndexName::new(
            chrono::DateTime::from_timestamp(1_800_000_000 + height as i64, 0)
                .expect("must succeed"),
            "t",
        )
        .to_string()
    }

    /// The catalog as a reader trusting `key` sees it.
    fn read(store: &MemStore, key: &SigningKey) -> Catalog {
        Catalog::decode(
            &store.get_marker(CATALOG).expect("must succeed"),
            &[key.public()],
        )
        .expect("must succeed")
        .0
    }

    /// Whether the catalog names only objects the store has.
    fn names_only_what_exists(store: &MemStore, key: &SigningKey) -> bool {
        let Ok(data) = store.get_marker(CATALOG) else {
            return true;
        };
        let c = Catalog::decode(&data, &[key.public()])
            .expect("must succeed")
            .0;
        let heads = store.list_indexes().expect("must succeed");
        let packidx: Vec<Id> = store
            .list(Kind::PackIndex)
            .expect("must succeed")
            .into_iter()
            .map(|p| p.0)
            .collect();
        c.heads.iter().all(|h| heads.contains(&h.name))
            && c.packidx.iter().all(|p| packidx.contains(&p.id))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Backup(u64),
        ForgetOldest,
        ReplacePackIndex,
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..1000).prop_map(Op::Backup),
            Just(Op::ForgetOldest),
            Just(Op::ReplacePackIndex),
            Just(Op::Commit),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever writers do through [`Publishing`] (backups, retention,
        /// a GC sweep replacing pack indexes), a reader never finds a
        /// catalog entry whose object is gone, and after a commit the
        /// catalog is exactly the store.
        #[test]
        fn the_catalog_never_names_what_is_gone(ops in prop::collection::vec(op(), 1..24)) {
            let store = MemStore::new();
            let key = SigningKey::from_seed([9; 32]);
            let publishing = Publishing::new(Arc::new(store.clone()), &key);
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Backup(h) => {
                        let data = Bytes::from(format!("packidx {i}").into_bytes());
                        publishing.put(Kind::PackIndex, &Id::of(&data), data).expect("must succeed");
                        publishing.put_index(&name(*h + 1000 * i as u64), &head_bytes(*h)).expect("must succeed");
                    }
                    Op::ForgetOldest => {
                        let mut names = store.list_indexes().expect("must succeed");
                        names.sort();
                        if let Some(n) = names.first() {
                            publishing.delete_index(n).expect("must succeed");
                        }
                    }
                    Op::ReplacePackIndex => {
                        let all = store.list(Kind::PackIndex).expect("must succeed");
                        if let Some((old, _)) = all.first() {
                            let data = Bytes::from(format!("merged {i}").into_bytes());
                            publishing.put(Kind::PackIndex, &Id::of(&data), data).expect("must succeed");
                            publishing.delete(Kind::PackIndex, old).expect("must succeed");
                        }
                    }
                    Op::Commit => {
                        publishing.commit().expect("must succeed");
                        let c = read(&store, &key);
                        let mut heads = store.list_indexes().expect("must succeed");
                        heads.sort();
                        prop_assert_eq!(c.heads.iter().map(|h| h.name.clone()).collect::<Vec<_>>(), heads);
                        let mut packidx: Vec<Id> = store.list(Kind::PackIndex).expect("must succeed").into_iter().map(|p| p.0).collect();
                        packidx.sort();
                        prop_assert_eq!(c.packidx.iter().map(|p| p.id).collect::<Vec<_>>(), packidx);
                    }
                }
                prop_assert!(names_only_what_exists(&store, &key), "after {:?}", op);
            }
        }
    }

    /// Two publishers of one store: the one whose catalog write comes
    /// second finds the catalog replaced since it read it, reads it again,
    /// and adds its head on top; neither update is lost.
    #[test]
    fn a_publisher_that_loses_the_race_redoes_its_change_on_the_new_catalog() {
        let store = MemStore::new();
        let key = SigningKey::from_seed([6; 32]);
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        crate::public::publish(&store, &key, chrono::Utc::now(), None, None).expect("publish");
        let a = Publishing::new(Arc::clone(&shared), &key);
        a.put_index(&name(1), &head_bytes(1)).expect("head a");
        // Just before A writes its catalog, B publishes its own backup.
        let other = Arc::clone(&shared);
        let b_key = SigningKey::from_seed([6; 32]);
        store.before_marker_put(CATALOG, move |_| {
            let b = Publishing::new(other, &b_key);
            b.put_index(&name(2), &head_bytes(2)).expect("head b");
            b.commit().expect("b commits first");
        });
        assert!(a.commit().expect("a commits after"));
        let (c, _) = Catalog::decode(&store.get_marker(CATALOG).expect("c"), &[]).expect("decode");
        let names: Vec<&str> = c.heads.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, [name(1), name(2)]);
    }

    /// A store without conditional writes (an S3-compatible server that
    /// ignores `If-Match`, as btm finds out from its answer).
    struct NoConditional(MemStore);

    impl crate::store::Layer for NoConditional {
        fn inner(&self) -> &dyn Store {
            &self.0
        }
        fn replace_marker_if(
            &self,
            _: &str,
            _: Option<&[u8]>,
            _: &[u8],
        ) -> Result<bool, StoreError> {
            Err(StoreError::Unsupported {
                store: "test".into(),
                what: "write conditionally".into(),
            })
        }
    }

    /// Two publishers of a store that cannot write conditionally, five
    /// backups each: the lock object keeps every update, and is gone after.
    #[test]
    fn without_conditional_writes_a_lock_object_keeps_every_update() {
        let store = MemStore::new();
        let key = SigningKey::from_seed([8; 32]);
        let shared: Arc<dyn Store> = Arc::new(NoConditional(store.clone()));
        std::thread::scope(|t| {
            for who in 0..2u64 {
                let (shared, key) = (Arc::clone(&shared), &key);
                t.spawn(move || {
                    for i in 0..5u64 {
                        let p = Publishing::new(Arc::clone(&shared), key);
                        let h = 100 * who + i;
                        p.put_index(&name(h), &head_bytes(h)).expect("head");
                        p.commit().expect("commit");
                    }
                });
            }
        });
        let (c, _) = Catalog::decode(&store.get_marker(CATALOG).expect("c"), &[]).expect("decode");
        assert_eq!(
            c.heads.len(),
            10,
            "{:?}",
            c.heads.iter().map(|h| &h.name).collect::<Vec<_>>()
        );
        assert!(matches!(
            store.get_marker(crate::public::writer::CATALOG_LOCK),
            Err(StoreError::NotFound(_))
        ));
    }

    /// A reader remembers the newest catalog it accepted from a store: an
    /// older signed copy put back (a stale mirror, a rollback) is refused,
    /// while a newer one is taken.
    #[test]
    fn a_reader_refuses_a_catalog_older_than_one_it_saw() {
        let store = MemStore::new();
        let key = SigningKey::from_seed([5; 32]);
        let seen = tempfile::tempdir().expect("tmp");
        let access = Access {
            trust: vec![key.public()],
            seen: Some(seen.path().to_owned()),
            ..Access::default()
        };
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        let t0 = chrono::Utc::now();
        crate::public::publish(&store, &key, t0, None, None).expect("publish");
        let old = store.get_marker(CATALOG).expect("catalog");
        CatalogStore::open(Arc::clone(&shared), &access).expect("first read");
        let p = Publishing::new(Arc::clone(&shared), &key);
        p.put_index(&name(1), &head_bytes(1)).expect("head");
        p.commit().expect("commit");
        let reader = CatalogStore::open(Arc::clone(&shared), &access).expect("newer");
        assert_eq!(reader.list_indexes().expect("list"), vec![name(1)]);
        store.put_marker(CATALOG, &old).expect("roll back");
        let e = CatalogStore::open(Arc::clone(&shared), &access).expect_err("older");
        assert!(
            e.to_string().contains("older than the one already seen"),
            "{e}"
        );
        // Another reader, with no memory, takes it: what the cache is for.
        let fresh = Access {
            seen: None,
            ..access.clone()
        };
        assert!(CatalogStore::open(Arc::clone(&shared), &fresh).is_ok());
        // A publisher's expiry is signed in, and kept by the next writer.
        let day = std::time::Duration::from_secs(86_400);
        crate::public::publish(&store, &key, chrono::Utc::now(), Some(day), None).expect("publish");
        let p = Publishing::new(Arc::clone(&shared), &key);
        p.put_index(&name(2), &head_bytes(2)).expect("head");
        p.commit().expect("commit");
        let (c, _) = Catalog::decode(&store.get_marker(CATALOG).expect("c"), &[]).expect("decode");
        let left = c.expires.expect("expiry kept") - c.published;
        assert_eq!(left, chrono::Duration::days(1));
    }

    #[test]
    fn a_reader_lists_from_the_catalog_checks_heads_and_follows_a_sweep() {
        let store = MemStore::new();
        let key = SigningKey::from_seed([4; 32]);
        let p = Publishing::new(Arc::new(store.clone()), &key);
        let a = Bytes::from_static(b"packidx a");
        p.put(Kind::PackIndex, &Id::of(&a), a.clone())
            .expect("must succeed");
        p.put_index(&name(1), &head_bytes(1)).expect("must succeed");
        // A head nobody published: on the store, not in the catalog.
        p.commit().expect("must succeed");
        store
            .put_index(&name(2), &head_bytes(2))
            .expect("must succeed");

        // The reader shares the store the test keeps writing to.
        let shared = &store;
        let reader = CatalogStore::open(
            Arc::new(crate::store::Counting::new(Arc::new(shared.clone()))),
            &Access {
                trust: vec![key.public()],
                ..Access::default()
            },
        )
        .expect("must succeed");
        assert_eq!(reader.list_indexes().expect("must succeed"), vec![name(1)]);
        assert!(reader.get_index(&name(1)).is_ok());
        assert!(matches!(
            reader.get_index(&name(2)),
            Err(crate::store::StoreError::NotFound(_))
        ));
        assert_eq!(
            reader.list(Kind::PackIndex).expect("must succeed"),
            vec![(Id::of(&a), a.len() as u64)]
        );
        let e = reader
            .put(Kind::Pack, &Id::of(b"x"), Bytes::new())
            .expect_err("must fail");
        assert!(e.to_string().contains("read-only"), "{e}");

        // A sweep replaces the pack index: the reader's next read of the
        // old one misses, and its next listing reads the catalog again.
        let b = Bytes::from_static(b"packidx b");
        let p = Publishing::new(Arc::new(shared.clone()), &key);
        p.put(Kind::PackIndex, &Id::of(&b), b.clone())
            .expect("must succeed");
        p.delete(Kind::PackIndex, &Id::of(&a))
            .expect("must succeed");
        assert!(reader.get(Kind::PackIndex, &Id::of(&a)).is_err());
        assert_eq!(
            reader.list(Kind::PackIndex).expect("must succeed"),
            vec![(Id::of(&b), b.len() as u64)]
        );

        // A head replaced under its name (only by tampering) is refused.
        shared.delete_index(&name(1)).expect("must succeed");
        shared
            .put_index(&name(1), &head_bytes(5))
            .expect("must succeed");
        let e = reader.get_index(&name(1)).expect_err("must fail");
        assert!(
            e.to_string()
                .contains("does not match the hash the catalog signed"),
            "{e}"
        );
    }
}
