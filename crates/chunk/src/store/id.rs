//! The address of a write-once object: the BLAKE3-256 hash of its content
//! (for a chunk, of its uncompressed bytes). The store names objects by it;
//! what an id means is the chunk engine's business.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A BLAKE3-256 hash, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

/// Why a string is not an [`Id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a 64-digit lowercase hex hash")]
pub struct BadId(pub String);

impl Id {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        Id(*blake3::hash(data).as_bytes())
    }

    /// The first 8 bytes as a big-endian number: ordered as the ids are,
    /// for comparisons that rarely need the other 24 bytes.
    pub fn prefix(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }

    /// The same order as `Ord`, comparing the [`Id::prefix`] first: in a
    /// binary search over millions of hashes the full comparison (a
    /// `memcmp` call) then runs only at the match.
    pub fn cmp_fast(&self, other: &Id) -> std::cmp::Ordering {
        self.prefix()
            .cmp(&other.prefix())
            .then_with(|| self.0.cmp(&other.0))
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Id {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        let mut out = [0u8; 32];
        crate::hex::decode_into(s.as_bytes(), &mut out).ok_or_else(|| BadId(s.to_owned()))?;
        Ok(Id(out))
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_junk() {
        let h = Id::of(b"hello");
        assert_eq!(h.to_hex().parse::<Id>(), Ok(h));
        assert_eq!(h.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        for bad in ["xyz", "", &h.to_hex().to_uppercase(), &h.to_hex()[1..]] {
            assert!(bad.parse::<Id>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// `cmp_fast` is `Ord`, ids sharing long prefixes included.
        #[test]
        fn the_fast_comparison_is_the_order(
            a: [u8; 32],
            b: [u8; 32],
            shared in 0usize..33,
        ) {
            let mut b = b;
            b[..shared].copy_from_slice(&a[..shared]);
            let (a, b) = (Id(a), Id(b));
            proptest::prop_assert_eq!(a.cmp_fast(&b), a.cmp(&b));
            proptest::prop_assert_eq!(a.cmp_fast(&a), std::cmp::Ordering::Equal);
        }
    }
}
