//! What the target holds in a region, as the receiver compares it with
//! what the source announces.

use crate::region_hashes::RegionHashes;
use crate::types::BlockHash;

/// A region's block hashes as the target holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewBlocks {
    /// Every block's hash is known (a manifest of the same geometry: the
    /// common case, kept without a per-block `Option` because a large
    /// disk has millions of such blocks per session; an empty region is
    /// only its count).
    Known(RegionHashes),
    /// Some blocks are unknown (`None`: never equal).
    Partial(Vec<Option<BlockHash>>),
}

impl ViewBlocks {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            ViewBlocks::Known(b) => b.len(),
            ViewBlocks::Partial(b) => b.len(),
        }
    }

    /// Whether the region has no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i`'s hash, if known.
    pub fn get(&self, i: usize) -> Option<BlockHash> {
        match self {
            ViewBlocks::Known(b) => b.get(i),
            ViewBlocks::Partial(b) => b.get(i).copied().flatten(),
        }
    }

    /// Every block's hash, `None` where unknown.
    pub fn to_options(&self) -> Vec<Option<BlockHash>> {
        match self {
            ViewBlocks::Known(b) => b.iter().map(Some).collect(),
            ViewBlocks::Partial(b) => b.clone(),
        }
    }
}

/// What the target holds in one region, in the source's geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionView {
    /// Block hashes.
    pub blocks: ViewBlocks,
    /// Chunk hashes (`None` when a block is unknown).
    pub chunks: Vec<Option<BlockHash>>,
    /// Region hash (`None` when a block is unknown).
    pub hash: Option<BlockHash>,
}
