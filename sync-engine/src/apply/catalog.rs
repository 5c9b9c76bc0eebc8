//! The catalog: one small checksummed file per target naming its committed
//! generation, its recovery points and the stamp taken at commit.
//!
//! | part | layout (little-endian) |
//! |------|------------------------|
//! | head | `"DFCATLG1" · u32 version · u8 status (0 complete, 1 incomplete) · u8 kind (0 file, 1 block device) · u8 stamp kind (0 none, 1 file, 2 device) · u8 0` |
//! | stamp (48 B) | file: `u64 len · i64 mtime ns · i64 ctime ns · u64 inode · [16] 0`; device: `[16] boot id · u64 rdev · u64 sectors written · [16] 0` |
//! | names | `u16 len · target path bytes · u16 len · target name bytes` |
//! | points | `u32 count`, then per point (136 B), newest first: `u128 generation · u128 parent · u8 consistency · u8 has undo · [6] 0 · i64 created ns · u64 disk bytes · u32 block size · [4] 0 · [32] manifest checksum · [32] undo checksum · u64 undo bytes` |
//! | checksum | `[32]` blake3 of everything before |
//!
//! It is replaced atomically: written to `catalog.tmp`, synced, renamed over
//! `catalog`, and the directory synced.

use std::path::{Path, PathBuf};

use diskferry_protocol::{BlockSize, Consistency, Generation, Geometry};

use crate::error::{Error, IoContext, Place, Result};
use crate::seqio::Fields;
use crate::store::{DiskKind, OpenHow, Stamp, Vfs};

const MAGIC: &[u8; 8] = b"DFCATLG1";
const VERSION: u32 = 1;
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

/// An undo segment kept for a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRef {
    /// Checksum of the segment file.
    pub checksum: [u8; 32],
    /// Bytes of old content it holds.
    pub data_bytes: u64,
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
    /// For an older point: the segment that restores it from the next newer one.
    pub undo: Option<UndoRef>,
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
    /// Kept generations, newest (the current one) first.
    pub points: Vec<PointRecord>,
}

impl Catalog {
    /// The committed generation the target is at.
    pub fn current(&self) -> Option<&PointRecord> {
        match self.status {
            Status::Complete => self.points.first(),
            Status::Incomplete => None,
        }
    }

    /// Drops the points past the `retention`-th consistent one (the current
    /// generation always stays). Returns the dropped points.
    pub fn prune(&mut self, retention: u32) -> Vec<PointRecord> {
        let mut consistent = 0;
        let mut keep = 1;
        for (i, p) in self.points.iter().enumerate() {
            if p.consistency.is_recovery_point() {
                consistent += 1;
                keep = i + 1;
                if consistent >= retention.max(1) {
                    break;
                }
            }
        }
        self.points.split_off(keep.min(self.points.len()))
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let n = bytes.len().min(u16::MAX as usize);
    b.extend_from_slice(&(n as u16).to_le_bytes());
    b.extend_from_slice(&bytes[..n]);
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
    let mut stamp = [0u8; 48];
    b.push(match c.stamp {
        None => 0,
        Some(Stamp::File { len, mtime_ns, ctime_ns, ino }) => {
            stamp[0..8].copy_from_slice(&len.to_le_bytes());
            stamp[8..16].copy_from_slice(&mtime_ns.to_le_bytes());
            stamp[16..24].copy_from_slice(&ctime_ns.to_le_bytes());
            stamp[24..32].copy_from_slice(&ino.to_le_bytes());
            1
        }
        Some(Stamp::Device { boot_id, rdev, sectors_written }) => {
            stamp[0..16].copy_from_slice(&boot_id);
            stamp[16..24].copy_from_slice(&rdev.to_le_bytes());
            stamp[24..32].copy_from_slice(&sectors_written.to_le_bytes());
            2
        }
    });
    b.push(0);
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
        let u = p.undo.unwrap_or(UndoRef { checksum: [0; 32], data_bytes: 0 });
        b.extend_from_slice(&u.checksum);
        b.extend_from_slice(&u.data_bytes.to_le_bytes());
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
    if f.take(8)? != MAGIC || f.u32()? != VERSION {
        return None;
    }
    let status = match f.u8()? {
        0 => Status::Complete,
        1 => Status::Incomplete,
        _ => return None,
    };
    let kind = DiskKind::from_u8(f.u8()?)?;
    let stamp_kind = f.u8()?;
    f.u8()?;
    let mut s = Fields::new(f.take(48)?);
    let stamp = match stamp_kind {
        0 => None,
        1 => Some(Stamp::File { len: s.u64()?, mtime_ns: s.i64()?, ctime_ns: s.i64()?, ino: s.u64()? }),
        2 => Some(Stamp::Device { boot_id: s.array()?, rdev: s.u64()?, sectors_written: s.u64()? }),
        _ => return None,
    };
    let path_len = f.u16()? as usize;
    let path = PathBuf::from(String::from_utf8(f.take(path_len)?.to_vec()).ok()?);
    let name_len = f.u16()? as usize;
    let name = String::from_utf8(f.take(name_len)?.to_vec()).ok()?;
    let count = f.u32()?;
    let mut points = Vec::new();
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
        let undo = UndoRef { checksum: f.array()?, data_bytes: f.u64()? };
        points.push(PointRecord {
            generation,
            parent,
            consistency,
            created_unix_ns,
            geometry: Geometry::new(disk_bytes, block_size),
            manifest_checksum,
            undo: has_undo.then_some(undo),
        });
    }
    if f.position() != b.len() - 32 {
        return None;
    }
    Some(Catalog { path, name: (!name.is_empty()).then_some(name), kind, status, stamp, points })
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

    fn point(n: u128, c: Consistency) -> PointRecord {
        PointRecord {
            generation: Generation(n),
            parent: None,
            consistency: c,
            created_unix_ns: 5,
            geometry: Geometry::new(1 << 20, BlockSize::DEFAULT),
            manifest_checksum: [n as u8; 32],
            undo: (n > 1).then_some(UndoRef { checksum: [1; 32], data_bytes: 7 }),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let c = Catalog {
            path: "/srv/disk.img".into(),
            name: Some("vm1".into()),
            kind: DiskKind::File,
            status: Status::Complete,
            stamp: Some(Stamp::File { len: 1, mtime_ns: 2, ctime_ns: 3, ino: 4 }),
            points: vec![point(3, Consistency::Crash), point(2, Consistency::Fuzzy)],
        };
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
    fn prune_keeps_consistent_points_and_chain() {
        use Consistency::*;
        let mk = |cs: &[Consistency]| Catalog {
            path: "/x".into(),
            name: None,
            kind: DiskKind::File,
            status: Status::Complete,
            stamp: None,
            points: cs.iter().enumerate().map(|(i, c)| point(10 - i as u128, *c)).collect(),
        };
        let mut c = mk(&[Crash, Crash, Crash]);
        assert_eq!(c.prune(2).len(), 1);
        assert_eq!(c.points.len(), 2);
        // Fuzzy links between consistent points are kept; fuzzy ones past the last are not.
        let mut c = mk(&[Fuzzy, Fuzzy, Crash, Fuzzy, Crash, Fuzzy]);
        c.prune(2);
        assert_eq!(c.points.len(), 5);
        let mut c = mk(&[Fuzzy, Fuzzy]);
        c.prune(2);
        assert_eq!(c.points.len(), 1);
    }
}
