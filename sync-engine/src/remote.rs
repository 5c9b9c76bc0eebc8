//! The engine's side of a networked session: building block frames on the
//! source, resolving differences and verifying frames on the target. The
//! agent only moves these frames between QUIC streams and the engine.

use bytes::Bytes;
use diskferry_protocol::message::{encode_block, encode_block_head, BlockFrame, Codec};
use diskferry_protocol::{Geometry, Payload, PAGE_SIZE};

use crate::aligned::BufferPool;
use crate::apply::OldContent;
use crate::block::{changed_pages, Patch, ReceivedBlock, VerifiedBlock, VerifiedSlice};
use crate::compress::{compress, decompress_into};
use crate::error::{Error, Result};
use crate::hash::hash_block;

/// Truncated blake3 (first 8 bytes, little-endian) of each 4 KiB page.
pub fn page_hashes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(PAGE_SIZE as usize)
        .map(|p| {
            let h = blake3::hash(p);
            let mut b = [0u8; 8];
            b.copy_from_slice(&h.as_bytes()[..8]);
            u64::from_le_bytes(b)
        })
        .collect()
}

/// The frame that turns the target's block into `bytes`: only the pages
/// whose hashes differ from `target_pages` (all of it when none are given),
/// zstd-compressed at `level` when that pays.
pub fn block_frame(index: u64, bytes: &[u8], target_pages: &[u64], level: Option<i32>) -> BlockFrame {
    let hash = hash_block(bytes);
    let ours = page_hashes(bytes);
    let ranges = if target_pages.len() == ours.len() && !ours.is_empty() {
        let page = PAGE_SIZE as usize;
        changed_pages(bytes.len(), |start, _| ours[start / page] != target_pages[start / page])
    } else {
        Vec::new()
    };
    // Nothing differs by page hash (a stale request): send the block whole.
    let ranges = if ranges.is_empty() { vec![(0, bytes.len() as u32)] } else { ranges };
    let mut plain = Vec::with_capacity(ranges.iter().map(|r| r.1 as usize).sum());
    for (off, len) in &ranges {
        plain.extend_from_slice(&bytes[*off as usize..(*off + *len) as usize]);
    }
    let (codec, payload) = match level.and_then(|l| compress(&plain, l)) {
        Some(z) => (Codec::Zstd, z),
        None => (Codec::Raw, plain),
    };
    BlockFrame { index, hash, block_len: bytes.len() as u32, codec, patches: ranges, payload: payload.into() }
}

/// An encoded frame in one or two pieces (the second, the payload, shared
/// with the memory map it was read from).
#[derive(Debug, Clone)]
pub struct WireFrame {
    /// The frame, or its head when `tail` holds the payload.
    pub head: Bytes,
    /// The payload, sent right after `head`.
    pub tail: Option<Bytes>,
}

impl From<Bytes> for WireFrame {
    fn from(head: Bytes) -> Self {
        WireFrame { head, tail: None }
    }
}

/// The Block frame carrying a whole block straight from the bytes that were
/// hashed: compressed when that pays, else the payload is shared with the
/// map (no copy) or copied once. Returns the frame and its payload size.
pub fn whole_block_frame(block: &VerifiedSlice<'_>, level: Option<i32>) -> (WireFrame, u64) {
    let (index, hash, bytes) = (block.index(), block.hash(), block.bytes());
    let patches = [(0u32, bytes.len() as u32)];
    let len = bytes.len() as u32;
    if let Some(z) = level.and_then(|l| compress(bytes, l)) {
        return (encode_block(index, &hash, len, Codec::Zstd, &patches, &z).into(), z.len() as u64);
    }
    let frame = match block.shared() {
        Some(payload) => WireFrame {
            head: encode_block_head(index, &hash, len, Codec::Raw, &patches, payload.len()),
            tail: Some(payload),
        },
        None => encode_block(index, &hash, len, Codec::Raw, &patches, bytes).into(),
    };
    (frame, bytes.len() as u64)
}

/// Why a received frame was not staged.
#[derive(Debug)]
pub enum FrameRejection {
    /// The frame is malformed for this session: the peer misbehaves.
    Invalid(String),
    /// The content did not match its hash: ask for the block again, whole.
    Mismatch,
    /// Reading the target failed.
    Storage(Error),
}

/// Decodes and verifies a block frame against the target's current content.
/// With `gather`, the payload is first copied (or decompressed) out of the
/// pieces it arrived in into one aligned buffer from that pool, ready for a
/// full copy's direct writes, and hashed there while it is in cache.
pub fn verify_frame(
    frame: &BlockFrame,
    old: &OldContent,
    g: &Geometry,
    gather: Option<&BufferPool>,
) -> Result<VerifiedBlock, FrameRejection> {
    if frame.index >= g.block_count() || frame.block_len != g.block_len(frame.index) {
        return Err(FrameRejection::Invalid(format!(
            "block {} has the wrong length or is outside the disk",
            frame.index
        )));
    }
    let plain_len = frame.plain_len() as usize;
    let into_buffer = |fill: &mut dyn FnMut(&mut [u8])| -> Bytes {
        match gather {
            Some(pool) => pool.filled(plain_len, fill),
            None => {
                let mut v = vec![0u8; plain_len];
                fill(&mut v);
                v.into()
            }
        }
    };
    let plain: Payload = match (frame.codec, gather) {
        (Codec::Raw, None) => frame.payload.clone(),
        (Codec::Raw, Some(_)) if frame.payload.len() == plain_len => {
            into_buffer(&mut |buf| frame.payload.copy_to_slice(buf)).into()
        }
        (Codec::Raw, Some(_)) => frame.payload.clone(),
        (Codec::Zstd, _) => {
            let packed = frame.payload.to_bytes();
            let mut ok = false;
            let out = into_buffer(&mut |buf| ok = decompress_into(&packed, buf));
            if !ok {
                return Err(FrameRejection::Invalid(format!("block {}: bad zstd payload", frame.index)));
            }
            out.into()
        }
    };
    if plain.len() != plain_len {
        return Err(FrameRejection::Invalid(format!("block {}: payload length", frame.index)));
    }
    // One patch per declared range, in one piece: shared when it arrived
    // in one (or was gathered), else joined here.
    let mut patches = Vec::with_capacity(frame.patches.len());
    let mut at = 0usize;
    for (off, len) in &frame.patches {
        patches.push(Patch { offset: *off, data: plain.slice(at..at + *len as usize).to_bytes() });
        at += *len as usize;
    }
    let received = ReceivedBlock { index: frame.index, len: frame.block_len, expected: frame.hash, patches };
    let base = if received.is_whole() {
        old.forget(frame.index);
        Vec::new()
    } else if old.is_staged(frame.index) {
        // Patches over a staged block would be verified against bytes the
        // replay does not start from.
        return Err(FrameRejection::Mismatch);
    } else {
        old.read(frame.index).map_err(FrameRejection::Storage)?
    };
    received.verify(base).map_err(|_| FrameRejection::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_carries_only_changed_pages() {
        let old = vec![7u8; 65536];
        let mut new = old.clone();
        new[10_000] = 1;
        let f = block_frame(3, &new, &page_hashes(&old), None);
        assert_eq!(f.patches, vec![(8192, 4096)]);
        assert_eq!(f.payload.len(), 4096);
        assert_eq!(f.hash, hash_block(&new));
        let whole = block_frame(3, &new, &[], None);
        assert_eq!(whole.patches, vec![(0, 65536)]);
        let mut tail = old[..5000].to_vec();
        tail[4500] = 1;
        let short = block_frame(3, &tail, &page_hashes(&old[..5000]), None);
        assert_eq!(short.patches, vec![(4096, 904)]);
    }
}
