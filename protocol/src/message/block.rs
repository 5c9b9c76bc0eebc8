//! Block frames (type 0x10): new content for ranges of one block, and their
//! encoding; the layout is in the table of [`super`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::coding::{BufExt, DecodeError, DecodeResult};
use crate::payload::{Body, Payload};
use crate::types::{BlockHash, BlockSize};

/// How a block payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Plain bytes.
    Raw,
    /// One zstd frame.
    Zstd,
}

/// New content for (ranges of) one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockFrame {
    /// Block index.
    pub index: u64,
    /// blake3 of the whole block after the patches are applied.
    pub hash: BlockHash,
    /// Length of the block.
    pub block_len: u32,
    /// Payload encoding.
    pub codec: Codec,
    /// `(offset, len)` of each patch; the payload holds their bytes in order.
    pub patches: Vec<(u32, u32)>,
    /// Encoded patch bytes, in the pieces they arrived in.
    pub payload: Payload,
}

impl BlockFrame {
    /// Sum of the patch lengths: the decoded payload size.
    pub fn plain_len(&self) -> u64 {
        self.patches.iter().map(|p| p.1 as u64).sum()
    }
}

pub(super) fn put_block_fields(
    b: &mut BytesMut,
    index: u64,
    hash: &BlockHash,
    block_len: u32,
    codec: Codec,
    patches: &[(u32, u32)],
    payload: &[&[u8]],
) {
    b.put_u64_le(index);
    b.put_slice(hash.as_bytes());
    b.put_u32_le(block_len);
    b.put_u8(match codec {
        Codec::Raw => 0,
        Codec::Zstd => 1,
    });
    b.put_u16_le(patches.len() as u16);
    for (off, len) in patches {
        b.put_u32_le(*off);
        b.put_u32_le(*len);
    }
    b.put_u32_le(payload.iter().map(|p| p.len()).sum::<usize>() as u32);
    for p in payload {
        b.put_slice(p);
    }
}

/// A Block frame encoded straight from borrowed bytes (one copy: into the
/// frame), for senders that hold the payload in a memory map.
pub fn encode_block(
    index: u64,
    hash: &BlockHash,
    block_len: u32,
    codec: Codec,
    patches: &[(u32, u32)],
    payload: &[u8],
) -> Bytes {
    let mut b = BytesMut::with_capacity(64 + patches.len() * 8 + payload.len());
    b.put_u32_le(0);
    b.put_u8(0x10);
    put_block_fields(&mut b, index, hash, block_len, codec, patches, &[payload]);
    let len = (b.len() - 4) as u32;
    b[0..4].copy_from_slice(&len.to_le_bytes());
    b.freeze()
}

/// Everything of a Block frame but its payload: sent followed by the payload
/// bytes themselves, the frame travels with no copy of them at all.
pub fn encode_block_head(
    index: u64,
    hash: &BlockHash,
    block_len: u32,
    codec: Codec,
    patches: &[(u32, u32)],
    payload_len: usize,
) -> Bytes {
    let mut b = BytesMut::with_capacity(64 + patches.len() * 8);
    b.put_u32_le((1 + 8 + 32 + 4 + 1 + 2 + patches.len() * 8 + 4 + payload_len) as u32);
    b.put_u8(0x10);
    put_block_fields(&mut b, index, hash, block_len, codec, patches, &[]);
    // `put_block_fields` wrote a payload length of 0: the real one goes there.
    let at = b.len() - 4;
    b[at..].copy_from_slice(&(payload_len as u32).to_le_bytes());
    b.freeze()
}

pub(super) fn decode_block(b: &mut impl Body) -> DecodeResult<BlockFrame> {
    let index = b.get_u64_checked()?;
    let hash = b.get_hash()?;
    let block_len = b.get_u32_checked()?;
    if block_len == 0 || block_len > BlockSize::MAX {
        return Err(DecodeError::Invalid("block length"));
    }
    let codec = match b.get_u8_checked()? {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        _ => return Err(DecodeError::Invalid("codec")),
    };
    let n = b.get_u16_checked()? as usize;
    if n == 0 || n.checked_mul(8).is_none_or(|t| t > b.remaining()) {
        return Err(DecodeError::Invalid("patch count"));
    }
    let mut patches = Vec::with_capacity(n);
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for _ in 0..n {
        let off = b.get_u32_checked()?;
        let len = b.get_u32_checked()?;
        let end = off as u64 + len as u64;
        // Patches are sorted, disjoint, non-empty and inside the block.
        if len == 0 || (off as u64) < prev_end || end > block_len as u64 {
            return Err(DecodeError::Invalid("patch range"));
        }
        prev_end = end;
        total += len as u64;
        patches.push((off, len));
    }
    let payload_len = b.get_u32_checked()? as usize;
    if payload_len > b.remaining() {
        return Err(DecodeError::Truncated);
    }
    if codec == Codec::Raw && payload_len as u64 != total {
        return Err(DecodeError::Invalid("payload length"));
    }
    let payload = b.take_payload(payload_len);
    Ok(BlockFrame { index, hash, block_len, codec, patches, payload })
}
