//! Transfer sessions as deterministic state machines: no sockets, no clock.
//! Inputs enter through `handle_*`, outputs leave through `poll_transmit`
//! (control frames) and `poll_event` (work for the driver), as in quinn-proto.
//!
//! A session on the control stream:
//!
//! ```text
//! S: Hello            T: Welcome
//! S: Open             T: Accept (plan: full | compare with manifest | compare by hashing)
//! compare, per region r, pipelined within the window:
//!   S: Region r         T: (equal) RegionDone r
//!                       T: NeedChunks r
//!   S: Chunks r         T: NeedBlocks r [chunks]
//!   S: BlockHashes…     T: Want r [blocks, page hashes]   (zeros and local copies staged by T)
//!   S: Block frames on data streams           T: RegionDone r
//! full copy, per region r:
//!   S: Block/Zero frames on data streams, then RegionEnd r (hash, frame count)
//!                       T: RegionDone r
//! S: Finish (consistency)   T: Committed (generation, root)
//! ```

pub mod receiver;
pub mod sender;
pub mod view;

pub use receiver::{Differing, ReceiverEvent, ReceiverSession};
pub use sender::{
    slot_units, window_units, SenderEvent, SenderSession, SourceRegion, FINE_WINDOW_UNITS, MAX_WINDOW, WINDOW_UNITS,
};
pub use view::{RegionView, ViewBlocks};

/// Moves control frames between two state machines joined in memory (a
/// local sync, a test) until neither has any to send; whether any moved.
/// Messages travel as values: no encoding, in order, nothing lost.
pub fn exchange(sender: &mut SenderSession, receiver: &mut ReceiverSession) -> bool {
    let mut moved = false;
    loop {
        let mut any = false;
        while let Some(m) = sender.poll_transmit() {
            receiver.handle_message(m);
            any = true;
        }
        while let Some(m) = receiver.poll_transmit() {
            sender.handle_message(m);
            any = true;
        }
        if !any {
            return moved;
        }
        moved = true;
    }
}
