//! The diskferry sync engine: everything between a disk and the wire.
//!
//! - [`Disk`] reads a file or block device (memory-mapped, holes skipped) and
//!   [`hash::hash_blocks`] hashes its blocks in parallel.
//! - [`manifest::ManifestWriter`] / [`manifest::Manifest`] store a
//!   generation's block hashes with a hash tree ([`tree`]) and a hash index.
//! - [`plan`] turns source and target hashes into operations, region by region.
//! - [`apply::Target`] applies verified blocks crash-consistently: redo log,
//!   commit record, in-place writes, undo segments for older recovery points;
//!   [`apply::Apply::prepare`] → [`apply::Prepared::seal`] →
//!   [`apply::Sealed::finish`] is the commit; failover moves
//!   ([`apply::Target::failover`]) run on the same log.
//! - [`history`] is a disk's own history as a source; with a target's
//!   catalog it decides what a push may overwrite (`session::lineage`).
//! - [`session`] holds every sync session: [`mod@session::decide`] (the one
//!   decision table), [`session::TargetSession`] and [`session::SourceSession`];
//!   its module docs follow a block from disk to disk.
//! - [`local::sync`] joins the two sessions in memory: a disk-to-disk sync
//!   with no network; the agent joins them over QUIC.
//!
//! The engine is synchronous and parallel inside (rayon); it knows no network,
//! no clock and no randomness: times and generation ids are arguments.
//!
//! ```
//! use diskferry_sync_engine::hash::hash_block;
//! use diskferry_protocol::BlockHash;
//! assert_eq!(hash_block(&[0u8; 4096]), BlockHash::ZERO);
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod aligned;
pub mod apply;
pub mod block;
pub mod changes;
pub mod compress;
pub mod digest;
pub mod disk;
pub mod error;
pub mod hash;
pub mod history;
mod leaf;
pub mod local;
pub mod manifest;
mod mmap;
pub mod plan;
pub mod points;
mod pool;
pub mod progress;
pub mod remote;
pub mod seqio;
pub mod session;
pub mod store;
pub mod tree;
pub mod verify;
pub mod view;

pub use disk::Disk;
pub use error::{Error, Place, Result};
pub use pool::thread_pool;
pub use progress::{NoProgress, Progress};
