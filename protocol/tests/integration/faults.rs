//! The sender and receiver under a fault harness, in the style of quinn's
//! tests: both state machines in memory, a model target (block hashes stand
//! for contents), and a proptest schedule that delays control frames,
//! reorders data frames across streams, duplicates them, and restarts the
//! connection mid-region. The pair must either commit exactly the source's
//! hashes or fail with a typed error on both sides — never hang, never
//! panic.

use std::collections::VecDeque;

use diskferry_protocol::message::{Accept, BlockFrame, Codec, Committed, Open, Plan, SyncMode, WantBlock};
use diskferry_protocol::session::{
    ReceiverEvent, ReceiverSession, RegionView, SenderEvent, SenderSession, SourceRegion, ViewBlocks,
};
use diskferry_protocol::{
    BlockHash, BlockSize, Consistency, ErrorCode, Generation, Geometry, Message, SessionId, TargetName,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// 4 MiB blocks: 32 blocks a region, so small disks span several regions.
const BS: u32 = 4 << 20;

use super::toy::{h, tree};

fn data_frame(index: u64, hash: BlockHash) -> Message {
    Message::Block(BlockFrame {
        index,
        hash,
        block_len: BS,
        codec: Codec::Raw,
        patches: vec![(0, 16)],
        payload: vec![0u8; 16].into(),
    })
}

/// What can go wrong on the way.
#[derive(Clone, Debug)]
struct Faults {
    seed: u64,
    /// Per mille: a ready control frame is held back this step.
    delay: u32,
    /// Per mille: a delivered data frame arrives a second time later.
    duplicate: u32,
    /// Restart the connection after this many steps (once).
    restart_at: Option<u32>,
}

enum End {
    Committed(Vec<BlockHash>),
    Failed(ErrorCode, ErrorCode),
}

/// One connection's worth of session state.
struct Conn {
    s: SenderSession,
    r: ReceiverSession,
    to_r: VecDeque<Message>,
    to_s: VecDeque<Message>,
    data: [VecDeque<Message>; 2],
    next_region: u64,
    next_view: u64,
    accepted: bool,
    done_sent: bool,
    regions: Vec<Vec<BlockHash>>,
    sender_failed: Option<ErrorCode>,
    receiver_failed: Option<ErrorCode>,
}

impl Conn {
    fn new(g: Geometry, plan: Plan) -> Conn {
        let open = Open {
            session: SessionId(1),
            target: TargetName::new("t").unwrap(),
            disk_bytes: g.disk_bytes,
            block_size: g.block_size,
            mode: if plan == Plan::Full { SyncMode::Full } else { SyncMode::Auto },
            force: false,
            discard_target_changes: false,
            lineage: Vec::new(),
            promote: false,
            group: None,
        };
        Conn {
            s: SenderSession::new(open),
            r: ReceiverSession::new(),
            to_r: VecDeque::new(),
            to_s: VecDeque::new(),
            data: [VecDeque::new(), VecDeque::new()],
            next_region: 0,
            next_view: 0,
            accepted: false,
            done_sent: false,
            regions: Vec::new(),
            sender_failed: None,
            receiver_failed: None,
        }
    }
}

/// Runs sessions until one commits or both fail, restarting once if asked.
fn run(source: &[BlockHash], target: &mut Vec<BlockHash>, plan: Plan, f: &Faults) -> End {
    let g = Geometry::new(source.len() as u64 * BS as u64, BlockSize::new(BS).unwrap());
    let mut rng = SmallRng::seed_from_u64(f.seed);
    let mut c = Conn::new(g, plan);
    let mut restarted = false;
    for step in 0..200_000u32 {
        if !restarted && f.restart_at == Some(step) {
            // The connection drops: whatever was in flight is lost, the target keeps its content.
            restarted = true;
            c = Conn::new(g, plan);
        }
        while let Some(m) = c.s.poll_transmit() {
            c.to_r.push_back(m);
        }
        while let Some(m) = c.r.poll_transmit() {
            c.to_s.push_back(m);
        }
        while let Some(ev) = c.s.poll_event() {
            match ev {
                SenderEvent::Accepted(_) => c.accepted = true,
                SenderEvent::SendBlocks { blocks, .. } => {
                    for w in blocks {
                        c.data[(w.index % 2) as usize].push_back(data_frame(w.index, source[w.index as usize]));
                    }
                }
                SenderEvent::Resend { index } => {
                    c.data[(index % 2) as usize].push_back(data_frame(index, source[index as usize]))
                }
                SenderEvent::RegionDone { .. } | SenderEvent::Committed(_) => {}
                SenderEvent::Failed { code, .. } => c.sender_failed = Some(code),
            }
        }
        while let Some(ev) = c.r.poll_event() {
            match ev {
                ReceiverEvent::Open(_) => {
                    c.r.accept(Accept { plan, target_generation: None, staged_blocks: 0, window: 2 }, g)
                }
                ReceiverEvent::Resolve { region, blocks } => {
                    let mut wants = Vec::new();
                    for d in blocks {
                        if !d.source.is_zero() {
                            wants.push(WantBlock { index: d.index, page_hashes: vec![] });
                        }
                    }
                    c.r.handle_resolved(region, wants);
                }
                ReceiverEvent::RegionComplete { hashes, .. } => c.regions.push(hashes.into_vec()),
                ReceiverEvent::Commit { .. } => {
                    let committed: Vec<BlockHash> = c.regions.concat();
                    c.r.handle_committed(Committed {
                        generation: Generation(3),
                        root: BlockHash::ZERO,
                        blocks_changed: 0,
                        bytes_written: 0,
                        points_dropped: 0,
                        unchanged: false,
                        common_point: None,
                        discarded_blocks: 0,
                        discarded_point: None,
                        target_bytes_read: 0,
                        promoted: false,
                    });
                    *target = committed.clone();
                    return End::Committed(committed);
                }
                ReceiverEvent::Failed { code, .. } => c.receiver_failed = Some(code),
            }
        }
        if let (Some(a), Some(b)) = (c.sender_failed, c.receiver_failed) {
            return End::Failed(a, b);
        }
        if c.accepted && plan != Plan::Full {
            while c.r.wants_view(c.next_view) && c.next_view < g.region_count() {
                let range = g.region_range(c.next_view);
                let blocks: Vec<Option<BlockHash>> =
                    range.clone().map(|b| Some(target.get(b as usize).copied().unwrap_or(BlockHash::ZERO))).collect();
                let known: Vec<BlockHash> = blocks.iter().map(|b| b.unwrap()).collect();
                let (chunks, hash) = tree(&known);
                c.r.handle_view(
                    c.next_view,
                    RegionView {
                        blocks: ViewBlocks::Known(compact(known)),
                        chunks: chunks.into_iter().map(Some).collect(),
                        hash: Some(hash),
                    },
                );
                c.next_view += 1;
            }
        }
        if c.accepted && c.next_region < g.region_count() && c.s.window_open() {
            let range = g.region_range(c.next_region);
            let blocks = source[range.start as usize..range.end as usize].to_vec();
            let mut items = 0;
            if plan == Plan::Full {
                for b in range.clone() {
                    let m = if source[b as usize].is_zero() {
                        Message::Zero { first: b, count: 1 }
                    } else {
                        data_frame(b, source[b as usize])
                    };
                    c.data[(b % 2) as usize].push_back(m);
                    items += 1;
                }
            }
            let (chunks, hash) = tree(&blocks);
            c.s.handle_region(SourceRegion { region: c.next_region, blocks: compact(blocks), chunks, hash, items });
            c.next_region += 1;
        }
        if c.accepted && c.next_region == g.region_count() && !c.done_sent && c.s.outstanding() == 0 {
            c.done_sent = true;
            c.s.handle_source_done(Consistency::Crash);
        }
        // Deliver: a data frame from either stream (across streams in any
        // order), and the control frames unless held back.
        let stream = rng.random_range(0..2usize);
        let other = 1 - stream;
        let pick = if c.data[stream].is_empty() { other } else { stream };
        if let Some(m) = c.data[pick].pop_front() {
            if rng.random_range(0..1000) < f.duplicate {
                c.data[rng.random_range(0..2usize)].push_back(m.clone());
            }
            match m {
                Message::Block(b) => c.r.handle_staged(b.index, b.hash, 16),
                Message::Zero { first, count } => c.r.handle_zeroed(first, count),
                _ => unreachable!(),
            }
        }
        if rng.random_range(0..1000) >= f.delay {
            if let Some(m) = c.to_r.pop_front() {
                c.r.handle_message(m);
            }
        }
        if rng.random_range(0..1000) >= f.delay {
            if let Some(m) = c.to_s.pop_front() {
                c.s.handle_message(m);
            }
        }
    }
    panic!("the sessions hung: sender failed {:?}, receiver failed {:?}", c.sender_failed, c.receiver_failed);
}

fn disk(seed: u64, blocks: u64) -> Vec<BlockHash> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..blocks).map(|i| if rng.random_range(0..5) == 0 { BlockHash::ZERO } else { h(i * 7 + seed % 97 + 1) }).collect()
}

fn faults() -> impl Strategy<Value = Faults> {
    (any::<u64>(), 0u32..600, prop_oneof![Just(0u32), 1u32..40], prop::option::of(1u32..150))
        .prop_map(|(seed, delay, duplicate, restart_at)| Faults { seed, delay, duplicate, restart_at })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_delta_under_faults_commits_the_source_or_fails_typed(f in faults(), seed in any::<u64>(), blocks in 33u64..140) {
        let source = disk(seed, blocks);
        let mut target = disk(seed ^ 0x55, blocks.saturating_sub(seed % 20));
        match run(&source, &mut target, Plan::CompareHash, &f) {
            End::Committed(c) => prop_assert_eq!(&c, &source, "the committed hashes are not the source's"),
            End::Failed(a, b) => {
                prop_assert!(a != ErrorCode::Internal && b != ErrorCode::Internal, "untyped failure {a} {b}");
                prop_assert!(f.duplicate > 0, "failed ({a}, {b}) without duplicated frames");
                // A refused session changed nothing; a clean rerun commits.
                let clean = Faults { duplicate: 0, restart_at: None, ..f.clone() };
                let end = run(&source, &mut target, Plan::CompareHash, &clean);
                prop_assert!(matches!(&end, End::Committed(c) if c == &source), "the clean rerun did not commit");
            }
        }
    }

    #[test]
    fn a_full_copy_under_faults_commits_the_source_or_fails_typed(f in faults(), seed in any::<u64>(), blocks in 33u64..140) {
        let source = disk(seed, blocks);
        let mut target = Vec::new();
        match run(&source, &mut target, Plan::Full, &f) {
            End::Committed(c) => prop_assert_eq!(&c, &source),
            End::Failed(a, b) => {
                prop_assert!(a != ErrorCode::Internal && b != ErrorCode::Internal, "untyped failure {a} {b}");
                prop_assert!(f.duplicate > 0, "failed ({a}, {b}) without duplicated frames");
            }
        }
    }
}

/// A region's hashes as the engine hands them over: an empty region as a
/// count, as a sparse disk's record gives it.
fn compact(blocks: Vec<BlockHash>) -> diskferry_protocol::RegionHashes {
    if blocks.iter().all(BlockHash::is_zero) {
        diskferry_protocol::RegionHashes::Zero(blocks.len())
    } else {
        diskferry_protocol::RegionHashes::Listed(blocks)
    }
}
