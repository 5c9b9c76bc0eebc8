//! Toy hashes for the session tests: the state machines treat hashes as
//! opaque, so tree nodes only need to differ when their children do.

use diskferry_protocol::{BlockHash, CHUNK_BLOCKS};

pub fn toy(children: &[BlockHash]) -> BlockHash {
    let mut acc = [0u8; 32];
    for (i, c) in children.iter().enumerate() {
        for (j, b) in c.0.iter().enumerate() {
            acc[j] = acc[j].wrapping_mul(31).wrapping_add(*b ^ i as u8);
        }
    }
    BlockHash(acc)
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
