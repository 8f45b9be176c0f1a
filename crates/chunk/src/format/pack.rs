//! Packs: the zstd frames of many chunks back to back, then a trailer that
//! lists them, so a pack describes itself and a lost pack index can be
//! rebuilt from the packs (`docs/format.md`, "Packs").

use super::{Cursor, FormatError};
use crate::store::Id;

/// The last 8 bytes of every pack.
pub const MAGIC: &[u8; 8] = b"BTMPACK\x02";
/// Bytes after the trailer: its length, the entry count, the magic.
pub const FOOTER_LEN: usize = 16;
/// Bytes of one trailer entry.
const ENTRY_LEN: usize = 40;
/// Default size at which a pack is closed; see `docs/format.md`,
/// "Choosing the sizes".
pub const DEFAULT_TARGET: usize = 16 << 20;
/// Offsets in pack indexes are 32-bit.
pub const MAX_PACK: usize = u32::MAX as usize;

/// Where one chunk's frame is in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    /// The chunk's hash.
    pub hash: Id,
    /// Offset of its frame in the pack.
    pub offset: u32,
    /// Length of the frame.
    pub stored_len: u32,
    /// Length of the chunk.
    pub raw_len: u32,
}

/// A pack being filled, in memory.
#[derive(Debug, Default)]
pub struct PackBuilder {
    data: Vec<u8>,
    blobs: Vec<Blob>,
}

/// A finished pack: its bytes, id and contents.
#[derive(Debug)]
pub struct SealedPack {
    /// BLAKE3 of `data`.
    pub id: Id,
    /// The whole pack.
    pub data: crate::store::Bytes,
    /// Its chunks, in pack order.
    pub blobs: Vec<Blob>,
}

impl PackBuilder {
    /// An empty pack with room for `capacity` bytes of frames.
    pub fn with_capacity(capacity: usize) -> Self {
        PackBuilder {
            data: Vec::with_capacity(capacity),
            blobs: Vec::new(),
        }
    }

    /// An empty pack built in `buf` (cleared), reusing its allocation.
    pub fn in_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        PackBuilder {
            data: buf,
            blobs: Vec::new(),
        }
    }

    /// Bytes of frames so far.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Append the frame of chunk `hash` (`raw_len` bytes uncompressed).
    /// The caller keeps the pack under [`MAX_PACK`] and each chunk in it at
    /// most once.
    pub fn push(&mut self, hash: Id, raw_len: u32, frame: &[u8]) {
        self.blobs.push(Blob {
            hash,
            offset: self.data.len() as u32,
            stored_len: frame.len() as u32,
            raw_len,
        });
        self.data.extend_from_slice(frame);
    }

    /// Append the trailer and footer; the pack is complete.
    pub fn seal(self) -> Result<SealedPack, FormatError> {
        let PackBuilder { mut data, blobs } = self;
        let mut raw = Vec::with_capacity(blobs.len() * ENTRY_LEN);
        for b in &blobs {
            raw.extend_from_slice(&b.hash.0);
            raw.extend_from_slice(&b.raw_len.to_le_bytes());
            raw.extend_from_slice(&b.stored_len.to_le_bytes());
        }
        let trailer = super::compress(&raw, 3, "pack trailer")?;
        data.extend_from_slice(&trailer);
        data.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        data.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
        data.extend_from_slice(MAGIC);
        if data.len() > MAX_PACK {
            return Err(FormatError::new("pack", "larger than 4 GiB"));
        }
        Ok(SealedPack {
            id: Id::of(&data),
            data: data.into(),
            blobs,
        })
    }
}

/// The footer's (trailer length, entry count), from a pack's last
/// [`FOOTER_LEN`] bytes.
pub fn parse_footer(footer: &[u8], what: &str) -> Result<(u32, u32), FormatError> {
    let bad = |d: &str| FormatError::new(what, d);
    if footer.len() != FOOTER_LEN || &footer[8..] != MAGIC {
        return Err(bad("not a btm pack (no BTMPACK2 footer)"));
    }
    let mut c = Cursor::new(footer);
    let t = c.u32().map_err(|_| bad("truncated footer"))?;
    let n = c.u32().map_err(|_| bad("truncated footer"))?;
    Ok((t, n))
}

/// The blobs a trailer describes, for a pack whose frames take
/// `frames_len` bytes; every frame must lie inside them.
pub fn parse_trailer(
    trailer: &[u8],
    count: u32,
    frames_len: u64,
    what: &str,
) -> Result<Vec<Blob>, FormatError> {
    let raw = super::decompress(trailer, count as usize * ENTRY_LEN, what)?;
    if raw.len() != count as usize * ENTRY_LEN {
        return Err(FormatError::new(what, "trailer does not match its count"));
    }
    let mut c = Cursor::new(&raw);
    let mut offset: u64 = 0;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let trunc = |_| FormatError::new(what, "truncated trailer");
        let hash = c.id().map_err(trunc)?;
        let raw_len = c.u32().map_err(trunc)?;
        let stored_len = c.u32().map_err(trunc)?;
        out.push(Blob {
            hash,
            offset: offset as u32,
            stored_len,
            raw_len,
        });
        offset += u64::from(stored_len);
    }
    if offset != frames_len {
        return Err(FormatError::new(
            what,
            format!("frames take {offset} bytes, the pack has {frames_len}"),
        ));
    }
    Ok(out)
}

/// The blobs of a whole pack held in memory.
pub fn read_pack(data: &[u8], what: &str) -> Result<Vec<Blob>, FormatError> {
    if data.len() < FOOTER_LEN {
        return Err(FormatError::new(what, "too short to be a pack"));
    }
    let (tlen, count) = parse_footer(&data[data.len() - FOOTER_LEN..], what)?;
    let frames_len = (data.len() - FOOTER_LEN)
        .checked_sub(tlen as usize)
        .ok_or_else(|| FormatError::new(what, "trailer longer than the pack"))?;
    parse_trailer(
        &data[frames_len..data.len() - FOOTER_LEN],
        count,
        frames_len as u64,
        what,
    )
}

/// Why a frame is not the chunk it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a zstd frame, or not of the right size.
    #[error("cannot decompress: {0}")]
    Decompress(String),
    /// Decompressed, but to other bytes.
    #[error("content does not match its hash")]
    Mismatch,
}

/// Decompress `frame` into `out` and check that it is `raw_len` bytes
/// whose BLAKE3 is `hash`. `dctx` and `out` are reused across chunks.
pub fn open_frame(
    frame: &[u8],
    hash: &Id,
    raw_len: u64,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    out.clear();
    out.reserve(raw_len as usize);
    dctx.decompress_to_buffer(frame, out)
        .map_err(|e| FrameError::Decompress(e.to_string()))?;
    if out.len() as u64 != raw_len || Id::of(out) != *hash {
        return Err(FrameError::Mismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A sealed pack's trailer lists exactly what was pushed, where it
        /// was pushed, and every frame opens to its chunk.
        #[test]
        fn packs_describe_themselves(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3000), 0..20)) {
            let mut b = PackBuilder::with_capacity(0);
            for c in &chunks {
                let frame = zstd::bulk::compress(c, 1).expect("zstd");
                b.push(Id::of(c), c.len() as u32, &frame);
            }
            let sealed = b.seal().expect("seal");
            prop_assert_eq!(sealed.id, Id::of(&sealed.data));
            let blobs = read_pack(&sealed.data, "p").expect("parse");
            prop_assert_eq!(&blobs, &sealed.blobs);
            let mut d = zstd::bulk::Decompressor::new().expect("dctx");
            let mut out = Vec::new();
            for (blob, c) in blobs.iter().zip(&chunks) {
                let frame = &sealed.data[blob.offset as usize..(blob.offset + blob.stored_len) as usize];
                prop_assert!(open_frame(frame, &blob.hash, c.len() as u64, &mut d, &mut out).is_ok());
                prop_assert_eq!(&out, c);
            }
        }

        #[test]
        fn junk_is_refused_not_panicked_on(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_pack(&data, "junk");
        }
    }

    #[test]
    fn a_frame_with_other_bytes_is_a_mismatch() {
        let frame = zstd::bulk::compress(b"abc", 1).expect("zstd");
        let mut d = zstd::bulk::Decompressor::new().expect("dctx");
        let mut out = Vec::new();
        assert_eq!(
            open_frame(&frame, &Id::of(b"abd"), 3, &mut d, &mut out),
            Err(FrameError::Mismatch)
        );
        assert!(matches!(
            open_frame(b"junk", &Id::of(b"abc"), 3, &mut d, &mut out),
            Err(FrameError::Decompress(_))
        ));
    }
}
