//! Every message of protocol version 1 and its byte layout.
//!
//! A frame is `u32 length · u8 type · fields`, little-endian, where `length`
//! counts the type byte and the fields; a frame over [`MAX_FRAME`] is refused
//! before it is buffered. Layouts (`[n]` is n raw bytes, `str` is `u16 len ·
//! utf-8`, `list<T>` is `u32 count · T…`):
//!
//! | type | message | direction | fields |
//! |------|---------|-----------|--------|
//! | 0x01 | Hello | S→T | `u16 min version · u16 max version · u32 capabilities` |
//! | 0x02 | Welcome | T→S | `u16 version · u32 capabilities · u32 max frame` |
//! | 0x03 | Open | S→T | `u128 session · str target · u64 disk bytes · u32 block size · u8 mode · u8 flags · u128 source base` |
//! | 0x04 | Accept | T→S | `u8 plan · u128 target generation · u64 staged blocks · u32 window` |
//! | 0x05 | Region | S→T | `u64 region · [32] hash` |
//! | 0x06 | NeedChunks | T→S | `u64 region` |
//! | 0x07 | Chunks | S→T | `u64 region · list<[32]>` |
//! | 0x08 | NeedBlocks | T→S | `u64 region · list<u32 chunk>` |
//! | 0x09 | BlockHashes | S→T | `u64 region · u32 chunk · list<[32]>` |
//! | 0x0a | Want | T→S | `u64 region · list<u64 block · u16 n · n × u64 page hash>` |
//! | 0x0b | RegionEnd | S→T | `u64 region · [32] hash · u32 items` |
//! | 0x0c | RegionDone | T→S | `u64 region · u64 bytes staged` |
//! | 0x0d | Finish | S→T | `u8 consistency` |
//! | 0x0e | Committed | T→S | `u128 generation · [32] root · u64 blocks changed · u64 bytes written · u32 points dropped · u8 flags` (flag 1: unchanged) |
//! | 0x0f | Error | both | `u16 code · str message` |
//! | 0x10 | Block | S→T data | `u64 block · [32] blake3 of the whole new block · u32 block len · u8 codec · u16 n · n × (u32 offset · u32 len) · u32 payload len · payload` |
//! | 0x11 | Zero | S→T data | `u64 first block · u64 count` |
//! | 0x12 | Nack | T→S | `u64 block` |
//!
//! Modes: 0 auto, 1 delta, 2 full. Plans: 0 full, 1 compare with the target's
//! trusted manifest, 2 compare by hashing the target. Codecs: 0 raw, 1 zstd
//! (the payload is one zstd frame of the concatenated patch bytes).

use bytes::{Buf, BufMut, Bytes, BytesMut};

mod block;
mod fields;

use block::{decode_block, put_block_fields};
pub use block::{encode_block, encode_block_head, BlockFrame, Codec};
pub use fields::*;
use fields::{COMMITTED_PROMOTED, COMMITTED_UNCHANGED, OPEN_DISCARD, OPEN_FORCE, OPEN_GROUP, OPEN_PROMOTE};

use crate::coding::{put_str, BufExt, DecodeError, DecodeResult};
use crate::error::ErrorCode;
use crate::payload::Body;
use crate::types::{BlockHash, BlockSize, Consistency, Generation, SessionId, TargetName};

/// The protocol version this crate speaks.
pub const VERSION: u16 = 2;
/// TLS application protocol name.
pub const ALPN: &[u8] = b"diskferry/1";
/// Hard limit on a frame's length field: one largest block plus headers.
pub const MAX_FRAME: u32 = BlockSize::MAX + (64 << 10);
/// Capability: zstd-compressed block payloads.
pub const CAP_ZSTD: u32 = 1;
/// Capability: sub-block (page) patches.
pub const CAP_PAGES: u32 = 2;
/// Capability: window slots of [`crate::session::FINE_WINDOW_UNITS`]
/// units, so that many more empty regions are in flight per slot.
pub const CAP_FINE_WINDOW: u32 = 4;
/// Every capability this version speaks.
pub const CAPABILITIES: u32 = CAP_ZSTD | CAP_PAGES | CAP_FINE_WINDOW;

/// Any protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Version offer.
    Hello {
        /// Lowest version spoken.
        min_version: u16,
        /// Highest version spoken.
        max_version: u16,
        /// Capability bits.
        capabilities: u32,
    },
    /// Version choice.
    Welcome {
        /// Chosen version.
        version: u16,
        /// Capability bits both sides share.
        capabilities: u32,
        /// Largest frame accepted.
        max_frame: u32,
    },
    /// Session request.
    Open(Open),
    /// Session acceptance.
    Accept(Accept),
    /// The hash of a source region.
    Region {
        /// Region index.
        region: u64,
        /// Its hash.
        hash: BlockHash,
    },
    /// The target's region hash differs: send its chunk hashes.
    NeedChunks {
        /// Region index.
        region: u64,
    },
    /// A region's chunk hashes.
    Chunks {
        /// Region index.
        region: u64,
        /// Chunk hashes in order.
        hashes: Vec<BlockHash>,
    },
    /// These chunks differ: send their block hashes.
    NeedBlocks {
        /// Region index.
        region: u64,
        /// Chunk indexes within the region.
        chunks: Vec<u32>,
    },
    /// One chunk's block hashes.
    BlockHashes {
        /// Region index.
        region: u64,
        /// Chunk index within the region.
        chunk: u32,
        /// Block hashes in order.
        hashes: Vec<BlockHash>,
    },
    /// Blocks the target needs.
    Want {
        /// Region index.
        region: u64,
        /// The blocks.
        blocks: Vec<WantBlock>,
    },
    /// Full copy: everything of a region has been sent on the data streams.
    RegionEnd {
        /// Region index.
        region: u64,
        /// The region's hash.
        hash: BlockHash,
        /// Block and zero frames sent for it.
        items: u32,
    },
    /// The target staged a region completely.
    RegionDone {
        /// Region index.
        region: u64,
        /// Bytes staged so far in the session.
        bytes_staged: u64,
    },
    /// The source sent every region.
    Finish {
        /// Consistency of what was read.
        consistency: Consistency,
    },
    /// The target committed.
    Committed(Committed),
    /// The session failed.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// For a person.
        message: String,
    },
    /// New block content (data streams).
    Block(BlockFrame),
    /// Blocks that are all zeros (data streams).
    Zero {
        /// First block.
        first: u64,
        /// Count.
        count: u64,
    },
    /// A patched block failed verification: send it whole.
    Nack {
        /// Block index.
        index: u64,
    },
}

impl Message {
    /// The type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => 0x01,
            Message::Welcome { .. } => 0x02,
            Message::Open(_) => 0x03,
            Message::Accept(_) => 0x04,
            Message::Region { .. } => 0x05,
            Message::NeedChunks { .. } => 0x06,
            Message::Chunks { .. } => 0x07,
            Message::NeedBlocks { .. } => 0x08,
            Message::BlockHashes { .. } => 0x09,
            Message::Want { .. } => 0x0a,
            Message::RegionEnd { .. } => 0x0b,
            Message::RegionDone { .. } => 0x0c,
            Message::Finish { .. } => 0x0d,
            Message::Committed(_) => 0x0e,
            Message::Error { .. } => 0x0f,
            Message::Block(_) => 0x10,
            Message::Zero { .. } => 0x11,
            Message::Nack { .. } => 0x12,
        }
    }

    /// Appends the whole frame (length prefix, type, fields) in one pass: the
    /// length is patched in at the end, so block payloads are copied once.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u8(self.type_byte());
        self.encode_fields(out);
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The frame as bytes.
    pub fn to_bytes(&self) -> Bytes {
        let payload = match self {
            Message::Block(f) => f.payload.len() + f.patches.len() * 8,
            _ => 0,
        };
        let mut b = BytesMut::with_capacity(128 + payload);
        self.encode(&mut b);
        b.freeze()
    }

    fn encode_fields(&self, b: &mut BytesMut) {
        match self {
            Message::Hello { min_version, max_version, capabilities } => {
                b.put_u16_le(*min_version);
                b.put_u16_le(*max_version);
                b.put_u32_le(*capabilities);
            }
            Message::Welcome { version, capabilities, max_frame } => {
                b.put_u16_le(*version);
                b.put_u32_le(*capabilities);
                b.put_u32_le(*max_frame);
            }
            Message::Open(o) => {
                b.put_u128_le(o.session.0);
                put_str(b, o.target.as_str());
                b.put_u64_le(o.disk_bytes);
                b.put_u32_le(o.block_size.get());
                b.put_u8(match o.mode {
                    SyncMode::Auto => 0,
                    SyncMode::Delta => 1,
                    SyncMode::Full => 2,
                });
                b.put_u8(
                    if o.force { OPEN_FORCE } else { 0 }
                        | if o.discard_target_changes { OPEN_DISCARD } else { 0 }
                        | if o.promote { OPEN_PROMOTE } else { 0 }
                        | if o.group.is_some() { OPEN_GROUP } else { 0 },
                );
                let lineage = &o.lineage[..o.lineage.len().min(MAX_LINEAGE)];
                b.put_u32_le(lineage.len() as u32);
                for g in lineage {
                    b.put_u128_le(g.0);
                }
                if let Some(t) = &o.group {
                    put_str(b, t.name.as_str());
                    b.put_u128_le(t.push);
                    b.put_u16_le(t.members);
                }
            }
            Message::Accept(a) => {
                b.put_u8(match a.plan {
                    Plan::Full => 0,
                    Plan::CompareManifest => 1,
                    Plan::CompareHash => 2,
                });
                b.put_u128_le(a.target_generation.map_or(0, |g| g.0));
                b.put_u64_le(a.staged_blocks);
                b.put_u32_le(a.window);
            }
            Message::Region { region, hash } => {
                b.put_u64_le(*region);
                b.put_slice(hash.as_bytes());
            }
            Message::NeedChunks { region } => b.put_u64_le(*region),
            Message::Chunks { region, hashes } => {
                b.put_u64_le(*region);
                put_hashes(b, hashes);
            }
            Message::NeedBlocks { region, chunks } => {
                b.put_u64_le(*region);
                b.put_u32_le(chunks.len() as u32);
                for c in chunks {
                    b.put_u32_le(*c);
                }
            }
            Message::BlockHashes { region, chunk, hashes } => {
                b.put_u64_le(*region);
                b.put_u32_le(*chunk);
                put_hashes(b, hashes);
            }
            Message::Want { region, blocks } => {
                b.put_u64_le(*region);
                b.put_u32_le(blocks.len() as u32);
                for w in blocks {
                    b.put_u64_le(w.index);
                    b.put_u16_le(w.page_hashes.len() as u16);
                    for p in &w.page_hashes {
                        b.put_u64_le(*p);
                    }
                }
            }
            Message::RegionEnd { region, hash, items } => {
                b.put_u64_le(*region);
                b.put_slice(hash.as_bytes());
                b.put_u32_le(*items);
            }
            Message::RegionDone { region, bytes_staged } => {
                b.put_u64_le(*region);
                b.put_u64_le(*bytes_staged);
            }
            Message::Finish { consistency } => b.put_u8(consistency.to_u8()),
            Message::Committed(c) => {
                b.put_u128_le(c.generation.0);
                b.put_slice(c.root.as_bytes());
                b.put_u64_le(c.blocks_changed);
                b.put_u64_le(c.bytes_written);
                b.put_u32_le(c.points_dropped);
                b.put_u8(
                    if c.unchanged { COMMITTED_UNCHANGED } else { 0 } | if c.promoted { COMMITTED_PROMOTED } else { 0 },
                );
                b.put_u128_le(c.common_point.map_or(0, |g| g.0));
                b.put_u64_le(c.discarded_blocks);
                b.put_u128_le(c.discarded_point.map_or(0, |g| g.0));
                b.put_u64_le(c.target_bytes_read);
            }
            Message::Error { code, message } => {
                b.put_u16_le(code.to_u16());
                put_str(b, message);
            }
            Message::Block(f) => {
                let parts: Vec<&[u8]> = f.payload.parts().iter().map(|p| &p[..]).collect();
                put_block_fields(b, f.index, &f.hash, f.block_len, f.codec, &f.patches, &parts)
            }
            Message::Zero { first, count } => {
                b.put_u64_le(*first);
                b.put_u64_le(*count);
            }
            Message::Nack { index } => b.put_u64_le(*index),
        }
    }

    /// Decodes one frame body (type byte and fields, without the length
    /// prefix). Every field is checked; leftover bytes are an error.
    pub fn decode(body: &mut impl Body) -> DecodeResult<Message> {
        let ty = body.get_u8_checked()?;
        let m = match ty {
            0x01 => Message::Hello {
                min_version: body.get_u16_checked()?,
                max_version: body.get_u16_checked()?,
                capabilities: body.get_u32_checked()?,
            },
            0x02 => Message::Welcome {
                version: body.get_u16_checked()?,
                capabilities: body.get_u32_checked()?,
                max_frame: body.get_u32_checked()?,
            },
            0x03 => {
                let session = SessionId(body.get_u128_checked()?);
                let target = TargetName::new(&body.get_str()?).map_err(|_| DecodeError::Invalid("target name"))?;
                let disk_bytes = body.get_u64_checked()?;
                let block_size =
                    BlockSize::new(body.get_u32_checked()?).map_err(|_| DecodeError::Invalid("block size"))?;
                let mode = match body.get_u8_checked()? {
                    0 => SyncMode::Auto,
                    1 => SyncMode::Delta,
                    2 => SyncMode::Full,
                    _ => return Err(DecodeError::Invalid("mode")),
                };
                let flags = body.get_u8_checked()?;
                if flags & !(OPEN_FORCE | OPEN_DISCARD | OPEN_PROMOTE | OPEN_GROUP) != 0 {
                    return Err(DecodeError::Invalid("flags"));
                }
                let n = body.get_count(16)?;
                if n > MAX_LINEAGE {
                    return Err(DecodeError::Invalid("lineage"));
                }
                let mut lineage = Vec::with_capacity(n);
                for _ in 0..n {
                    lineage.push(generation(body.get_u128_checked()?).ok_or(DecodeError::Invalid("lineage"))?);
                }
                let group = if flags & OPEN_GROUP != 0 {
                    let name = TargetName::new(&body.get_str()?).map_err(|_| DecodeError::Invalid("group name"))?;
                    let push = body.get_u128_checked()?;
                    let members = body.get_u16_checked()?;
                    if members == 0 || members > MAX_GROUP_MEMBERS {
                        return Err(DecodeError::Invalid("group members"));
                    }
                    Some(GroupTag { name, push, members })
                } else {
                    None
                };
                Message::Open(Open {
                    session,
                    target,
                    disk_bytes,
                    block_size,
                    mode,
                    force: flags & OPEN_FORCE != 0,
                    discard_target_changes: flags & OPEN_DISCARD != 0,
                    lineage,
                    promote: flags & OPEN_PROMOTE != 0,
                    group,
                })
            }
            0x04 => {
                let plan = match body.get_u8_checked()? {
                    0 => Plan::Full,
                    1 => Plan::CompareManifest,
                    2 => Plan::CompareHash,
                    _ => return Err(DecodeError::Invalid("plan")),
                };
                Message::Accept(Accept {
                    plan,
                    target_generation: generation(body.get_u128_checked()?),
                    staged_blocks: body.get_u64_checked()?,
                    window: body.get_u32_checked()?,
                })
            }
            0x05 => Message::Region { region: body.get_u64_checked()?, hash: body.get_hash()? },
            0x06 => Message::NeedChunks { region: body.get_u64_checked()? },
            0x07 => Message::Chunks { region: body.get_u64_checked()?, hashes: get_hashes(body)? },
            0x08 => {
                let region = body.get_u64_checked()?;
                let n = body.get_count(4)?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(body.get_u32_checked()?);
                }
                Message::NeedBlocks { region, chunks }
            }
            0x09 => Message::BlockHashes {
                region: body.get_u64_checked()?,
                chunk: body.get_u32_checked()?,
                hashes: get_hashes(body)?,
            },
            0x0a => {
                let region = body.get_u64_checked()?;
                let n = body.get_count(10)?;
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    let index = body.get_u64_checked()?;
                    let pages = body.get_u16_checked()? as usize;
                    if pages > (BlockSize::MAX / crate::types::PAGE_SIZE) as usize {
                        return Err(DecodeError::Invalid("page count"));
                    }
                    let mut page_hashes = Vec::with_capacity(pages.min(body.remaining() / 8));
                    for _ in 0..pages {
                        page_hashes.push(body.get_u64_checked()?);
                    }
                    blocks.push(WantBlock { index, page_hashes });
                }
                Message::Want { region, blocks }
            }
            0x0b => Message::RegionEnd {
                region: body.get_u64_checked()?,
                hash: body.get_hash()?,
                items: body.get_u32_checked()?,
            },
            0x0c => Message::RegionDone { region: body.get_u64_checked()?, bytes_staged: body.get_u64_checked()? },
            0x0d => Message::Finish {
                consistency: Consistency::from_u8(body.get_u8_checked()?).ok_or(DecodeError::Invalid("consistency"))?,
            },
            0x0e => {
                let new = generation(body.get_u128_checked()?).ok_or(DecodeError::Invalid("generation"))?;
                let root = body.get_hash()?;
                let blocks_changed = body.get_u64_checked()?;
                let bytes_written = body.get_u64_checked()?;
                let points_dropped = body.get_u32_checked()?;
                let flags = body.get_u8_checked()?;
                if flags & !(COMMITTED_UNCHANGED | COMMITTED_PROMOTED) != 0 {
                    return Err(DecodeError::Invalid("committed flags"));
                }
                Message::Committed(Committed {
                    generation: new,
                    root,
                    blocks_changed,
                    bytes_written,
                    points_dropped,
                    unchanged: flags & COMMITTED_UNCHANGED != 0,
                    common_point: generation(body.get_u128_checked()?),
                    discarded_blocks: body.get_u64_checked()?,
                    discarded_point: generation(body.get_u128_checked()?),
                    target_bytes_read: body.get_u64_checked()?,
                    promoted: flags & COMMITTED_PROMOTED != 0,
                })
            }
            0x0f => Message::Error { code: ErrorCode::from_u16(body.get_u16_checked()?), message: body.get_str()? },
            0x10 => Message::Block(decode_block(body)?),
            0x11 => Message::Zero { first: body.get_u64_checked()?, count: body.get_u64_checked()? },
            0x12 => Message::Nack { index: body.get_u64_checked()? },
            other => return Err(DecodeError::UnknownType(other)),
        };
        if body.has_remaining() {
            return Err(DecodeError::Trailing(body.remaining()));
        }
        Ok(m)
    }
}

fn generation(raw: u128) -> Option<Generation> {
    (raw != 0).then_some(Generation(raw))
}

fn put_hashes(b: &mut BytesMut, hashes: &[BlockHash]) {
    b.put_u32_le(hashes.len() as u32);
    for h in hashes {
        b.put_slice(h.as_bytes());
    }
}

fn get_hashes(b: &mut impl Buf) -> DecodeResult<Vec<BlockHash>> {
    let n = b.get_count(32)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(b.get_hash()?);
    }
    Ok(v)
}

#[cfg(test)]
pub(crate) mod tests;
