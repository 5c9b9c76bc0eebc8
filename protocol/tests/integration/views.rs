//! How far ahead the receiver takes the target's views: views that list
//! their blocks are bounded by the window in regions, empty regions' views
//! by the window in units (as many as may be in flight).

use diskferry_protocol::message::Plan;
use diskferry_protocol::session::{ReceiverEvent, RegionView, ViewBlocks};
use diskferry_protocol::{BlockHash, Message};

use super::session::receiver;
use super::toy::{h, tree};

#[test]
fn views_of_empty_regions_look_ahead_as_far_as_the_window_units_reach() {
    // Window 2: views that list blocks for 4 regions ahead at most; empty
    // regions' views for 2 × 2 × 16 = 64, as many as may be in flight.
    let per = diskferry_protocol::REGION_BYTES / 65536;
    let empty = |n: u64| RegionView {
        blocks: ViewBlocks::Known(diskferry_protocol::RegionHashes::Zero(n as usize)),
        chunks: vec![Some(BlockHash::ZERO); (n / 32) as usize],
        hash: Some(BlockHash::ZERO),
    };
    let mut r = receiver(100 * per, Plan::CompareManifest);
    let mut next = 0;
    while r.wants_view(next) {
        r.handle_view(next, empty(per));
        next += 1;
    }
    assert_eq!(next, 64, "empty views looked ahead");
    // Once region 0 is done, one more.
    r.handle_message(Message::Region { region: 0, hash: BlockHash::ZERO });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::RegionComplete { region: 0, .. })));
    assert!(r.wants_view(64) && !r.wants_view(65));

    let mut r = receiver(100 * per, Plan::CompareManifest);
    let listed = |i: u64| {
        let blocks: Vec<BlockHash> = (0..per).map(|b| h(i * per + b + 1)).collect();
        let (chunks, hash) = tree(&blocks);
        RegionView {
            blocks: ViewBlocks::Known(diskferry_protocol::RegionHashes::Listed(blocks)),
            chunks: chunks.into_iter().map(Some).collect(),
            hash: Some(hash),
        }
    };
    let mut next = 0;
    while r.wants_view(next) {
        // Every third region holds data.
        r.handle_view(next, if next % 3 == 0 { listed(next) } else { empty(per) });
        next += 1;
    }
    assert_eq!(next, 10, "four views that list blocks at most (regions 0, 3, 6, 9)");
    // An equal region drops its listed view: the lookahead moves on.
    r.handle_message(Message::Region { region: 0, hash: listed(0).hash.unwrap() });
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::RegionComplete { region: 0, .. })));
    assert!(r.wants_view(10));
}
