//! The fields of the session's requests and answers: modes, plans, `Open`,
//! `Accept`, `WantBlock`, `Committed`, and their flag bits.

use crate::types::{BlockHash, BlockSize, Generation, SessionId, TargetName};

/// Which sync the source asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// The target decides: delta when it holds the disk, full otherwise.
    Auto,
    /// Compare; the target must exist.
    Delta,
    /// Send everything without comparing.
    Full,
}

/// How the session will run, decided by the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// No comparison: every non-zero block travels.
    Full,
    /// Compare with the target's trusted manifest (its disk is not read).
    CompareManifest,
    /// Compare by hashing the target's disk.
    CompareHash,
}

/// Session request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// Session id (a rerun of an interrupted push may reuse staged blocks).
    pub session: SessionId,
    /// Logical target name.
    pub target: TargetName,
    /// Source disk size.
    pub disk_bytes: u64,
    /// Block size.
    pub block_size: BlockSize,
    /// Requested mode.
    pub mode: SyncMode,
    /// Sync a diverged target anyway, or one unrelated to the source.
    pub force: bool,
    /// A split brain proceeds: the target's own changes past the common
    /// point are discarded (kept as a recovery point until `commit`).
    pub discard_target_changes: bool,
    /// The source disk's lineage, newest first (at most
    /// [`MAX_LINEAGE`]): what it was last pushed as, or the generation it
    /// holds as a promoted replica, and the ones before.
    pub lineage: Vec<Generation>,
    /// Promote the committed point (the target becomes `live`) in this
    /// session: the last step of `failover-sync --promote`.
    pub promote: bool,
    /// This session is one member of a replication group's push: the
    /// target commits it only together with the others.
    pub group: Option<GroupTag>,
}

/// The replication group push a session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupTag {
    /// The group's name.
    pub name: TargetName,
    /// The push, the same in every member's session.
    pub push: u128,
    /// How many members (sessions) the push has.
    pub members: u16,
}

/// Members a group push may have.
pub const MAX_GROUP_MEMBERS: u16 = 64;

/// Generations an `Open` may carry as lineage.
pub const MAX_LINEAGE: usize = 256;

/// Session acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    /// How the session runs.
    pub plan: Plan,
    /// The target's committed generation.
    pub target_generation: Option<Generation>,
    /// Blocks staged by an interrupted session that this one may reuse.
    pub staged_blocks: u64,
    /// Regions the source may have in flight.
    pub window: u32,
}

/// A block requested by the target, with the hashes of its current pages
/// (empty: send the whole block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantBlock {
    /// Block index.
    pub index: u64,
    /// Truncated blake3 (first 8 bytes, little-endian) of each 4 KiB page the target holds.
    pub page_hashes: Vec<u64>,
}

/// The result of a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The new generation.
    pub generation: Generation,
    /// Root of its hash tree.
    pub root: BlockHash,
    /// Blocks whose content changed.
    pub blocks_changed: u64,
    /// Content bytes written into the target.
    pub bytes_written: u64,
    /// Recovery points the commit dropped by starting a new chain (`--force`).
    pub points_dropped: u32,
    /// The target already held exactly this content at a point at least as
    /// consistent: no new generation was made, `generation` is that point.
    pub unchanged: bool,
    /// The last point both sides held, when the target's disk had a
    /// lineage of its own (or was a replica of the source's chain).
    pub common_point: Option<Generation>,
    /// Blocks of the target's own changes discarded (`discard_target_changes`).
    pub discarded_blocks: u64,
    /// The recovery point that keeps them until `commit`.
    pub discarded_point: Option<Generation>,
    /// Bytes the target read from its own disk.
    pub target_bytes_read: u64,
    /// The committed point was promoted (`Open.promote`).
    pub promoted: bool,
}

/// [`Committed`] flag: the target already held this content.
pub(super) const COMMITTED_UNCHANGED: u8 = 1;
/// [`Open`] flags.
pub(super) const OPEN_FORCE: u8 = 1;
pub(super) const OPEN_DISCARD: u8 = 2;
pub(super) const OPEN_PROMOTE: u8 = 4;
pub(super) const OPEN_GROUP: u8 = 8;
/// [`Committed`] flag: the point was promoted.
pub(super) const COMMITTED_PROMOTED: u8 = 2;
