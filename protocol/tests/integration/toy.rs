//! Block and tree hashes for the session tests: blocks are numbered, tree
//! nodes are blake3 of their children (the state machines treat both as
//! opaque).

use diskferry_protocol::{BlockHash, CHUNK_BLOCKS};

/// A tree node over `children`. The sessions treat hashes as opaque, but a
/// weak toy here collides on random data (a linear mix did, in a property
/// test), and two different regions would then compare equal: blake3.
pub fn toy(children: &[BlockHash]) -> BlockHash {
    let mut hasher = blake3::Hasher::new();
    for c in children {
        hasher.update(&c.0);
    }
    BlockHash(*hasher.finalize().as_bytes())
}

pub fn h(n: u64) -> BlockHash {
    if n == 0 {
        return BlockHash::ZERO;
    }
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8] = 1;
    BlockHash(b)
}

pub fn tree(blocks: &[BlockHash]) -> (Vec<BlockHash>, BlockHash) {
    let chunks: Vec<BlockHash> = blocks.chunks(CHUNK_BLOCKS as usize).map(toy).collect();
    let region = toy(&chunks);
    (chunks, region)
}
