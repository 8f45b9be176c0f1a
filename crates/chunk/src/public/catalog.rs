//! The catalog of a published store (`docs/format.md`, "Catalog"): its
//! encoding, signing and checking. Pure: bytes in, bytes or a verdict out;
//! reading and writing it is [`super::reader`]'s and [`super::writer`]'s.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::key::{PublicKey, SigningKey};
use crate::store::Id;

/// The catalog format this version writes and reads.
pub const FORMAT: u32 = 1;

/// A backup as the catalog names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadEntry {
    /// The index name.
    pub name: String,
    /// Its tag.
    pub tag: String,
    /// `meta.height` of the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u64>,
    /// `meta.chain` of the head: the chain identity `btm verify` checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<serde_json::Value>,
    /// BLAKE3 of the head object's bytes.
    pub blake3: Id,
    /// The head object's length.
    pub size: u64,
    /// The head's signature (see [`head_message`]).
    pub sig: String,
}

/// A pack index as the catalog names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackIndexEntry {
    /// Its id.
    pub id: Id,
    /// Its length.
    pub size: u64,
}

/// The catalog's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// [`FORMAT`].
    pub format: u32,
    /// When it was written; only grows ([`next_published`]).
    pub published: DateTime<Utc>,
    /// When readers stop accepting it, if the publisher set a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    /// The heads, sorted by name.
    pub heads: Vec<HeadEntry>,
    /// Every pack index.
    pub packidx: Vec<PackIndexEntry>,
    /// Other places serving copies of this store, which readers restoring
    /// from it also draw on (`docs/format.md`, "Several mirrors").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

/// Why a catalog is refused. Each names what is wrong in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// Not a catalog this version can read.
    #[error("catalog is malformed: {0}")]
    Malformed(String),
    /// The signature does not verify: changed after it was signed.
    #[error("catalog signature does not verify: it was changed after it was signed (tampered or damaged)")]
    BadSignature,
    /// Signed, but by a key the reader does not trust (the key, as
    /// `--trust` takes it).
    #[error("catalog is signed by {0}, which is not a trusted key (--trust, trust = [...])")]
    Untrusted(String),
    /// A head entry whose signature does not verify.
    #[error("head {0} is not signed by the catalog's key: refused")]
    UnsignedHead(String),
    /// Older than a catalog of the same store and key already accepted: a
    /// mirror or cache serving an old copy.
    #[error("catalog published {published} is older than the one already seen from this store ({seen}): an old copy (a stale mirror or cache, or a rollback)")]
    Older {
        /// This catalog's time.
        published: DateTime<Utc>,
        /// The newest seen.
        seen: DateTime<Utc>,
    },
    /// Past the expiry its publisher signed into it.
    #[error("catalog published {published} expired at {expires}: the publisher has not renewed it (a frozen mirror, or a publisher that stopped)")]
    Expired {
        /// This catalog's time.
        published: DateTime<Utc>,
        /// Its expiry.
        expires: DateTime<Utc>,
    },
    /// Older than the reader allows (`--max-age`).
    #[error("catalog published {published} is older than --max-age {max_age}")]
    TooOld {
        /// This catalog's time.
        published: DateTime<Utc>,
        /// The limit, as given.
        max_age: String,
    },
}

/// The `published` time of a catalog replacing one published at
/// `previous`: `now`, or just after `previous` if that is not earlier (a
/// publisher whose clock is behind another's), so that readers always see
/// it grow.
pub fn next_published(previous: Option<DateTime<Utc>>, now: DateTime<Utc>) -> DateTime<Utc> {
    match previous {
        Some(p) if p >= now => p + chrono::Duration::microseconds(1),
        _ => now,
    }
}

/// The expiry of a catalog published at `published`: `asked` after it, or,
/// when the writer asks for none, the same interval the catalog it
/// replaces had (`before`: its published time and expiry), so one
/// publisher without `--expires` does not drop another's policy.
pub fn next_expiry(
    published: DateTime<Utc>,
    asked: Option<std::time::Duration>,
    before: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> Option<DateTime<Utc>> {
    let interval = match asked {
        Some(d) => chrono::Duration::from_std(d).ok()?,
        None => {
            let (p, e) = before?;
            e - p
        }
    };
    published.checked_add_signed(interval)
}

/// The bytes a head's signature covers.
pub fn head_message(name: &str, hash: &Id) -> Vec<u8> {
    format!("btm head v1\n{name}\n{}", hash.to_hex()).into_bytes()
}

fn catalog_message(body: &[u8]) -> Vec<u8> {
    let mut m = b"btm catalog v1\n".to_vec();
    m.extend_from_slice(body);
    m
}

impl Catalog {
    /// An empty catalog published at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Catalog {
            format: FORMAT,
            published: now,
            expires: None,
            heads: Vec::new(),
            packidx: Vec::new(),
            mirrors: Vec::new(),
        }
    }

    /// Sort heads by name and pack indexes by id, dropping repeats, as
    /// the format lists them.
    pub fn normalize(&mut self) {
        self.heads.sort_by(|a, b| a.name.cmp(&b.name));
        self.heads.dedup_by(|a, b| a.name == b.name);
        self.packidx.sort_by_key(|p| p.id);
        self.packidx.dedup_by_key(|p| p.id);
    }

    /// The catalog's object: the body, then its signature by `key`.
    pub fn encode(&self, key: &SigningKey) -> Vec<u8> {
        // A map of plain values cannot fail to serialize.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let sig = key.sign(&catalog_message(&body));
        let mut out = body;
        out.push(b'\n');
        out.extend_from_slice(format!("ed25519 {} {sig}\n", key.public().to_base64()).as_bytes());
        out
    }

    /// Check and read a catalog object. Its signature must verify with
    /// the key it names, and every head's with the same key; with `trust`
    /// non-empty that key must be one of them. Returns the catalog and the
    /// key that signed it.
    pub fn decode(data: &[u8], trust: &[PublicKey]) -> Result<(Catalog, PublicKey), CatalogError> {
        let bad = |what: &str| CatalogError::Malformed(what.to_owned());
        let text = std::str::from_utf8(data).map_err(|_| bad("not UTF-8"))?;
        let (body, rest) = text
            .split_once('\n')
            .ok_or_else(|| bad("no signature line"))?;
        let line = rest.strip_suffix('\n').unwrap_or(rest);
        let mut parts = line.split(' ');
        let (Some("ed25519"), Some(key), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("the signature line is not \"ed25519 KEY SIGNATURE\""));
        };
        let key = PublicKey::from_base64(key)
            .ok_or_else(|| bad("the signing key is not an ed25519 key"))?;
        key.verify(&catalog_message(body.as_bytes()), sig)
            .map_err(|_| CatalogError::BadSignature)?;
        if !trust.is_empty() && !trust.contains(&key) {
            return Err(CatalogError::Untrusted(key.to_string()));
        }
        let catalog: Catalog =
            serde_json::from_str(body).map_err(|e| CatalogError::Malformed(e.to_string()))?;
        if catalog.format != FORMAT {
            return Err(CatalogError::Malformed(format!(
                "format {} is not one this btm reads ({FORMAT}); upgrade btm",
                catalog.format
            )));
        }
        for h in &catalog.heads {
            key.verify(&head_message(&h.name, &h.blake3), &h.sig)
                .map_err(|_| CatalogError::UnsignedHead(h.name.clone()))?;
        }
        Ok((catalog, key))
    }

    /// Whether a reader may accept this catalog at `now`: not older than
    /// `seen` (the newest it accepted before from this store and key), not
    /// expired, and not published longer than `max_age` ago.
    pub fn check_fresh(
        &self,
        seen: Option<DateTime<Utc>>,
        max_age: Option<std::time::Duration>,
        now: DateTime<Utc>,
    ) -> Result<(), CatalogError> {
        let published = self.published;
        if let Some(seen) = seen.filter(|s| published < *s) {
            return Err(CatalogError::Older { published, seen });
        }
        if let Some(expires) = self.expires.filter(|e| *e <= now) {
            return Err(CatalogError::Expired { published, expires });
        }
        let too_old = |m: std::time::Duration| {
            chrono::Duration::from_std(m).is_ok_and(|d| now - published > d)
        };
        if let Some(m) = max_age.filter(|m| too_old(*m)) {
            return Err(CatalogError::TooOld {
                published,
                max_age: humantime::format_duration(m).to_string(),
            });
        }
        Ok(())
    }

    /// The entry of head `name`.
    pub fn head(&self, name: &str) -> Option<&HeadEntry> {
        self.heads
            .binary_search_by(|h| h.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.heads[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).expect("time")
    }

    #[test]
    fn a_catalog_older_than_seen_expired_or_past_max_age_is_refused() {
        let mut c = Catalog::new(at(100));
        assert_eq!(c.check_fresh(None, None, at(100_000)), Ok(()));
        assert_eq!(c.check_fresh(Some(at(100)), None, at(200)), Ok(()));
        let e = c
            .check_fresh(Some(at(101)), None, at(200))
            .expect_err("older");
        assert!(matches!(e, CatalogError::Older { .. }), "{e}");
        assert!(
            e.to_string().contains("older than the one already seen"),
            "{e}"
        );
        c.expires = Some(at(160));
        assert_eq!(c.check_fresh(None, None, at(159)), Ok(()));
        let e = c.check_fresh(None, None, at(160)).expect_err("expired");
        assert!(e.to_string().contains("expired at"), "{e}");
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(c.check_fresh(None, Some(day), at(150)), Ok(()));
        c.expires = None;
        let e = c
            .check_fresh(None, Some(day), at(100 + 86_401))
            .expect_err("old");
        assert_eq!(
            e.to_string(),
            format!("catalog published {} is older than --max-age 1day", at(100))
        );
    }

    #[test]
    fn an_expiry_is_asked_for_or_kept_from_the_catalog_replaced() {
        let week = std::time::Duration::from_secs(7 * 86_400);
        assert_eq!(next_expiry(at(0), Some(week), None), Some(at(7 * 86_400)));
        assert_eq!(
            next_expiry(at(50), None, Some((at(0), at(30)))),
            Some(at(80))
        );
        assert_eq!(next_expiry(at(50), None, None), None);
        assert_eq!(
            next_expiry(at(50), Some(week), Some((at(0), at(30)))),
            Some(at(50 + 7 * 86_400))
        );
    }

    proptest! {
        /// Whatever the writers' clocks say, a catalog is published after
        /// the one it replaces.
        #[test]
        fn published_times_only_grow(previous in -1000i64..1000, now in -1000i64..1000) {
            let next = next_published(Some(at(previous)), at(now));
            prop_assert!(next > at(previous));
            prop_assert!(next >= at(now));
        }
    }

    fn sample(key: &SigningKey, names: &[String], packs: &[u64]) -> Catalog {
        let mut c =
            Catalog::new(DateTime::<Utc>::from_timestamp(1_800_000_000, 7).expect("must succeed"));
        for (i, n) in names.iter().enumerate() {
            let hash = Id::of(n.as_bytes());
            c.heads.push(HeadEntry {
                name: n.clone(),
                tag: "t".into(),
                height: (i % 2 == 0).then_some(i as u64 * 100),
                chain: (i % 3 == 0).then(|| serde_json::json!({"kind": "cometbft", "height": i})),
                blake3: hash,
                size: i as u64 + 10,
                sig: key.sign(&head_message(n, &hash)),
            });
        }
        for p in packs {
            c.packidx.push(PackIndexEntry {
                id: Id::of(&p.to_le_bytes()),
                size: *p,
            });
        }
        c.normalize();
        c
    }

    proptest! {
        #[test]
        fn a_signed_catalog_reads_back_and_any_changed_byte_is_refused(
            names in prop::collection::btree_set("[a-z0-9]{1,12}", 0..8),
            packs in prop::collection::vec(any::<u64>(), 0..8),
            flip in any::<usize>(),
            bit in 0u8..8,
        ) {
            let key = SigningKey::from_seed([7; 32]);
            let names: Vec<String> = names.into_iter().collect();
            let c = sample(&key, &names, &packs);
            let data = c.encode(&key);
            let (back, signer) = Catalog::decode(&data, &[key.public()]).expect("must succeed");
            prop_assert_eq!(&back, &c);
            prop_assert_eq!(signer, key.public());
            for n in &names {
                prop_assert!(back.head(n).is_some());
            }
            // Any one bit changed anywhere but the final newline is refused.
            let mut bad = data.clone();
            let i = flip % (bad.len() - 1);
            bad[i] ^= 1 << bit;
            prop_assert!(Catalog::decode(&bad, &[key.public()]).is_err());
            prop_assert!(Catalog::decode(&bad, &[]).is_err());
        }
    }

    #[test]
    fn another_key_or_an_unsigned_head_is_refused() {
        let key = SigningKey::from_seed([1; 32]);
        let other = SigningKey::from_seed([2; 32]);
        let c = sample(&key, &["a".into(), "b".into()], &[1]);
        let e = Catalog::decode(&c.encode(&key), &[other.public()]).expect_err("must fail");
        assert_eq!(e, CatalogError::Untrusted(key.public().to_string()));
        assert!(e.to_string().contains("not a trusted key"));
        // Unauthenticated reading still checks the signature it carries.
        assert!(Catalog::decode(&c.encode(&key), &[]).is_ok());

        // A head whose signature is another key's, inside a catalog the
        // trusted key signed: refused by name.
        let mut forged = c.clone();
        forged.heads[1].sig = other.sign(&head_message("b", &forged.heads[1].blake3));
        let e = Catalog::decode(&forged.encode(&key), &[key.public()]).expect_err("must fail");
        assert_eq!(e, CatalogError::UnsignedHead("b".into()));
        let mut unsigned = c.clone();
        unsigned.heads[0].sig = String::new();
        let e = Catalog::decode(&unsigned.encode(&key), &[key.public()]).expect_err("must fail");
        assert_eq!(e, CatalogError::UnsignedHead("a".into()));
    }

    #[test]
    fn unknown_formats_and_keys_are_refused() {
        let key = SigningKey::from_seed([3; 32]);
        let mut c = sample(&key, &[], &[]);
        c.format = 2;
        let e = Catalog::decode(&c.encode(&key), &[])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("upgrade btm"), "{e}");
        let body =
            br#"{"format":1,"published":"2026-01-01T00:00:00Z","heads":[],"packidx":[],"x":1}"#;
        let mut data = body.to_vec();
        data.extend_from_slice(
            format!(
                "\ned25519 {} {}\n",
                key.public().to_base64(),
                key.sign(&catalog_message(body))
            )
            .as_bytes(),
        );
        let e = Catalog::decode(&data, &[])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        assert!(Catalog::decode(b"{}", &[]).is_err());
    }
}
