//! Shared fakes for diskferry's tests.
//!
//! - [`MemFs`]: an in-memory [`Vfs`](diskferry_sync_engine::store::Vfs) with
//!   sparse files, simulated block devices, in-process locks and logical
//!   write stamps.
//! - [`CrashFs`]: a `Vfs` that models durability as the storage contracts
//!   state it, counts sync points, freezes durability at any of them and
//!   rebuilds the image a power cut leaves ([`CrashFs::crash`]).
//! - [`FaultyFs`]: wraps any `Vfs` and fails every operation after the N-th
//!   with `EIO` or `ENOSPC` ([`Fault`]).
//! - [`pair::push`]: a push in memory through the wire format, with the
//!   networked apply (resumable target, verified frames, direct sinks).
//! - [`DiskGen`]: seeded disk images (data, zero runs, repeats) and changes
//!   to them (unaligned writes, zeroed runs, size changes), with
//!   [`write_image`] / [`read_image`] / [`write_sparse_file`] to place them.
//!
//! ```
//! use std::path::Path;
//! use diskferry_testkit::{read_image, write_image, CrashFs, DiskGen, MemFs};
//!
//! let base = MemFs::new();
//! let disk = DiskGen::new(1).disk(64 << 10);
//! write_image(&base, Path::new("/src.img"), &disk).unwrap();
//! let fs = CrashFs::new(&base);
//! let image = fs.crash(42);
//! assert_eq!(read_image(&image, Path::new("/src.img")).unwrap(), Some(disk));
//! ```
#![warn(missing_docs)]

pub mod crashfs;
mod crashlog;
mod faulty;
mod gen;
mod memfs;
mod model;
pub mod pair;

pub use crashfs::CrashFs;
pub use faulty::{Fault, FaultyFs, ReadAhead, Writes};
pub use gen::{read_image, write_image, write_sparse_file, DiskGen};
pub use memfs::MemFs;
