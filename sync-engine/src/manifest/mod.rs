//! Manifests: the blake3 of every block of one generation, a hash tree over
//! them and a sorted hash index, in one checksummed file.
//!
//! Layout (little-endian; full tables in `docs/design.md`):
//!
//! | section  | content |
//! |----------|---------|
//! | runs     | `u8 kind (0 zero, 1 data) · 3 zero bytes · u32 count`, a data run followed by `count × 32` hash bytes |
//! | regions  | one 32-byte hash per region |
//! | index    | one `u64 hash prefix · u64 block` per data block, sorted |
//! | footer   | 192 bytes: geometry, generation, parent, consistency, time, offsets, root, checksum |
//!
//! Zero blocks cost nothing but their run header, so a manifest's size follows
//! the data, not the disk. Readers stream the runs and look up the index with
//! positional reads: a manifest is never held whole in memory.

pub mod compare;
mod reader;
mod writer;

pub use reader::{BlockCursor, Manifest, INDEX_PAGES_BYTES};
pub use writer::ManifestWriter;

use diskferry_protocol::{BlockHash, Consistency, Generation, Geometry};

pub(crate) const MAGIC: &[u8; 8] = b"DFMANIFT";
pub(crate) const VERSION: u32 = 1;
pub(crate) const FOOTER_LEN: u64 = 192;
pub(crate) const RUN_ZERO: u8 = 0;
pub(crate) const RUN_DATA: u8 = 1;
pub(crate) const INDEX_ENTRY: u64 = 16;

/// What a manifest says about its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestHeader {
    /// Disk size and block size.
    pub geometry: Geometry,
    /// The generation these hashes describe.
    pub generation: Generation,
    /// The generation it was synced from, if any.
    pub parent: Option<Generation>,
    /// Recovery-point quality.
    pub consistency: Consistency,
    /// Creation time, nanoseconds since the Unix epoch (given by the caller).
    pub created_unix_ns: i64,
    /// Blocks holding data.
    pub data_blocks: u64,
    /// All-zero blocks.
    pub zero_blocks: u64,
    /// Root of the hash tree.
    pub root: BlockHash,
}

/// The identity of a manifest's generation, given at [`ManifestWriter::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestMeta {
    /// The generation.
    pub generation: Generation,
    /// Its parent.
    pub parent: Option<Generation>,
    /// Its consistency.
    pub consistency: Consistency,
    /// Creation time in ns since the epoch.
    pub created_unix_ns: i64,
}
