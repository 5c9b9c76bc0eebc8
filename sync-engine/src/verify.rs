//! Checking a target's bytes against its committed manifest.

use diskferry_protocol::{BlockHash, ErrorCode, Generation};

use crate::apply::{Status, Target};
use crate::error::{Error, IoContext, Place, Result};
use std::path::Path;

use crate::disk::Disk;
use crate::hash::hash_blocks;
use crate::local::Progress;
use crate::manifest::Manifest;
use crate::store::DiskKind;

/// What a verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// The committed generation.
    pub generation: Generation,
    /// Root of its manifest.
    pub root: BlockHash,
    /// Whether every block matched.
    pub ok: bool,
    /// Blocks that did not match.
    pub mismatched_blocks: u64,
    /// The first of them.
    pub first_mismatch: Option<u64>,
    /// Set when the size alone differs from the commit.
    pub size_mismatch: Option<(u64, u64)>,
}

/// Hashes the target and compares every block with the committed manifest.
/// A target whose bytes match has its stamp refreshed (its times may have
/// changed without its content).
pub fn verify(target: &mut Target, progress: &dyn Progress) -> Result<VerifyReport> {
    let report = check(target, progress)?;
    if report.ok {
        target.restamp()?;
    }
    Ok(report)
}

/// [`verify`] without refreshing the stamp.
pub fn check(target: &Target, progress: &dyn Progress) -> Result<VerifyReport> {
    let catalog = target.catalog().ok_or_else(|| {
        Error::new(ErrorCode::NoState, format!("diskferry has no state for {}", target.path().display()))
            .hint("sync it first, or pass the --state-dir it was synced with")
    })?;
    if catalog.status == Status::Incomplete {
        return Err(Error::new(
            ErrorCode::Incomplete,
            format!("{} is in the middle of a full copy and holds no recovery point", target.path().display()),
        )
        .hint("run the sync again to finish it"));
    }
    let Some(point) = catalog.current().copied() else {
        return Err(Error::new(ErrorCode::NoState, "no committed generation"));
    };
    let manifest = target.manifest_of(&point)?;
    let g = point.geometry;
    let path = target.path().to_path_buf();
    let vfs = target.vfs().clone();
    let meta = vfs
        .metadata(&path)
        .ctx(Place::Target, "reading", &path)?
        .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("target {} does not exist", path.display())))?;
    let size_ok = match meta.kind {
        DiskKind::File => meta.len == g.disk_bytes,
        DiskKind::BlockDevice => meta.len >= g.disk_bytes,
    };
    let mut report = VerifyReport {
        generation: point.generation,
        root: manifest.header().root,
        ok: size_ok,
        mismatched_blocks: 0,
        first_mismatch: None,
        size_mismatch: (!size_ok).then_some((g.disk_bytes, meta.len)),
    };
    if !size_ok {
        return Ok(report);
    }
    let disk = vfs.open_disk(&path).ctx(Place::Target, "opening", &path)?;
    progress.phase("verifying", g.disk_bytes);
    let (mismatched, first) = compare_with_manifest(&disk, &path, &manifest, progress, false)?;
    report.mismatched_blocks = mismatched;
    report.first_mismatch = first;
    report.ok = mismatched == 0;
    Ok(report)
}

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
