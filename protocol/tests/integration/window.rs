//! Window slots of 128 units when both sides speak `CAP_FINE_WINDOW`:
//! many more empty regions in flight, with neither side keeping their
//! chunk lists; and the old slots of 16 with a peer that does not.

use diskferry_protocol::message::{Plan, CAPABILITIES, CAP_FINE_WINDOW, CAP_PAGES, CAP_ZSTD};
use diskferry_protocol::session::{
    ReceiverEvent, RegionView, SenderEvent, SourceRegion, ViewBlocks, FINE_WINDOW_UNITS, WINDOW_UNITS,
};
use diskferry_protocol::{BlockHash, ErrorCode, Message, RegionHashes, REGION_BYTES};

use super::session::{accepted_sender_with, receiver_with};
use super::toy::h;

const PER: usize = (REGION_BYTES / 65536) as usize;

/// An empty source region without its chunk list.
fn empty(region: u64) -> SourceRegion {
    SourceRegion { region, blocks: RegionHashes::Zero(PER), chunks: Vec::new(), hash: BlockHash::ZERO, items: 0 }
}

/// The target's view of an empty region, without its chunk list.
fn empty_view() -> RegionView {
    RegionView { blocks: ViewBlocks::Known(RegionHashes::Zero(PER)), chunks: Vec::new(), hash: Some(BlockHash::ZERO) }
}

#[test]
fn both_sides_agree_on_the_slot_size() {
    // The receiver echoes what it also speaks; each side sizes its slot
    // from what both speak.
    let mut r = receiver_with(4 * PER as u64, Plan::CompareManifest, CAPABILITIES);
    assert!(r.wants_view(2 * 2 * u64::from(FINE_WINDOW_UNITS) - 1));
    assert!(!r.wants_view(2 * 2 * u64::from(FINE_WINDOW_UNITS)));
    let s = accepted_sender_with(Plan::CompareManifest, 4 * REGION_BYTES, CAPABILITIES);
    assert_eq!(s.capabilities() & CAP_FINE_WINDOW, CAP_FINE_WINDOW);
    assert_eq!(s.slot_units(), FINE_WINDOW_UNITS);
    // An older peer: slots of 16 on both sides.
    let s = accepted_sender_with(Plan::CompareManifest, 4 * REGION_BYTES, CAP_ZSTD | CAP_PAGES);
    assert_eq!(s.slot_units(), WINDOW_UNITS);
    r = receiver_with(4 * PER as u64, Plan::CompareManifest, CAP_ZSTD | CAP_PAGES);
    assert!(!r.wants_view(2 * 2 * u64::from(WINDOW_UNITS)));
}

#[test]
fn a_fine_window_holds_a_slot_of_empty_regions_each() {
    let slot = u64::from(FINE_WINDOW_UNITS);
    let mut s = accepted_sender_with(Plan::CompareManifest, 4 * slot * REGION_BYTES, CAPABILITIES);
    // Window 2: one slot of empty regions and one slot to spare.
    for r in 0..slot {
        assert!(s.window_open(), "empty region {r}");
        s.handle_region(empty(r));
    }
    assert!(s.window_open(), "a slot for a region with data");
    s.handle_region(empty(slot));
    assert!(!s.window_open());
    s.handle_message(Message::RegionDone { region: 5, bytes_staged: 0 });
    assert!(matches!(s.poll_event(), Some(SenderEvent::RegionDone { region: 5, units: 1, .. })));
    let data = SourceRegion { hash: h(99), blocks: RegionHashes::Listed(vec![h(7); PER]), ..empty(slot + 1) };
    s.handle_region(data);
    assert!(!s.window_open());
    s.handle_message(Message::RegionDone { region: slot + 1, bytes_staged: 0 });
    assert!(
        matches!(s.poll_event(), Some(SenderEvent::RegionDone { units, .. }) if units == FINE_WINDOW_UNITS),
        "a region with data gives back a whole slot"
    );

    // The receiver takes as many and fails the session on one more.
    let mut r = receiver_with(4 * slot * PER as u64, Plan::CompareManifest, CAPABILITIES);
    for region in 0..2 * slot {
        r.handle_message(Message::Region { region, hash: BlockHash::ZERO });
    }
    assert!(r.poll_transmit().is_none(), "two slots of empty regions are inside the window");
    r.handle_message(Message::Region { region: 2 * slot, hash: BlockHash::ZERO });
    assert!(matches!(r.poll_transmit(), Some(Message::Error { code: ErrorCode::Protocol, .. })));
}

#[test]
fn an_old_target_keeps_a_new_source_to_slots_of_16() {
    // The receiver of an older agent counts 16 units a slot: a new source
    // that sent a fine window's worth would be failed by it.
    let mut s = accepted_sender_with(Plan::CompareManifest, 64 * REGION_BYTES, CAP_ZSTD | CAP_PAGES);
    let mut sent = 0;
    while s.window_open() {
        s.handle_region(empty(sent));
        sent += 1;
    }
    assert_eq!(sent, u64::from(WINDOW_UNITS) + 1, "a slot of empty regions, then one into the spare slot");
    let mut r = receiver_with(64 * PER as u64, Plan::CompareManifest, CAP_ZSTD | CAP_PAGES);
    for region in 0..sent {
        r.handle_message(Message::Region { region, hash: BlockHash::ZERO });
    }
    assert!(r.poll_transmit().is_none());
}

#[test]
fn empty_regions_without_chunk_lists_still_compare_chunk_by_chunk() {
    // The target holds data where the source is empty: the source answers
    // with its empty region's chunks (all ZERO) though it kept none.
    let mut s = accepted_sender_with(Plan::CompareManifest, 4 * REGION_BYTES, CAPABILITIES);
    s.handle_region(empty(0));
    while s.poll_transmit().is_some() {}
    s.handle_message(Message::NeedChunks { region: 0 });
    match s.poll_transmit() {
        Some(Message::Chunks { region: 0, hashes }) => {
            assert_eq!(hashes, vec![BlockHash::ZERO; PER / 32]);
        }
        other => panic!("chunks expected, got {other:?}"),
    }

    // The source holds data in one chunk where the target is empty: the
    // target, keeping no chunk list for its empty view, asks for exactly
    // that chunk.
    let mut r = receiver_with(PER as u64, Plan::CompareManifest, CAPABILITIES);
    r.handle_view(0, empty_view());
    r.handle_message(Message::Region { region: 0, hash: h(1) });
    assert_eq!(r.poll_transmit(), Some(Message::NeedChunks { region: 0 }));
    let mut chunks = vec![BlockHash::ZERO; PER / 32];
    chunks[3] = h(2);
    r.handle_message(Message::Chunks { region: 0, hashes: chunks });
    assert_eq!(r.poll_transmit(), Some(Message::NeedBlocks { region: 0, chunks: vec![3] }));
    // And an empty source region against an empty view is equal at once.
    let mut r = receiver_with(PER as u64, Plan::CompareManifest, CAPABILITIES);
    r.handle_view(0, empty_view());
    r.handle_message(Message::Region { region: 0, hash: BlockHash::ZERO });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::RegionComplete { region: 0, .. })));
}
