//! Hashing a whole disk (`diskferry hash`): its hash-tree root, how many
//! blocks are zeros, and optionally its manifest written to a file.

use std::path::Path;
use std::sync::Arc;

use diskferry_protocol::{BlockHash, BlockSize, Consistency, Generation, Geometry};

use crate::error::{IoContext, Place, Result};
use crate::hash::hash_blocks;
use crate::manifest::{ManifestMeta, ManifestWriter};
use crate::progress::Progress;
use crate::store::Vfs;
use crate::tree::{region_hash, RootHasher};

/// What hashing a disk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    /// The disk's size and the block size used.
    pub geometry: Geometry,
    /// Root of the hash tree.
    pub root: BlockHash,
    /// Blocks that are all zeros (holes included).
    pub zero_blocks: u64,
}

/// Where to write the manifest, and the values the engine does not make.
#[derive(Clone, Copy, Debug)]
pub struct ManifestOut<'a> {
    /// The file to create.
    pub path: &'a Path,
    /// Its generation id.
    pub generation: Generation,
    /// Its creation time, ns since the epoch.
    pub now_unix_ns: i64,
}

/// Hashes `path` region by region on the current rayon pool.
pub fn digest(
    vfs: Arc<dyn Vfs>,
    path: &Path,
    block_size: BlockSize,
    manifest: Option<ManifestOut<'_>>,
    progress: &dyn Progress,
) -> Result<Digest> {
    let before = vfs.metadata(path).ctx(Place::Source, "reading", path)?;
    let disk = crate::disk::Disk::open_on(vfs.as_ref(), path).ctx(Place::Source, "opening", path)?;
    let g = Geometry::new(disk.len(), block_size);
    let mut writer = match &manifest {
        Some(m) => Some(ManifestWriter::create(vfs.clone(), m.path, g)?),
        None => None,
    };
    let mut root = RootHasher::new(&g);
    let mut zero_blocks = 0u64;
    progress.phase("hashing", g.disk_bytes);
    for region in 0..g.region_count() {
        let range = g.region_range(region);
        let hashes = hash_blocks(&disk, &g, range.clone()).ctx(Place::Source, "reading", path)?;
        zero_blocks += hashes.iter().filter(|h| h.is_zero()).count() as u64;
        root.update(&region_hash(&hashes));
        if let Some(w) = &mut writer {
            w.push_region(region, &hashes)?;
        }
        progress.advance(g.block_offset(range.end).min(g.disk_bytes) - g.block_offset(range.start));
    }
    if let (Some(w), Some(m)) = (writer, manifest) {
        let after = vfs.metadata(path).ctx(Place::Source, "reading", path)?;
        let consistency = if before == after { Consistency::Crash } else { Consistency::Fuzzy };
        w.finish(ManifestMeta { generation: m.generation, parent: None, consistency, created_unix_ns: m.now_unix_ns })?;
    }
    Ok(Digest { geometry: g, root: root.finish(), zero_blocks })
}
