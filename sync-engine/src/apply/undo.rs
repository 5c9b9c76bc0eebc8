//! Undo segments: the old content of every range a commit overwrites, so the
//! previous generation survives as a recovery point.
//!
//! | part | layout (little-endian) |
//! |------|------------------------|
//! | header (64 B) | `"DFUNDO01" · u32 version · u32 block size · u128 generation restored · u128 newer generation · u64 old disk bytes · u64 new disk bytes` |
//! | entry | `u8 kind (1 data, 2 zero) · [7] 0 · u64 offset · u64 len · data (kind 1)` |
//! | footer (56 B) | `u8 0xFF · [7] 0 · u64 entries · u64 data bytes · [32] blake3 of everything before` |
//!
//! Every entry holds content from before the commit, so entries may be
//! applied in any order; then the image is cut to the old size.

use std::path::Path;

use diskferry_protocol::{BlockSize, Generation};

use crate::error::{Error, IoContext, Place, Result};
use crate::hash::is_zero;
use crate::seqio::{digest_range, Fields, HashedWriter, SeqReader};
use crate::store::{OpenHow, Storage, Vfs};

const MAGIC: &[u8; 8] = b"DFUNDO01";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;
const FOOTER_LEN: u64 = 56;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const CHUNK: u64 = 1 << 20;

/// What an undo segment restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoHeader {
    /// Block size of the generations.
    pub block_size: BlockSize,
    /// The generation this segment restores.
    pub generation: Generation,
    /// The generation it is applied to.
    pub newer: Generation,
    /// Disk size of the restored generation.
    pub old_disk_bytes: u64,
    /// Disk size of the newer generation.
    pub new_disk_bytes: u64,
}

/// Writes an undo segment by reading the old content of each range about to
/// be overwritten.
#[derive(Debug)]
pub struct UndoWriter<'a> {
    w: HashedWriter,
    path: &'a Path,
    target: &'a dyn Storage,
    old_len: u64,
    entries: u64,
    data_bytes: u64,
    buf: Vec<u8>,
}

impl<'a> UndoWriter<'a> {
    /// Creates the segment at `path` for `target`, whose current size is `header.old_disk_bytes`.
    pub fn create(vfs: &dyn Vfs, path: &'a Path, target: &'a dyn Storage, header: &UndoHeader) -> Result<Self> {
        let storage = vfs.open(path, OpenHow::Truncate).ctx(Place::State, "creating undo segment", path)?;
        let mut w = HashedWriter::new(storage, 0).flush_every(super::target::LOG_FLUSH_EVERY).bypass_cache().ctx(
            Place::State,
            "writing undo segment",
            path,
        )?;
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&header.block_size.get().to_le_bytes());
        h[16..32].copy_from_slice(&header.generation.0.to_le_bytes());
        h[32..48].copy_from_slice(&header.newer.0.to_le_bytes());
        h[48..56].copy_from_slice(&header.old_disk_bytes.to_le_bytes());
        h[56..64].copy_from_slice(&header.new_disk_bytes.to_le_bytes());
        w.write(&h).ctx(Place::State, "writing undo segment", path)?;
        Ok(UndoWriter { w, path, target, old_len: header.old_disk_bytes, entries: 0, data_bytes: 0, buf: Vec::new() })
    }

    fn entry(&mut self, kind: u8, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let mut e = [0u8; 24];
        e[0] = kind;
        e[8..16].copy_from_slice(&offset.to_le_bytes());
        e[16..24].copy_from_slice(&len.to_le_bytes());
        self.w.write(&e).ctx(Place::State, "writing undo segment", self.path)?;
        if let Some(d) = data {
            self.w.write(d).ctx(Place::State, "writing undo segment", self.path)?;
            self.data_bytes += d.len() as u64;
        }
        self.entries += 1;
        Ok(())
    }

    /// Saves the old content of `[offset, offset+len)` before it is overwritten
    /// with data. Zeros are recorded as a zero range, not as bytes.
    pub fn save_overwrite(&mut self, offset: u64, len: u64) -> Result<()> {
        self.save(offset, len, true)
    }

    /// Saves the old content of a range about to become zeros (only its data matters).
    pub fn save_zeroing(&mut self, offset: u64, len: u64) -> Result<()> {
        self.save(offset, len, false)
    }

    fn save(&mut self, offset: u64, len: u64, record_zeros: bool) -> Result<()> {
        let end = (offset + len).min(self.old_len);
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let data = self.target.data_ranges(pos, n).ctx(Place::Target, "reading", self.path)?;
            let mut cursor = pos;
            for (d_off, d_len) in data.into_iter().chain(std::iter::once((pos + n, 0))) {
                if d_off > cursor && record_zeros {
                    self.entry(KIND_ZERO, cursor, d_off - cursor, None)?;
                }
                if d_len > 0 {
                    let mut buf = std::mem::take(&mut self.buf);
                    buf.resize(d_len as usize, 0);
                    self.target.read_at(d_off, &mut buf).ctx(Place::Target, "reading old content of", self.path)?;
                    if is_zero(&buf) {
                        if record_zeros {
                            self.entry(KIND_ZERO, d_off, d_len, None)?;
                        }
                    } else {
                        self.entry(KIND_DATA, d_off, d_len, Some(&buf))?;
                    }
                    self.buf = buf;
                }
                cursor = d_off + d_len;
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes the footer and syncs. Returns the checksum and the data bytes held.
    pub fn finish(mut self) -> Result<([u8; 32], u64)> {
        let mut f = [0u8; 24];
        f[0] = 0xFF;
        f[8..16].copy_from_slice(&self.entries.to_le_bytes());
        f[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        self.w.write(&f).ctx(Place::State, "writing undo segment", self.path)?;
        let sum = self.w.digest();
        self.w.write(&sum).ctx(Place::State, "writing undo segment", self.path)?;
        self.w.flush().ctx(Place::State, "writing undo segment", self.path)?;
        self.w.storage().sync().ctx(Place::State, "syncing undo segment", self.path)?;
        Ok((sum, self.data_bytes))
    }
}

/// Verifies an undo segment and returns its header, checksum and data bytes.
pub fn check_undo(vfs: &dyn Vfs, path: &Path) -> Result<(UndoHeader, [u8; 32], u64)> {
    let storage = vfs.open(path, OpenHow::Read).ctx(Place::State, "opening undo segment", path)?;
    let len = storage.len().ctx(Place::State, "reading undo segment", path)?;
    if len < HEADER_LEN + FOOTER_LEN {
        return Err(Error::corrupt(path, "too short"));
    }
    let mut footer = [0u8; FOOTER_LEN as usize];
    storage.read_at(len - FOOTER_LEN, &mut footer).ctx(Place::State, "reading undo segment", path)?;
    let hasher = digest_range(storage.as_ref(), len - 32).ctx(Place::State, "reading undo segment", path)?;
    if hasher.finalize().as_bytes() != &footer[24..56] || footer[0] != 0xFF {
        return Err(Error::corrupt(path, "checksum mismatch"));
    }
    let mut hb = [0u8; HEADER_LEN as usize];
    storage.read_at(0, &mut hb).ctx(Place::State, "reading undo segment", path)?;
    let header = decode_header(&hb).ok_or_else(|| Error::corrupt(path, "invalid header"))?;
    let data_bytes = u64::from_le_bytes(footer[16..24].try_into().unwrap_or([0; 8]));
    let mut sum = [0u8; 32];
    sum.copy_from_slice(&footer[24..56]);
    Ok((header, sum, data_bytes))
}

fn decode_header(b: &[u8]) -> Option<UndoHeader> {
    let mut f = Fields::new(b);
    if f.take(8)? != MAGIC || f.u32()? != VERSION {
        return None;
    }
    Some(UndoHeader {
        block_size: BlockSize::new(f.u32()?).ok()?,
        generation: Generation(f.u128()?),
        newer: Generation(f.u128()?),
        old_disk_bytes: f.u64()?,
        new_disk_bytes: f.u64()?,
    })
}

/// One entry of an undo segment, as read back.
#[derive(Debug)]
pub enum UndoEntry<'a> {
    /// Old content at a byte offset.
    Data {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// A range that was zeros (or a hole).
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// Hands every entry of a (verified, see [`check_undo`]) segment to `visit`, in order.
pub fn read_undo_entries(vfs: &dyn Vfs, path: &Path, visit: &mut dyn FnMut(UndoEntry<'_>) -> Result<()>) -> Result<()> {
    let storage = vfs.open(path, OpenHow::Read).ctx(Place::State, "opening undo segment", path)?;
    let len = storage.len().ctx(Place::State, "reading undo segment", path)?;
    if len < HEADER_LEN + FOOTER_LEN {
        return Err(Error::corrupt(path, "too short"));
    }
    let mut r = SeqReader::new(storage, HEADER_LEN, len - FOOTER_LEN, 1 << 20).bypass_cache();
    let mut buf = Vec::new();
    while r.remaining() > 0 {
        let mut e = [0u8; 24];
        r.read_exact(&mut e).map_err(|_| Error::corrupt(path, "entry cut short"))?;
        let mut f = Fields::new(&e[8..]);
        let (offset, elen) = (f.u64().unwrap_or(0), f.u64().unwrap_or(0));
        if offset.checked_add(elen).is_none() {
            return Err(Error::corrupt(path, "entry range overflows"));
        }
        match e[0] {
            KIND_DATA => {
                if elen > r.remaining() {
                    return Err(Error::corrupt(path, "entry longer than the segment"));
                }
                buf.resize(elen as usize, 0);
                r.read_exact(&mut buf).map_err(|_| Error::corrupt(path, "entry cut short"))?;
                visit(UndoEntry::Data { offset, bytes: &buf })?;
            }
            KIND_ZERO => visit(UndoEntry::Zero { offset, len: elen })?,
            _ => return Err(Error::corrupt(path, "unknown entry kind")),
        }
    }
    Ok(())
}

/// Applies a (verified) undo segment to `image`, which holds the newer
/// generation, turning it into the restored one (a file image, cut to the
/// restored size).
/// `header` comes from [`check_undo`] on the same file.
pub fn apply_undo(
    vfs: &dyn Vfs,
    path: &Path,
    header: &UndoHeader,
    image: &dyn Storage,
    image_path: &Path,
) -> Result<UndoHeader> {
    let header = *header;
    read_undo_entries(vfs, path, &mut |e| match e {
        UndoEntry::Data { offset, bytes } => image.write_at(offset, bytes).ctx(Place::Target, "writing", image_path),
        UndoEntry::Zero { offset, len } => image.zero_range(offset, len).ctx(Place::Target, "writing", image_path),
    })?;
    // Cut between segments too: bytes past an older, smaller size must not
    // survive into the next (older) segment's image.
    image.set_len(header.old_disk_bytes).ctx(Place::Target, "resizing", image_path)?;
    Ok(header)
}
