//! Writing verified blocks straight into a `.partial` or a device (full
//! copies), and reading a target's current blocks from any thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Geometry};

use crate::aligned::BufferPool;
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
    /// Aligned buffers that received blocks are gathered into.
    pub(super) buffers: BufferPool,
}

/// Largest single write a batch is merged into.
const MAX_WRITE: usize = 8 << 20;

impl DirectSink {
    /// Writes one block through the page cache (small direct writes would
    /// wait on the device one by one; a local copy gathers its blocks with
    /// [`super::RunWriter`] when it can).
    pub fn write(&self, block: &VerifiedSlice<'_>) -> Result<()> {
        let segments = self.segments(self.geometry.block_offset(block.index()), block.bytes());
        self.write_segments(segments, false)
    }

    /// Writes the patches of a verified update in place.
    pub fn write_verified(&self, block: &VerifiedBlock) -> Result<()> {
        self.write_batch(std::slice::from_ref(block))
    }

    /// The aligned buffers received blocks are gathered into, by the
    /// verification of received frames.
    pub fn buffers(&self) -> &BufferPool {
        &self.buffers
    }

    /// Writes several verified blocks with as few writes as their places
    /// allow: adjacent ones are merged into one vectored write of up to
    /// 8 MiB, sent past the page cache when the buffers are aligned (as
    /// verification with [`DirectSink::buffers`] leaves them). Either all of it is written or an error
    /// says what failed; nothing is durable before the commit's sync.
    pub fn write_batch(&self, blocks: &[VerifiedBlock]) -> Result<()> {
        let mut segments = Vec::new();
        for b in blocks {
            let base = self.geometry.block_offset(b.index());
            for p in b.patches() {
                segments.extend(self.segments(base + p.offset as u64, &p.data));
            }
        }
        self.write_segments(segments, true)
    }

    /// The pieces of `bytes` (to be written at `off`) that need writing:
    /// all of them, or into a new sparse file only the runs of non-zero
    /// 4 KiB pages (a new file reads zeros elsewhere, and unwritten pages
    /// cost no space).
    pub(super) fn segments<'a>(&self, off: u64, bytes: &'a [u8]) -> Vec<(u64, &'a [u8])> {
        if !self.sparse {
            return vec![(off, bytes)];
        }
        let page = diskferry_protocol::PAGE_SIZE as u64;
        let mut out = Vec::new();
        let mut run: Option<usize> = None;
        let mut start = 0usize;
        while start <= bytes.len() {
            // Pages on the disk's page boundaries, whatever `off` is.
            let end = if start == bytes.len() {
                start
            } else {
                let next = (off + start as u64) / page * page + page;
                (next - off).min(bytes.len() as u64) as usize
            };
            let zero = start == bytes.len() || crate::hash::is_zero(&bytes[start..end]);
            match (zero, run) {
                (false, None) => run = Some(start),
                (true, Some(from)) => {
                    out.push((off + from as u64, &bytes[from..start]));
                    run = None;
                }
                _ => {}
            }
            if start == bytes.len() {
                break;
            }
            start = end;
        }
        out
    }

    pub(super) fn write_segments(&self, mut segments: Vec<(u64, &[u8])>, bypass_cache: bool) -> Result<()> {
        segments.sort_unstable_by_key(|s| s.0);
        let _one_writer = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = 0;
        while i < segments.len() {
            // Adjacent segments, up to MAX_WRITE bytes (at least one).
            let start = segments[i].0;
            let mut end = start;
            let mut bufs: Vec<&[u8]> = Vec::new();
            while let Some(&(off, bytes)) = segments.get(i) {
                if !bufs.is_empty() && (off != end || (end - start) as usize + bytes.len() > MAX_WRITE) {
                    break;
                }
                bufs.push(bytes);
                end = off + bytes.len() as u64;
                i += 1;
            }
            self.disk.write_vectored_at(start, &bufs, bypass_cache).ctx(Place::Target, "writing", &self.path)?;
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
    pub(super) kept: Arc<KeptBlocks>,
}

/// Current bytes of wanted blocks, read once when the target asked for
/// their changed pages and kept for the frame that patches them, so a
/// delta reads each block it rewrites once, not twice. Bounded: past its
/// limit (a target agent's share of its memory budget per session, at
/// most [`KeptBlocks::MAX_BYTES`]) a block is simply read again.
#[derive(Debug)]
pub struct KeptBlocks {
    blocks: std::sync::Mutex<HashMap<u64, Vec<u8>>>,
    bytes: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl KeptBlocks {
    /// Bytes kept at most per session, and the limit when none is given.
    pub const MAX_BYTES: u64 = 32 << 20;

    /// Keeps at most `limit` bytes (and never more than [`KeptBlocks::MAX_BYTES`]).
    pub fn new(limit: u64) -> KeptBlocks {
        KeptBlocks { blocks: Default::default(), bytes: Default::default(), limit: limit.min(Self::MAX_BYTES) }
    }
}

impl OldContent {
    /// Keeps `bytes`, just read as `block`'s current content, for the frame
    /// that will patch it ([`OldContent::read`] takes them).
    pub fn keep(&self, block: u64, bytes: Vec<u8>) {
        use std::sync::atomic::Ordering::Relaxed;
        let k = &self.kept;
        if k.bytes.load(Relaxed) + bytes.len() as u64 > k.limit {
            return;
        }
        k.bytes.fetch_add(bytes.len() as u64, Relaxed);
        if let Some(old) = k.blocks.lock().unwrap_or_else(|p| p.into_inner()).insert(block, bytes) {
            k.bytes.fetch_sub(old.len() as u64, Relaxed);
        }
    }

    /// Drops what was kept for `block` (it arrived whole).
    pub fn forget(&self, block: u64) {
        let _ = self.take(block);
    }

    fn take(&self, block: u64) -> Option<Vec<u8>> {
        let b = self.kept.blocks.lock().unwrap_or_else(|p| p.into_inner()).remove(&block)?;
        self.kept.bytes.fetch_sub(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Some(b)
    }

    /// The target (or `.partial`) these bytes come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of `block` (zeros past the end): kept ones if
    /// [`OldContent::keep`] holds them (taken), else read.
    pub fn read(&self, block: u64) -> Result<Vec<u8>> {
        if let Some(b) = self.take(block) {
            return Ok(b);
        }
        self.read_disk(block)
    }

    /// The bytes of `block` read from the disk (zeros past the end).
    pub fn read_disk(&self, block: u64) -> Result<Vec<u8>> {
        let len = self.geometry.block_len(block);
        let off = self.geometry.block_offset(block);
        let mut buf = vec![0u8; len as usize];
        let have = self.old_len.saturating_sub(off).min(len as u64);
        // Holes read as the zeros `buf` holds: reading them would fill the
        // cache with fresh zeroed pages (on this VM ~9 ms per MiB).
        for (d_off, d_len) in self.disk.data_ranges(off, have).ctx(Place::Target, "inspecting", &self.path)? {
            let at = (d_off - off) as usize;
            self.disk.read_at(d_off, &mut buf[at..at + d_len as usize]).ctx(Place::Target, "reading", &self.path)?;
        }
        Ok(buf)
    }

    /// Asks the disk ahead for `blocks` (ascending), adjacent ones as one
    /// range: on a cold target (a full download writes past the cache) the
    /// reads of a region's changed blocks then wait on the device together.
    pub fn will_need(&self, blocks: &[u64]) {
        let g = &self.geometry;
        for run in blocks.chunk_by(|a, b| *b == a + 1) {
            if let (Some(&first), Some(&last)) = (run.first(), run.last()) {
                let (off, end) = (g.block_offset(first), g.block_offset(last + 1).min(self.old_len));
                // Only the data: see `read_disk`.
                for (d_off, d_len) in self.disk.data_ranges(off, end.saturating_sub(off)).unwrap_or_default() {
                    self.disk.will_need(d_off, d_len);
                }
            }
        }
    }

    /// Whether `block` was staged by an interrupted session: its content is
    /// then not what [`OldContent::read`] returns, so it must travel whole.
    pub fn is_staged(&self, block: u64) -> bool {
        self.overlay.contains_key(&block)
    }
}
