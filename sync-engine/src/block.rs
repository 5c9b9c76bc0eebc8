//! Block updates and the typestate that guards integrity: only a
//! [`VerifiedBlock`] (whose resulting bytes matched the expected blake3) can
//! be staged into a target.

use bytes::Bytes;
use diskferry_protocol::{BlockHash, ErrorCode, PAGE_SIZE};

use crate::error::Error;
use crate::leaf::hash_block;

/// A byte range inside one block and its new content (shared, not copied,
/// from the frame it arrived in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Offset inside the block.
    pub offset: u32,
    /// New bytes.
    pub data: Bytes,
}

/// A block update as received or read: not yet checked.
#[derive(Clone, Debug)]
pub struct ReceivedBlock {
    /// Block index.
    pub index: u64,
    /// Length of the block in the new geometry.
    pub len: u32,
    /// The blake3 the whole new block must have.
    pub expected: BlockHash,
    /// Changed ranges; one patch covering the block for a whole block.
    pub patches: Vec<Patch>,
}

/// A block update whose resulting content matched its expected hash.
#[derive(Clone, Debug)]
pub struct VerifiedBlock {
    index: u64,
    hash: BlockHash,
    patches: Vec<Patch>,
}

/// A whole block's bytes together with their hash, borrowed from the buffer
/// that was hashed. Only the hashing code makes these, so holding one proves
/// the bytes match the hash.
#[derive(Clone, Copy, Debug)]
pub struct VerifiedSlice<'a> {
    index: u64,
    hash: BlockHash,
    bytes: &'a [u8],
    /// The memory map the bytes lie in, and their offset there.
    owner: Option<(&'a Bytes, usize)>,
}

impl<'a> VerifiedSlice<'a> {
    pub(crate) fn new(index: u64, hash: BlockHash, bytes: &'a [u8], owner: Option<(&'a Bytes, usize)>) -> Self {
        VerifiedSlice { index, hash, bytes, owner }
    }

    /// The bytes as shared [`Bytes`] without a copy, when they lie in a map.
    pub fn shared(&self) -> Option<Bytes> {
        self.owner.map(|(b, at)| b.slice(at..at + self.bytes.len()))
    }

    /// Block index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// blake3 of the bytes.
    pub fn hash(&self) -> BlockHash {
        self.hash
    }

    /// The bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// The new content of a block did not hash to what the source announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block {index}: content does not match its blake3")]
pub struct HashMismatch {
    /// Block index.
    pub index: u64,
}

impl From<HashMismatch> for Error {
    fn from(e: HashMismatch) -> Self {
        Error::new(ErrorCode::HashMismatch, e.to_string())
            .hint("the block was corrupted on the way; run the sync again")
    }
}

impl ReceivedBlock {
    /// A whole-block update.
    pub fn whole(index: u64, expected: BlockHash, data: Bytes) -> Self {
        ReceivedBlock { index, len: data.len() as u32, expected, patches: vec![Patch { offset: 0, data }] }
    }

    /// Whether the patches cover the whole block (no old content needed).
    pub fn is_whole(&self) -> bool {
        self.patches.len() == 1 && self.patches[0].offset == 0 && self.patches[0].data.len() == self.len as usize
    }

    /// Checks that the patches applied over `old` (the block's current bytes,
    /// zero-filled to `len`; ignored for a whole block) give the expected hash.
    /// `old` is patched in place: a copy of it would be one more block per
    /// frame outside the target's memory budget.
    pub fn verify(self, old: Vec<u8>) -> Result<VerifiedBlock, HashMismatch> {
        let mismatch = HashMismatch { index: self.index };
        let hash = if self.is_whole() {
            // The common case hashes the received bytes where they lie.
            hash_block(&self.patches[0].data)
        } else {
            let mut new = old;
            new.resize(self.len as usize, 0);
            for p in &self.patches {
                let start = p.offset as usize;
                let end = start.checked_add(p.data.len()).filter(|&e| e <= new.len()).ok_or(mismatch.clone())?;
                new[start..end].copy_from_slice(&p.data);
            }
            hash_block(&new)
        };
        if hash != self.expected {
            return Err(mismatch);
        }
        Ok(VerifiedBlock { index: self.index, hash: self.expected, patches: self.patches })
    }
}

impl VerifiedBlock {
    /// Builds the update that turns `old` into `new` from bytes read locally,
    /// hashing `new` itself: the result is verified by construction.
    pub fn from_local(index: u64, new: &[u8], old: Option<&[u8]>) -> VerifiedBlock {
        let hash = hash_block(new);
        let patches = match old {
            Some(old) => diff_pages(old, new)
                .into_iter()
                .map(|(off, len)| Patch {
                    offset: off,
                    data: Bytes::copy_from_slice(&new[off as usize..(off + len) as usize]),
                })
                .collect(),
            None => vec![Patch { offset: 0, data: Bytes::copy_from_slice(new) }],
        };
        VerifiedBlock { index, hash, patches }
    }

    /// Block index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// blake3 of the whole new block.
    pub fn hash(&self) -> BlockHash {
        self.hash
    }

    /// The changed ranges.
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    /// Bytes of new content carried.
    pub fn payload_len(&self) -> u64 {
        self.patches.iter().map(|p| p.data.len() as u64).sum()
    }
}

/// Ranges `(offset, len)` of the 4 KiB pages that differ between `old` and
/// `new` (adjacent pages merged). `old` shorter than `new` reads as zeros.
pub fn diff_pages(old: &[u8], new: &[u8]) -> Vec<(u32, u32)> {
    changed_pages(new.len(), |start, end| {
        // Old bytes available in [start, hi); past the old end the page reads as zeros.
        let hi = end.min(old.len()).max(start);
        old.get(start..hi).unwrap_or(&[]) != &new[start..hi] || !crate::leaf::is_zero(&new[hi..end])
    })
}

/// The one page-range merger: the `(offset, len)` ranges of a `len`-byte
/// block made of the 4 KiB pages for which `differs(start, end)` holds,
/// adjacent pages merged; the last page may be short.
pub fn changed_pages(len: usize, mut differs: impl FnMut(usize, usize) -> bool) -> Vec<(u32, u32)> {
    let page = PAGE_SIZE as usize;
    let mut out: Vec<(u32, u32)> = Vec::new();
    for start in (0..len).step_by(page) {
        let end = (start + page).min(len);
        if !differs(start, end) {
            continue;
        }
        match out.last_mut() {
            Some((off, l)) if (*off + *l) as usize == start => *l += (end - start) as u32,
            _ => out.push((start as u32, (end - start) as u32)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_finds_changed_pages() {
        let old = vec![1u8; 65536];
        let mut new = old.clone();
        new[5000] = 9;
        new[9000] = 9;
        new[65535] = 9;
        assert_eq!(diff_pages(&old, &new), vec![(4096, 8192), (61440, 4096)]);
        assert!(diff_pages(&old, &old).is_empty());
        // Shorter old content reads as zeros.
        let mut grown = vec![0u8; 12288];
        grown[..4096].copy_from_slice(&old[..4096]);
        assert!(diff_pages(&old[..4096], &grown).is_empty());
        grown[10000] = 1;
        assert_eq!(diff_pages(&old[..4096], &grown), vec![(8192, 4096)]);
    }

    #[test]
    fn verify_patch_over_old() {
        let old = vec![3u8; 8192];
        let mut new = old.clone();
        new[100] = 4;
        let good = ReceivedBlock {
            index: 7,
            len: 8192,
            expected: hash_block(&new),
            patches: vec![Patch { offset: 0, data: Bytes::copy_from_slice(&new[..4096]) }],
        };
        let vb = good.clone().verify(old.clone()).unwrap();
        assert_eq!(vb.hash(), hash_block(&new));
        let mut bad = good.clone();
        let mut flipped = bad.patches[0].data.to_vec();
        flipped[0] ^= 1;
        bad.patches[0].data = flipped.into();
        assert_eq!(bad.verify(old.clone()).unwrap_err(), HashMismatch { index: 7 });
        let mut out_of_range = good;
        out_of_range.patches[0].offset = 8000;
        assert!(out_of_range.verify(old.clone()).is_err());
    }

    #[test]
    fn local_update_is_minimal() {
        let old = vec![1u8; 65536];
        let mut new = old.clone();
        new[70] = 2;
        let vb = VerifiedBlock::from_local(3, &new, Some(&old));
        assert_eq!(vb.payload_len(), 4096);
        assert_eq!(VerifiedBlock::from_local(3, &new, None).payload_len(), 65536);
    }
}
