//! Value types shared by every layer: block geometry, hashes, generations.

use std::fmt;
use std::str::FromStr;

/// Size of the sub-block unit used to find the changed pages inside a changed block.
pub const PAGE_SIZE: u32 = 4096;
/// Blocks per chunk: the middle level of the hash tree.
pub const CHUNK_BLOCKS: u64 = 32;
/// Bytes of disk a region covers (at least one chunk): the unit of pipelining.
pub const REGION_BYTES: u64 = 64 << 20;

/// A blake3 digest of one block's bytes, or [`BlockHash::ZERO`] for an all-zero block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Sentinel for a block whose bytes are all zero (a hole, or written zeros).
    /// Zero blocks are never hashed, so this value cannot collide with real content
    /// except with the probability of a blake3 preimage.
    pub const ZERO: BlockHash = BlockHash([0; 32]);

    /// Whether this is the all-zero sentinel.
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// Whether every hash of `hashes` is the zero sentinel. A region is
    /// 1024 hashes and a large sparse disk has thousands of empty regions
    /// per session: this ORs 32 hashes at a time into one 32-byte
    /// accumulator (a vector OR each), where `iter().all(is_zero)` branches
    /// per hash.
    pub fn all_zero(hashes: &[BlockHash]) -> bool {
        hashes.chunks(32).all(|group| {
            let mut acc = [0u8; 32];
            for h in group {
                for (a, b) in acc.iter_mut().zip(h.0) {
                    *a |= b;
                }
            }
            acc == [0u8; 32]
        })
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 bytes as a little-endian integer, used to index hashes.
    pub fn prefix64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({}…)", &self.to_hex()[..12])
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Lower-case hex of a byte string.
pub fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Parses lower- or upper-case hex of exactly `N` bytes (colons allowed between bytes).
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits: String = s.chars().filter(|&c| c != ':').collect();
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

/// Index of a block from the start of the disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct BlockIndex(pub u64);

/// Block size: a power of two from 4 KiB to 4 MiB.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockSize(u32);

impl BlockSize {
    /// Smallest allowed block size.
    pub const MIN: u32 = 4 << 10;
    /// Largest allowed block size.
    pub const MAX: u32 = 4 << 20;
    /// The default, 64 KiB.
    pub const DEFAULT: BlockSize = BlockSize(64 << 10);

    /// Checked constructor.
    pub fn new(bytes: u32) -> Result<Self, InvalidBlockSize> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(InvalidBlockSize::OutOfRange(bytes as u64))
        }
    }

    /// Size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Size in bytes as u64.
    pub fn bytes(self) -> u64 {
        self.0 as u64
    }

    /// Number of 4 KiB pages in a full block.
    pub fn pages(self) -> u32 {
        self.0 / PAGE_SIZE
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1 << 20 {
            write!(f, "{}M", self.0 >> 20)
        } else {
            write!(f, "{}K", self.0 >> 10)
        }
    }
}

impl FromStr for BlockSize {
    type Err = InvalidBlockSize;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_size(s).ok_or_else(|| InvalidBlockSize::NotASize(s.to_string()))?;
        let bytes32 = u32::try_from(bytes).map_err(|_| InvalidBlockSize::OutOfRange(bytes))?;
        BlockSize::new(bytes32)
    }
}

/// A block size that is not a size, or outside 4 KiB..=4 MiB, or not a power of two.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBlockSize {
    /// The text is not a size such as `4096`, `64K` or `1M`.
    #[error("block size {0:?} is not a size (write it like 4K, 64K or 1M)")]
    NotASize(String),
    /// A size, but not a power of two from 4 KiB to 4 MiB.
    #[error("block size {0} is not a power of two from 4K to 4M")]
    OutOfRange(u64),
}

/// Parses `4096`, `64K`, `64KiB`, `1M`, `2G`, `1T` (binary units) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let upper = s.to_ascii_uppercase();
    let trimmed = upper.trim_end_matches('B').trim_end_matches('I').to_string();
    let (num, shift) = match trimmed.chars().last()? {
        'K' => (&trimmed[..trimmed.len() - 1], 10),
        'M' => (&trimmed[..trimmed.len() - 1], 20),
        'G' => (&trimmed[..trimmed.len() - 1], 30),
        'T' => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed.as_str(), 0),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Disk size and block size together: everything that maps offsets to blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Geometry {
    /// Logical size of the disk in bytes.
    pub disk_bytes: u64,
    /// Block size.
    pub block_size: BlockSize,
}

impl Geometry {
    /// A geometry for a disk of `disk_bytes` with `block_size` blocks.
    pub fn new(disk_bytes: u64, block_size: BlockSize) -> Self {
        Geometry { disk_bytes, block_size }
    }

    /// Number of blocks; the last may be short.
    pub fn block_count(&self) -> u64 {
        self.disk_bytes.div_ceil(self.block_size.bytes())
    }

    /// Byte offset of block `index`.
    pub fn block_offset(&self, index: u64) -> u64 {
        index * self.block_size.bytes()
    }

    /// Length in bytes of block `index` (short for the last block, 0 past the end).
    pub fn block_len(&self, index: u64) -> u32 {
        let start = self.block_offset(index);
        if start >= self.disk_bytes {
            return 0;
        }
        (self.disk_bytes - start).min(self.block_size.bytes()) as u32
    }

    /// Blocks per region (a region covers about [`REGION_BYTES`], at least one chunk).
    pub fn region_blocks(&self) -> u64 {
        (REGION_BYTES / self.block_size.bytes()).max(CHUNK_BLOCKS)
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.block_count().div_ceil(self.region_blocks())
    }

    /// Block range `[first, end)` of region `region`.
    pub fn region_range(&self, region: u64) -> std::ops::Range<u64> {
        let per = self.region_blocks();
        let first = region * per;
        first.min(self.block_count())..((region + 1) * per).min(self.block_count())
    }

    /// The region holding block `index`.
    pub fn region_of(&self, index: u64) -> u64 {
        index / self.region_blocks()
    }
}

/// One committed state of a replica: a random 128-bit id chosen by the committer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u128);

impl Generation {
    /// 32 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0.to_be_bytes())
    }
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Generation({})", self.to_hex())
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Generation {
    type Err = InvalidGeneration;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_hex::<16>(s.trim()).map(|b| Generation(u128::from_be_bytes(b))).ok_or(InvalidGeneration)
    }
}

/// A string that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a generation is 32 hex digits")]
pub struct InvalidGeneration;

/// Identity of one transfer session, chosen by the source. Resuming does not
/// depend on it: a target reuses any staged blocks whose hashes still match.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SessionId(pub u128);

/// How trustworthy a committed generation is as a recovery point.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Consistency {
    /// Read from a running source that changed while it was read: not a recovery point.
    Fuzzy,
    /// Read from a point-in-time snapshot or a stopped source.
    Crash,
    /// A quiesce hook ran before the snapshot.
    App,
}

impl Consistency {
    /// Stable on-disk and wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            Consistency::Fuzzy => 0,
            Consistency::Crash => 1,
            Consistency::App => 2,
        }
    }

    /// Inverse of [`Consistency::to_u8`].
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Consistency::Fuzzy),
            1 => Some(Consistency::Crash),
            2 => Some(Consistency::App),
            _ => None,
        }
    }

    /// Name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Fuzzy => "fuzzy",
            Consistency::Crash => "crash-consistent",
            Consistency::App => "app-consistent",
        }
    }

    /// Whether a generation with this label may be offered as a recovery point.
    pub fn is_recovery_point(self) -> bool {
        self != Consistency::Fuzzy
    }
}

/// A target name as it travels on the wire: a plain identifier, never a path.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TargetName(String);

impl TargetName {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 128;

    /// Checked constructor: `[A-Za-z0-9._-]`, 1..=128 characters, not `.` or `..`.
    pub fn new(name: &str) -> Result<Self, InvalidTargetName> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name != "."
            && name != ".."
            && !name.contains("..")
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if ok {
            Ok(TargetName(name.to_string()))
        } else {
            Err(InvalidTargetName(name.chars().take(160).collect()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A target name with characters outside `[A-Za-z0-9._-]`, a `..`, or a bad length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("target name {0:?} is not a plain identifier ([A-Za-z0-9._-], no '..', 1-128 chars)")]
pub struct InvalidTargetName(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_zero_sees_any_set_byte() {
        for len in [0usize, 1, 31, 32, 33, 1024, 1025] {
            let mut hashes = vec![BlockHash::ZERO; len];
            assert!(BlockHash::all_zero(&hashes));
            for at in [0, len / 2, len.saturating_sub(1)] {
                for byte in [0, 17, 31] {
                    if len == 0 {
                        continue;
                    }
                    hashes[at].0[byte] = 0x80;
                    assert!(!BlockHash::all_zero(&hashes), "len {len} hash {at} byte {byte}");
                    hashes[at] = BlockHash::ZERO;
                }
            }
        }
    }

    #[test]
    fn block_size_bounds() {
        assert!(BlockSize::new(4096).is_ok());
        assert!(BlockSize::new(4 << 20).is_ok());
        assert!(BlockSize::new(2048).is_err());
        assert!(BlockSize::new(8 << 20).is_err());
        assert!(BlockSize::new(65535).is_err());
        assert_eq!("64K".parse::<BlockSize>().map(|b| b.get()), Ok(65536));
        assert_eq!("1MiB".parse::<BlockSize>().map(|b| b.get()), Ok(1 << 20));
        assert_eq!("4096".parse::<BlockSize>().map(|b| b.get()), Ok(4096));
        assert!("64Q".parse::<BlockSize>().is_err());
    }

    #[test]
    fn block_size_errors_say_what_was_given() {
        for (text, says) in
            [("abc", "\"abc\" is not a size"), ("-1", "\"-1\" is not a size"), ("3K", "block size 3072 ")]
        {
            let e = text.parse::<BlockSize>().expect_err(text).to_string();
            assert!(e.contains(says), "{text}: {e}");
            assert!(!e.contains("block size 0"), "{text}: {e}");
        }
    }

    #[test]
    fn geometry_short_last_block() {
        let g = Geometry::new(65536 * 3 + 1, BlockSize::DEFAULT);
        assert_eq!(g.block_count(), 4);
        assert_eq!(g.block_len(3), 1);
        assert_eq!(g.block_len(4), 0);
        assert_eq!(Geometry::new(0, BlockSize::DEFAULT).block_count(), 0);
        assert_eq!(g.region_count(), 1);
        let big = Geometry::new(1 << 40, BlockSize::DEFAULT);
        assert_eq!(big.region_blocks(), 1024);
        assert_eq!(big.region_count(), 16384);
        assert_eq!(big.region_range(16383), 16383 * 1024..16384 * 1024);
    }

    #[test]
    fn target_names() {
        for ok in ["vm1-disk0", "a", "x.y_z", "A9"] {
            assert!(TargetName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a..b", "a b", "é", &"x".repeat(129)] {
            assert!(TargetName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generation_hex_roundtrip() {
        let g = Generation(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(g.to_hex().parse::<Generation>(), Ok(g));
        assert!("xyz".parse::<Generation>().is_err());
    }
}
