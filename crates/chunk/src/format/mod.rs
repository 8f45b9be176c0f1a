//! The chunk store's on-store formats (`docs/format.md` is their contract):
//! packs and their trailers ([`pack`]), pack indexes ([`packidx`]), backup
//! heads and index names ([`head`]), tree segments ([`tree`]), and the
//! version 1 index, read for compatibility ([`v1`]). Each module is the only
//! place that encodes or decodes its format; nothing here does I/O.

pub mod head;
pub mod pack;
pub mod packidx;
pub mod tree;
pub mod v1;

/// Why bytes are not the format they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct FormatError {
    /// What was being decoded.
    pub what: String,
    /// What is wrong.
    pub detail: String,
}

impl FormatError {
    pub(crate) fn new(what: impl Into<String>, detail: impl Into<String>) -> Self {
        FormatError {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// Append `v` as an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Append `v` as a zigzag varint.
pub fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// A cursor over bytes being decoded; every read checks bounds.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

/// A decoding step that ran past the end or met a malformed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.remaining() < n {
            return Err(Truncated);
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.bytes(1)?[0])
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// 32 bytes, as an id.
    pub fn id(&mut self) -> Result<crate::store::Id, Truncated> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.bytes(32)?);
        Ok(crate::store::Id(a))
    }

    /// An unsigned LEB128 varint of at most 10 bytes that fits in 64 bits.
    pub fn varint(&mut self) -> Result<u64, Truncated> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(Truncated);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Truncated)
    }

    /// A zigzag varint.
    pub fn zigzag(&mut self) -> Result<i64, Truncated> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
}

/// zstd-compress `data` at `level`.
pub(crate) fn compress(data: &[u8], level: i32, what: &str) -> Result<Vec<u8>, FormatError> {
    zstd::bulk::compress(data, level).map_err(|e| FormatError::new(what, e.to_string()))
}

/// Decompress one zstd frame of at most `limit` bytes.
pub(crate) fn decompress(data: &[u8], limit: usize, what: &str) -> Result<Vec<u8>, FormatError> {
    use std::io::Read;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(data)
        .and_then(|d| d.take(limit as u64 + 1).read_to_end(&mut out))
        .map_err(|e| FormatError::new(what, format!("cannot decompress: {e}")))?;
    if out.len() > limit {
        return Err(FormatError::new(what, format!("larger than {limit} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_round_trip(v in any::<u64>(), s in any::<i64>()) {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            put_zigzag(&mut buf, s);
            let mut c = Cursor::new(&buf);
            prop_assert_eq!(c.varint(), Ok(v));
            prop_assert_eq!(c.zigzag(), Ok(s));
            prop_assert!(c.is_empty());
        }

        #[test]
        fn junk_never_panics(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut c = Cursor::new(&data);
            while c.varint().is_ok() {}
        }
    }

    #[test]
    fn overlong_varints_are_refused() {
        let mut c = Cursor::new(&[0xff; 11]);
        assert_eq!(c.varint(), Err(Truncated));
        let mut c = Cursor::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert_eq!(c.varint(), Err(Truncated));
    }
}
