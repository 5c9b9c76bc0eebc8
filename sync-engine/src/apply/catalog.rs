//! The catalog: one small checksummed file per target naming its committed
//! generation, its recovery points and the stamp taken at commit.
//!
//! | part | layout (little-endian) |
//! |------|------------------------|
//! | head | `"DFCATLG1" · u32 version (2; 1 is read) · u8 status (0 complete, 1 incomplete) · u8 kind (0 file, 1 block device) · u8 stamp kind (0 none, 1 file, 2 device) · u8 role (0 replica, 1 live)` |
//! | stamp (48 B) | file: `u64 len · i64 mtime ns · i64 ctime ns · u64 inode · [16] 0`; device: `[16] boot id · u64 rdev · u64 sectors written · [16] 0` |
//! | names | `u16 len · target path bytes · u16 len · target name bytes` |
//! | points | `u32 count`, then per point (184 B), the current one first: `u128 generation · u128 parent · u8 consistency · u8 has undo · [6] 0 · i64 created ns · u64 disk bytes · u32 block size · [4] 0 · [32] manifest checksum · [32] undo checksum · u64 undo bytes · u128 generation the undo segment applies to · [32] root` (version 1: 136 B without the last two fields: the point before, root unknown) |
//! | pins | version 2: `u32 count`, then per pin `u128 generation · u16 len · clone path bytes` |
//! | checksum | `[32]` blake3 of everything before |
//!
//! The points form a tree rooted at the current one: each other point's
//! undo segment turns the image of the point it applies to into its own.
//! A commit adds a new root above the old one; a failover to a kept point
//! (`apply/moves.rs`) makes that point the root and the old root a leaf
//! restored from it.
//!
//! It is replaced atomically: written to `catalog.tmp`, synced, renamed over
//! `catalog`, and the directory synced.

use std::path::{Path, PathBuf};

use diskferry_protocol::{BlockHash, BlockSize, Consistency, Generation, Geometry};

use crate::error::{Error, IoContext, Place, Result};
use crate::seqio::Fields;
use crate::store::{decode_stamp, encode_stamp, put_str, DiskKind, OpenHow, Stamp, Vfs};

const MAGIC: &[u8; 8] = b"DFCATLG1";
const VERSION: u32 = 2;
/// File name of the catalog in a target's state directory.
pub const CATALOG: &str = "catalog";
const CATALOG_TMP: &str = "catalog.tmp";

/// Whether the target holds its committed generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The target is at `points[0]`.
    Complete,
    /// A full copy is being written straight into a block device: the target
    /// is no recovery point until that copy commits.
    Incomplete,
}

/// What a target is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It receives pushes.
    Replica,
    /// It was promoted (`failover`): a VM runs on it and no push lands on it.
    Live,
}

impl Role {
    /// The name printed and accepted by operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Replica => "replica",
            Role::Live => "live",
        }
    }
}

/// An undo segment kept for a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRef {
    /// Checksum of the segment file.
    pub checksum: [u8; 32],
    /// Bytes of old content it holds.
    pub data_bytes: u64,
    /// The point whose image the segment turns into this one.
    pub applies_to: Generation,
}

/// A point kept whatever the retention: by a test-failover clone while the
/// clone exists, or — with an empty clone path — a receiving disk's own
/// changes a push discarded, until `commit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The pinned point.
    pub generation: Generation,
    /// The clone's path (empty: discarded changes).
    pub clone: PathBuf,
}

impl Pin {
    /// Whether it keeps discarded changes rather than a clone's point.
    pub fn is_discarded(&self) -> bool {
        self.clone.as_os_str().is_empty()
    }
}

/// One kept generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointRecord {
    /// The generation.
    pub generation: Generation,
    /// The generation it was synced over.
    pub parent: Option<Generation>,
    /// Its consistency.
    pub consistency: Consistency,
    /// Commit time (ns since the epoch).
    pub created_unix_ns: i64,
    /// Disk size and block size.
    pub geometry: Geometry,
    /// Checksum of its manifest file.
    pub manifest_checksum: [u8; 32],
    /// Root of its hash tree.
    pub root: BlockHash,
    /// For an older point: the segment that restores it from the next newer one.
    pub undo: Option<UndoRef>,
}

impl PointRecord {
    /// The point a manifest describes (no undo segment).
    pub fn of(m: &crate::manifest::Manifest) -> PointRecord {
        let h = m.header();
        PointRecord {
            generation: h.generation,
            parent: h.parent,
            consistency: h.consistency,
            created_unix_ns: h.created_unix_ns,
            geometry: h.geometry,
            manifest_checksum: m.checksum(),
            root: h.root,
            undo: None,
        }
    }
}

/// A target's catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    /// The target's canonical path.
    pub path: PathBuf,
    /// Its logical name when served to peers.
    pub name: Option<String>,
    /// File or block device.
    pub kind: DiskKind,
    /// Complete or mid full-copy.
    pub status: Status,
    /// Stamp of the target right after the last commit.
    pub stamp: Option<Stamp>,
    /// Replica or live.
    pub role: Role,
    /// Kept generations, the current one first, then newest first.
    pub points: Vec<PointRecord>,
    /// Points pinned by test-failover clones.
    pub pins: Vec<Pin>,
}

impl Catalog {
    /// The committed generation the target is at.
    pub fn current(&self) -> Option<&PointRecord> {
        match self.status {
            Status::Complete => self.points.first(),
            Status::Incomplete => None,
        }
    }

    /// A kept point by generation.
    pub fn point(&self, g: Generation) -> Option<&PointRecord> {
        self.points.iter().find(|p| p.generation == g)
    }

    /// The points whose undo segments turn the current image into `g`'s,
    /// in the order they are applied (empty for the current point); `None`
    /// if `g` is not kept or its links do not reach the current point.
    pub fn path_to(&self, g: Generation) -> Option<Vec<PointRecord>> {
        let root = self.points.first()?.generation;
        let mut path = Vec::new();
        let mut at = *self.point(g)?;
        while at.generation != root {
            if path.len() > self.points.len() {
                return None;
            }
            path.push(at);
            at = *self.point(at.undo?.applies_to)?;
        }
        path.reverse();
        Some(path)
    }

    /// The current generation and its parents as far as the kept points
    /// go, newest first (at most [`crate::history::MAX_CHAIN`]).
    pub fn ancestry(&self) -> Vec<Generation> {
        let mut out = Vec::new();
        let mut at = self.current().copied();
        while let Some(p) = at {
            if out.contains(&p.generation) || out.len() >= crate::history::MAX_CHAIN {
                break;
            }
            out.push(p.generation);
            at = p.parent.and_then(|g| self.point(g)).copied();
        }
        out
    }

    /// Whether `g` is pinned by a test-failover clone.
    pub fn is_pinned(&self, g: Generation) -> bool {
        self.pins.iter().any(|p| p.generation == g)
    }

    /// Drops every point but the current one, the `retention` newest
    /// consistent ones, the pinned ones, and the points their undo segments
    /// go through (fuzzy links between kept points stay, never listed).
    /// Returns the dropped points.
    pub fn prune(&mut self, retention: u32, also: &[Generation]) -> Vec<PointRecord> {
        let mut by_age: Vec<&PointRecord> = self.points.iter().skip(1).collect();
        by_age.sort_by_key(|p| std::cmp::Reverse(p.created_unix_ns));
        let mut wanted: Vec<Generation> = self.points.first().map(|p| p.generation).into_iter().collect();
        let current_counts = self.points.first().is_some_and(|p| p.consistency.is_recovery_point());
        let more = (retention.max(1) as usize).saturating_sub(current_counts as usize);
        wanted.extend(by_age.iter().filter(|p| p.consistency.is_recovery_point()).take(more).map(|p| p.generation));
        wanted.extend(self.pins.iter().map(|p| p.generation));
        wanted.extend(also.iter().filter(|g| self.points.iter().any(|p| p.generation == **g)));
        self.keep_only(&wanted)
    }

    /// Keeps the `wanted` points and every point on their paths from the
    /// current one; returns the others, removed.
    pub fn keep_only(&mut self, wanted: &[Generation]) -> Vec<PointRecord> {
        let mut keep: Vec<Generation> = Vec::new();
        for g in wanted {
            if let Some(path) = self.path_to(*g) {
                keep.extend(path.iter().map(|p| p.generation));
            }
        }
        keep.extend(self.points.first().map(|p| p.generation));
        let (kept, dropped): (Vec<_>, Vec<_>) = self.points.drain(..).partition(|p| keep.contains(&p.generation));
        self.points = kept;
        // A test image's pin stays until its cleanup, even if its point went
        // (a demote, a new chain): the cleanup finds the image by it.
        self.pins.retain(|p| !p.is_discarded() || keep.contains(&p.generation));
        dropped
    }
}

fn encode(c: &Catalog) -> Vec<u8> {
    let mut b = Vec::with_capacity(256 + c.points.len() * 136);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.push(match c.status {
        Status::Complete => 0,
        Status::Incomplete => 1,
    });
    b.push(c.kind.to_u8());
    let (stamp_kind, stamp) = encode_stamp(c.stamp);
    b.push(stamp_kind);
    b.push(match c.role {
        Role::Replica => 0,
        Role::Live => 1,
    });
    b.extend_from_slice(&stamp);
    put_str(&mut b, &c.path.to_string_lossy());
    put_str(&mut b, c.name.as_deref().unwrap_or(""));
    b.extend_from_slice(&(c.points.len() as u32).to_le_bytes());
    for p in &c.points {
        b.extend_from_slice(&p.generation.0.to_le_bytes());
        b.extend_from_slice(&p.parent.map_or(0, |g| g.0).to_le_bytes());
        b.push(p.consistency.to_u8());
        b.push(p.undo.is_some() as u8);
        b.extend_from_slice(&[0; 6]);
        b.extend_from_slice(&p.created_unix_ns.to_le_bytes());
        b.extend_from_slice(&p.geometry.disk_bytes.to_le_bytes());
        b.extend_from_slice(&p.geometry.block_size.get().to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&p.manifest_checksum);
        let u = p.undo.unwrap_or(UndoRef { checksum: [0; 32], data_bytes: 0, applies_to: Generation(0) });
        b.extend_from_slice(&u.checksum);
        b.extend_from_slice(&u.data_bytes.to_le_bytes());
        b.extend_from_slice(&u.applies_to.0.to_le_bytes());
        b.extend_from_slice(p.root.as_bytes());
    }
    b.extend_from_slice(&(c.pins.len() as u32).to_le_bytes());
    for pin in &c.pins {
        b.extend_from_slice(&pin.generation.0.to_le_bytes());
        put_str(&mut b, &pin.clone.to_string_lossy());
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Catalog> {
    if b.len() < 32 || blake3::hash(&b[..b.len() - 32]).as_bytes() != &b[b.len() - 32..] {
        return None;
    }
    let mut f = Fields::new(&b[..b.len() - 32]);
    if f.take(8)? != MAGIC {
        return None;
    }
    let version = f.u32()?;
    if !(1..=VERSION).contains(&version) {
        return None;
    }
    let status = match f.u8()? {
        0 => Status::Complete,
        1 => Status::Incomplete,
        _ => return None,
    };
    let kind = DiskKind::from_u8(f.u8()?)?;
    let stamp_kind = f.u8()?;
    let role = match f.u8()? {
        0 => Role::Replica,
        1 => Role::Live,
        _ => return None,
    };
    let stamp = decode_stamp(stamp_kind, f.take(48)?)?;
    let path_len = f.u16()? as usize;
    let path = PathBuf::from(String::from_utf8(f.take(path_len)?.to_vec()).ok()?);
    let name_len = f.u16()? as usize;
    let name = String::from_utf8(f.take(name_len)?.to_vec()).ok()?;
    let count = f.u32()?;
    let mut points: Vec<PointRecord> = Vec::new();
    for _ in 0..count {
        let generation = Generation(f.u128()?);
        let parent = match f.u128()? {
            0 => None,
            g => Some(Generation(g)),
        };
        let consistency = Consistency::from_u8(f.u8()?)?;
        let has_undo = f.u8()? == 1;
        f.take(6)?;
        let created_unix_ns = f.i64()?;
        let disk_bytes = f.u64()?;
        let block_size = BlockSize::new(f.u32()?).ok()?;
        f.take(4)?;
        let manifest_checksum = f.array()?;
        let (checksum, data_bytes) = (f.array()?, f.u64()?);
        let applies_to = match version {
            1 => points.last().map_or(Generation(0), |p| p.generation),
            _ => Generation(f.u128()?),
        };
        // Version 1 kept no root (its manifest has it).
        let root = match version {
            1 => BlockHash::ZERO,
            _ => BlockHash(f.array()?),
        };
        let undo = UndoRef { checksum, data_bytes, applies_to };
        points.push(PointRecord {
            generation,
            parent,
            consistency,
            created_unix_ns,
            geometry: Geometry::new(disk_bytes, block_size),
            manifest_checksum,
            root,
            undo: has_undo.then_some(undo),
        });
    }
    let mut pins = Vec::new();
    if version >= 2 {
        for _ in 0..f.u32()? {
            let generation = Generation(f.u128()?);
            let len = f.u16()? as usize;
            let clone = PathBuf::from(String::from_utf8(f.take(len)?.to_vec()).ok()?);
            pins.push(Pin { generation, clone });
        }
    }
    if f.position() != b.len() - 32 {
        return None;
    }
    Some(Catalog { path, name: (!name.is_empty()).then_some(name), kind, status, stamp, role, points, pins })
}

/// Reads the catalog in `dir`; `None` if there is none.
pub fn read_catalog(vfs: &dyn Vfs, dir: &Path) -> Result<Option<Catalog>> {
    let path = dir.join(CATALOG);
    if vfs.metadata(&path).ctx(Place::State, "reading", &path)?.is_none() {
        return Ok(None);
    }
    let storage = vfs.open(&path, OpenHow::Read).ctx(Place::State, "opening", &path)?;
    let len = storage.len().ctx(Place::State, "reading", &path)?;
    if len > 64 << 20 {
        return Err(Error::corrupt(&path, "implausibly large"));
    }
    let mut b = vec![0u8; len as usize];
    storage.read_at(0, &mut b).ctx(Place::State, "reading", &path)?;
    decode(&b).map(Some).ok_or_else(|| Error::corrupt(&path, "checksum or structure mismatch"))
}

/// Atomically replaces the catalog in `dir`.
pub fn write_catalog(vfs: &dyn Vfs, dir: &Path, c: &Catalog) -> Result<()> {
    let tmp = dir.join(CATALOG_TMP);
    let path = dir.join(CATALOG);
    let storage = vfs.open(&tmp, OpenHow::Truncate).ctx(Place::State, "creating", &tmp)?;
    storage.write_at(0, &encode(c)).ctx(Place::State, "writing", &tmp)?;
    storage.sync().ctx(Place::State, "syncing", &tmp)?;
    vfs.rename(&tmp, &path).ctx(Place::State, "replacing", &path)?;
    vfs.sync_dir(dir).ctx(Place::State, "syncing", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Point `n` of a linear chain: created at `n`, restored from `n + 1`.
    fn point(n: u128, c: Consistency) -> PointRecord {
        PointRecord {
            generation: Generation(n),
            parent: None,
            consistency: c,
            created_unix_ns: n as i64,
            geometry: Geometry::new(1 << 20, BlockSize::DEFAULT),
            manifest_checksum: [n as u8; 32],
            root: BlockHash([n as u8 ^ 0x5A; 32]),
            undo: Some(UndoRef { checksum: [1; 32], data_bytes: 7, applies_to: Generation(n + 1) }),
        }
    }

    fn chain(cs: &[Consistency]) -> Catalog {
        let mut points: Vec<PointRecord> = cs.iter().enumerate().map(|(i, c)| point(10 - i as u128, *c)).collect();
        points[0].undo = None;
        Catalog {
            path: "/x".into(),
            name: None,
            kind: DiskKind::File,
            status: Status::Complete,
            stamp: None,
            role: Role::Replica,
            points,
            pins: Vec::new(),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let mut c = chain(&[Consistency::Crash, Consistency::Fuzzy]);
        c.path = "/srv/disk.img".into();
        c.name = Some("vm1".into());
        c.stamp = Some(Stamp::File { len: 1, mtime_ns: 2, ctime_ns: 3, ino: 4 });
        c.role = Role::Live;
        c.pins = vec![Pin { generation: Generation(9), clone: "/tmp/test.img".into() }];
        let b = encode(&c);
        assert_eq!(decode(&b), Some(c));
        for i in [0, 10, b.len() / 2, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad), None, "flip at {i}");
        }
        assert_eq!(decode(&b[..b.len() - 1]), None);
    }

    #[test]
    fn version_1_reads_as_a_linear_chain() {
        let c = chain(&[Consistency::Crash, Consistency::Crash, Consistency::App]);
        // Version 1: no applies-to field, no pins, role byte 0.
        let mut b = encode(&c);
        b.truncate(b.len() - 32 - 4);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let points_at = b.len() - 3 * 184;
        let mut v1 = b[..points_at].to_vec();
        for i in 0..3 {
            v1.extend_from_slice(&b[points_at + i * 184..points_at + i * 184 + 136]);
        }
        let sum = blake3::hash(&v1);
        v1.extend_from_slice(sum.as_bytes());
        let mut want = c.clone();
        for p in &mut want.points {
            p.root = BlockHash::ZERO;
        }
        let got = decode(&v1).expect("version 1 decodes");
        assert_eq!(got.points[1..], want.points[1..]);
        assert_eq!(got.path_to(Generation(8)).map(|p| p.len()), Some(2));
    }

    #[test]
    fn prune_keeps_consistent_points_and_chain() {
        use Consistency::*;
        let mut c = chain(&[Crash, Crash, Crash]);
        assert_eq!(c.prune(2, &[]).len(), 1);
        assert_eq!(c.points.len(), 2);
        // Fuzzy links between consistent points are kept; fuzzy ones past the last are not.
        let mut c = chain(&[Fuzzy, Fuzzy, Crash, Fuzzy, Crash, Fuzzy]);
        c.prune(2, &[]);
        assert_eq!(c.points.len(), 5);
        let mut c = chain(&[Fuzzy, Fuzzy]);
        c.prune(2, &[]);
        assert_eq!(c.points.len(), 1);
    }

    #[test]
    fn pins_survive_pruning_with_their_links() {
        use Consistency::*;
        let mut c = chain(&[Crash, Fuzzy, Crash, Crash, Crash]);
        c.pins.push(Pin { generation: Generation(6), clone: "/t".into() });
        let dropped: Vec<u128> = c.prune(1, &[]).iter().map(|p| p.generation.0).collect();
        assert_eq!(dropped, Vec::<u128>::new(), "6 is pinned: 9, 8 and 7 are its links");
        c.pins.clear();
        let dropped: Vec<u128> = c.prune(1, &[]).iter().map(|p| p.generation.0).collect();
        assert_eq!(dropped, vec![9, 8, 7, 6]);
    }

    #[test]
    fn paths_follow_the_tree_after_a_re_root() {
        use Consistency::*;
        // 10 (current) <- 9 <- 8: move to 8, so 10 is restored from 8 and 9 still from 10.
        let mut c = chain(&[Crash, Crash, Crash]);
        assert_eq!(
            c.path_to(Generation(8)).map(|p| p.iter().map(|p| p.generation.0).collect::<Vec<_>>()),
            Some(vec![9, 8])
        );
        let mut eight = c.points[2];
        eight.undo = None;
        let mut ten = c.points[0];
        ten.undo = Some(UndoRef { checksum: [2; 32], data_bytes: 3, applies_to: Generation(8) });
        c.points = vec![eight, ten, c.points[1]];
        let ids =
            |c: &Catalog, g| c.path_to(Generation(g)).map(|p| p.iter().map(|p| p.generation.0).collect::<Vec<_>>());
        assert_eq!(ids(&c, 9), Some(vec![10, 9]));
        assert_eq!(ids(&c, 10), Some(vec![10]));
        assert_eq!(ids(&c, 8), Some(vec![]));
        assert_eq!(ids(&c, 7), None);
        // A link that points nowhere (or in a circle) is no path.
        c.points[2].undo = Some(UndoRef { checksum: [0; 32], data_bytes: 0, applies_to: Generation(9) });
        assert_eq!(ids(&c, 9), None);
    }
}
