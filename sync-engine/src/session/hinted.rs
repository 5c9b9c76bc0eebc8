//! A source session's hinted read (`changes.rs`): whether a hint may be
//! used for this session, the spot check that tests it, and each region's
//! hashes from the dirty runs read and the history's record of the rest.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use diskferry_protocol::{BlockHash, Generation, Geometry, RegionHashes};

use crate::changes::{ChangeHint, DirtyBlocks, HintOutcome, SpotCheck};
use crate::disk::Disk;
use crate::error::{IoContext, Place, Result};
use crate::hash::{hash_block, hash_blocks_counted};
use crate::history::History;
use crate::manifest::{BlockCursor, Manifest};
use crate::store::Vfs;

/// Dirty runs closer than this many blocks are read as one.
const JOIN_GAP_BLOCKS: u64 = 1;

/// A hint in use: the dirty blocks and the recorded hashes of the rest,
/// read region by region in order.
#[derive(Debug)]
pub(super) struct Hinted {
    dirty: DirtyBlocks,
    recorded: Mutex<(u64, BlockCursor)>,
}

/// What a session was handed to decide on a hint.
pub(super) struct Offer<'a> {
    pub vfs: &'a Arc<dyn Vfs>,
    pub state_root: Option<&'a Path>,
    pub origin: &'a Path,
    pub path: &'a Path,
    pub disk: &'a Disk,
    pub geometry: Geometry,
}

/// Decides whether `hint` may stand in for a full read of the source, now
/// that the target said which generation it holds (`None` with a full
/// copy: everything is read anyway), and tests it on a sample of the
/// blocks it calls clean. A hint that is not used says why.
pub(super) fn start(
    o: &Offer<'_>,
    hint: &ChangeHint,
    spot: &SpotCheck,
    target_generation: Option<Generation>,
    full_copy: bool,
    read: &AtomicU64,
) -> Result<(Option<Hinted>, HintOutcome)> {
    let refuse = |why: String| Ok((None, HintOutcome::refused(why)));
    if full_copy {
        return refuse("a full copy reads every block".into());
    }
    if target_generation != Some(hint.since) {
        let at = target_generation.map_or_else(|| "no generation".to_string(), |g| format!("generation {g}"));
        return refuse(format!("the hint counts from generation {}, the target holds {at}", hint.since));
    }
    let Some(root) = o.state_root else { return refuse("no state directory holds the disk's history".into()) };
    let history = match History::load(o.vfs.as_ref(), root, o.origin)? {
        Some(h) if h.last() == Some(hint.since) => h,
        Some(h) => {
            let last = h.last().map_or_else(|| "nothing".to_string(), |g| g.to_string());
            return refuse(format!("the disk's history last recorded {last}, not the hint's {}", hint.since));
        }
        None => return refuse("the disk has no history to take unchanged blocks from".into()),
    };
    // A push of the same disk to another target may have replaced it meanwhile.
    let manifest = match history.manifest(o.vfs.clone(), root) {
        Ok(m) => m,
        Err(e) => return refuse(format!("the record of generation {} could not be read: {}", hint.since, e.message)),
    };
    // A change list counts from a moment; a fuzzy generation's hashes are
    // of no single moment. (An extent map compares the very clone that was
    // read, and a dirty bitmap starts after a read at rest: a fuzzy label on
    // those is a failover-sync pass, not a moving read.)
    let fuzzy = manifest.header().consistency == diskferry_protocol::Consistency::Fuzzy;
    if fuzzy && hint.source == crate::changes::ChangeSource::Ranges {
        return refuse(format!(
            "generation {} was read while the disk changed (fuzzy): a change list cannot count from it",
            hint.since
        ));
    }
    if manifest.geometry() != o.geometry {
        return refuse("the disk's size or block size changed since the hint's generation".into());
    }
    let g = o.geometry;
    let mut dirty = DirtyBlocks::from_ranges(&g, &hint.ranges);
    let sample = dirty.sample_clean(&g, spot);
    let mut outcome =
        HintOutcome { source: hint.source, note: None, dirty_blocks: dirty.count(), spot_checked: sample.len() as u64 };
    let mut written_meanwhile = Vec::new();
    if let Some(block) = spot_check(o, &manifest, &sample, hint, &mut written_meanwhile, read)? {
        outcome.source = crate::changes::ChangeSource::FullScan;
        outcome.note = Some(format!(
            "the spot check found block {block} changed where the {} hint called it clean: the disk was read in full",
            hint.source.as_str()
        ));
        return Ok((None, outcome));
    }
    if !written_meanwhile.is_empty() {
        // Written since the hint was cut: read them too.
        let mut ranges = hint.ranges.clone();
        ranges.extend(written_meanwhile.iter().map(|&b| (g.block_offset(b), u64::from(g.block_len(b)))));
        dirty = DirtyBlocks::from_ranges(&g, &ranges);
        outcome.dirty_blocks = dirty.count();
    }
    Ok((Some(Hinted { dirty, recorded: Mutex::new((0, manifest.cursor())) }), outcome))
}

/// The first sampled block whose bytes no longer hash to the record,
/// except blocks the running source wrote since the hint was cut (those
/// are put in `written_meanwhile`).
fn spot_check(
    o: &Offer<'_>,
    manifest: &Manifest,
    sample: &[u64],
    hint: &ChangeHint,
    written_meanwhile: &mut Vec<u64>,
    read: &AtomicU64,
) -> Result<Option<u64>> {
    let g = o.geometry;
    // First what each sampled block should hold and whether it lies in a
    // hole (known without a read: on a large sparse disk most of the
    // sample lands there), so that only the blocks to read are asked of
    // the device ahead, at once.
    let mut cursor = manifest.cursor();
    let mut at = 0u64;
    let mut data = DataWindow::default();
    let mut checks = Vec::with_capacity(sample.len());
    for &b in sample {
        // Skip to block b in the record (a sorted sample: one pass).
        if b > at {
            cursor.skip(b - at)?;
        }
        let recorded = cursor.next_blocks(1)?.first().copied().unwrap_or(BlockHash::ZERO);
        at = b + 1;
        let (off, len) = (g.block_offset(b), u64::from(g.block_len(b)));
        let holes = data.holes(o.disk, off, len).ctx(Place::Source, "reading", o.path)?;
        if !holes {
            o.disk.will_need(off, len);
        }
        checks.push((b, recorded, holes));
    }
    let mut buf = Vec::new();
    let mut live: Option<Vec<(u64, u64)>> = None;
    for (b, recorded, holes) in checks {
        let (off, len) = (g.block_offset(b), u64::from(g.block_len(b)));
        let now = if holes {
            BlockHash::ZERO
        } else {
            buf.resize(len as usize, 0);
            o.disk.read_at(off, &mut buf).ctx(Place::Source, "reading", o.path)?;
            read.fetch_add(len, Ordering::Relaxed);
            hash_block(&buf)
        };
        if now != recorded {
            let Some(ask) = &hint.live else { return Ok(Some(b)) };
            let covers = |list: &[(u64, u64)]| list.iter().any(|&(o, l)| o < off + len && off < o + l);
            // Asked again only when the last answer does not cover it: the
            // write may be newer than that answer.
            if !live.as_deref().is_some_and(covers) {
                live = Some((ask.0)().ctx(Place::Source, "asking what was written to", o.path)?);
            }
            if !live.as_deref().is_some_and(covers) {
                return Ok(Some(b));
            }
            written_meanwhile.push(b);
        }
    }
    Ok(None)
}

/// Where the source holds data, asked a window at a time: a spot check's
/// sorted sample of a 1 TiB disk is about 16 K blocks, and one `SEEK_DATA`
/// walk per 1 GiB costs far fewer calls than one per block.
#[derive(Default)]
struct DataWindow {
    start: u64,
    end: u64,
    ranges: Vec<(u64, u64)>,
}

/// The window asked at a time.
const DATA_WINDOW: u64 = 1 << 30;

impl DataWindow {
    /// Whether `[off, off+len)` lies wholly in holes.
    fn holes(&mut self, disk: &Disk, off: u64, len: u64) -> std::io::Result<bool> {
        if off < self.start || off + len > self.end {
            let window = DATA_WINDOW.max(len).min(disk.len().saturating_sub(off)).max(len);
            self.ranges = disk.data_ranges(off, window)?;
            (self.start, self.end) = (off, off + window);
        }
        Ok(!self.ranges.iter().any(|&(o, l)| o < off + len && off < o + l))
    }
}

impl Hinted {
    /// Whether region `region` is taken from the record alone (no dirty
    /// block): such a region needs no read and no hashing thread.
    pub(super) fn clean(&self, g: &Geometry, region: u64) -> bool {
        !self.dirty.touches(g.region_range(region))
    }

    /// Region `region`'s block hashes: the dirty runs read and hashed, the
    /// rest as recorded. `None` when regions are asked out of order (the
    /// record is read forward only): the caller then reads the region.
    pub(super) fn region(
        &self,
        disk: &Disk,
        g: &Geometry,
        region: u64,
        path: &Path,
        read: &AtomicU64,
    ) -> Result<Option<RegionHashes>> {
        let range = g.region_range(region);
        let recorded = {
            let mut rec = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            if rec.0 != region {
                return Ok(None);
            }
            rec.0 += 1;
            rec.1.next_hashes(range.end - range.start)?
        };
        let dirty = self.dirty.within(range.clone(), JOIN_GAP_BLOCKS);
        if dirty.is_empty() {
            return Ok(Some(recorded));
        }
        let mut hashes = recorded.into_vec();
        // Scattered runs: read what they ask, not the pages around them.
        let disk = disk.unmapped();
        // All asked of the device at once: in a fresh reflink snapshot
        // (nothing cached) or on a cold disk, one wait instead of one per run.
        for run in &dirty {
            disk.will_need(g.block_offset(run.start), g.block_offset(run.end) - g.block_offset(run.start));
        }
        for run in dirty {
            let fresh = hash_blocks_counted(&disk, g, run.clone(), None, read).ctx(Place::Source, "reading", path)?;
            let at = (run.start - range.start) as usize;
            hashes[at..at + fresh.len()].copy_from_slice(&fresh);
        }
        Ok(Some(RegionHashes::Listed(hashes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RealFs;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn the_data_window_moves_with_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(5 * DATA_WINDOW).unwrap();
        // Data in the first window, and past the second one.
        for at in [4096u64, 2 * DATA_WINDOW + (3 << 20), 5 * DATA_WINDOW - 65536] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[7u8; 65536]).unwrap();
        }
        drop(f);
        let disk = Disk::open_on(&RealFs, &path).unwrap();
        let mut w = DataWindow::default();
        let b = 65536;
        assert!(!w.holes(&disk, 0, b).unwrap());
        assert!(w.holes(&disk, 1 << 20, b).unwrap());
        assert!(w.holes(&disk, DATA_WINDOW + b, b).unwrap());
        assert!(!w.holes(&disk, 2 * DATA_WINDOW + (3 << 20), b).unwrap());
        assert!(w.holes(&disk, 2 * DATA_WINDOW + (8 << 20), b).unwrap());
        assert!(!w.holes(&disk, 5 * DATA_WINDOW - b, b).unwrap());
        // Asked out of order (not how the sample comes, but still right).
        assert!(!w.holes(&disk, 0, b).unwrap());
    }
}
