//! Target apply: staging verified blocks, the commit protocol, recovery and
//! recovery points. The commit protocol, step by step with each fsync, is
//! documented in `docs/design.md` and on [`Apply::commit`].

pub mod catalog;
pub mod journal;
mod target;
pub mod undo;

pub use catalog::{Catalog, PointRecord, Status, UndoRef};
pub use target::{
    diverged_error, manifest_file, partial_path, target_key, Aborted, Apply, ApplyMode, ApplyStats, BeginSpec,
    CommitMeta, CommitReport, DirectSink, OldContent, Recovery, Target, TargetOptions, Trust,
};
