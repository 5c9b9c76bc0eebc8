//! Parallel block hashing: holes skipped with SEEK_DATA, zero blocks detected
//! before hashing, blake3 on every core.

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use diskferry_protocol::{BlockHash, Geometry};
use rayon::prelude::*;

use crate::block::VerifiedSlice;
use crate::disk::Disk;

/// Bytes one hashing task maps or reads at a time: large enough to amortize
/// the map, small enough that memory stays low however large the disk.
const BATCH_BYTES: u64 = 4 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SCRATCH2: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub use crate::leaf::{hash_block, is_zero};

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
    hash_blocks_counted(disk, g, blocks, visit, &AtomicU64::new(0))
}

/// [`hash_blocks_visit`], adding to `read` the bytes it read (holes are
/// not read).
pub fn hash_blocks_counted(
    disk: &Disk,
    g: &Geometry,
    blocks: Range<u64>,
    visit: Option<BlockVisitor<'_>>,
    read: &AtomicU64,
) -> io::Result<Vec<BlockHash>> {
    let layout = Layout::new(disk, g, &blocks)?;
    let parts: Vec<Vec<BlockHash>> = batches(g, &blocks)
        .into_par_iter()
        .map(|batch| {
            with_batch(disk, &layout, g, &batch, &SCRATCH, |bytes| {
                read.fetch_add(bytes.bytes.map_or(0, |b| b.len() as u64), Ordering::Relaxed);
                batch
                    .clone()
                    .map(|i| {
                        let Some(block) = bytes.block(g, i) else { return Ok(BlockHash::ZERO) };
                        let h = hash_block(block);
                        if let (Some(v), false) = (visit, h.is_zero()) {
                            let owner = bytes.owner.map(|o| (o, (g.block_offset(i) - bytes.start) as usize));
                            v(VerifiedSlice::new(i, h, block, owner))?;
                        }
                        Ok(h)
                    })
                    .collect::<io::Result<Vec<_>>>()
            })?
        })
        .collect::<io::Result<_>>()?;
    Ok(parts.concat())
}

/// Hashes `blocks` of `source` and compares each with the same block of
/// `target` byte for byte (zeros past the target's end): the local full
/// compare, which needs no hash of the target.
pub fn hash_and_compare(
    source: &Disk,
    target: &Disk,
    g: &Geometry,
    blocks: Range<u64>,
) -> io::Result<Vec<(BlockHash, bool)>> {
    let src_layout = Layout::new(source, g, &blocks)?;
    let tgt_layout = Layout::new(target, g, &blocks)?;
    let parts: Vec<Vec<(BlockHash, bool)>> = batches(g, &blocks)
        .into_par_iter()
        .map(|batch| {
            with_batch(source, &src_layout, g, &batch, &SCRATCH, |s| {
                with_batch(target, &tgt_layout, g, &batch, &SCRATCH2, |t| {
                    batch
                        .clone()
                        .map(|i| {
                            let (sb, tb) = (s.block(g, i), t.block(g, i));
                            let h = sb.map_or(BlockHash::ZERO, hash_block);
                            let equal = match (sb, tb) {
                                (None, None) => true,
                                (None, Some(t)) => is_zero(t),
                                (Some(_), None) => h.is_zero(),
                                (Some(s), Some(t)) => {
                                    let n = t.len().min(s.len());
                                    s[..n] == t[..n] && is_zero(&s[n..])
                                }
                            };
                            (h, equal)
                        })
                        .collect::<Vec<_>>()
                })
            })?
        })
        .collect::<io::Result<_>>()?;
    Ok(parts.concat())
}

/// Splits a block range into batches of about [`BATCH_BYTES`].
fn batches(g: &Geometry, blocks: &Range<u64>) -> Vec<Range<u64>> {
    let per_batch = (BATCH_BYTES / g.block_size.bytes()).max(1);
    (blocks.start..blocks.end).step_by(per_batch as usize).map(|b| b..(b + per_batch).min(blocks.end)).collect()
}

/// Where a disk holds data within a block range, found once per call.
struct Layout {
    data: Vec<(u64, u64)>,
    readable_end: u64,
}

impl Layout {
    fn new(disk: &Disk, g: &Geometry, blocks: &Range<u64>) -> io::Result<Layout> {
        let readable_end = g.disk_bytes.min(disk.len());
        let start = g.block_offset(blocks.start).min(readable_end);
        let end = g.block_offset(blocks.end).min(readable_end);
        let data = if end > start { disk.data_ranges(start, end - start)? } else { Vec::new() };
        Ok(Layout { data, readable_end })
    }

    fn has_data(&self, start: u64, end: u64) -> bool {
        // `data` is sorted and disjoint: find the first range ending after `start`.
        let i = self.data.partition_point(|&(off, len)| off + len <= start);
        start < end && self.data.get(i).is_some_and(|&(off, _)| off < end)
    }

    /// The smallest span of `[start, end)` holding all its data, widened to
    /// whole blocks (`None` if it is all holes).
    fn data_span(&self, start: u64, end: u64, bs: u64) -> Option<(u64, u64)> {
        let i = self.data.partition_point(|&(off, len)| off + len <= start);
        let first = self.data.get(i).filter(|&&(off, _)| off < end)?.0.max(start);
        let j = self.data.partition_point(|&(off, _)| off < end);
        let (off, len) = self.data[j.checked_sub(1)?];
        let last = (off + len).min(end);
        Some((start + (first - start) / bs * bs, (start + (last - start).div_ceil(bs) * bs).min(end)))
    }
}

/// One batch's bytes (`None`: all holes).
struct BatchBytes<'a> {
    start: u64,
    bytes: Option<&'a [u8]>,
    owner: Option<&'a Bytes>,
    layout: &'a Layout,
}

impl BatchBytes<'_> {
    /// Block `i`'s bytes, or `None` when it lies in a hole or past the end.
    fn block(&self, g: &Geometry, i: u64) -> Option<&[u8]> {
        let bytes = self.bytes?;
        let b_start = g.block_offset(i);
        let b_end = (b_start + g.block_size.bytes()).min(self.layout.readable_end);
        if !self.layout.has_data(b_start, b_end) {
            return None;
        }
        bytes.get((b_start.checked_sub(self.start)?) as usize..(b_end - self.start) as usize)
    }
}

fn with_batch<R>(
    disk: &Disk,
    layout: &Layout,
    g: &Geometry,
    batch: &Range<u64>,
    scratch: &'static std::thread::LocalKey<RefCell<Vec<u8>>>,
    f: impl FnOnce(&BatchBytes<'_>) -> R,
) -> io::Result<R> {
    let batch_start = g.block_offset(batch.start).min(layout.readable_end);
    let batch_end = g.block_offset(batch.end).min(layout.readable_end);
    // Map only the span that holds data: populating hole pages would make
    // the kernel allocate and zero page cache for nothing.
    let Some((start, end)) = layout.data_span(batch_start, batch_end, g.block_size.bytes()) else {
        return Ok(f(&BatchBytes { start: batch_start, bytes: None, owner: None, layout }));
    };
    scratch.with(|buf| {
        let mut buf = buf.borrow_mut();
        disk.with_bytes(start, (end - start) as usize, &mut buf, |bytes, owner| {
            f(&BatchBytes { start, bytes: Some(bytes), owner, layout })
        })
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
    fn data_span_is_block_aligned() {
        let l = Layout { data: vec![(5000, 100), (20000, 10)], readable_end: 1 << 20 };
        assert_eq!(l.data_span(0, 65536, 4096), Some((4096, 20480)));
        assert_eq!(l.data_span(8192, 16384, 4096), None);
        assert_eq!(l.data_span(0, 4096, 4096), None);
        assert_eq!(l.data_span(4096, 8192, 4096), Some((4096, 8192)));
    }

    #[test]
    fn layout_search() {
        let l = Layout { data: vec![(10, 5), (100, 50)], readable_end: 1000 };
        assert!(!l.has_data(0, 10));
        assert!(l.has_data(0, 11));
        assert!(!l.has_data(15, 100));
        assert!(l.has_data(149, 200));
        assert!(!l.has_data(150, 200));
    }
}
