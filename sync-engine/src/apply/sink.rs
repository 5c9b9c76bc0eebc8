//! Writing verified blocks straight into a `.partial` or a device (full
//! copies), and reading a target's current blocks from any thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Geometry};

use crate::block::{VerifiedBlock, VerifiedSlice};
use crate::error::{IoContext, Place, Result};
use crate::store::Storage;

/// Writes whole verified blocks of a full copy straight into their place.
#[derive(Debug, Clone)]
pub struct DirectSink {
    pub(super) disk: Arc<dyn Storage>,
    pub(super) path: PathBuf,
    pub(super) geometry: Geometry,
    /// Writing into a new `.partial`: zero pages stay holes.
    pub(super) sparse: bool,
    /// One writer at a time: the kernel serializes writes to a file anyway,
    /// and threads queued here sleep instead of spinning on its lock.
    pub(super) writing: Arc<std::sync::Mutex<()>>,
}

impl DirectSink {
    /// Writes one block.
    pub fn write(&self, block: &VerifiedSlice<'_>) -> Result<()> {
        self.write_at(self.geometry.block_offset(block.index()), block.bytes())
    }

    /// Writes the patches of a verified update in place.
    pub fn write_verified(&self, block: &VerifiedBlock) -> Result<()> {
        let base = self.geometry.block_offset(block.index());
        for p in block.patches() {
            self.write_at(base + p.offset as u64, &p.data)?;
        }
        Ok(())
    }

    fn write_at(&self, off: u64, bytes: &[u8]) -> Result<()> {
        let _one_writer = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.sparse {
            return self.disk.write_at(off, bytes).ctx(Place::Target, "writing", &self.path);
        }
        // Only the runs of non-zero 4 KiB pages: a new file reads zeros
        // elsewhere, and unwritten pages cost no space.
        let page = diskferry_protocol::PAGE_SIZE as usize;
        let mut run: Option<usize> = None;
        for start in (0..bytes.len()).step_by(page).chain(std::iter::once(bytes.len())) {
            let zero = start == bytes.len() || crate::hash::is_zero(&bytes[start..(start + page).min(bytes.len())]);
            match (zero, run) {
                (false, None) => run = Some(start),
                (true, Some(from)) => {
                    self.disk.write_at(off + from as u64, &bytes[from..start]).ctx(
                        Place::Target,
                        "writing",
                        &self.path,
                    )?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The current content of a target's blocks, readable from any thread while
/// a session stages (the old generation for a journaled apply, the
/// `.partial` so far for a resumed full copy).
#[derive(Debug, Clone)]
pub struct OldContent {
    pub(super) disk: Arc<dyn Storage>,
    pub(super) path: PathBuf,
    pub(super) geometry: Geometry,
    pub(super) old_len: u64,
    pub(super) overlay: Arc<HashMap<u64, BlockHash>>,
}

impl OldContent {
    /// The target (or `.partial`) these bytes come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of `block` (zeros past the end).
    pub fn read(&self, block: u64) -> Result<Vec<u8>> {
        let len = self.geometry.block_len(block);
        let off = self.geometry.block_offset(block);
        let mut buf = vec![0u8; len as usize];
        let have = self.old_len.saturating_sub(off).min(len as u64) as usize;
        if have > 0 {
            self.disk.read_at(off, &mut buf[..have]).ctx(Place::Target, "reading", &self.path)?;
        }
        Ok(buf)
    }

    /// Whether `block` was staged by an interrupted session: its content is
    /// then not what [`OldContent::read`] returns, so it must travel whole.
    pub fn is_staged(&self, block: u64) -> bool {
        self.overlay.contains_key(&block)
    }
}
