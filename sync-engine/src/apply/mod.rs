//! Target apply: staging verified blocks, the commit protocol, recovery and
//! recovery points. The commit protocol, step by step with each fsync, is
//! documented in `docs/design.md` and on [`Apply::prepare`].
//!
//! - `target`: a target and its state directory (lock, catalog, trust);
//! - `recover`: what opening a target does about an interrupted apply;
//! - `session`: the apply of one session (mode, staging);
//! - `commit`: prepare → seal → finish;
//! - `group`: the commit of a replication group (one point across targets);
//! - `moves`: failover to a kept point, commit, pins of test clones;
//! - `demote`: a live target back to a replica;
//! - `sink`: direct writes of full copies, and reads of current content;
//! - `catalog`, `journal`, `undo`: the state files.

pub mod catalog;
mod check;
mod commit;
mod demote;
pub mod group;
mod inflight;
pub mod journal;
mod moves;
mod recover;
#[cfg(test)]
mod replay_order;
mod runs;
mod session;
mod sink;
mod target;
mod touched;
pub mod undo;

pub use catalog::{Catalog, Pin, PointRecord, Role, Status, UndoRef};
pub use check::VerifyReport;
pub use commit::{CommitMeta, CommitReport, Prepared, Sealed};
pub use demote::DemoteReport;
pub use moves::{CommitPointsReport, MoveReport};
pub use runs::RunWriter;
pub use session::{Apply, ApplyMode, ApplyStats, BeginSpec};
pub use sink::{DirectSink, KeptBlocks, OldContent};
pub use target::{
    diverged_error, manifest_file, partial_path, target_key, Aborted, Recovery, Target, TargetOptions, Trust,
};
pub use touched::TOUCHED_LIST_BYTES;
