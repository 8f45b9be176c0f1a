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
    /// When it was written (informational).
    pub published: DateTime<Utc>,
    /// The heads, sorted by name.
    pub heads: Vec<HeadEntry>,
    /// Every pack index.
    pub packidx: Vec<PackIndexEntry>,
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
            heads: Vec::new(),
            packidx: Vec::new(),
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
