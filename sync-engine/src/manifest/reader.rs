//! Opening, verifying and reading a manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use diskferry_protocol::{BlockHash, BlockSize, Consistency, Generation, Geometry, RegionHashes};

use super::{ManifestHeader, FOOTER_LEN, INDEX_ENTRY, MAGIC, RUN_DATA, RUN_ZERO, VERSION};
use crate::error::{Error, IoContext, Place, Result};
use crate::seqio::{digest_range, Fields, SeqReader};
use crate::store::{OpenHow, Storage, Vfs};

/// An open, checksum-verified manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    header: ManifestHeader,
    region_offset: u64,
    index_offset: u64,
    footer_offset: u64,
    checksum: [u8; 32],
    index_pages: Arc<IndexPages>,
}

/// Pages of the index that lookups read, kept: every lookup's binary
/// search starts at the same entries, and each entry was a read of its own
/// (about 16 per changed block of a 4 GiB disk, 10,000 syscalls for a 1 %
/// delta). The first [`INDEX_PAGES_KEPT`] pages read are kept (512 KiB
/// per open manifest at most), the rest read when needed.
#[derive(Default)]
struct IndexPages(Mutex<HashMap<u64, Arc<[u8]>>>);

impl std::fmt::Debug for IndexPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.0.lock().map_or(0, |k| k.len());
        write!(f, "IndexPages({kept} kept)")
    }
}

const INDEX_PAGE: u64 = 4096;
const INDEX_PAGES_KEPT: usize = 128;
/// Memory an open manifest's kept index pages take at most.
pub const INDEX_PAGES_BYTES: u64 = INDEX_PAGE * INDEX_PAGES_KEPT as u64;

impl Manifest {
    /// Opens `path` and verifies its checksum and structure; damage is `E_STATE_CORRUPT`.
    pub fn open(vfs: &dyn Vfs, path: &Path) -> Result<Manifest> {
        let storage = vfs.open(path, OpenHow::Read).ctx(Place::State, "opening manifest", path)?;
        let len = storage.len().ctx(Place::State, "reading manifest", path)?;
        if len < FOOTER_LEN {
            return Err(Error::corrupt(path, "shorter than its footer"));
        }
        let footer_offset = len - FOOTER_LEN;
        let mut footer = [0u8; FOOTER_LEN as usize];
        storage.read_at(footer_offset, &mut footer).ctx(Place::State, "reading manifest", path)?;
        let mut hasher = digest_range(storage.as_ref(), footer_offset).ctx(Place::State, "reading manifest", path)?;
        hasher.update(&footer[..160]);
        if hasher.finalize().as_bytes() != &footer[160..192] {
            return Err(Error::corrupt(path, "checksum mismatch"));
        }
        let (header, region_offset, index_offset, stored_footer_offset) =
            decode_footer(&footer).ok_or_else(|| Error::corrupt(path, "invalid footer"))?;
        let regions = header.geometry.region_count();
        let ok = stored_footer_offset == footer_offset
            && region_offset <= index_offset
            && index_offset - region_offset == regions * 32
            && footer_offset - index_offset == header.data_blocks * INDEX_ENTRY
            && header.data_blocks + header.zero_blocks == header.geometry.block_count();
        if !ok {
            return Err(Error::corrupt(path, "inconsistent section sizes"));
        }
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&footer[160..192]);
        Ok(Manifest {
            storage,
            path: path.to_path_buf(),
            header,
            region_offset,
            index_offset,
            footer_offset,
            checksum,
            index_pages: Arc::default(),
        })
    }

    /// The header.
    pub fn header(&self) -> &ManifestHeader {
        &self.header
    }

    /// Shorthand for the header's geometry.
    pub fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    /// The file's checksum: identifies this exact manifest.
    pub fn checksum(&self) -> [u8; 32] {
        self.checksum
    }

    /// Where it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hash of region `r`.
    pub fn region_hash(&self, r: u64) -> Result<BlockHash> {
        let mut b = [0u8; 32];
        self.storage.read_at(self.region_offset + r * 32, &mut b).ctx(Place::State, "reading manifest", &self.path)?;
        Ok(BlockHash(b))
    }

    /// A forward-only reader of the block hashes from block 0.
    pub fn cursor(&self) -> BlockCursor {
        BlockCursor {
            reader: SeqReader::new(self.storage.clone(), 0, self.region_offset, 256 << 10),
            path: self.path.clone(),
            run_left: 0,
            run_is_data: false,
            blocks_left: self.header.geometry.block_count(),
        }
    }

    /// Some block whose hash starts like `h` (the caller verifies the bytes).
    pub fn lookup(&self, h: &BlockHash) -> Result<Option<u64>> {
        let want = h.prefix64();
        // The last page read: the search's last steps (256 entries to a
        // page) stay within it.
        let mut last: Option<(u64, Arc<[u8]>)> = None;
        let mut entry = |i: u64| -> Result<(u64, u64)> {
            let at = i * INDEX_ENTRY;
            let n = at / INDEX_PAGE;
            let page = match &last {
                Some((m, page)) if *m == n => page.clone(),
                _ => {
                    let page = self.index_page(n)?;
                    last = Some((n, page.clone()));
                    page
                }
            };
            let mut f = Fields::new(page.get((at % INDEX_PAGE) as usize..).unwrap_or_default());
            Ok((f.u64().unwrap_or(0), f.u64().unwrap_or(0)))
        };
        let (mut lo, mut hi) = (0u64, self.header.data_blocks);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (p, _) = entry(mid)?;
            if p < want {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo < self.header.data_blocks {
            let (p, b) = entry(lo)?;
            if p == want {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// Page `n` of the index (the last one shorter), kept for the next lookups.
    fn index_page(&self, n: u64) -> Result<Arc<[u8]>> {
        let mut kept = self.index_pages.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(page) = kept.get(&n) {
            return Ok(page.clone());
        }
        let start = n * INDEX_PAGE;
        let len = INDEX_PAGE.min((self.footer_offset - self.index_offset).saturating_sub(start));
        let mut page = vec![0u8; len as usize];
        self.storage.read_at(self.index_offset + start, &mut page).ctx(Place::State, "reading manifest", &self.path)?;
        let page: Arc<[u8]> = page.into();
        // The first pages read stay: they hold the entries every search
        // starts with.
        if kept.len() < INDEX_PAGES_KEPT {
            kept.insert(n, page.clone());
        }
        Ok(page)
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.footer_offset + FOOTER_LEN
    }
}

fn decode_footer(f: &[u8; FOOTER_LEN as usize]) -> Option<(ManifestHeader, u64, u64, u64)> {
    let mut r = Fields::new(f);
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return None;
    }
    let block_size = BlockSize::new(r.u32()?).ok()?;
    let disk_bytes = r.u64()?;
    let geometry = Geometry::new(disk_bytes, block_size);
    if r.u64()? != geometry.block_count() {
        return None;
    }
    let data_blocks = r.u64()?;
    let zero_blocks = r.u64()?;
    let _run_count = r.u64()?;
    let generation = Generation(r.u128()?);
    let parent = match r.u128()? {
        0 => None,
        p => Some(Generation(p)),
    };
    let consistency = Consistency::from_u8(r.u8()?)?;
    r.take(7)?;
    let created_unix_ns = r.i64()?;
    let region_offset = r.u64()?;
    let index_offset = r.u64()?;
    let footer_offset = r.u64()?;
    let root = BlockHash(r.array()?);
    let header =
        ManifestHeader { geometry, generation, parent, consistency, created_unix_ns, data_blocks, zero_blocks, root };
    Some((header, region_offset, index_offset, footer_offset))
}

/// Reads block hashes in order.
#[derive(Debug)]
pub struct BlockCursor {
    reader: SeqReader,
    path: PathBuf,
    run_left: u64,
    run_is_data: bool,
    blocks_left: u64,
}

impl BlockCursor {
    /// Running out of bytes is damage; any other read error is an I/O error.
    fn read_error(&self, e: std::io::Error, what: &str) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(&self.path, what)
        } else {
            Error::io(Place::State, "reading", &self.path, e)
        }
    }

    /// The next `n` block hashes (fewer at the end of the disk), as a count
    /// when they lie in one zero run (an empty region of a sparse disk).
    pub fn next_hashes(&mut self, n: u64) -> Result<RegionHashes> {
        let n = n.min(self.blocks_left);
        if self.run_left == 0 && n > 0 {
            self.next_run()?;
        }
        if !self.run_is_data && self.run_left >= n {
            self.run_left -= n;
            self.blocks_left -= n;
            return Ok(RegionHashes::Zero(n as usize));
        }
        self.next_blocks(n).map(RegionHashes::Listed)
    }

    fn next_run(&mut self) -> Result<()> {
        let mut h = [0u8; 8];
        self.reader.read_exact(&mut h).map_err(|e| self.read_error(e, "runs end early"))?;
        let count = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as u64;
        self.run_is_data = match h[0] {
            RUN_DATA => true,
            RUN_ZERO => false,
            _ => return Err(Error::corrupt(&self.path, "unknown run kind")),
        };
        self.run_left = count;
        Ok(())
    }

    /// Moves past the next `n` block hashes (fewer at the end of the disk)
    /// without listing them: zero runs cost nothing, however long.
    pub fn skip(&mut self, n: u64) -> Result<()> {
        let n = n.min(self.blocks_left);
        let mut left = n;
        let mut sink = [0u8; 32];
        while left > 0 {
            if self.run_left == 0 {
                self.next_run()?;
                continue;
            }
            let take = self.run_left.min(left);
            if self.run_is_data {
                for _ in 0..take {
                    self.reader.read_exact(&mut sink).map_err(|e| self.read_error(e, "data run ends early"))?;
                }
            }
            self.run_left -= take;
            left -= take;
        }
        self.blocks_left -= n;
        Ok(())
    }

    /// The next `n` block hashes (fewer at the end of the disk).
    pub fn next_blocks(&mut self, n: u64) -> Result<Vec<BlockHash>> {
        let n = n.min(self.blocks_left);
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            if self.run_left == 0 {
                self.next_run()?;
                continue;
            }
            let take = self.run_left.min(n - out.len() as u64);
            if self.run_is_data {
                for _ in 0..take {
                    let b = self.reader.bytes32().map_err(|e| self.read_error(e, "data run ends early"))?;
                    out.push(BlockHash(b));
                }
            } else {
                out.resize(out.len() + take as usize, BlockHash::ZERO);
            }
            self.run_left -= take;
        }
        self.blocks_left -= n;
        Ok(out)
    }
}
