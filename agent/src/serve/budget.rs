//! The target agent's one memory budget (`memory_budget_mib`).
//!
//! It is split in two pools so that neither can starve the other:
//! - **sessions** (half): an admitted session holds its QUIC receive window
//!   (what the source may send ahead of what the agent has read) and an
//!   estimate of its working state (region views and hashes in flight, the
//!   manifest index held in memory, I/O buffers) for as long as it runs.
//!   Sessions beyond what the pool holds wait before their target is opened;
//!   they never fail for memory. Their connection keeps a small window
//!   meanwhile, and the source waits for the Accept.
//! - **frames** (half): a block frame holds its wire bytes and its decoding
//!   buffers from before its body is read off the stream until it is staged
//!   or written. A frame waiting for units is not read, so QUIC flow control
//!   stops the source.
//!
//! What stays outside: the binary itself, thread stacks and the runtime, a
//! few small buffers per connection that waits for admission — a fixed
//! amount that does not grow with the disk size — and, per full-copy
//! session, up to 8 MiB of idle aligned write buffers kept for reuse
//! (a buffer in use belongs to a frame and is counted with it).

use std::sync::Arc;

use diskferry_protocol::coding::{BufExt, DecodeResult};
use diskferry_protocol::message::MAX_FRAME;
use diskferry_protocol::session::WINDOW_UNITS;
use diskferry_protocol::Geometry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accounting unit.
const UNIT: u64 = 4096;
/// The smallest budget that runs a session with the largest blocks.
pub const MIN_BUDGET: u64 = 16 << 20;
/// Region views the view thread may have made ahead of the session (a
/// deeper queue lets it run on while the session answers the source: on
/// a large sparse disk, a handoff per region dominated).
pub const VIEWS_QUEUED: usize = 8;
/// The receive window of a connection not yet admitted: room for control frames only.
pub const PRE_ADMISSION_WINDOW: u64 = 256 << 10;
/// Largest control frame a source may send (a region's chunk hashes are 16 KiB).
pub const MAX_CONTROL_FRAME: u32 = 256 << 10;
/// Bytes of a block frame up to its first patch (type byte included).
pub const BLOCK_HEAD: usize = 56;
/// Regions a source may have in flight (fewer for small blocks, whose regions hold more blocks).
const MAX_REGIONS_IN_FLIGHT: u32 = 16;

/// What one session may use, decided when it opens.
#[derive(Clone, Copy, Debug)]
pub struct SessionCost {
    units: u32,
    /// The connection's QUIC receive window once admitted.
    pub receive_window: u64,
    /// Regions the source may have in flight (`Accept.window`).
    pub regions_in_flight: u32,
    /// Manifest index entries held in memory before a sorted run spills.
    pub index_entries: usize,
}

/// The two pools.
#[derive(Debug)]
pub struct Budget {
    sessions: Arc<Semaphore>,
    session_units: u32,
    frames: Arc<Semaphore>,
    frame_units: u32,
}

fn units(bytes: u64, cap: u32) -> u32 {
    (bytes.div_ceil(UNIT).max(1)).min(cap as u64) as u32
}

impl Budget {
    /// A budget of `bytes` (at least [`MIN_BUDGET`]).
    pub fn new(bytes: u64) -> Budget {
        let half = (bytes.max(MIN_BUDGET) / 2 / UNIT).min(u32::MAX as u64 / 2) as u32;
        Budget {
            sessions: Arc::new(Semaphore::new(half as usize)),
            session_units: half,
            frames: Arc::new(Semaphore::new(half as usize)),
            frame_units: half,
        }
    }

    /// What a session of geometry `g` costs.
    pub fn session_cost(&self, g: &Geometry) -> SessionCost {
        self.cost(g, 1)
    }

    /// What each of the `members` sessions of a group push costs when they
    /// share one admission (`units` is the whole group's): one receive
    /// window split between them, and each member's own state (its share
    /// of the regions in flight, its index, its I/O buffers), judged from
    /// `g` (the member that opens first).
    pub fn group_cost(&self, g: &Geometry, members: u16) -> SessionCost {
        self.cost(g, u64::from(members.max(1)))
    }

    fn cost(&self, g: &Geometry, members: u64) -> SessionCost {
        let pool = self.session_units as u64 * UNIT;
        let receive_window = ((pool / 8).clamp(1 << 20, 16 << 20) / members).max(1 << 20);
        // Each region in flight: the source's hashes, the target's view of it
        // and of the regions looked ahead (2 × window), about 34 bytes a block.
        let per_region = g.region_blocks() * 34 * 3;
        let regions_in_flight =
            (((2 << 20) / per_region.max(1)).clamp(2, MAX_REGIONS_IN_FLIGHT as u64) / members).max(2) as u32;
        // A sorted run of about the size its merge reads back (64 KiB per run).
        let blocks = g.block_count().max(1);
        let index_entries = ((blocks * 4096) as f64).sqrt().clamp(16384.0, (1 << 20) as f64) as usize;
        let state = per_region * regions_in_flight as u64
            + g.region_blocks() * 34 * VIEWS_QUEUED as u64
            // empty regions' views (a chunk list, ~1 KiB): looked ahead as
            // far as the window's units reach, and batched in the queue
            + (2 * regions_in_flight as u64 * u64::from(WINDOW_UNITS)
                + (VIEWS_QUEUED * super::view::EMPTY_VIEWS_PER_BATCH) as u64)
                * 2048
            + index_entries.min(blocks as usize) as u64 * 16
            + blocks.div_ceil(index_entries as u64) * (64 << 10)
            + diskferry_sync_engine::apply::TOUCHED_LIST_BYTES // the redo log's ranges
            + (3 << 20); // redo log, manifest and view I/O buffers
        SessionCost {
            units: units((receive_window + state) * members, self.session_units),
            receive_window,
            regions_in_flight,
            index_entries,
        }
    }

    /// Waits until a session of `cost` fits.
    pub async fn admit(&self, cost: &SessionCost) -> Option<OwnedSemaphorePermit> {
        self.sessions.clone().acquire_many_owned(cost.units).await.ok()
    }

    /// Whether a session of `cost` can start now (for logging that it waits).
    pub fn fits_now(&self, cost: &SessionCost) -> bool {
        self.sessions.available_permits() >= cost.units as usize
    }

    /// Waits until a frame of `bytes` (see [`frame_bytes`]) fits.
    pub async fn frame(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        self.frames.clone().acquire_many_owned(units(bytes, self.frame_units)).await.ok()
    }
}

/// The memory a frame of `len` bytes holds until staged, judged from its
/// first bytes: the wire bytes, plus a decompressed copy for zstd, plus one
/// block (the aligned copy of a whole block, or the current content a patch
/// applies to).
pub fn frame_bytes(len: u32, head: &[u8]) -> u64 {
    let len = len.min(MAX_FRAME) as u64;
    // Block: type 0x10 · u64 index · [32] hash · u32 block len · u8 codec ·
    // u16 patches · (u32 offset · u32 len) of the first patch · …
    if head.len() < BLOCK_HEAD || head[0] != 0x10 {
        return len;
    }
    let mut f: &[u8] = &head[41..BLOCK_HEAD];
    let fields = (|| -> DecodeResult<_> { Ok((f.get_u32_checked()?, f.get_u8_checked()?)) })();
    let Ok((block_len, codec)) = fields else { return len };
    let block_len = (block_len as u64).min(MAX_FRAME as u64);
    let mut bytes = len;
    if codec != 0 {
        bytes += block_len;
    }
    // One block more: a whole block is copied into an aligned buffer for a
    // full copy's direct writes (or joined from its pieces), a patch needs
    // the block's current content to be verified over.
    bytes += block_len;
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_protocol::message::{BlockFrame, Codec};
    use diskferry_protocol::{BlockHash, BlockSize, Message};

    fn frame(codec: Codec, patches: Vec<(u32, u32)>, payload: usize) -> Vec<u8> {
        let m = Message::Block(BlockFrame {
            index: 7,
            hash: BlockHash([1; 32]),
            block_len: 65536,
            codec,
            patches,
            payload: vec![1u8; payload].into(),
        });
        m.to_bytes().to_vec()
    }

    #[test]
    fn frames_cost_what_they_hold() {
        let whole = frame(Codec::Raw, vec![(0, 65536)], 65536);
        let len = whole.len() as u32 - 4;
        assert_eq!(frame_bytes(len, &whole[4..]), len as u64 + 65536);
        let zstd = frame(Codec::Zstd, vec![(0, 65536)], 300);
        let len = zstd.len() as u32 - 4;
        assert_eq!(frame_bytes(len, &zstd[4..]), len as u64 + 2 * 65536);
        let zstd_patch = frame(Codec::Zstd, vec![(0, 4096)], 300);
        let len = zstd_patch.len() as u32 - 4;
        assert_eq!(frame_bytes(len, &zstd_patch[4..]), len as u64 + 2 * 65536);
        let patch = frame(Codec::Raw, vec![(4096, 4096)], 4096);
        let len = patch.len() as u32 - 4;
        assert_eq!(frame_bytes(len, &patch[4..]), len as u64 + 65536);
        assert_eq!(frame_bytes(10, &[0x05; 10]), 10);
    }

    #[test]
    fn one_session_always_fits_and_small_blocks_keep_few_regions_in_flight() {
        for budget in [0, MIN_BUDGET, 64 << 20, 1 << 30] {
            let b = Budget::new(budget);
            for bs in [4096u32, 65536, 4 << 20] {
                for disk in [1u64 << 20, 1 << 40] {
                    let c = b.session_cost(&Geometry::new(disk, BlockSize::new(bs).unwrap()));
                    assert!(c.units <= b.session_units, "{budget} {bs} {disk}");
                    assert!(c.regions_in_flight >= 2);
                }
            }
        }
        let b = Budget::new(128 << 20);
        assert_eq!(b.session_cost(&Geometry::new(1 << 30, BlockSize::DEFAULT)).regions_in_flight, 16);
        assert!(b.session_cost(&Geometry::new(1 << 30, BlockSize::new(4096).unwrap())).regions_in_flight < 16);
    }
}
