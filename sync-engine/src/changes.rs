//! Change hints: the ranges of a disk that may have changed since a
//! generation, as a hypervisor's dirty bitmap, the extent map of a reflink
//! snapshot or another tracker's change list says. A source session given a
//! hint reads and hashes only those ranges and takes every other block's
//! hash from the disk's history — but only when the hint is tied to the
//! generation the target is at and the history holds that generation's
//! manifest, and only after a spot check of blocks the hint calls clean
//! found none changed. Otherwise the disk is read in full and the report
//! says why.

use std::ops::Range;

use diskferry_protocol::{Generation, Geometry};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Where a push learned what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeSource {
    /// No hint: every block was read and hashed.
    FullScan,
    /// A QEMU dirty bitmap.
    DirtyBitmap,
    /// The extents a reflink snapshot no longer shares with the last one.
    ExtentMap,
    /// A change list from another tracker.
    Ranges,
}

impl ChangeSource {
    /// The name in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeSource::FullScan => "full-scan",
            ChangeSource::DirtyBitmap => "dirty-bitmap",
            ChangeSource::ExtentMap => "extent-map",
            ChangeSource::Ranges => "ranges",
        }
    }
}

/// Byte ranges that may have changed since generation `since`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeHint {
    /// The generation the ranges are counted from.
    pub since: Generation,
    /// Who says so.
    pub source: ChangeSource,
    /// `(offset, length)` byte ranges, in any order, possibly overlapping.
    pub ranges: Vec<(u64, u64)>,
    /// For a disk that runs while it is read: the ranges written since the
    /// hint was cut. A spot-check mismatch there is such a write, not a lie.
    pub live: Option<LiveWrites>,
}

/// Asks the source's owner which byte ranges were written since the hint
/// was cut (a running VM's bitmap started with the pass).
#[derive(Clone)]
pub struct LiveWrites(pub std::sync::Arc<WrittenRanges>);

/// The byte ranges written since some moment, or why they are not known.
pub type WrittenRanges = dyn Fn() -> std::io::Result<Vec<(u64, u64)>> + Send + Sync;

impl std::fmt::Debug for LiveWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveWrites")
    }
}

impl PartialEq for LiveWrites {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LiveWrites {}

/// How many clean blocks a hinted push re-hashes to test the hint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpotCheck {
    /// Share of the blocks the hint calls clean (default 0.1 %).
    pub fraction: f64,
    /// At least this many (or all clean blocks, if fewer).
    pub min_blocks: u64,
    /// Seeds the choice of blocks (the engine has no randomness of its own).
    pub seed: u64,
}

impl SpotCheck {
    /// The default share with a seed.
    pub fn with_seed(seed: u64) -> SpotCheck {
        SpotCheck { fraction: 0.001, min_blocks: 16, seed }
    }
}

/// What a push did with its hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HintOutcome {
    /// `FullScan` when there was none or it was not used.
    pub source: ChangeSource,
    /// Why a hint was not used (or stopped being trusted).
    pub note: Option<String>,
    /// Blocks the hint called dirty.
    pub dirty_blocks: u64,
    /// Clean blocks re-hashed by the spot check.
    pub spot_checked: u64,
}

impl HintOutcome {
    /// No hint was offered.
    pub fn full_scan() -> HintOutcome {
        HintOutcome { source: ChangeSource::FullScan, note: None, dirty_blocks: 0, spot_checked: 0 }
    }

    /// A hint was offered and not used, because `why`.
    pub fn refused(why: impl Into<String>) -> HintOutcome {
        HintOutcome { note: Some(why.into()), ..HintOutcome::full_scan() }
    }
}

/// The blocks a hint calls dirty: sorted, disjoint, non-adjacent runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBlocks {
    runs: Vec<Range<u64>>,
}

impl DirtyBlocks {
    /// Every block touched by a byte range, within the geometry.
    pub fn from_ranges(g: &Geometry, ranges: &[(u64, u64)]) -> DirtyBlocks {
        let bs = g.block_size.bytes();
        let mut runs: Vec<Range<u64>> = ranges
            .iter()
            .filter(|&&(off, len)| len > 0 && off < g.disk_bytes)
            .map(|&(off, len)| off / bs..off.saturating_add(len).min(g.disk_bytes).div_ceil(bs))
            .collect();
        runs.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        DirtyBlocks { runs: merged }
    }

    /// How many blocks are dirty.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether any block of `blocks` is dirty.
    pub fn touches(&self, blocks: Range<u64>) -> bool {
        let i = self.runs.partition_point(|r| r.end <= blocks.start);
        self.runs.get(i).is_some_and(|r| r.start < blocks.end)
    }

    /// Whether block `b` is dirty.
    pub fn contains(&self, b: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end <= b);
        self.runs.get(i).is_some_and(|r| r.start <= b)
    }

    /// The dirty runs within `blocks`, clipped to it, with runs closer than
    /// `gap` blocks joined (one larger read beats many small ones).
    pub fn within(&self, blocks: Range<u64>, gap: u64) -> Vec<Range<u64>> {
        let i = self.runs.partition_point(|r| r.end <= blocks.start);
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in self.runs[i..].iter().take_while(|r| r.start < blocks.end) {
            let r = r.start.max(blocks.start)..r.end.min(blocks.end);
            match out.last_mut() {
                Some(last) if r.start <= last.end + gap => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// The blocks a spot check re-hashes: a sorted sample of the clean
    /// blocks, `spot.fraction` of them and at least `spot.min_blocks`.
    pub fn sample_clean(&self, g: &Geometry, spot: &SpotCheck) -> Vec<u64> {
        let total = g.block_count();
        let clean = total - self.count().min(total);
        if clean == 0 {
            return Vec::new();
        }
        let want = ((clean as f64 * spot.fraction).ceil() as u64).max(spot.min_blocks).min(clean);
        let mut rng = SmallRng::seed_from_u64(spot.seed);
        let mut picked = std::collections::BTreeSet::new();
        // Draw among the clean blocks by rank, then map the rank past the
        // dirty runs before it: uniform over clean blocks, no rejection loop.
        while (picked.len() as u64) < want {
            picked.insert(rng.random_range(0..clean));
        }
        let mut out = Vec::with_capacity(picked.len());
        let mut runs = self.runs.iter().peekable();
        let mut skipped = 0;
        for rank in picked {
            let mut b = rank + skipped;
            while let Some(r) = runs.peek() {
                if r.start <= b {
                    skipped += r.end - r.start;
                    b = rank + skipped;
                    runs.next();
                } else {
                    break;
                }
            }
            out.push(b);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_protocol::BlockSize;

    fn geo(blocks: u64) -> Geometry {
        Geometry::new(blocks * 65536 - 100, BlockSize::DEFAULT)
    }

    #[test]
    fn ranges_round_out_to_blocks_and_merge() {
        let g = geo(100);
        let d = DirtyBlocks::from_ranges(&g, &[(65536 * 10 + 5, 1), (65536 * 11, 65536 * 2), (0, 0), (1 << 40, 9)]);
        assert_eq!(d.runs, vec![10..13]);
        assert!(d.contains(10) && d.contains(12) && !d.contains(13) && !d.contains(9));
        let d = DirtyBlocks::from_ranges(&g, &[(65536 * 99, 1 << 30), (0, 1)]);
        assert_eq!(d.runs, vec![0..1, 99..100]);
        assert_eq!(d.count(), 2);
    }

    #[test]
    fn within_clips_and_joins_close_runs() {
        let g = geo(100);
        let d = DirtyBlocks::from_ranges(&g, &[(0, 65536 * 3), (65536 * 5, 65536), (65536 * 30, 65536 * 40)]);
        assert_eq!(d.within(2..40, 0), vec![2..3, 5..6, 30..40]);
        assert_eq!(d.within(2..40, 2), vec![2..6, 30..40]);
        assert_eq!(d.within(6..30, 4), Vec::<Range<u64>>::new());
    }

    #[test]
    fn the_sample_is_clean_sorted_and_sized() {
        let g = geo(10_000);
        let d = DirtyBlocks::from_ranges(&g, &[(0, 65536 * 4000), (65536 * 6000, 65536 * 10)]);
        for seed in 0..20 {
            let s = d.sample_clean(&g, &SpotCheck { fraction: 0.01, min_blocks: 16, seed });
            assert_eq!(s.len(), 60, "1 % of 5990 clean blocks");
            assert!(s.windows(2).all(|w| w[0] < w[1]));
            assert!(s.iter().all(|&b| !d.contains(b) && b < 10_000), "{s:?}");
        }
        let s = d.sample_clean(&g, &SpotCheck::with_seed(1));
        assert_eq!(s.len(), 16, "at least 16");
        let all = DirtyBlocks::from_ranges(&g, &[(0, u64::MAX)]);
        assert!(all.sample_clean(&g, &SpotCheck::with_seed(1)).is_empty());
        let few = DirtyBlocks::from_ranges(&g, &[(0, 65536 * 9990)]);
        assert_eq!(few.sample_clean(&g, &SpotCheck::with_seed(3)), (9990..10_000).collect::<Vec<_>>());
    }
}
