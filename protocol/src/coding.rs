//! Little-endian primitives over `bytes::{Buf, BufMut}`. Decoding checks
//! lengths before reading, so truncated input is an error, never a panic.

use bytes::{Buf, BufMut};

use crate::types::BlockHash;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame ended before a field.
    #[error("frame truncated")]
    Truncated,
    /// The frame type byte is unknown.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A field holds a value outside its range.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// The frame's length prefix is over the hard maximum.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(u64),
    /// Bytes were left after the last field.
    #[error("{0} trailing bytes after the frame's fields")]
    Trailing(usize),
}

/// Result of decoding.
pub type DecodeResult<T> = Result<T, DecodeError>;

/// Reads fixed-size little-endian fields.
pub trait BufExt: Buf {
    /// One byte.
    fn get_u8_checked(&mut self) -> DecodeResult<u8> {
        need(self, 1)?;
        Ok(self.get_u8())
    }
    /// u16.
    fn get_u16_checked(&mut self) -> DecodeResult<u16> {
        need(self, 2)?;
        Ok(self.get_u16_le())
    }
    /// u32.
    fn get_u32_checked(&mut self) -> DecodeResult<u32> {
        need(self, 4)?;
        Ok(self.get_u32_le())
    }
    /// u64.
    fn get_u64_checked(&mut self) -> DecodeResult<u64> {
        need(self, 8)?;
        Ok(self.get_u64_le())
    }
    /// u128.
    fn get_u128_checked(&mut self) -> DecodeResult<u128> {
        need(self, 16)?;
        Ok(self.get_u128_le())
    }
    /// A 32-byte hash.
    fn get_hash(&mut self) -> DecodeResult<BlockHash> {
        need(self, 32)?;
        let mut h = [0u8; 32];
        self.copy_to_slice(&mut h);
        Ok(BlockHash(h))
    }
    /// A `u16` length then UTF-8 bytes.
    fn get_str(&mut self) -> DecodeResult<String> {
        let n = self.get_u16_checked()? as usize;
        need(self, n)?;
        let mut v = vec![0u8; n];
        self.copy_to_slice(&mut v);
        String::from_utf8(v).map_err(|_| DecodeError::Invalid("utf-8 string"))
    }
    /// A count that must fit in what is left when each item takes `item` bytes.
    fn get_count(&mut self, item: usize) -> DecodeResult<usize> {
        let n = self.get_u32_checked()? as usize;
        if n.checked_mul(item).is_none_or(|total| total > self.remaining()) {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }
}

impl<B: Buf + ?Sized> BufExt for B {}

fn need<B: Buf + ?Sized>(b: &B, n: usize) -> DecodeResult<()> {
    if b.remaining() < n {
        Err(DecodeError::Truncated)
    } else {
        Ok(())
    }
}

/// Writes a `u16`-length-prefixed string (cut at 65535 bytes on a char boundary).
pub fn put_str(b: &mut impl BufMut, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.put_u16_le(end as u16);
    b.put_slice(&s.as_bytes()[..end]);
}
