//! zstd at a low level, skipped for data it does not shrink. After a block
//! that does not shrink, the next ones are sent raw for a while, twice as
//! long after each further miss: on an incompressible disk an attempt per
//! 33 blocks still cost a tenth of a full push's source CPU.

use std::cell::RefCell;

/// Blocks sent raw after one that did not shrink.
const SKIP_AFTER_MISS: u32 = 32;
/// The longest raw run after misses in a row (16 MiB of 64 KiB blocks):
/// compressible data after a long incompressible stretch is found again
/// within that.
const MAX_SKIP: u32 = 256;

/// One thread's compressor and how long it sends raw.
struct State {
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
    skip: u32,
    next_skip: u32,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Compresses `data` at `level` if that saves at least 1/16 of it; `None`
/// means "send it raw".
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.as_ref().is_none_or(|st| st.level != level) {
            *s = zstd::bulk::Compressor::new(level).ok().map(|compressor| State {
                level,
                compressor,
                skip: 0,
                next_skip: SKIP_AFTER_MISS,
            });
        }
        let st = s.as_mut()?;
        if st.skip > 0 {
            st.skip -= 1;
            return None;
        }
        match st.compressor.compress(data) {
            Ok(out) if out.len() + data.len() / 16 <= data.len() => {
                st.next_skip = SKIP_AFTER_MISS;
                Some(out)
            }
            _ => {
                st.skip = st.next_skip;
                st.next_skip = (st.next_skip * 2).min(MAX_SKIP);
                None
            }
        }
    })
}

/// Decompresses a payload that must decode to exactly `plain_len` bytes.
pub fn decompress(payload: &[u8], plain_len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; plain_len];
    decompress_into(payload, &mut out).then_some(out)
}

/// Decompresses a payload into `out`, which it must fill exactly (a
/// receiver decompresses straight into the buffer it writes from).
pub fn decompress_into(payload: &[u8], out: &mut [u8]) -> bool {
    // A payload that decodes to more does not fit and fails; to less, is short.
    zstd::bulk::decompress_to_buffer(payload, out).is_ok_and(|n| n == out.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_round_trip_and_random_skipped() {
        let text = b"diskferry ".repeat(6000);
        let c = compress(&text, 1).unwrap();
        assert!(c.len() < text.len() / 10);
        assert_eq!(decompress(&c, text.len()).unwrap(), text);
        assert!(decompress(&c, text.len() - 1).is_none());
        let mut x = 0x1234_5678_u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&noise, 1).is_none());
        // Right after a miss, even compressible data is sent raw for a while,
        // twice as long after each miss in a row (up to MAX_SKIP); a block
        // that shrinks ends the backing off.
        let mut skip = SKIP_AFTER_MISS;
        for _ in 0..6 {
            for _ in 0..skip {
                assert!(compress(&text, 1).is_none());
            }
            assert!(compress(&noise, 1).is_none(), "an attempt that misses");
            skip = (skip * 2).min(MAX_SKIP);
        }
        assert_eq!(skip, MAX_SKIP);
        let raw_run = || (0..).take_while(|_| compress(&text, 1).is_none()).count();
        assert_eq!(raw_run(), MAX_SKIP as usize);
        assert!(compress(&noise, 1).is_none());
        assert_eq!(raw_run(), SKIP_AFTER_MISS as usize);
    }
}
