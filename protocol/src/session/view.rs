//! What the target holds in a region, as the receiver compares it with
//! what the source announces.

use std::collections::{BTreeMap, BTreeSet};

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
    /// Chunk hashes (`None` when a block is unknown); an empty region's
    /// (all ZERO) may be left out, see [`RegionView::chunk`].
    pub chunks: Vec<Option<BlockHash>>,
    /// Region hash (`None` when a block is unknown).
    pub hash: Option<BlockHash>,
}

impl RegionView {
    /// Chunk `i`'s hash, if known: ZERO throughout an empty region, whose
    /// chunk list need not be kept (thousands of them are looked ahead).
    pub fn chunk(&self, i: usize) -> Option<BlockHash> {
        match &self.blocks {
            ViewBlocks::Known(RegionHashes::Zero(n)) if self.chunks.is_empty() => {
                (i < n.div_ceil(crate::types::CHUNK_BLOCKS as usize)).then_some(BlockHash::ZERO)
            }
            _ => self.chunks.get(i).copied().flatten(),
        }
    }

    /// Whether it lists its blocks: all but an empty region's view (only
    /// a count of zero blocks, and at most its chunk list).
    pub fn lists_blocks(&self) -> bool {
        !matches!(self.blocks, ViewBlocks::Known(RegionHashes::Zero(_)))
    }
}

/// The views a receiver holds, by region, counting those that list their
/// blocks (the memory that matters: an empty region's view is its chunk
/// list only).
#[derive(Debug, Default)]
pub(super) struct HeldViews {
    views: BTreeMap<u64, RegionView>,
    listed: BTreeSet<u64>,
}

impl HeldViews {
    pub(super) fn insert(&mut self, region: u64, view: RegionView) {
        if view.lists_blocks() {
            self.listed.insert(region);
        }
        self.views.insert(region, view);
    }

    pub(super) fn remove(&mut self, region: u64) {
        self.views.remove(&region);
        self.listed.remove(&region);
    }

    pub(super) fn contains(&self, region: u64) -> bool {
        self.views.contains_key(&region)
    }

    pub(super) fn get(&self, region: u64) -> Option<&RegionView> {
        self.views.get(&region)
    }

    pub(super) fn get_mut(&mut self, region: u64) -> Option<&mut RegionView> {
        self.views.get_mut(&region)
    }

    /// Views held that list their blocks.
    pub(super) fn listed(&self) -> usize {
        self.listed.len()
    }
}
