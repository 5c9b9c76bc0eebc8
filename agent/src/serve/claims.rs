//! The blocks of a full copy that a data frame has already written. A full
//! copy's frames are written as soon as they are verified, before the
//! session's state machine counts them, so a frame sent twice, or one for a
//! region already done, would overwrite bytes whose hash the manifest
//! already holds. Each block is claimed once, before its bytes go to disk;
//! a second claim fails the session and writes nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use diskferry_protocol::Geometry;

/// One bit per block of the disk, set when a frame wrote it.
pub(super) struct Claims {
    geometry: Geometry,
    bits: Vec<AtomicU64>,
}

impl Claims {
    pub fn new(geometry: Geometry) -> Claims {
        let words = geometry.block_count().div_ceil(64);
        Claims { geometry, bits: (0..words).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Claims blocks `first..first + count`, which must lie in one region
    /// of the disk. `Err` says why they may not be written.
    pub fn claim(&self, first: u64, count: u64) -> Result<(), String> {
        let g = &self.geometry;
        let Some(end) = first.checked_add(count).filter(|&e| count > 0 && e <= g.block_count()) else {
            return Err(format!("blocks {first}+{count} are outside the disk of {} blocks", g.block_count()));
        };
        if g.region_of(first) != g.region_of(end - 1) {
            return Err(format!("blocks {first}+{count} span regions"));
        }
        let mut block = first;
        while block < end {
            let bit = block % 64;
            let n = (end - block).min(64 - bit);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            let word = &self.bits[(block / 64) as usize];
            let before = word.fetch_or(mask, Ordering::AcqRel);
            if before & mask != 0 {
                let again = block + u64::from((before & mask).trailing_zeros()) - bit;
                return Err(format!("block {again} was sent twice"));
            }
            block += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_protocol::BlockSize;

    fn claims(blocks: u64) -> Claims {
        let bs = BlockSize::new(4096).unwrap();
        Claims::new(Geometry::new(blocks * 4096, bs))
    }

    #[test]
    fn each_block_once() {
        let c = claims(1000);
        c.claim(0, 1).unwrap();
        c.claim(1, 130).unwrap();
        assert_eq!(c.claim(0, 1), Err("block 0 was sent twice".into()));
        assert_eq!(c.claim(100, 1), Err("block 100 was sent twice".into()));
        // A range overlapping a claimed block anywhere in it.
        assert_eq!(c.claim(131, 64), Ok(()));
        assert_eq!(c.claim(190, 10), Err("block 190 was sent twice".into()));
        c.claim(999, 1).unwrap();
    }

    #[test]
    fn ranges_outside_the_disk_or_across_regions_are_refused() {
        let c = claims(1000);
        assert!(c.claim(1000, 1).is_err());
        assert!(c.claim(999, 2).is_err());
        assert!(c.claim(5, 0).is_err());
        assert!(c.claim(u64::MAX - 1, 3).is_err());
        // 4 MiB blocks: a region holds 32 of them.
        let big = Claims::new(Geometry::new(100 << 22, BlockSize::new(4 << 20).unwrap()));
        assert!(big.claim(31, 2).unwrap_err().contains("span regions"));
        big.claim(32, 32).unwrap();
    }

    #[test]
    fn concurrent_claims_of_one_block_let_one_through() {
        let c = std::sync::Arc::new(claims(64 * 1024));
        let won: u64 = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| (0..64 * 1024).filter(|&b| c.claim(b, 1).is_ok()).count() as u64)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(won, 64 * 1024);
    }
}
