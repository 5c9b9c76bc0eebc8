//! Streaming manifest writer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Geometry, RegionHashes};

use super::{ManifestHeader, ManifestMeta, FOOTER_LEN, INDEX_ENTRY, MAGIC, RUN_DATA, RUN_ZERO, VERSION};
use crate::error::{Error, IoContext, Place, Result};
use crate::seqio::{HashedWriter, SeqReader, SeqWriter};
use crate::store::{OpenHow, Storage, Vfs};
use crate::tree::{region_hash, RootHasher};

/// Hashes buffered before a data run is written out.
const RUN_FLUSH: usize = 4096;
/// Index entries held in memory before a sorted run spills to a file (16 MiB).
const INDEX_SPILL_DEFAULT: usize = 1 << 20;

/// Writes a manifest region by region, in order, holding only the current
/// run, the region hashes and a bounded slice of the index in memory.
#[derive(Debug)]
pub struct ManifestWriter {
    vfs: Arc<dyn Vfs>,
    path: PathBuf,
    out: HashedWriter,
    geometry: Geometry,
    next_block: u64,
    pending_data: Vec<BlockHash>,
    pending_zero: u64,
    run_count: u64,
    data_blocks: u64,
    zero_blocks: u64,
    regions: Vec<BlockHash>,
    root: RootHasher,
    index: IndexBuilder,
}

impl ManifestWriter {
    /// Creates (truncating) the manifest file at `path`.
    pub fn create(vfs: Arc<dyn Vfs>, path: &Path, geometry: Geometry) -> Result<Self> {
        let storage = vfs.open(path, OpenHow::Truncate).ctx(Place::State, "creating manifest", path)?;
        Ok(ManifestWriter {
            vfs,
            path: path.to_path_buf(),
            out: HashedWriter::new(storage, 0),
            geometry,
            next_block: 0,
            pending_data: Vec::with_capacity(RUN_FLUSH),
            pending_zero: 0,
            run_count: 0,
            data_blocks: 0,
            zero_blocks: 0,
            regions: Vec::new(),
            root: RootHasher::new(&geometry),
            index: IndexBuilder::new(path, INDEX_SPILL_DEFAULT),
        })
    }

    /// Lowers the in-memory index bound (tests exercise the spill path with it).
    pub fn with_index_spill(mut self, entries: usize) -> Self {
        self.index.cap = entries.max(1);
        self
    }

    /// The geometry being written.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// [`ManifestWriter::push_region`] for hashes that may be a count of
    /// zeros, which costs one count, not a scan of listed zeros.
    pub fn push_hashes(&mut self, region: u64, hashes: &RegionHashes) -> Result<()> {
        match hashes {
            RegionHashes::Listed(v) => self.push_region(region, v),
            RegionHashes::Zero(n) => {
                self.take_region(region, *n)?;
                self.push_zero_region(*n as u64)
            }
        }
    }

    /// Moves past region `region` of `len` blocks, which must be the next
    /// one and whole; its block range.
    fn take_region(&mut self, region: u64, len: usize) -> Result<std::ops::Range<u64>> {
        let range = self.geometry.region_range(region);
        if range.start != self.next_block || (range.end - range.start) as usize != len {
            return Err(Error::new(
                diskferry_protocol::ErrorCode::Internal,
                format!("manifest region {region} out of order or of the wrong length"),
            ));
        }
        self.next_block = range.end;
        Ok(range)
    }

    fn push_zero_region(&mut self, blocks: u64) -> Result<()> {
        self.flush_data()?;
        self.pending_zero += blocks;
        self.zero_blocks += blocks;
        self.root.update(&BlockHash::ZERO);
        self.regions.push(BlockHash::ZERO);
        Ok(())
    }

    /// Appends the hashes of the next region; regions must come in order and whole.
    pub fn push_region(&mut self, region: u64, hashes: &[BlockHash]) -> Result<()> {
        let range = self.take_region(region, hashes.len())?;
        // A region in a hole (most of a large sparse disk) is one count.
        if BlockHash::all_zero(hashes) {
            return self.push_zero_region(hashes.len() as u64);
        }
        for (i, h) in hashes.iter().enumerate() {
            self.push_block(range.start + i as u64, *h)?;
        }
        let rh = region_hash(hashes);
        self.root.update(&rh);
        self.regions.push(rh);
        Ok(())
    }

    fn push_block(&mut self, index: u64, h: BlockHash) -> Result<()> {
        if h.is_zero() {
            self.flush_data()?;
            self.pending_zero += 1;
            self.zero_blocks += 1;
        } else {
            self.flush_zero()?;
            self.pending_data.push(h);
            self.data_blocks += 1;
            self.index.push(self.vfs.as_ref(), h.prefix64(), index)?;
            if self.pending_data.len() >= RUN_FLUSH {
                self.flush_data()?;
            }
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write(bytes).ctx(Place::State, "writing manifest", &self.path)
    }

    fn flush_data(&mut self) -> Result<()> {
        if self.pending_data.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending_data);
        self.write(&run_header(RUN_DATA, pending.len() as u32))?;
        for h in &pending {
            self.write(h.as_bytes())?;
        }
        self.run_count += 1;
        self.pending_data = pending;
        self.pending_data.clear();
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<()> {
        while self.pending_zero > 0 {
            let n = self.pending_zero.min(u32::MAX as u64);
            self.write(&run_header(RUN_ZERO, n as u32))?;
            self.run_count += 1;
            self.pending_zero -= n;
        }
        Ok(())
    }

    /// Writes the region hashes, the index and the footer, and syncs the file.
    /// The caller makes the name durable (rename, directory sync).
    pub fn finish(self, meta: ManifestMeta) -> Result<ManifestHeader> {
        self.finish_with(meta, true)
    }

    /// [`ManifestWriter::finish`], syncing only if `sync`: a record that may
    /// be lost in a crash (the source's note of what it sent) skips it.
    pub fn finish_with(mut self, meta: ManifestMeta, sync: bool) -> Result<ManifestHeader> {
        if self.next_block != self.geometry.block_count() {
            return Err(Error::new(
                diskferry_protocol::ErrorCode::Internal,
                "manifest finished before its last region",
            ));
        }
        self.flush_data()?;
        self.flush_zero()?;
        let region_offset = self.out.position();
        for r in std::mem::take(&mut self.regions) {
            self.write(r.as_bytes())?;
        }
        let index_offset = self.out.position();
        let index = std::mem::replace(&mut self.index, IndexBuilder::new(&self.path, 1));
        index.finish(self.vfs.as_ref(), &mut self.out, &self.path)?;
        let footer_offset = self.out.position();
        debug_assert_eq!(footer_offset - index_offset, self.data_blocks * INDEX_ENTRY);
        let header = ManifestHeader {
            geometry: self.geometry,
            generation: meta.generation,
            parent: meta.parent,
            consistency: meta.consistency,
            created_unix_ns: meta.created_unix_ns,
            data_blocks: self.data_blocks,
            zero_blocks: self.zero_blocks,
            root: self.root.finish(),
        };
        let mut footer = encode_footer(&header, self.run_count, region_offset, index_offset, footer_offset);
        self.write(&footer[..160])?;
        // The checksum covers everything before it.
        let checksum = self.out.digest();
        footer[160..192].copy_from_slice(&checksum);
        self.write(&checksum)?;
        self.out.flush().ctx(Place::State, "writing manifest", &self.path)?;
        if sync {
            self.out.storage().sync().ctx(Place::State, "syncing manifest", &self.path)?;
        }
        Ok(header)
    }
}

fn run_header(kind: u8, count: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = kind;
    h[4..8].copy_from_slice(&count.to_le_bytes());
    h
}

pub(crate) fn encode_footer(
    h: &ManifestHeader,
    run_count: u64,
    region_offset: u64,
    index_offset: u64,
    footer_offset: u64,
) -> [u8; FOOTER_LEN as usize] {
    let mut f = [0u8; FOOTER_LEN as usize];
    f[0..8].copy_from_slice(MAGIC);
    f[8..12].copy_from_slice(&VERSION.to_le_bytes());
    f[12..16].copy_from_slice(&h.geometry.block_size.get().to_le_bytes());
    f[16..24].copy_from_slice(&h.geometry.disk_bytes.to_le_bytes());
    f[24..32].copy_from_slice(&h.geometry.block_count().to_le_bytes());
    f[32..40].copy_from_slice(&h.data_blocks.to_le_bytes());
    f[40..48].copy_from_slice(&h.zero_blocks.to_le_bytes());
    f[48..56].copy_from_slice(&run_count.to_le_bytes());
    f[56..72].copy_from_slice(&h.generation.0.to_le_bytes());
    f[72..88].copy_from_slice(&h.parent.map_or(0, |p| p.0).to_le_bytes());
    f[88] = h.consistency.to_u8();
    f[96..104].copy_from_slice(&h.created_unix_ns.to_le_bytes());
    f[104..112].copy_from_slice(&region_offset.to_le_bytes());
    f[112..120].copy_from_slice(&index_offset.to_le_bytes());
    f[120..128].copy_from_slice(&footer_offset.to_le_bytes());
    f[128..160].copy_from_slice(h.root.as_bytes());
    f
}

/// Builds the sorted `(prefix, block)` index with bounded memory: sorted runs
/// spill to files beside the manifest and are merged at the end.
#[derive(Debug)]
struct IndexBuilder {
    base: PathBuf,
    cap: usize,
    mem: Vec<(u64, u64)>,
    runs: Vec<(PathBuf, u64)>,
}

impl IndexBuilder {
    fn new(manifest: &Path, cap: usize) -> Self {
        IndexBuilder { base: manifest.to_path_buf(), cap, mem: Vec::new(), runs: Vec::new() }
    }

    fn push(&mut self, vfs: &dyn Vfs, prefix: u64, block: u64) -> Result<()> {
        self.mem.push((prefix, block));
        if self.mem.len() >= self.cap {
            self.spill(vfs)?;
        }
        Ok(())
    }

    fn run_path(&self, n: usize) -> PathBuf {
        let mut s = self.base.clone().into_os_string();
        s.push(format!(".run{n}"));
        PathBuf::from(s)
    }

    fn spill(&mut self, vfs: &dyn Vfs) -> Result<()> {
        self.mem.sort_unstable();
        let path = self.run_path(self.runs.len());
        let storage = vfs.open(&path, OpenHow::Truncate).ctx(Place::State, "creating index run", &path)?;
        let mut w = SeqWriter::new(storage, 0);
        for (p, b) in self.mem.drain(..) {
            w.write(&p.to_le_bytes()).ctx(Place::State, "writing index run", &path)?;
            w.write(&b.to_le_bytes()).ctx(Place::State, "writing index run", &path)?;
        }
        w.flush().ctx(Place::State, "writing index run", &path)?;
        self.runs.push((path, w.position()));
        Ok(())
    }

    fn finish(mut self, vfs: &dyn Vfs, out: &mut HashedWriter, manifest: &Path) -> Result<()> {
        let write = |out: &mut HashedWriter, p: u64, b: u64| -> Result<()> {
            out.write(&p.to_le_bytes()).ctx(Place::State, "writing manifest", manifest)?;
            out.write(&b.to_le_bytes()).ctx(Place::State, "writing manifest", manifest)
        };
        if self.runs.is_empty() {
            self.mem.sort_unstable();
            for &(p, b) in &self.mem {
                write(out, p, b)?;
            }
            return Ok(());
        }
        if !self.mem.is_empty() {
            self.spill(vfs)?;
        }
        let mut readers = Vec::new();
        for (path, len) in &self.runs {
            let s: Arc<dyn Storage> = vfs.open(path, OpenHow::Read).ctx(Place::State, "reading index run", path)?;
            readers.push(SeqReader::new(s, 0, *len, 64 << 10));
        }
        let mut heap = BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            if r.remaining() >= INDEX_ENTRY {
                let e = read_entry(r, &self.runs[i].0)?;
                heap.push(Reverse((e, i)));
            }
        }
        while let Some(Reverse(((p, b), i))) = heap.pop() {
            write(out, p, b)?;
            if readers[i].remaining() >= INDEX_ENTRY {
                let e = read_entry(&mut readers[i], &self.runs[i].0)?;
                heap.push(Reverse((e, i)));
            }
        }
        for (path, _) in &self.runs {
            vfs.remove_file(path).ctx(Place::State, "removing index run", path)?;
        }
        Ok(())
    }
}

fn read_entry(r: &mut SeqReader, path: &Path) -> Result<(u64, u64)> {
    let p = r.u64().ctx(Place::State, "reading index run", path)?;
    let b = r.u64().ctx(Place::State, "reading index run", path)?;
    Ok((p, b))
}
