//! What a target holds, region by region, in the source's geometry: from its
//! trusted manifest (its disk is not read) or by hashing its bytes, with the
//! blocks staged by an interrupted session laid over it.

use std::collections::HashMap;

use diskferry_protocol::session::{RegionView, ViewBlocks};
use diskferry_protocol::{BlockHash, Geometry, RegionHashes};

use crate::disk::Disk;
use crate::error::{IoContext, Place, Result};
use crate::hash::hash_blocks;
use crate::manifest::{BlockCursor, Manifest};
use crate::tree::{chunk_hashes, region_nodes};

/// Where the target's hashes come from.
#[derive(Debug)]
pub enum ViewSource {
    /// The committed manifest; `device` says blocks past its end hold unknown bytes.
    Manifest {
        /// The manifest.
        manifest: Box<Manifest>,
        /// Forward-only reader of its blocks.
        cursor: Box<BlockCursor>,
        /// Whether the target is a block device.
        device: bool,
    },
    /// Hash the bytes (the target, or the `.partial` of a resumed full copy).
    Disk(Disk),
}

/// Produces region views in order.
#[derive(Debug)]
pub struct ViewProducer {
    source: ViewSource,
    geometry: Geometry,
    overlay: HashMap<u64, BlockHash>,
    next: u64,
}

/// One region's view with its tree nodes (`None` when a block is unknown).
pub type View = RegionView;

impl ViewProducer {
    /// A producer over `source` for a session of `geometry`, with `overlay`
    /// (block → hash) staged by an interrupted session.
    pub fn new(source: ViewSource, geometry: Geometry, overlay: HashMap<u64, BlockHash>) -> Self {
        ViewProducer { source, geometry, overlay, next: 0 }
    }

    /// The disk, when the view hashes one.
    pub fn disk(&self) -> Option<&Disk> {
        match &self.source {
            ViewSource::Disk(d) => Some(d),
            ViewSource::Manifest { .. } => None,
        }
    }

    /// The manifest, when the view comes from one.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.source {
            ViewSource::Manifest { manifest, .. } => Some(manifest),
            ViewSource::Disk(_) => None,
        }
    }

    /// The view of the next region (regions come in order, starting at 0).
    pub fn next_region(&mut self) -> Result<(u64, View)> {
        let region = self.next;
        self.next += 1;
        let g = self.geometry;
        let range = g.region_range(region);
        let mut blocks = match &mut self.source {
            ViewSource::Manifest { manifest, cursor, device } => {
                manifest_view(cursor, &manifest.geometry(), &g, range.clone(), *device)?
            }
            ViewSource::Disk(disk) => ViewBlocks::Known(
                hash_blocks(disk, &g, range.clone())
                    .ctx(Place::Target, "reading", std::path::Path::new("target"))?
                    .into(),
            ),
        };
        if !self.overlay.is_empty() && range.clone().any(|b| self.overlay.contains_key(&b)) {
            let mut with = blocks.to_options();
            for (i, b) in range.clone().enumerate() {
                if let Some(h) = self.overlay.get(&b) {
                    with[i] = Some(*h);
                }
            }
            blocks = ViewBlocks::Partial(with);
        }
        Ok((region, view_of(blocks)))
    }
}

/// Tree nodes over possibly-unknown blocks.
pub fn view_of(blocks: ViewBlocks) -> View {
    let known = match blocks {
        ViewBlocks::Known(all) => all,
        ViewBlocks::Partial(b) => match b.iter().copied().collect::<Option<Vec<BlockHash>>>() {
            Some(all) => RegionHashes::Listed(all),
            None => {
                let chunks = b
                    .chunks(diskferry_protocol::CHUNK_BLOCKS as usize)
                    .map(|c| {
                        let all: Option<Vec<BlockHash>> = c.iter().copied().collect();
                        all.map(|a| chunk_hashes(&a)[0])
                    })
                    .collect();
                return View { blocks: ViewBlocks::Partial(b), chunks, hash: None };
            }
        },
    };
    // An empty region's chunks are all ZERO and not kept (RegionView::chunk).
    let (chunks, hash) = match known {
        RegionHashes::Zero(_) => (Vec::new(), BlockHash::ZERO),
        _ => region_nodes(&known),
    };
    View { blocks: ViewBlocks::Known(known), chunks: chunks.into_iter().map(Some).collect(), hash: Some(hash) }
}

/// The committed hashes of `range` in the new geometry `g`: blocks whose
/// length changed are unknown; past the old end a file reads zeros, a block
/// device holds whatever it held.
pub fn manifest_view(
    cursor: &mut BlockCursor,
    old: &Geometry,
    g: &Geometry,
    range: std::ops::Range<u64>,
    device: bool,
) -> Result<ViewBlocks> {
    let old_count = old.block_count();
    let base = range.start;
    let have = range.end.min(old_count).saturating_sub(base);
    // The same geometry (the common case): every block is as recorded.
    if old == g && range.end <= old_count {
        return Ok(ViewBlocks::Known(cursor.next_hashes(have)?));
    }
    let hashes = cursor.next_blocks(have)?;
    Ok(ViewBlocks::Partial(
        range
            .map(|b| {
                if b < old_count {
                    (old.block_len(b) == g.block_len(b)).then(|| hashes[(b - base) as usize])
                } else if device {
                    None
                } else {
                    Some(BlockHash::ZERO)
                }
            })
            .collect(),
    ))
}
