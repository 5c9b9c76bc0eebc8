//! Storage behind one narrow synchronous interface.
//!
//! Everything the apply and recovery code does to a disk or a state file goes
//! through [`Storage`] (one open file or device) and [`Vfs`] (names, renames,
//! directory syncs). Production uses [`RealFs`]; the test kit adds an
//! in-memory filesystem and one that simulates power cuts, which is how the
//! commit protocol is proven crash-safe.

pub mod counting;
pub mod file;
mod trash;

pub use counting::CountingStorage;
pub use file::{boot_id, FileStorage, RealFs};
pub use trash::{unlink_in_background, wait_for_removals};

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// The I/O error for a path that is neither a regular file nor a block
/// device; [`crate::Error::io`] turns it into `E_NOT_A_DISK`.
#[derive(Debug)]
pub struct NotADisk;

impl fmt::Display for NotADisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a regular file or block device")
    }
}

impl std::error::Error for NotADisk {}

/// An `io::Error` carrying [`NotADisk`].
pub fn not_a_disk() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NotADisk)
}

/// What a path holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
}

impl DiskKind {
    /// Stable on-disk byte.
    pub fn to_u8(self) -> u8 {
        match self {
            DiskKind::File => 0,
            DiskKind::BlockDevice => 1,
        }
    }

    /// Inverse of [`DiskKind::to_u8`].
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(DiskKind::File),
            1 => Some(DiskKind::BlockDevice),
            _ => None,
        }
    }
}

/// What changes when something writes a disk: used to notice writes made
/// behind diskferry's back (divergence) and changes to a source while it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// A regular file: size, modification and change times, inode.
    File {
        /// Size in bytes.
        len: u64,
        /// mtime in nanoseconds since the epoch.
        mtime_ns: i64,
        /// ctime in nanoseconds since the epoch.
        ctime_ns: i64,
        /// Inode number.
        ino: u64,
    },
    /// A block device: the kernel's count of sectors written since boot.
    Device {
        /// `/proc/sys/kernel/random/boot_id`; the counter restarts at boot.
        boot_id: [u8; 16],
        /// Device number.
        rdev: u64,
        /// Sectors written, from `/sys/dev/block/MAJ:MIN/stat`.
        sectors_written: u64,
    },
}

/// Metadata of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// File or block device.
    pub kind: DiskKind,
    /// Size in bytes (a block device's capacity).
    pub len: u64,
    /// Write stamp.
    pub stamp: Stamp,
    /// What the name refers to: two names of one file or device are equal here.
    pub identity: FileId,
}

/// How to open a path. Opening for writing never follows a symlink in the
/// last component (paths are canonical, so one there was swapped in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenHow {
    /// Read only.
    Read,
    /// Read and write an existing file or device (block devices exclusively).
    ReadWrite,
    /// Create a new file (0600); fails if it exists.
    CreateNew,
    /// Create the file or truncate it to zero.
    Truncate,
}

/// One open file or block device.
///
/// Contract: reads and writes are positional and may run from several threads;
/// nothing written is durable until [`Storage::sync`] returns; writes may
/// reach the medium in any order and torn at sector boundaries.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `off`; fails if the range passes the end.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `off`, extending a file as needed.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Writes `bufs` back to back from `off`, with as few calls as the
    /// storage allows. `bypass_cache` asks for direct I/O where the storage
    /// has it and `off` and the buffers suit it
    /// ([`crate::aligned::is_direct_aligned`]): a full copy's data would only
    /// push the host's own pages out of its cache, and a fresh page-cache
    /// page can cost more CPU than the copy into it. Durability is as for
    /// any write: only after [`Storage::sync`].
    fn write_vectored_at(&self, off: u64, bufs: &[&[u8]], bypass_cache: bool) -> io::Result<()> {
        let _ = bypass_cache;
        let mut at = off;
        for b in bufs {
            self.write_at(at, b)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Reads up to `buf.len()` bytes from `off` and returns how many (fewer
    /// only at the end), past the page cache where the storage has direct
    /// I/O and `off` and `buf` suit it: a log read back once at a commit
    /// would only fill the cache with fresh pages, which can cost more CPU
    /// than the read itself.
    fn read_direct_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        read_up_to(self, off, buf)
    }
    /// Sets a file's size (zeros when growing). Block devices: `Unsupported`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[off, off+len)` read as zeros: punches a hole in a file,
    /// zeroes a block device range.
    fn zero_range(&self, off: u64, len: u64) -> io::Result<()>;
    /// Allocates space so later writes to `[off, off+len)` cannot fail with
    /// ENOSPC; never changes content or size.
    fn reserve(&self, off: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write and size change durable.
    fn sync(&self) -> io::Result<()>;
    /// The sub-ranges of `[off, off+len)` that may hold data (holes left out).
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(if len == 0 { Vec::new() } else { vec![(off, len)] })
    }
    /// Hint: start writing back `[off, off+len)` now, so the final sync is
    /// short, and drop it from the cache once clean (an image's bulk copy).
    fn start_writeback(&self, _off: u64, _len: u64) {}
    /// Hint: start writing `[off, off+len)` to the device now and keep it
    /// cached (a log read back at the commit, a range written in place).
    fn start_flush(&self, _off: u64, _len: u64) {}
    /// Hint: `[off, off+len)` will be read soon; start reading it now
    /// (scattered runs of an uncached file then wait on the device together,
    /// not one after the other).
    fn will_need(&self, _off: u64, _len: u64) {}
    /// What is open, as [`Meta::identity`] names it (`None`: this storage cannot tell).
    fn identity(&self) -> io::Result<Option<FileId>> {
        Ok(None)
    }
}

/// Which file or device a name refers to: `(st_dev, st_ino)` for a file,
/// `(st_rdev, u64::MAX)` for a block device.
pub type FileId = (u64, u64);

/// The name a file takes while [`Vfs::remove_later`] frees it.
pub const TRASH_PREFIX: &str = ".trash-";

/// [`Storage::read_direct_at`] through the cache: what lies before the end.
pub(crate) fn read_up_to(storage: &(impl Storage + ?Sized), off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let n = storage.len()?.saturating_sub(off).min(buf.len() as u64) as usize;
    storage.read_at(off, &mut buf[..n])?;
    Ok(n)
}

/// A filesystem namespace: opening, renaming, removing and syncing directories.
///
/// Contract: a create, rename or remove is durable only after
/// [`Vfs::sync_dir`] on the directory that holds the name.
pub trait Vfs: Send + Sync + fmt::Debug {
    /// Opens a file or block device.
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<Arc<dyn Storage>>;
    /// The file behind `path`, opened read-only, when it can be memory
    /// mapped for hashing (`None`: read it through [`Vfs::open`]).
    fn mappable(&self, _path: &Path) -> io::Result<Option<std::fs::File>> {
        Ok(None)
    }
    /// Metadata, or `None` if nothing is at `path`.
    fn metadata(&self, path: &Path) -> io::Result<Option<Meta>>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file; succeeds if it does not exist.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a file that nothing needs any more, like
    /// [`Vfs::remove_file`]: its name is gone on return (durable after
    /// [`Vfs::sync_dir`]), but freeing its blocks (tens of milliseconds for
    /// a large log on ext4) may be left to a background thread, under a
    /// name that starts with [`TRASH_PREFIX`]. A leftover of that name (the
    /// process exited first) is removed by passing it here again.
    fn remove_later(&self, path: &Path) -> io::Result<()> {
        self.remove_file(path)
    }
    /// Creates a directory and its parents (mode 0700).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the names in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// File names in `dir` (empty if it does not exist).
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Takes an exclusive lock on `path` (created if needed), held until the
    /// guard drops; a process that dies releases it. `WouldBlock` if held.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>>;
    /// Copies `from` to a new file `to` sharing blocks (reflink) where the
    /// filesystem can; `Ok(false)` when it cannot and the caller must copy.
    fn reflink(&self, _from: &Path, _to: &Path) -> io::Result<bool> {
        Ok(false)
    }
}

/// A stamp as stored (catalog, source history): `u8 kind (0 none, 1 file,
/// 2 device)` and 48 bytes (file: `u64 len · i64 mtime ns · i64 ctime ns ·
/// u64 inode · [16] 0`; device: `[16] boot id · u64 rdev · u64 sectors
/// written · [16] 0`).
pub(crate) fn encode_stamp(stamp: Option<Stamp>) -> (u8, [u8; 48]) {
    let mut b = [0u8; 48];
    let kind = match stamp {
        None => 0,
        Some(Stamp::File { len, mtime_ns, ctime_ns, ino }) => {
            b[0..8].copy_from_slice(&len.to_le_bytes());
            b[8..16].copy_from_slice(&mtime_ns.to_le_bytes());
            b[16..24].copy_from_slice(&ctime_ns.to_le_bytes());
            b[24..32].copy_from_slice(&ino.to_le_bytes());
            1
        }
        Some(Stamp::Device { boot_id, rdev, sectors_written }) => {
            b[0..16].copy_from_slice(&boot_id);
            b[16..24].copy_from_slice(&rdev.to_le_bytes());
            b[24..32].copy_from_slice(&sectors_written.to_le_bytes());
            2
        }
    };
    (kind, b)
}

/// The inverse of [`encode_stamp`]; `None` for an unknown kind.
pub(crate) fn decode_stamp(kind: u8, bytes: &[u8]) -> Option<Option<Stamp>> {
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    let i64_at = |at: usize| Some(i64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    Some(match kind {
        0 => None,
        1 => Some(Stamp::File { len: u64_at(0)?, mtime_ns: i64_at(8)?, ctime_ns: i64_at(16)?, ino: u64_at(24)? }),
        2 => Some(Stamp::Device {
            boot_id: bytes.get(0..16)?.try_into().ok()?,
            rdev: u64_at(16)?,
            sectors_written: u64_at(24)?,
        }),
        _ => return None,
    })
}

pub(crate) fn put_str(b: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let n = bytes.len().min(u16::MAX as usize);
    b.extend_from_slice(&(n as u16).to_le_bytes());
    b.extend_from_slice(&bytes[..n]);
}

/// The state subdirectory name for a disk path (its target state, its
/// history): readable, and unique per path.
pub fn state_key(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(40)
        .collect();
    let digest = blake3::hash(path.as_os_str().as_bytes());
    format!("{name}-{}", diskferry_protocol::to_hex(&digest.as_bytes()[..8]))
}
