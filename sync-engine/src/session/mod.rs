//! Sync sessions, owned by the engine and the same for local and network
//! syncs: [`target::TargetSession`] decides and applies on the target side,
//! [`source::SourceSession`] hashes and reads on the source side. The sans-IO
//! state machines of `diskferry_protocol::session` carry their exchange;
//! a local sync joins the two in memory (the `local` module), the agent
//! joins them over QUIC.
//!
//! Where a block goes from disk to disk:
//! 1. the source session hashes region r of the source (mapped, holes
//!    skipped) into block, chunk and region hashes;
//! 2. the target session's view of region r (its trusted manifest, or its
//!    bytes hashed) is compared with them, region hash first, then chunks,
//!    then blocks; equal regions cost one hash;
//! 3. for blocks that differ the target resolves what it can itself (zero
//!    ranges, copies of content it holds) and wants the rest, with the page
//!    hashes of what it holds;
//! 4. the source session reads each wanted block and sends the pages that
//!    differ (zstd when it pays); a full copy sends every non-zero block as
//!    it is hashed, and zero runs as ranges;
//! 5. the target verifies each block's blake3 (`block::ReceivedBlock::verify`)
//!    and stages it (redo log), or writes it in place (`.partial`, device);
//! 6. when every region is done and the source finished, the target commits:
//!    prepare → seal (the commit point) → finish.

pub mod decide;
mod hinted;
pub mod lineage;
pub mod source;
pub mod target;

pub use decide::{decide, Decision, Request};
pub use source::{Item, ItemSink, Link, SourceSession};
pub use target::{commit_group, Accepted, Member, Outcome, SealedMember, TargetRequest, TargetSession};
