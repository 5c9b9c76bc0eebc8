//! The sender and receiver state machines run against each other in memory,
//! with fake disks whose tree nodes are a toy hash (the sessions treat
//! hashes as opaque), on a queue that can delay frames.

use std::collections::VecDeque;

use diskferry_protocol::message::{
    Accept, BlockFrame, Codec, Committed, Open, Plan, SyncMode, WantBlock, CAP_PAGES, CAP_ZSTD,
};
use diskferry_protocol::session::{
    ReceiverEvent, ReceiverSession, RegionView, SenderEvent, SenderSession, SourceRegion, ViewBlocks,
};
use diskferry_protocol::{
    BlockHash, BlockSize, Consistency, ErrorCode, Generation, Geometry, Message, SessionId, TargetName,
};

use super::toy::{h, tree};

struct Run {
    committed: Option<Committed>,
    wanted: Vec<u64>,
    resolved_locally: Vec<u64>,
    regions: Vec<Vec<BlockHash>>,
    sender_failed: Option<ErrorCode>,
    receiver_failed: Option<ErrorCode>,
    control_frames: usize,
}

/// Runs a whole session: `source` and `target` are block hashes; the target
/// resolves zeros itself; `plan` is what the target accepts with.
fn run(source: &[BlockHash], target: &[BlockHash], block_size: u32, plan: Plan) -> Run {
    let g = Geometry::new(source.len() as u64 * block_size as u64, BlockSize::new(block_size).unwrap());
    let open = open(g, SyncMode::Auto);
    let mut s = SenderSession::new(open);
    let mut r = ReceiverSession::new();
    let mut to_r: VecDeque<Message> = VecDeque::new();
    let mut to_s: VecDeque<Message> = VecDeque::new();
    let mut data: VecDeque<Message> = VecDeque::new();
    let mut next_region = 0u64;
    let mut next_view = 0u64;
    let mut out = Run {
        committed: None,
        wanted: vec![],
        resolved_locally: vec![],
        regions: vec![],
        sender_failed: None,
        receiver_failed: None,
        control_frames: 0,
    };
    let mut accepted = false;
    let mut source_done = false;
    for _ in 0..100_000 {
        while let Some(m) = s.poll_transmit() {
            to_r.push_back(m);
        }
        while let Some(m) = r.poll_transmit() {
            to_s.push_back(m);
        }
        while let Some(ev) = s.poll_event() {
            match ev {
                SenderEvent::Accepted(_) => accepted = true,
                SenderEvent::SendBlocks { blocks, .. } => {
                    for w in blocks {
                        out.wanted.push(w.index);
                        data.push_back(block(w.index, source[w.index as usize]));
                    }
                }
                SenderEvent::Resend { index } => data.push_back(block(index, source[index as usize])),
                SenderEvent::RegionDone { .. } => {}
                SenderEvent::Committed(c) => out.committed = Some(c),
                SenderEvent::Failed { code, .. } => out.sender_failed = Some(code),
            }
        }
        while let Some(ev) = r.poll_event() {
            match ev {
                ReceiverEvent::Open(_) => {
                    r.accept(Accept { plan, target_generation: None, staged_blocks: 0, window: 4 }, g)
                }
                ReceiverEvent::Resolve { region, blocks } => {
                    let mut wants = vec![];
                    for d in blocks {
                        if d.source.is_zero() {
                            out.resolved_locally.push(d.index);
                        } else {
                            wants.push(WantBlock { index: d.index, page_hashes: vec![] });
                        }
                    }
                    r.handle_resolved(region, wants);
                }
                ReceiverEvent::RegionComplete { hashes, .. } => out.regions.push(hashes.into_vec()),
                ReceiverEvent::Commit { .. } => r.handle_committed(Committed {
                    generation: Generation(9),
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
                }),
                ReceiverEvent::Failed { code, .. } => out.receiver_failed = Some(code),
            }
        }
        if s.is_finished() && r.is_finished() && to_r.is_empty() && to_s.is_empty() {
            break;
        }
        if accepted && plan != Plan::Full {
            while r.wants_view(next_view) && next_view < g.region_count() {
                let range = g.region_range(next_view);
                let blocks: Vec<Option<BlockHash>> =
                    range.clone().map(|b| target.get(b as usize).copied().or(Some(BlockHash::ZERO))).collect();
                let known: Vec<BlockHash> = blocks.iter().map(|b| b.unwrap()).collect();
                let (chunks, hash) = tree(&known);
                // Both forms of a fully known view: the agent sends Known,
                // a resumed session's overlay makes it Partial.
                let blocks = if next_view.is_multiple_of(2) {
                    ViewBlocks::Known(compact(known))
                } else {
                    ViewBlocks::Partial(blocks)
                };
                r.handle_view(
                    next_view,
                    RegionView { blocks, chunks: chunks.into_iter().map(Some).collect(), hash: Some(hash) },
                );
                next_view += 1;
            }
        }
        if accepted && next_region < g.region_count() && s.window_open() {
            let range = g.region_range(next_region);
            let blocks = source[range.start as usize..range.end as usize].to_vec();
            let mut items = 0;
            if plan == Plan::Full {
                for b in range.clone() {
                    if source[b as usize].is_zero() {
                        data.push_back(Message::Zero { first: b, count: 1 });
                    } else {
                        data.push_back(block(b, source[b as usize]));
                    }
                    items += 1;
                }
            }
            let (chunks, hash) = tree(&blocks);
            s.handle_region(SourceRegion { region: next_region, blocks: compact(blocks), chunks, hash, items });
            next_region += 1;
        }
        if accepted && next_region == g.region_count() && !source_done && s.outstanding() == 0 {
            source_done = true;
            s.handle_source_done(Consistency::Crash);
        }
        // Data frames go to the driver of the target, which stages them.
        if let Some(m) = data.pop_front() {
            match m {
                Message::Block(f) => r.handle_staged(f.index, f.hash, f.payload.len() as u64),
                Message::Zero { first, count } => r.handle_zeroed(first, count),
                _ => unreachable!(),
            }
        }
        if let Some(m) = to_r.pop_front() {
            out.control_frames += 1;
            r.handle_message(m);
        }
        if let Some(m) = to_s.pop_front() {
            out.control_frames += 1;
            s.handle_message(m);
        }
    }
    out
}

fn block(index: u64, hash: BlockHash) -> Message {
    Message::Block(BlockFrame {
        index,
        hash,
        block_len: 4096,
        codec: Codec::Raw,
        patches: vec![(0, 4096)],
        payload: vec![0u8; 4096].into(),
    })
}

fn disk(n: u64) -> Vec<BlockHash> {
    (0..n).map(|i| if i % 7 == 3 { BlockHash::ZERO } else { h(i + 1) }).collect()
}

#[test]
fn delta_fetches_exactly_the_changed_blocks() {
    // 4K blocks: 16384 blocks per region; 40000 blocks = 3 regions.
    let source = disk(40000);
    let mut target = source.clone();
    for i in [5u64, 17000, 17001, 39999] {
        target[i as usize] = h(1_000_000 + i);
    }
    target[10] = h(777); // a block the source holds as zeros (10 % 7 == 3)
    let run = run(&source, &target, 4096, Plan::CompareHash);
    assert!(run.committed.is_some(), "sender {:?} receiver {:?}", run.sender_failed, run.receiver_failed);
    let mut wanted = run.wanted.clone();
    wanted.sort();
    assert_eq!(wanted, vec![5, 17000, 17001, 39999]);
    assert_eq!(run.resolved_locally, vec![10]);
    let all: Vec<BlockHash> = run.regions.concat();
    assert_eq!(all, source, "the committed hashes are the source's");
}

#[test]
fn unchanged_disk_costs_one_frame_per_region() {
    let source = disk(40000);
    let run = run(&source, &source, 4096, Plan::CompareManifest);
    assert!(run.committed.is_some());
    assert!(run.wanted.is_empty());
    // Hello, Welcome, Open, Accept, 3 × (Region, RegionDone), Finish, Committed.
    assert_eq!(run.control_frames, 4 + 3 * 2 + 2);
}

#[test]
fn empty_regions_travel_as_counts_and_compare_with_listed_ones() {
    // 4K blocks: 16384 per region; 5 regions. Region 1 is empty on both
    // sides, region 2 only on the source, region 3 only on the target:
    // a count of zeros must compare equal to, and unequal with, a list.
    let per = 16384usize;
    let mut source = disk(5 * per as u64);
    let mut target = source.clone();
    source[per..3 * per].fill(BlockHash::ZERO);
    target[per..2 * per].fill(BlockHash::ZERO);
    target[3 * per..4 * per].fill(BlockHash::ZERO);
    target[4 * per + 9] = h(999_999);
    let run = run(&source, &target, 4096, Plan::CompareManifest);
    assert!(run.committed.is_some(), "sender {:?} receiver {:?}", run.sender_failed, run.receiver_failed);
    let mut wanted = run.wanted.clone();
    wanted.sort();
    let mut expect: Vec<u64> = (3 * per as u64..4 * per as u64).filter(|b| !source[*b as usize].is_zero()).collect();
    expect.push(4 * per as u64 + 9);
    assert_eq!(wanted, expect);
    // Region 2's data blocks become zeros on the target without a transfer.
    assert_eq!(run.resolved_locally.len(), (2 * per..3 * per).filter(|b| !target[*b].is_zero()).count());
    assert_eq!(run.regions.concat(), source);
}

#[test]
fn full_copy_counts_every_frame() {
    let source = disk(1000);
    let run = run(&source, &[], 65536, Plan::Full);
    assert!(run.committed.is_some(), "sender {:?} receiver {:?}", run.sender_failed, run.receiver_failed);
    assert_eq!(run.regions.concat(), source);
}

#[test]
fn target_shorter_than_source() {
    let source = disk(5000);
    let target = disk(1200);
    let run = run(&source, &target, 4096, Plan::CompareHash);
    assert!(run.committed.is_some());
    let expect: Vec<u64> = (1200..5000).filter(|i| !source[*i as usize].is_zero()).collect();
    let mut wanted = run.wanted;
    wanted.sort();
    assert_eq!(wanted, expect);
}

#[test]
fn unexpected_messages_fail_with_codes() {
    let mut r = ReceiverSession::new();
    r.handle_message(Message::NeedChunks { region: 0 });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));
    assert!(matches!(r.poll_transmit(), Some(Message::Error { code: ErrorCode::Protocol, .. })));

    let mut r = ReceiverSession::new();
    r.handle_message(Message::Hello { min_version: 7, max_version: 9, capabilities: 0 });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Version, .. })));

    let mut s = accepted_sender(Plan::CompareHash, 1 << 20);
    // Asking for a region that was never sent is a protocol error, not a panic.
    s.handle_message(Message::NeedChunks { region: 99 });
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(e, SenderEvent::Failed { code: ErrorCode::Protocol, .. })));
    // The target's own error ends the session with its code.
    let mut r = ReceiverSession::new();
    r.handle_message(Message::Error { code: ErrorCode::Diverged, message: "x".into() });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Diverged, .. })));
}

/// A sender accepted with `plan` and a window of 2 regions, on a disk of
/// `disk_bytes` at 64 KiB blocks, by a target that speaks zstd and pages
/// only (slots of 16 units).
fn accepted_sender(plan: Plan, disk_bytes: u64) -> SenderSession {
    accepted_sender_with(plan, disk_bytes, CAP_ZSTD | CAP_PAGES)
}

/// [`accepted_sender`] by a target that speaks `capabilities`.
pub(super) fn accepted_sender_with(plan: Plan, disk_bytes: u64, capabilities: u32) -> SenderSession {
    let mut s = SenderSession::new(open(Geometry::new(disk_bytes, BlockSize::DEFAULT), SyncMode::Auto));
    s.handle_message(Message::Welcome {
        version: diskferry_protocol::VERSION,
        capabilities,
        max_frame: diskferry_protocol::MAX_FRAME,
    });
    s.handle_message(Message::Accept(Accept { plan, target_generation: None, staged_blocks: 0, window: 2 }));
    while s.poll_transmit().is_some() {}
    while s.poll_event().is_some() {}
    s
}

#[test]
fn empty_regions_take_a_unit_of_the_window_when_compared() {
    let per = (diskferry_protocol::REGION_BYTES / BlockSize::DEFAULT.bytes()) as usize;
    let empty = |region| SourceRegion {
        region,
        blocks: diskferry_protocol::RegionHashes::Zero(per),
        chunks: vec![BlockHash::ZERO; per / 32],
        hash: BlockHash::ZERO,
        items: 0,
    };
    let data =
        |region| SourceRegion { hash: h(region + 1), blocks: compact(vec![h(region + 1); per]), ..empty(region) };
    // Compared: a window of 2 slots holds 16 empty regions and a slot to spare.
    let mut s = accepted_sender(Plan::CompareManifest, 40 * diskferry_protocol::REGION_BYTES);
    for r in 0..16 {
        assert!(s.window_open(), "empty region {r}");
        s.handle_region(empty(r));
    }
    assert!(s.window_open(), "a slot for a region with data");
    s.handle_region(empty(16));
    assert!(!s.window_open(), "no whole slot left");
    s.handle_message(Message::RegionDone { region: 3, bytes_staged: 0 });
    assert!(matches!(s.poll_event(), Some(SenderEvent::RegionDone { region: 3, units: 1, .. })));
    assert!(s.window_open());
    s.handle_region(data(17));
    assert!(!s.window_open());
    s.handle_message(Message::RegionDone { region: 17, bytes_staged: 0 });
    assert!(matches!(s.poll_event(), Some(SenderEvent::RegionDone { region: 17, units: 16, .. })));
    assert!(s.window_open());
    // A full copy's region takes a slot, empty or not.
    let mut s = accepted_sender(Plan::Full, 40 * diskferry_protocol::REGION_BYTES);
    s.handle_region(empty(0));
    assert!(s.window_open());
    s.handle_region(empty(1));
    assert!(!s.window_open());
    s.handle_message(Message::RegionDone { region: 0, bytes_staged: 0 });
    assert!(matches!(s.poll_event(), Some(SenderEvent::RegionDone { region: 0, units: 16, .. })));
}

#[test]
fn verify_failures_are_retried_then_fatal() {
    let mut r = ReceiverSession::new();
    r.handle_message(Message::Hello {
        min_version: diskferry_protocol::VERSION,
        max_version: diskferry_protocol::VERSION,
        capabilities: 3,
    });
    let _ = r.poll_transmit();
    let open = Open {
        session: SessionId(1),
        target: TargetName::new("t").unwrap(),
        disk_bytes: 4 << 20,
        block_size: BlockSize::DEFAULT,
        mode: SyncMode::Full,
        force: false,
        discard_target_changes: false,
        lineage: Vec::new(),
        promote: false,
        group: None,
    };
    r.handle_message(Message::Open(open));
    let _ = r.poll_event();
    let g = Geometry::new(4 << 20, BlockSize::DEFAULT);
    r.accept(Accept { plan: Plan::Full, target_generation: None, staged_blocks: 0, window: 2 }, g);
    let _ = r.poll_transmit();
    r.handle_staged(0, h(1), 10); // creates the region's bookkeeping
    for _ in 0..2 {
        r.handle_verify_failed(3);
        assert_eq!(r.poll_transmit(), Some(Message::Nack { index: 3 }));
    }
    r.handle_verify_failed(3);
    assert!(matches!(r.poll_transmit(), Some(Message::Error { code: ErrorCode::HashMismatch, .. })));
}

#[test]
fn unrequested_blocks_are_refused() {
    let mut r = ReceiverSession::new();
    r.handle_message(Message::Hello {
        min_version: diskferry_protocol::VERSION,
        max_version: diskferry_protocol::VERSION,
        capabilities: 3,
    });
    let open = Open {
        session: SessionId(1),
        target: TargetName::new("t").unwrap(),
        disk_bytes: 4 << 20,
        block_size: BlockSize::DEFAULT,
        mode: SyncMode::Delta,
        force: false,
        discard_target_changes: false,
        lineage: Vec::new(),
        promote: false,
        group: None,
    };
    r.handle_message(Message::Open(open));
    let _ = r.poll_event();
    let g = Geometry::new(4 << 20, BlockSize::DEFAULT);
    r.accept(Accept { plan: Plan::CompareHash, target_generation: None, staged_blocks: 0, window: 2 }, g);
    while r.poll_transmit().is_some() {}
    // A region the target is comparing, with one block wanted.
    let blocks: Vec<Option<BlockHash>> = (0..64).map(|i| Some(h(i + 1))).collect();
    let (chunks, hash) = tree(&blocks.iter().map(|b| b.unwrap()).collect::<Vec<_>>());
    let blocks = ViewBlocks::Partial(blocks);
    r.handle_view(0, RegionView { blocks, chunks: chunks.into_iter().map(Some).collect(), hash: Some(hash) });
    let mut source: Vec<BlockHash> = (0..64).map(|i| h(i + 1)).collect();
    source[3] = h(999);
    let (src_chunks, src_hash) = tree(&source);
    r.handle_message(Message::Region { region: 0, hash: src_hash });
    r.handle_message(Message::Chunks { region: 0, hashes: src_chunks });
    r.handle_message(Message::BlockHashes { region: 0, chunk: 0, hashes: source[..32].to_vec() });
    let Some(ReceiverEvent::Resolve { blocks, .. }) = r.poll_event() else { panic!("expected a resolve") };
    assert_eq!(blocks.len(), 1);
    r.handle_resolved(0, vec![WantBlock { index: 3, page_hashes: vec![] }]);
    while r.poll_transmit().is_some() {}
    // Block 5 was not asked for: refused, it must not complete the region.
    r.handle_staged(5, h(5), 4096);
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));
}

/// A receiver running a full copy of `blocks` 64 KiB blocks (one region).
fn full_receiver(blocks: u64) -> ReceiverSession {
    receiver(blocks, Plan::Full)
}

/// A receiver that accepted `plan` with a window of 2 regions, on a disk of
/// `blocks` 64 KiB blocks.
pub(super) fn receiver(blocks: u64, plan: Plan) -> ReceiverSession {
    receiver_with(blocks, plan, CAP_ZSTD | CAP_PAGES)
}

/// [`receiver`] for a source that speaks `capabilities`.
pub(super) fn receiver_with(blocks: u64, plan: Plan, capabilities: u32) -> ReceiverSession {
    let mut r = ReceiverSession::new();
    r.handle_message(Message::Hello {
        min_version: diskferry_protocol::VERSION,
        max_version: diskferry_protocol::VERSION,
        capabilities,
    });
    let g = Geometry::new(blocks * 65536, BlockSize::DEFAULT);
    let open = open(g, SyncMode::Full);
    r.handle_message(Message::Open(open));
    let _ = r.poll_event();
    r.accept(Accept { plan, target_generation: None, staged_blocks: 0, window: 2 }, g);
    while r.poll_transmit().is_some() {}
    r
}

#[test]
fn a_source_past_its_window_is_refused() {
    // Compared: 2 slots hold 32 empty regions, or 2 with data.
    let per = diskferry_protocol::REGION_BYTES / 65536;
    let mut r = receiver(40 * per, Plan::CompareManifest);
    for region in 0..32 {
        r.handle_message(Message::Region { region, hash: BlockHash::ZERO });
    }
    assert!(r.poll_event().is_none(), "32 empty regions fit");
    r.handle_message(Message::Region { region: 32, hash: h(1) });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));
    let mut r = receiver(40 * per, Plan::CompareManifest);
    r.handle_message(Message::Region { region: 0, hash: h(1) });
    r.handle_message(Message::Region { region: 1, hash: h(2) });
    assert!(r.poll_event().is_none(), "2 regions with data fit");
    r.handle_message(Message::Region { region: 2, hash: BlockHash::ZERO });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));
    // A full copy's empty region takes a slot.
    let mut r = receiver(40 * per, Plan::Full);
    for region in 0..2 {
        r.handle_message(Message::RegionEnd { region, hash: BlockHash::ZERO, items: 1 });
    }
    assert!(r.poll_event().is_none());
    r.handle_message(Message::RegionEnd { region: 2, hash: BlockHash::ZERO, items: 1 });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));
}

#[test]
fn wants_and_nacks_outside_their_region_or_disk_are_refused() {
    let per = diskferry_protocol::REGION_BYTES / BlockSize::DEFAULT.bytes();
    let blocks: Vec<BlockHash> = (0..per).map(|i| h(i + 1)).collect();
    let (chunks, hash) = tree(&blocks);
    // Regions 0 and 1 in flight.
    let in_flight = || {
        let mut s = accepted_sender(Plan::CompareManifest, 3 * diskferry_protocol::REGION_BYTES);
        for region in 0..2 {
            s.handle_region(SourceRegion {
                region,
                blocks: compact(blocks.clone()),
                chunks: chunks.clone(),
                hash,
                items: 0,
            });
        }
        while s.poll_transmit().is_some() {}
        s
    };
    let want = |index| Message::Want { region: 1, blocks: vec![WantBlock { index, page_hashes: Vec::new() }] };
    let mut s = in_flight();
    s.handle_message(want(per + 5));
    assert!(matches!(s.poll_event(), Some(SenderEvent::SendBlocks { region: 1, .. })));
    for bad in [want(5), want(2 * per), Message::Nack { index: 3 * per }] {
        let mut s = in_flight();
        s.handle_message(bad.clone());
        assert!(matches!(s.poll_event(), Some(SenderEvent::Failed { code: ErrorCode::Protocol, .. })), "{bad:?}");
    }
}

/// The Open of a push of a disk of geometry `g` in `mode`.
fn open(g: Geometry, mode: SyncMode) -> Open {
    Open {
        session: SessionId(1),
        target: TargetName::new("t").unwrap(),
        disk_bytes: g.disk_bytes,
        block_size: g.block_size,
        mode,
        force: false,
        discard_target_changes: false,
        lineage: Vec::new(),
        promote: false,
        group: None,
    }
}

#[test]
fn a_window_past_any_target_is_not_taken_up() {
    let mut s = SenderSession::new(open(Geometry::new(1 << 40, BlockSize::DEFAULT), SyncMode::Auto));
    let (version, max_frame) = (diskferry_protocol::VERSION, diskferry_protocol::MAX_FRAME);
    s.handle_message(Message::Welcome { version, capabilities: 0, max_frame });
    let plan = Plan::CompareManifest;
    s.handle_message(Message::Accept(Accept { plan, target_generation: None, staged_blocks: 0, window: u32::MAX }));
    let window = std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
        SenderEvent::Accepted(a) => Some(a.window),
        _ => None,
    });
    assert_eq!(window, Some(diskferry_protocol::session::MAX_WINDOW));
}

#[test]
fn a_chunk_asked_twice_is_refused() {
    let per = (diskferry_protocol::REGION_BYTES / BlockSize::DEFAULT.bytes()) as usize;
    let mut s = accepted_sender(Plan::CompareManifest, 40 * diskferry_protocol::REGION_BYTES);
    let blocks: Vec<BlockHash> = (0..per as u64).map(|i| h(i + 1)).collect();
    let (chunks, hash) = tree(&blocks);
    s.handle_region(SourceRegion { region: 0, blocks: compact(blocks), chunks, hash, items: 0 });
    while s.poll_transmit().is_some() {}
    s.handle_message(Message::NeedBlocks { region: 0, chunks: vec![3, 5, 3] });
    assert!(matches!(s.poll_event(), Some(SenderEvent::Failed { code: ErrorCode::Protocol, .. })));
}

#[test]
fn a_full_copy_block_resent_with_new_bytes_amends_its_region() {
    let mut r = full_receiver(64);
    for i in (0..64).filter(|&i| i != 3) {
        r.handle_staged(i, h(i + 1), 65536);
    }
    // The source's bytes changed after it hashed block 3: verification fails,
    // and the resend carries what the source holds now.
    r.handle_verify_failed(3);
    assert_eq!(r.poll_transmit(), Some(Message::Nack { index: 3 }));
    r.handle_staged(3, h(999), 65536);
    let announced: Vec<BlockHash> = (0..64).map(|i| h(i + 1)).collect();
    r.handle_message(Message::RegionEnd { region: 0, hash: tree(&announced).1, items: 64 });
    let Some(ReceiverEvent::RegionComplete { hashes, expected, .. }) = r.poll_event() else {
        panic!("the region completes")
    };
    assert_eq!(expected, None, "the announced region hash is stale: not checked");
    assert_eq!(hashes.get(3).unwrap(), h(999), "the manifest records the bytes staged");
}

#[test]
fn a_full_copy_refuses_a_block_twice_or_zeros_over_a_block() {
    let mut r = full_receiver(64);
    r.handle_staged(5, h(6), 65536);
    r.handle_staged(5, h(6), 65536);
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));

    let mut r = full_receiver(64);
    r.handle_staged(5, h(6), 65536);
    r.handle_zeroed(4, 3);
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })));

    // Without a resend, the announced region hash is checked by the driver.
    let mut r = full_receiver(64);
    let hashes: Vec<BlockHash> = (0..64).map(|i| h(i + 1)).collect();
    for i in 0..64 {
        r.handle_staged(i, hashes[i as usize], 65536);
    }
    r.handle_message(Message::RegionEnd { region: 0, hash: tree(&hashes).1, items: 64 });
    let Some(ReceiverEvent::RegionComplete { expected, .. }) = r.poll_event() else { panic!("completes") };
    assert_eq!(expected, Some(tree(&hashes).1));
}

#[test]
fn a_full_copy_region_is_every_block_and_then_closed() {
    // Fewer frames announced than blocks: the rest would enter the
    // manifest as zeros over whatever the disk holds.
    let mut r = full_receiver(64);
    for i in 0..63 {
        r.handle_staged(i, h(i + 1), 65536);
    }
    r.handle_message(Message::RegionEnd { region: 0, hash: h(0), items: 63 });
    let Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, message, .. }) = r.poll_event() else {
        panic!("a region left short fails")
    };
    assert!(message.contains("without block 63"), "{message}");

    // Once done, nothing may touch the region again in the session.
    let done = || {
        let mut r = full_receiver(64);
        r.handle_zeroed(0, 64);
        r.handle_message(Message::RegionEnd { region: 0, hash: BlockHash::ZERO, items: 1 });
        assert!(matches!(r.poll_event(), Some(ReceiverEvent::RegionComplete { region: 0, .. })));
        r
    };
    let late: [&dyn Fn(&mut ReceiverSession); 4] =
        [&|r| r.handle_staged(3, h(4), 65536), &|r| r.handle_zeroed(10, 2), &|r| r.handle_verify_failed(3), &|r| {
            r.handle_message(Message::RegionEnd { region: 0, hash: BlockHash::ZERO, items: 0 })
        }];
    for (i, frame) in late.iter().enumerate() {
        let mut r = done();
        frame(&mut r);
        assert!(
            matches!(r.poll_event(), Some(ReceiverEvent::Failed { code: ErrorCode::Protocol, .. })),
            "late frame {i} is refused"
        );
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
