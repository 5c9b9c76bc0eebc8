//! Comparing a disk's bytes with a manifest, region by region (`verify`,
//! export's image check, and recovery's check of a renamed copy).

use std::path::Path;

use crate::disk::Disk;
use crate::error::{IoContext, Place, Result};
use crate::hash::hash_blocks;
use crate::progress::Progress;

use super::Manifest;

/// Hashes `disk` region by region and compares every block with `manifest`:
/// the number of blocks that differ and the first of them. With `stop_early`
/// it stops at the first differing region (a yes/no check).
pub fn compare_with_manifest(
    disk: &Disk,
    path: &Path,
    manifest: &Manifest,
    progress: &dyn Progress,
    stop_early: bool,
) -> Result<(u64, Option<u64>)> {
    let g = manifest.geometry();
    let mut cursor = manifest.cursor();
    let (mut mismatched, mut first) = (0u64, None);
    for region in 0..g.region_count() {
        let range = g.region_range(region);
        let have = hash_blocks(disk, &g, range.clone()).ctx(Place::Target, "reading", path)?;
        let want = cursor.next_blocks(range.end - range.start)?;
        for (i, (a, b)) in have.iter().zip(&want).enumerate() {
            if a != b {
                mismatched += 1;
                first.get_or_insert(range.start + i as u64);
            }
        }
        if stop_early && mismatched > 0 {
            break;
        }
        progress.advance(g.block_offset(range.end).min(g.disk_bytes) - g.block_offset(range.start));
    }
    Ok((mismatched, first))
}
