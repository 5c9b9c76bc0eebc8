//! Block leaves of the hash tree: the blake3 of a block's bytes, or the ZERO
//! sentinel for an all-zero block, which is detected before hashing.

use diskferry_protocol::BlockHash;

/// Whether every byte is zero. Checks the head first, so data blocks exit at once.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, rest) = buf.split_at(buf.len().min(32));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    rest.chunks(512).all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The hash of one block's bytes: [`BlockHash::ZERO`] for all zeros, else blake3.
pub fn hash_block(bytes: &[u8]) -> BlockHash {
    if is_zero(bytes) {
        BlockHash::ZERO
    } else {
        BlockHash(*blake3::hash(bytes).as_bytes())
    }
}
