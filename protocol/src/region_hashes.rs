//! A region's block hashes, with an empty region kept as a count.

use std::ops::Range;

use crate::types::BlockHash;

/// The block hashes of one region. A region whose every block is zero —
/// nearly every region of a large sparse disk — is only its length: a
/// 1 TiB disk has 16,384 regions of 1024 hashes, and listing, scanning and
/// copying 32 KiB of zeros for each, on both sides of a push, was most of
/// what a hinted delta of such a disk cost.
#[derive(Clone, Debug)]
pub enum RegionHashes {
    /// `n` blocks, all zero.
    Zero(usize),
    /// Every block's hash.
    Listed(Vec<BlockHash>),
}

impl RegionHashes {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            RegionHashes::Zero(n) => *n,
            RegionHashes::Listed(v) => v.len(),
        }
    }

    /// Whether the region has no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i`'s hash (`None` past the end).
    pub fn get(&self, i: usize) -> Option<BlockHash> {
        match self {
            RegionHashes::Zero(n) => (i < *n).then_some(BlockHash::ZERO),
            RegionHashes::Listed(v) => v.get(i).copied(),
        }
    }

    /// Whether every block is zero.
    pub fn all_zero(&self) -> bool {
        match self {
            RegionHashes::Zero(_) => true,
            RegionHashes::Listed(v) => BlockHash::all_zero(v),
        }
    }

    /// The hashes of blocks `range` (clamped to the region).
    pub fn slice(&self, range: Range<usize>) -> Vec<BlockHash> {
        let end = range.end.min(self.len());
        let start = range.start.min(end);
        match self {
            RegionHashes::Zero(_) => vec![BlockHash::ZERO; end - start],
            RegionHashes::Listed(v) => v[start..end].to_vec(),
        }
    }

    /// The same hashes, as a count when every block is zero: what a region
    /// in flight holds (the window charges an empty region a unit, so it
    /// must not keep a list).
    pub fn compact(self) -> Self {
        match self {
            RegionHashes::Listed(v) if BlockHash::all_zero(&v) => RegionHashes::Zero(v.len()),
            other => other,
        }
    }

    /// Every hash, listed.
    pub fn into_vec(self) -> Vec<BlockHash> {
        match self {
            RegionHashes::Zero(n) => vec![BlockHash::ZERO; n],
            RegionHashes::Listed(v) => v,
        }
    }

    /// Every hash, listed, without taking `self`.
    pub fn to_vec(&self) -> Vec<BlockHash> {
        self.slice(0..self.len())
    }

    /// Every hash in order.
    pub fn iter(&self) -> impl Iterator<Item = BlockHash> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or(BlockHash::ZERO))
    }
}

impl From<Vec<BlockHash>> for RegionHashes {
    fn from(v: Vec<BlockHash>) -> Self {
        RegionHashes::Listed(v)
    }
}

/// Equal when the blocks are: a count of zeros equals a list of as many zeros.
impl PartialEq for RegionHashes {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (RegionHashes::Listed(a), RegionHashes::Listed(b)) => a == b,
            (RegionHashes::Zero(n), RegionHashes::Zero(m)) => n == m,
            (RegionHashes::Zero(n), RegionHashes::Listed(v)) | (RegionHashes::Listed(v), RegionHashes::Zero(n)) => {
                v.len() == *n && BlockHash::all_zero(v)
            }
        }
    }
}

impl Eq for RegionHashes {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_of_zeros_acts_as_the_list() {
        let zero = RegionHashes::Zero(5);
        let listed = RegionHashes::Listed(vec![BlockHash::ZERO; 5]);
        assert_eq!(zero, listed);
        assert_ne!(zero, RegionHashes::Zero(4));
        assert_eq!(zero.len(), 5);
        assert_eq!(zero.get(4), Some(BlockHash::ZERO));
        assert_eq!(zero.get(5), None);
        assert_eq!(zero.slice(3..9), vec![BlockHash::ZERO; 2]);
        assert_eq!(zero.to_vec(), listed.to_vec());
        assert!(zero.all_zero() && listed.all_zero());
        assert!(matches!(listed.clone().compact(), RegionHashes::Zero(5)));
        let mut one = vec![BlockHash::ZERO; 5];
        one[2] = BlockHash([1; 32]);
        let one = RegionHashes::Listed(one);
        assert_ne!(zero, one);
        assert!(matches!(one.clone().compact(), RegionHashes::Listed(_)));
        assert!(!one.all_zero());
        assert_eq!(one.slice(2..3), vec![BlockHash([1; 32])]);
        assert_eq!(one.iter().filter(|h| !h.is_zero()).count(), 1);
    }
}
