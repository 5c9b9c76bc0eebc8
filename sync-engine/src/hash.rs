//! Parallel block hashing: holes skipped with SEEK_DATA, zero blocks detected
//! before hashing, blake3 on every core.

use std::cell::RefCell;
use std::io;
use std::ops::Range;

use diskferry_protocol::{BlockHash, Geometry};
use rayon::prelude::*;

use crate::block::VerifiedSlice;
use crate::disk::Disk;

/// Bytes one hashing task maps or reads at a time: large enough to amortize
/// the map, small enough that memory stays low however large the disk.
const BATCH_BYTES: u64 = 4 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

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

/// A rayon pool with `threads` workers (all cores when `None`).
pub fn thread_pool(threads: Option<usize>) -> io::Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("df-hash-{i}"));
    if let Some(n) = threads {
        b = b.num_threads(n.max(1));
    }
    b.build().map_err(io::Error::other)
}

/// Called from the hashing threads with each non-zero block.
pub type BlockVisitor<'a> = &'a (dyn Fn(VerifiedSlice<'_>) -> io::Result<()> + Sync);

/// Hashes blocks `blocks` of `disk`, in parallel on the current rayon pool.
///
/// Blocks past the end of the disk (a target shorter than the geometry) hash
/// as zero: a file that grows reads zeros there.
pub fn hash_blocks(disk: &Disk, g: &Geometry, blocks: Range<u64>) -> io::Result<Vec<BlockHash>> {
    hash_blocks_visit(disk, g, blocks, None)
}

/// [`hash_blocks`], also handing every non-zero block's bytes to `visit`
/// (which sees exactly the bytes that were hashed: a copy made there is
/// verified by construction).
pub fn hash_blocks_visit(
    disk: &Disk,
    g: &Geometry,
    blocks: Range<u64>,
    visit: Option<BlockVisitor<'_>>,
) -> io::Result<Vec<BlockHash>> {
    if blocks.is_empty() {
        return Ok(Vec::new());
    }
    let readable_end = g.disk_bytes.min(disk.len());
    let start = g.block_offset(blocks.start).min(readable_end);
    let end = (g.block_offset(blocks.end)).min(readable_end);
    let data = disk.data_ranges(start, end - start)?;
    let per_batch = (BATCH_BYTES / g.block_size.bytes()).max(1);
    let batches: Vec<Range<u64>> = (blocks.start..blocks.end)
        .step_by(per_batch as usize)
        .map(|b| b..(b + per_batch).min(blocks.end))
        .collect();
    let parts: Vec<Vec<BlockHash>> = batches
        .into_par_iter()
        .map(|batch| hash_batch(disk, g, batch, &data, readable_end, visit))
        .collect::<io::Result<_>>()?;
    Ok(parts.concat())
}

fn overlaps(data: &[(u64, u64)], start: u64, end: u64) -> bool {
    // `data` is sorted and disjoint: find the first range ending after `start`.
    let i = data.partition_point(|&(off, len)| off + len <= start);
    data.get(i).is_some_and(|&(off, _)| off < end)
}

fn hash_batch(
    disk: &Disk,
    g: &Geometry,
    batch: Range<u64>,
    data: &[(u64, u64)],
    readable_end: u64,
    visit: Option<BlockVisitor<'_>>,
) -> io::Result<Vec<BlockHash>> {
    let start = g.block_offset(batch.start).min(readable_end);
    let end = g.block_offset(batch.end).min(readable_end);
    if start >= end || !overlaps(data, start, end) {
        return Ok(vec![BlockHash::ZERO; (batch.end - batch.start) as usize]);
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        disk.with_bytes(start, (end - start) as usize, &mut scratch, |bytes| {
            (batch.start..batch.end)
                .map(|i| {
                    let b_start = g.block_offset(i);
                    let b_end = (b_start + g.block_size.bytes()).min(readable_end);
                    if b_start >= b_end || !overlaps(data, b_start, b_end) {
                        return Ok(BlockHash::ZERO);
                    }
                    let block = &bytes[(b_start - start) as usize..(b_end - start) as usize];
                    let h = hash_block(block);
                    if let (Some(v), false) = (visit, h.is_zero()) {
                        v(VerifiedSlice::new(i, h, block))?;
                    }
                    Ok(h)
                })
                .collect::<io::Result<Vec<_>>>()
        })?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 70000]));
        let mut v = vec![0u8; 70000];
        v[69999] = 1;
        assert!(!is_zero(&v));
        v[69999] = 0;
        v[5] = 1;
        assert!(!is_zero(&v));
        assert_eq!(hash_block(&[0; 4096]), BlockHash::ZERO);
        assert_eq!(hash_block(b"abc").0, *blake3::hash(b"abc").as_bytes());
    }

    #[test]
    fn overlap_search() {
        let data = [(10, 5), (100, 50)];
        assert!(!overlaps(&data, 0, 10));
        assert!(overlaps(&data, 0, 11));
        assert!(!overlaps(&data, 15, 100));
        assert!(overlaps(&data, 149, 200));
        assert!(!overlaps(&data, 150, 200));
    }
}
