//! The hash tree over block hashes: block → chunk (32 blocks) → region
//! (about 64 MiB) → root. Two manifests, or two agents, compare region by
//! region and descend only where hashes differ.
//!
//! A node whose children are all [`BlockHash::ZERO`] is itself `ZERO`, so an
//! empty region costs nothing to hash or to compare.

use diskferry_protocol::{BlockHash, Geometry, RegionHashes, CHUNK_BLOCKS};

const TAG_CHUNK: u8 = 1;
const TAG_REGION: u8 = 2;

fn node_hash(tag: u8, children: &[BlockHash]) -> BlockHash {
    if BlockHash::all_zero(children) {
        return BlockHash::ZERO;
    }
    let mut h = blake3::Hasher::new();
    h.update(&[tag]);
    for c in children {
        h.update(c.as_bytes());
    }
    BlockHash(*h.finalize().as_bytes())
}

/// Chunk hashes of a region's block hashes (the region starts on a chunk boundary).
pub fn chunk_hashes(blocks: &[BlockHash]) -> Vec<BlockHash> {
    blocks.chunks(CHUNK_BLOCKS as usize).map(|c| node_hash(TAG_CHUNK, c)).collect()
}

/// A region's chunk hashes and hash; an empty region's are zero without
/// looking at a block.
pub fn region_nodes(blocks: &RegionHashes) -> (Vec<BlockHash>, BlockHash) {
    match blocks {
        RegionHashes::Zero(n) => (vec![BlockHash::ZERO; n.div_ceil(CHUNK_BLOCKS as usize)], BlockHash::ZERO),
        RegionHashes::Listed(v) => {
            let chunks = chunk_hashes(v);
            let hash = region_hash_from_chunks(&chunks);
            (chunks, hash)
        }
    }
}

/// A region's hash from its chunk hashes.
pub fn region_hash_from_chunks(chunks: &[BlockHash]) -> BlockHash {
    node_hash(TAG_REGION, chunks)
}

/// A region's hash from its block hashes.
pub fn region_hash(blocks: &[BlockHash]) -> BlockHash {
    region_hash_from_chunks(&chunk_hashes(blocks))
}

/// Streams region hashes, in order, into the root hash.
#[derive(Debug, Clone)]
pub struct RootHasher {
    hasher: blake3::Hasher,
    regions: u64,
}

impl RootHasher {
    /// A root over a disk of this geometry (size and block size are part of the root).
    pub fn new(geometry: &Geometry) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"diskferry root v1");
        hasher.update(&geometry.disk_bytes.to_le_bytes());
        hasher.update(&geometry.block_size.get().to_le_bytes());
        RootHasher { hasher, regions: 0 }
    }

    /// Adds the next region's hash.
    pub fn update(&mut self, region: &BlockHash) {
        self.hasher.update(region.as_bytes());
        self.regions += 1;
    }

    /// The root.
    pub fn finish(&self) -> BlockHash {
        BlockHash(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_protocol::BlockSize;

    #[test]
    fn zero_nodes_stay_zero() {
        let zeros = vec![BlockHash::ZERO; 100];
        assert!(region_hash(&zeros).is_zero());
        let mut one = zeros.clone();
        one[70] = BlockHash([7; 32]);
        let chunks = chunk_hashes(&one);
        assert_eq!(chunks.len(), 4);
        assert!(chunks[0].is_zero() && chunks[1].is_zero() && chunks[3].is_zero());
        assert!(!chunks[2].is_zero());
        assert_ne!(region_hash(&one), region_hash(&zeros));
    }

    #[test]
    fn root_depends_on_geometry() {
        let a = RootHasher::new(&Geometry::new(100, BlockSize::DEFAULT)).finish();
        let b = RootHasher::new(&Geometry::new(101, BlockSize::DEFAULT)).finish();
        assert_ne!(a, b);
    }
}
