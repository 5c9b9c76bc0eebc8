//! The target agent's one memory budget (`memory_budget_mib`).
//!
//! It is split in two pools so that neither can starve the other:
//! - **sessions** (half): an admitted session holds its QUIC receive window
//!   (what the source may send ahead of what the agent has read) and an
//!   estimate of its working state (region views and hashes in flight, the
//!   manifest index held in memory, the pages of the trusted manifest's
//!   index its lookups keep, the current content of blocks a delta asked
//!   for, I/O buffers) for as long as it runs.
//!   Sessions beyond what the pool holds wait before their target is opened;
//!   they never fail for memory. Their connection keeps a small window
//!   meanwhile, and the source waits for the Accept.
//! - **frames** (half): a block frame holds its wire bytes and its decoding
//!   buffers from before its body is read off the stream until it is staged
//!   or written. A frame waiting for units is not read, so QUIC flow control
//!   stops the source.
//!
//! A data stream waiting for units keeps its unread bytes in the
//! connection's receive window, which its other streams share: a frame
//! that has its units but not all its bytes may then never get them. So
//! each admitted data stream owns one dearest frame's units of the frames
//! half ([`StreamFrames`]), taken with the session's admission: it uses the
//! shared rest when there is room and else waits only for its own earlier
//! frames to be written, never for the network. A session whose streams'
//! own units exceed the frames half is refused (`E_MEMORY_BUDGET`), naming
//! the budget that would run it.
//!
//! What stays outside: the binary itself, thread stacks and the runtime, a
//! few small buffers per connection that waits for admission — a fixed
//! amount that does not grow with the disk size — and, per full-copy
//! session, up to 8 MiB of idle aligned write buffers kept for reuse
//! (a buffer in use belongs to a frame and is counted with it).

use std::sync::Arc;

use diskferry_protocol::coding::{BufExt, DecodeResult};
use diskferry_protocol::message::MAX_FRAME;
use diskferry_protocol::session::FINE_WINDOW_UNITS;
use diskferry_protocol::{BlockSize, Geometry};
use diskferry_sync_engine::apply::KeptBlocks;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accounting unit.
const UNIT: u64 = 4096;
/// The smallest budget (it runs sessions with blocks up to 1 MiB; larger
/// blocks need more, see [`SessionCost::budget_needed_mib`]).
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
/// Data streams of a session alone; a group member has one on the group's connection.
const DATA_STREAMS: u64 = 2;
/// What a block frame may carry beyond its payload (its head and patch list), as [`MAX_FRAME`] allows.
const FRAME_SLACK: u64 = MAX_FRAME as u64 - BlockSize::MAX as u64;

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
    /// Bytes of a delta's current block content kept for the frames that
    /// patch them (past it a block is read again).
    pub kept_bytes: u64,
    /// Units of the frames half each data stream owns: its dearest frame.
    pub stream_units: u32,
    /// Data streams each session opens.
    pub data_streams: u32,
    /// Units of the frames half all the streams own together.
    frame_units: u64,
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
        self.cost(g, 1, DATA_STREAMS)
    }

    /// What each of the `members` sessions of a group push costs when they
    /// share one admission (`units` is the whole group's): one receive
    /// window split between them, and each member's own state (its share
    /// of the regions in flight, its index, its I/O buffers), judged from
    /// `g` (the member that opens first).
    pub fn group_cost(&self, g: &Geometry, members: u16) -> SessionCost {
        self.cost(g, u64::from(members.max(1)), 1)
    }

    fn cost(&self, g: &Geometry, members: u64, streams_each: u64) -> SessionCost {
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
        // A sixteenth of the pool: eight deltas whose every block changed
        // kept 12 MiB each, 115 MiB at a 16 MiB budget (tests/e2e/memory.rs).
        let kept_bytes = ((pool / 16).clamp(256 << 10, KeptBlocks::MAX_BYTES) / members).max(64 << 10);
        let state = per_region * regions_in_flight as u64
            + g.region_blocks() * 34 * VIEWS_QUEUED as u64
            // empty regions: their views (no chunk list: ~100 bytes, in a
            // map) looked ahead as far as the window's units reach, and
            // batched in the queue; one in flight before its view came is
            // also a pending entry (~200 bytes)
            + (2 * regions_in_flight as u64 * u64::from(FINE_WINDOW_UNITS)
                + (VIEWS_QUEUED * super::view::EMPTY_VIEWS_PER_BATCH) as u64)
                * 512
            + kept_bytes
            + diskferry_sync_engine::manifest::INDEX_PAGES_BYTES // the trusted manifest's lookups
            + index_entries.min(blocks as usize) as u64 * 16
            + blocks.div_ceil(index_entries as u64) * (64 << 10)
            + diskferry_sync_engine::apply::TOUCHED_LIST_BYTES // the redo log's ranges
            + (3 << 20); // redo log, manifest and view I/O buffers
        let stream_units = dearest_frame(g).div_ceil(UNIT) as u32;
        SessionCost {
            units: units((receive_window + state) * members, self.session_units),
            receive_window,
            regions_in_flight,
            index_entries,
            kept_bytes,
            stream_units,
            data_streams: streams_each as u32,
            frame_units: u64::from(stream_units) * streams_each * members,
        }
    }

    /// Whether a session of `cost` can ever run here: its streams' own
    /// frames fit in the frames half.
    pub fn can_hold(&self, cost: &SessionCost) -> bool {
        cost.frame_units <= u64::from(self.frame_units)
    }

    /// Waits until a session of `cost` fits (it must pass [`Budget::can_hold`]).
    pub async fn admit(&self, cost: &SessionCost) -> Option<Admission> {
        let sessions = self.sessions.clone().acquire_many_owned(cost.units).await.ok()?;
        let own = u32::try_from(cost.frame_units).ok()?;
        let frames = self.frames.clone().acquire_many_owned(own).await.ok()?;
        Some(Admission { _sessions: sessions, _frames: frames, stream_units: cost.stream_units })
    }

    /// Whether a session of `cost` can start now (for logging that it waits).
    pub fn fits_now(&self, cost: &SessionCost) -> bool {
        self.sessions.available_permits() >= cost.units as usize
            && self.frames.available_permits() as u64 >= cost.frame_units
    }
}

impl SessionCost {
    /// The smallest `memory_budget_mib` whose frames half holds this
    /// session's streams' own frames.
    pub fn budget_needed_mib(&self) -> u64 {
        (self.frame_units * UNIT * 2).div_ceil(1 << 20).max(MIN_BUDGET >> 20)
    }
}

/// A session's share of both halves, held while it runs.
#[derive(Debug)]
pub struct Admission {
    _sessions: OwnedSemaphorePermit,
    _frames: OwnedSemaphorePermit,
    /// The units each data stream owns ([`SessionCost::stream_units`]).
    pub stream_units: u32,
}

/// The dearest frame a block of `g` can legitimately need: the longest
/// frame the block allows (its payload, head and patch list) plus two
/// blocks (a zstd patch's decompressed bytes and the current content it is
/// verified over; see [`frame_bytes`]).
pub fn dearest_frame(g: &Geometry) -> u64 {
    longest_frame(g) + 2 * u64::from(g.block_size.get())
}

/// The longest frame a data stream of geometry `g` may carry.
fn longest_frame(g: &Geometry) -> u64 {
    u64::from(g.block_size.get()) + FRAME_SLACK
}

/// One data stream's frame memory: units of the agent's shared frames
/// while they last, else of the stream's own reserve (one dearest frame),
/// which only its own earlier frames hold and which comes back when they
/// are written, whatever the network does.
#[derive(Debug)]
pub struct StreamFrames {
    own: Arc<Semaphore>,
    own_units: u32,
}

impl StreamFrames {
    /// The frames of a stream that owns `units` (its session's [`SessionCost::stream_units`]).
    pub fn new(units: u32) -> StreamFrames {
        StreamFrames { own: Arc::new(Semaphore::new(units as usize)), own_units: units }
    }

    /// Waits until a frame of `bytes` (see [`frame_bytes`]) fits; `None`
    /// when it could never fit the stream's own reserve (no legitimate
    /// frame is that large).
    pub async fn frame(&self, budget: &Budget, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = bytes.div_ceil(UNIT).max(1);
        if n > u64::from(self.own_units) {
            return None;
        }
        let n = n as u32;
        if let Ok(p) = budget.frames.clone().try_acquire_many_owned(n) {
            return Some(p);
        }
        self.own.clone().acquire_many_owned(n).await.ok()
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

    #[tokio::test]
    async fn a_stream_takes_its_own_units_when_the_shared_ones_are_gone() {
        let budget = Budget::new(MIN_BUDGET);
        let g = Geometry::new(1 << 30, BlockSize::new(1 << 20).unwrap());
        let cost = budget.session_cost(&g);
        assert!(budget.can_hold(&cost));
        let _admission = budget.admit(&cost).await.unwrap();
        // Another session's frames take every shared unit left.
        let _hog = budget.frames.clone().try_acquire_many_owned(budget.frames.available_permits() as u32).unwrap();
        let frames = StreamFrames::new(cost.stream_units);
        let whole = 2 * (1 << 20) + BLOCK_HEAD as u64;
        let first = frames.frame(&budget, whole).await.expect("its own units");
        // The second waits for the first to be written, not for anyone else.
        let second = frames.frame(&budget, whole);
        tokio::pin!(second);
        assert!(futures_now(&mut second).is_none());
        drop(first);
        assert!(second.await.is_some());
        // No legitimate frame is dearer than the stream's own units.
        assert!(frames.frame(&budget, dearest_frame(&g) + UNIT).await.is_none());
    }

    fn futures_now<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn large_blocks_name_the_budget_that_holds_their_streams() {
        let small = Budget::new(MIN_BUDGET);
        for (bs, fits) in [(65536u32, true), (1 << 20, true), (2 << 20, false), (4 << 20, false)] {
            let g = Geometry::new(1 << 30, BlockSize::new(bs).unwrap());
            let cost = small.session_cost(&g);
            assert_eq!(small.can_hold(&cost), fits, "{bs}");
            let needed = Budget::new(cost.budget_needed_mib() << 20);
            assert!(needed.can_hold(&needed.session_cost(&g)), "{bs}");
            assert!(!Budget::new((cost.budget_needed_mib() - 1) << 20).can_hold(&cost) || fits, "{bs}");
        }
        // A group's members own one stream each.
        let g = Geometry::new(1 << 30, BlockSize::new(4 << 20).unwrap());
        let b = Budget::new(128 << 20);
        assert!(b.can_hold(&b.group_cost(&g, 4)));
        assert!(!b.can_hold(&b.group_cost(&g, 8)));
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
