//! Pack indexes: which pack holds which chunk, at which offset. The union
//! of all of them is the store's chunk map (`docs/format.md`, "Pack
//! indexes").

use super::pack::Blob;
use super::{Cursor, FormatError};
use crate::store::Id;

/// The first 8 bytes of a decoded pack index.
pub const MAGIC: &[u8; 8] = b"BTMPIDX\x02";
/// The largest decoded pack index accepted.
const LIMIT: usize = 1 << 30;

/// One pack and its chunks, as a pack index lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackEntry {
    /// The pack's id.
    pub id: Id,
    /// Its length in bytes.
    pub len: u64,
    /// Its chunks, in pack order.
    pub blobs: Vec<Blob>,
}

/// The stored (compressed) bytes of a pack index listing `packs`.
pub fn encode(packs: &[PackEntry]) -> Result<Vec<u8>, FormatError> {
    let n: usize = packs.iter().map(|p| p.blobs.len()).sum();
    let mut raw = Vec::with_capacity(12 + packs.len() * 44 + n * 44);
    raw.extend_from_slice(MAGIC);
    raw.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        raw.extend_from_slice(&p.id.0);
        raw.extend_from_slice(&p.len.to_le_bytes());
        raw.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
        for b in &p.blobs {
            raw.extend_from_slice(&b.hash.0);
            raw.extend_from_slice(&b.offset.to_le_bytes());
            raw.extend_from_slice(&b.stored_len.to_le_bytes());
            raw.extend_from_slice(&b.raw_len.to_le_bytes());
        }
    }
    super::compress(&raw, 3, "pack index")
}

/// Decode a pack index; `what` names it in errors. Every blob must lie
/// inside its pack.
pub fn decode(data: &[u8], what: &str) -> Result<Vec<PackEntry>, FormatError> {
    let raw = super::decompress(data, LIMIT, what)?;
    let bad = |d: &str| FormatError::new(what, d);
    let mut c = Cursor::new(&raw);
    if c.bytes(8).map_err(|_| bad("truncated"))? != MAGIC {
        return Err(bad("not a btm pack index (no BTMPIDX2 magic)"));
    }
    let count = c.u32().map_err(|_| bad("truncated"))?;
    let mut out = Vec::with_capacity((count as usize).min(1 << 20));
    for _ in 0..count {
        let trunc = |_| bad("truncated");
        let id = c.id().map_err(trunc)?;
        let len = c.u64().map_err(trunc)?;
        let n = c.u32().map_err(trunc)?;
        if (n as usize).saturating_mul(44) > c.remaining() {
            return Err(bad("truncated"));
        }
        let mut blobs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let b = Blob {
                hash: c.id().map_err(trunc)?,
                offset: c.u32().map_err(trunc)?,
                stored_len: c.u32().map_err(trunc)?,
                raw_len: c.u32().map_err(trunc)?,
            };
            if u64::from(b.offset) + u64::from(b.stored_len) > len {
                return Err(bad(&format!("chunk {} lies outside pack {id}", b.hash)));
            }
            blobs.push(b);
        }
        out.push(PackEntry { id, len, blobs });
    }
    if !c.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob(i: u32) -> Blob {
        Blob {
            hash: Id::of(&i.to_le_bytes()),
            offset: i * 10,
            stored_len: 10,
            raw_len: 20,
        }
    }

    proptest! {
        #[test]
        fn pack_indexes_round_trip(sizes in prop::collection::vec(0u32..50, 0..20)) {
            let packs: Vec<PackEntry> = sizes.iter().enumerate().map(|(i, &n)| PackEntry {
                id: Id::of(&(i as u64).to_le_bytes()),
                len: u64::from(n) * 10 + 16,
                blobs: (0..n).map(blob).collect(),
            }).collect();
            let enc = encode(&packs).expect("encode");
            prop_assert_eq!(decode(&enc, "x").expect("decode"), packs);
        }

        #[test]
        fn junk_is_refused(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data, "junk");
            let compressed = zstd::bulk::compress(&data, 1).expect("zstd");
            let _ = decode(&compressed, "junk");
        }
    }

    #[test]
    fn a_blob_outside_its_pack_is_refused() {
        let packs = [PackEntry {
            id: Id::of(b"p"),
            len: 5,
            blobs: vec![blob(0)],
        }];
        let enc = encode(&packs).expect("encode");
        assert!(decode(&enc, "x").is_err());
    }
}
