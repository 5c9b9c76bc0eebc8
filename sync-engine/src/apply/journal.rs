//! The redo log: verified block updates staged before commit, then a commit
//! record. Byte layouts are tabled in `docs/design.md`; in short:
//!
//! | record | layout (little-endian) |
//! |--------|------------------------|
//! | header (96 B) | `"DFREDO01" · u32 version · u8 kind · u8 resumable · u16 0 · u128 session · u128 base generation · u64 disk bytes · u32 block size · u32 0 · [32] blake3 of bytes 0..64` |
//! | patch | `u8 1 · [3] 0 · u32 n · u64 block · [32] new block hash · n × (u32 offset · u32 len) · data · [32] blake3 of the entry` |
//! | zero  | `u8 2 · [7] 0 · u64 offset · u64 len · [32] blake3 of the entry` |
//! | commit (176 B, last) | `u8 3 · u8 grouped · [6] 0 · u128 generation · u64 entries · [32] digest of entry checksums · [32] manifest checksum · u8 has undo · [7] 0 · [32] undo checksum · u64 undo bytes · [32] blake3 of the record` |
//!
//! Entries are written without fsync; at commit they are synced, then the
//! commit record is written and synced. A valid record therefore proves every
//! entry before it was durable: a record whose entries do not check out is
//! damage (`E_STATE_CORRUPT`), never a torn write, and is never replayed or
//! discarded silently.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, BlockSize, Generation, Geometry, SessionId};

use super::touched::{Touched, TouchedList};
use crate::block::VerifiedBlock;
use crate::error::{Error, IoContext, Place, Result};
use crate::seqio::{Fields, SeqReader, SeqWriter};
use crate::store::{OpenHow, Storage, Vfs};

const MAGIC: &[u8; 8] = b"DFREDO01";
const VERSION: u32 = 1;
/// Header size.
pub const HEADER_LEN: u64 = 96;
const TAG_PATCH: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_COMMIT: u8 = 3;
/// Commit record size.
pub const COMMIT_LEN: u64 = 176;

/// How a session writes its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalKind {
    /// Updates staged here, written in place at commit.
    Redo,
    /// A full download written to `NAME.partial`, renamed over `NAME` at commit.
    Partial,
    /// A failover to a kept point (`apply/moves.rs`): the undo data from the
    /// current point to that one, written in place at commit like `Redo`;
    /// the commit record names the kept point, which becomes the current one.
    Move,
}

/// The journal's first record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// Redo or partial.
    pub kind: JournalKind,
    /// Whether an interrupted session may resume from the staged entries.
    pub resumable: bool,
    /// The session that wrote it.
    pub session: SessionId,
    /// The committed generation the entries apply to (`None`: no state yet).
    pub base: Option<Generation>,
    /// The geometry after commit.
    pub geometry: Geometry,
}

/// The commit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    /// The generation committed.
    pub generation: Generation,
    /// Number of entries before the record.
    pub entries: u64,
    /// blake3 over the entries' checksums in order.
    pub entries_digest: [u8; 32],
    /// Checksum of the new generation's manifest.
    pub manifest_checksum: [u8; 32],
    /// Checksum and size of the undo segment written for the previous generation.
    pub undo: Option<([u8; 32], u64)>,
    /// A member of a replication group's commit: it stands only once the
    /// group's record names its generation (`apply/group.rs`).
    pub grouped: bool,
}

/// One staged update, as read back.
#[derive(Debug)]
pub enum Entry<'a> {
    /// New bytes for ranges of a block.
    Patch {
        /// Block index.
        block: u64,
        /// Hash of the whole block after the update.
        hash: BlockHash,
        /// `(offset in block, len)` of each range, in the order of `data`.
        ranges: Vec<(u32, u32)>,
        /// The ranges' bytes, concatenated.
        data: &'a [u8],
    },
    /// A byte range that becomes zeros.
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// What a scan found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The header.
    pub header: JournalHeader,
    /// Bytes up to the end of the last valid entry.
    pub valid_len: u64,
    /// Valid entries.
    pub entries: u64,
    /// Running digest of the entries' checksums.
    pub digest: blake3::Hasher,
    /// Bytes of block data in the valid entries.
    pub data_bytes: u64,
    /// The commit record, when the journal is committed.
    pub commit: Option<CommitRecord>,
    /// The ranges the valid entries write, while few enough to keep.
    pub touched: TouchedList,
}

/// Appends entries to a new or resumed journal.
#[derive(Debug)]
pub struct JournalWriter {
    w: SeqWriter,
    path: PathBuf,
    header: JournalHeader,
    entries: u64,
    digest: blake3::Hasher,
    data_bytes: u64,
    pub(super) touched: TouchedList,
}

fn encode_header(h: &JournalHeader) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12] = match h.kind {
        JournalKind::Redo => 0,
        JournalKind::Partial => 1,
        JournalKind::Move => 2,
    };
    b[13] = h.resumable as u8;
    b[16..32].copy_from_slice(&h.session.0.to_le_bytes());
    b[32..48].copy_from_slice(&h.base.map_or(0, |g| g.0).to_le_bytes());
    b[48..56].copy_from_slice(&h.geometry.disk_bytes.to_le_bytes());
    b[56..60].copy_from_slice(&h.geometry.block_size.get().to_le_bytes());
    let sum = blake3::hash(&b[..64]);
    b[64..96].copy_from_slice(sum.as_bytes());
    b
}

fn decode_header(b: &[u8]) -> Option<JournalHeader> {
    if blake3::hash(&b[..64]).as_bytes() != &b[64..96] {
        return None;
    }
    let mut f = Fields::new(b);
    if f.take(8)? != MAGIC || f.u32()? != VERSION {
        return None;
    }
    let kind = match f.u8()? {
        0 => JournalKind::Redo,
        1 => JournalKind::Partial,
        2 => JournalKind::Move,
        _ => return None,
    };
    let resumable = f.u8()? != 0;
    f.u16()?;
    let session = SessionId(f.u128()?);
    let base = match f.u128()? {
        0 => None,
        g => Some(Generation(g)),
    };
    let disk_bytes = f.u64()?;
    let block_size = BlockSize::new(f.u32()?).ok()?;
    Some(JournalHeader { kind, resumable, session, base, geometry: Geometry::new(disk_bytes, block_size) })
}

fn encode_commit(c: &CommitRecord) -> [u8; COMMIT_LEN as usize] {
    let mut b = [0u8; COMMIT_LEN as usize];
    b[0] = TAG_COMMIT;
    b[1] = u8::from(c.grouped);
    b[8..24].copy_from_slice(&c.generation.0.to_le_bytes());
    b[24..32].copy_from_slice(&c.entries.to_le_bytes());
    b[32..64].copy_from_slice(&c.entries_digest);
    b[64..96].copy_from_slice(&c.manifest_checksum);
    if let Some((sum, len)) = c.undo {
        b[96] = 1;
        b[104..136].copy_from_slice(&sum);
        b[136..144].copy_from_slice(&len.to_le_bytes());
    }
    let sum = blake3::hash(&b[..144]);
    b[144..176].copy_from_slice(sum.as_bytes());
    b
}

fn decode_commit(b: &[u8]) -> Option<CommitRecord> {
    if b.len() != COMMIT_LEN as usize
        || b[0] != TAG_COMMIT
        || b[1] > 1
        || blake3::hash(&b[..144]).as_bytes() != &b[144..176]
    {
        return None;
    }
    let grouped = b[1] == 1;
    let mut f = Fields::new(&b[8..]);
    let generation = Generation(f.u128()?);
    let entries = f.u64()?;
    let entries_digest = f.array()?;
    let manifest_checksum = f.array()?;
    let has_undo = f.u8()? == 1;
    f.take(7)?;
    let undo_sum = f.array()?;
    let undo_len = f.u64()?;
    Some(CommitRecord {
        generation,
        entries,
        entries_digest,
        manifest_checksum,
        undo: has_undo.then_some((undo_sum, undo_len)),
        grouped,
    })
}

impl JournalWriter {
    /// Creates a journal (replacing any file at `path`) and writes its header.
    pub fn create(vfs: &dyn Vfs, path: &Path, header: JournalHeader) -> Result<Self> {
        let storage = vfs.open(path, OpenHow::Truncate).ctx(Place::State, "creating redo log", path)?;
        let mut w = SeqWriter::new(storage, 0).flush_every(super::target::LOG_FLUSH_EVERY).bypass_cache().ctx(
            Place::State,
            "writing redo log",
            path,
        )?;
        w.write(&encode_header(&header)).ctx(Place::State, "writing redo log", path)?;
        // On disk at once, so an interrupted session is known for what it was.
        w.flush().ctx(Place::State, "writing redo log", path)?;
        Ok(JournalWriter {
            w,
            path: path.to_path_buf(),
            header,
            entries: 0,
            digest: blake3::Hasher::new(),
            data_bytes: 0,
            touched: TouchedList::default(),
        })
    }

    /// Continues an uncommitted journal after its last valid entry.
    pub fn resume(vfs: &dyn Vfs, path: &Path, scan: &Scan) -> Result<Self> {
        let storage = vfs.open(path, OpenHow::ReadWrite).ctx(Place::State, "opening redo log", path)?;
        storage.set_len(scan.valid_len).ctx(Place::State, "truncating redo log", path)?;
        let w = SeqWriter::new(storage, scan.valid_len)
            .flush_every(super::target::LOG_FLUSH_EVERY)
            .bypass_cache()
            .ctx(Place::State, "reading redo log", path)?;
        Ok(JournalWriter {
            w,
            path: path.to_path_buf(),
            header: scan.header,
            entries: scan.entries,
            digest: scan.digest.clone(),
            data_bytes: scan.data_bytes,
            touched: scan.touched.clone(),
        })
    }

    /// The header.
    pub fn header(&self) -> &JournalHeader {
        &self.header
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write(bytes).ctx(Place::State, "writing redo log", &self.path)
    }

    fn finish_entry(&mut self, entry: &[u8]) -> Result<()> {
        let sum = blake3::hash(entry);
        self.put(entry)?;
        self.put(sum.as_bytes())?;
        self.digest.update(sum.as_bytes());
        self.entries += 1;
        Ok(())
    }

    /// Stages a verified block update.
    pub fn append_patch(&mut self, block: &VerifiedBlock) -> Result<()> {
        let patches = block.patches();
        let mut e = Vec::with_capacity(48 + patches.len() * 8 + block.payload_len() as usize);
        e.push(TAG_PATCH);
        e.extend_from_slice(&[0; 3]);
        e.extend_from_slice(&(patches.len() as u32).to_le_bytes());
        e.extend_from_slice(&block.index().to_le_bytes());
        e.extend_from_slice(block.hash().as_bytes());
        for p in patches {
            e.extend_from_slice(&p.offset.to_le_bytes());
            e.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
        }
        for p in patches {
            e.extend_from_slice(&p.data);
        }
        self.data_bytes += block.payload_len();
        self.finish_entry(&e)?;
        let bs = self.header.geometry.block_size.bytes();
        for p in patches {
            let offset = block.index() * bs + u64::from(p.offset);
            self.touched.push(Touched { offset, len: p.data.len() as u64, data: true });
        }
        Ok(())
    }

    /// Stages bytes for one range inside `block` (a move's restored
    /// content). The block-hash field is zeros: a move is never resumed,
    /// and only a resume reads it.
    pub fn append_range(&mut self, block: u64, offset_in_block: u32, data: &[u8]) -> Result<()> {
        let mut e = Vec::with_capacity(56 + data.len());
        e.push(TAG_PATCH);
        e.extend_from_slice(&[0; 3]);
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&block.to_le_bytes());
        e.extend_from_slice(&[0; 32]);
        e.extend_from_slice(&offset_in_block.to_le_bytes());
        e.extend_from_slice(&(data.len() as u32).to_le_bytes());
        e.extend_from_slice(data);
        self.data_bytes += data.len() as u64;
        self.finish_entry(&e)?;
        let offset = block * self.header.geometry.block_size.bytes() + u64::from(offset_in_block);
        self.touched.push(Touched { offset, len: data.len() as u64, data: true });
        Ok(())
    }

    /// Stages a zero range.
    pub fn append_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        let mut e = [0u8; 24];
        e[0] = TAG_ZERO;
        e[8..16].copy_from_slice(&offset.to_le_bytes());
        e[16..24].copy_from_slice(&len.to_le_bytes());
        self.finish_entry(&e)?;
        self.touched.push(Touched { offset, len, data: false });
        Ok(())
    }

    /// Entries so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Block data bytes staged.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// File size so far.
    pub fn len(&self) -> u64 {
        self.w.position()
    }

    /// Whether no entry was written.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The digest a commit record must carry.
    pub fn entries_digest(&self) -> [u8; 32] {
        *self.digest.finalize().as_bytes()
    }

    /// Writes buffered entries to the log (not a sync).
    pub fn flush_entries(&mut self) -> Result<()> {
        self.w.flush().ctx(Place::State, "writing redo log", &self.path)
    }

    /// Flushes and syncs the entries (first half of sealing).
    pub fn sync_entries(&mut self) -> Result<()> {
        self.w.flush().ctx(Place::State, "writing redo log", &self.path)?;
        self.w.storage().sync().ctx(Place::State, "syncing redo log", &self.path)
    }

    /// Writes and syncs the commit record: the commit point.
    pub fn seal(mut self, record: &CommitRecord) -> Result<()> {
        self.put(&encode_commit(record))?;
        self.w.flush().ctx(Place::State, "writing redo log", &self.path)?;
        self.w.storage().sync().ctx(Place::State, "syncing redo log", &self.path)
    }

    /// The storage (for replay right after sealing).
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.w.storage().clone()
    }

    /// Calls `visit` for every range the log's entries write, in log order:
    /// from the list kept while writing, or by scanning the flushed log
    /// when it grew too long to keep.
    pub fn visit_touched(&self, visit: &mut dyn FnMut(Touched) -> Result<()>) -> Result<()> {
        if let Some(list) = self.touched.get() {
            return list.iter().try_for_each(|t| visit(*t));
        }
        let bs = self.header.geometry.block_size.bytes();
        scan(&self.storage(), &self.path, &mut |e| {
            let mut failed = Ok(());
            super::touched::each(&e, bs, &mut |t| {
                if failed.is_ok() {
                    failed = visit(t);
                }
            });
            failed
        })
        .map(|_| ())
    }
}

/// Reads a journal: header, entries (each handed to `visit`), commit record.
///
/// `Ok(None)`: no valid header (a log torn at creation: nothing staged).
/// A committed journal whose entries fail their checks is `E_STATE_CORRUPT`.
pub fn scan(
    storage: &Arc<dyn Storage>,
    path: &Path,
    visit: &mut dyn FnMut(Entry<'_>) -> Result<()>,
) -> Result<Option<Scan>> {
    let len = storage.len().ctx(Place::State, "reading redo log", path)?;
    if len < HEADER_LEN {
        return Ok(None);
    }
    let mut hb = [0u8; HEADER_LEN as usize];
    storage.read_at(0, &mut hb).ctx(Place::State, "reading redo log", path)?;
    let commit = if len >= HEADER_LEN + COMMIT_LEN {
        let mut cb = [0u8; COMMIT_LEN as usize];
        storage.read_at(len - COMMIT_LEN, &mut cb).ctx(Place::State, "reading redo log", path)?;
        decode_commit(&cb)
    } else {
        None
    };
    let Some(header) = decode_header(&hb) else {
        // A header torn at creation means nothing was staged; behind a valid
        // commit record it can only be damage.
        return match commit {
            Some(_) => Err(Error::corrupt(path, "committed redo log has a damaged header")),
            None => Ok(None),
        };
    };
    let entries_end = if commit.is_some() { len - COMMIT_LEN } else { len };
    let mut r = SeqReader::new(storage.clone(), HEADER_LEN, entries_end, 1 << 20).bypass_cache();
    let mut scan = Scan {
        header,
        valid_len: HEADER_LEN,
        entries: 0,
        digest: blake3::Hasher::new(),
        data_bytes: 0,
        commit: None,
        touched: TouchedList::default(),
    };
    let g = header.geometry;
    let mut buf = Vec::new();
    loop {
        if r.remaining() == 0 {
            break;
        }
        match read_entry(&mut r, &g, &mut buf, path)? {
            Some((sum, data_len)) => {
                let entry = parse_entry(&buf, &g);
                match entry {
                    Some(e) => {
                        scan.touched.note(&e, g.block_size.bytes());
                        visit(e)?
                    }
                    None => break,
                }
                scan.digest.update(&sum);
                scan.entries += 1;
                scan.data_bytes += data_len;
                scan.valid_len = r.position();
            }
            None => break,
        }
    }
    if let Some(c) = commit {
        let complete = scan.valid_len == entries_end
            && scan.entries == c.entries
            && scan.digest.finalize().as_bytes() == &c.entries_digest;
        if !complete {
            return Err(Error::corrupt(path, "committed redo log has damaged entries"));
        }
        scan.commit = Some(c);
    }
    Ok(Some(scan))
}

/// Reads one entry's bytes into `buf` (without its checksum) if it is whole
/// and its checksum matches. Returns the checksum and the data length.
fn read_entry(r: &mut SeqReader, g: &Geometry, buf: &mut Vec<u8>, path: &Path) -> Result<Option<([u8; 32], u64)>> {
    // The log may end anywhere (a torn tail): running out of bytes ends it,
    // any other read error is an error.
    let read = |r: &mut SeqReader, out: &mut [u8]| -> Result<bool> {
        match r.read_exact(out) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(Error::io(Place::State, "reading", path, e)),
        }
    };
    buf.clear();
    let mut head = [0u8; 8];
    if !read(r, &mut head)? {
        return Ok(None);
    }
    buf.extend_from_slice(&head);
    let (body_len, data_len) = match head[0] {
        TAG_ZERO => (16usize, 0u64),
        TAG_PATCH => {
            let n = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as u64;
            if n == 0 || n > g.block_size.pages() as u64 {
                return Ok(None);
            }
            let mut fixed = vec![0u8; 40 + n as usize * 8];
            if !read(r, &mut fixed)? {
                return Ok(None);
            }
            let mut total = 0u64;
            for i in 0..n as usize {
                let at = 40 + i * 8 + 4;
                total += u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]]) as u64;
            }
            if total > g.block_size.bytes() {
                return Ok(None);
            }
            buf.extend_from_slice(&fixed);
            (total as usize, total)
        }
        _ => return Ok(None),
    };
    let start = buf.len();
    buf.resize(start + body_len, 0);
    if !read(r, &mut buf[start..])? {
        return Ok(None);
    }
    let mut sum = [0u8; 32];
    if !read(r, &mut sum)? || blake3::hash(buf).as_bytes() != &sum {
        return Ok(None);
    }
    Ok(Some((sum, data_len)))
}

fn parse_entry<'a>(buf: &'a [u8], g: &Geometry) -> Option<Entry<'a>> {
    let mut f = Fields::new(buf);
    match f.u8()? {
        TAG_ZERO => {
            f.take(7)?;
            let offset = f.u64()?;
            let len = f.u64()?;
            (offset.checked_add(len)? <= g.disk_bytes).then_some(Entry::Zero { offset, len })
        }
        TAG_PATCH => {
            f.take(3)?;
            let n = f.u32()? as usize;
            let block = f.u64()?;
            let hash = BlockHash(f.array()?);
            let table = f.take(n * 8)?;
            let block_len = g.block_len(block) as u64;
            let data = &buf[f.position()..];
            let mut ranges = Vec::with_capacity(n);
            let mut total = 0u64;
            let mut t = Fields::new(table);
            for _ in 0..n {
                let (off, len) = (t.u32()?, t.u32()?);
                if off as u64 + len as u64 > block_len {
                    return None;
                }
                total += len as u64;
                ranges.push((off, len));
            }
            if block_len == 0 || total != data.len() as u64 {
                return None;
            }
            Some(Entry::Patch { block, hash, ranges, data })
        }
        _ => None,
    }
}
