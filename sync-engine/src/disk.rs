//! Reading a disk for hashing: memory-mapped, with a `pread` fallback.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::aligned::{AlignedVec, DIRECT_ALIGN};
use crate::store::{file::FileStorage, DiskKind, OpenHow, Storage, Vfs};

/// A disk opened for reading: a file, a block device or any [`Storage`].
#[derive(Debug)]
pub struct Disk {
    backing: Backing,
    kind: DiskKind,
    len: u64,
    /// Read once and never again (a snapshot taken for one push): reads
    /// that copy go past the page cache ([`Disk::read_once`]).
    read_once: bool,
}

#[derive(Debug)]
enum Backing {
    /// Read through short-lived memory maps (no copy).
    Mapped(File, Arc<FileStorage>),
    /// Read with `pread` into a buffer.
    Read(Arc<dyn Storage>),
}

impl Disk {
    /// Opens a file or block device, reading it through memory maps.
    pub fn open(path: &Path) -> io::Result<Disk> {
        Self::mapped(File::open(path)?)
    }

    /// Opens `path` on any filesystem: memory-mapped where the filesystem
    /// hands out a real file, else read through its [`Storage`].
    pub fn open_on(vfs: &dyn Vfs, path: &Path) -> io::Result<Disk> {
        if let Some(file) = vfs.mappable(path)? {
            return Self::mapped(file);
        }
        let meta = vfs.metadata(path)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Disk::from_storage(vfs.open(path, OpenHow::Read)?, meta.kind, meta.len))
    }

    fn mapped(file: File) -> io::Result<Disk> {
        let (file, kind, len) = describe(file)?;
        let storage = Arc::new(FileStorage::new(file.try_clone()?)?);
        Ok(Disk { backing: Backing::Mapped(file, storage), kind, len, read_once: false })
    }

    /// Opens a file or block device, reading it with `pread` (no memory maps).
    pub fn open_unmapped(path: &Path) -> io::Result<Disk> {
        let (file, kind, len) = describe(File::open(path)?)?;
        Ok(Disk { backing: Backing::Read(Arc::new(FileStorage::new(file)?)), kind, len, read_once: false })
    }

    /// The same disk read with `pread`. For scattered reads of a file whose
    /// pages are not cached (a hint's dirty runs in a fresh reflink
    /// snapshot): a fault in a memory map reads around it, in large folios
    /// on XFS, and zeroed the holes around each 64 KiB block (1.5 s of CPU
    /// for 41 MiB of a 4 GiB image); a `pread` reads about what it asks.
    pub fn unmapped(&self) -> Disk {
        let storage: Arc<dyn Storage> = match &self.backing {
            Backing::Mapped(_, s) => s.clone(),
            Backing::Read(s) => s.clone(),
        };
        Disk { backing: Backing::Read(storage), kind: self.kind, len: self.len, read_once: self.read_once }
    }

    /// The same disk, whose reads into a buffer (a hint's dirty runs, the
    /// spot check, blocks read again to send them) go past the page cache.
    /// For a snapshot taken for one push: a new inode (or device) that
    /// nothing has cached and nobody reads again, so caching its pages only
    /// evicts others; and filling fresh cache pages can cost more than the
    /// read itself (this VM: 390 ms for 655 blocks of a fresh reflink
    /// snapshot read buffered, 29–41 ms read direct). Reads through the map
    /// (a full read) stay as they are: they are shared without a copy.
    pub fn read_once(mut self) -> Disk {
        self.read_once = true;
        self
    }

    /// A disk backed by any storage (tests, simulated filesystems).
    pub fn from_storage(storage: Arc<dyn Storage>, kind: DiskKind, len: u64) -> Disk {
        Disk { backing: Backing::Read(storage), kind, len, read_once: false }
    }

    /// Size in bytes when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// File or block device.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    fn storage(&self) -> &dyn Storage {
        match &self.backing {
            Backing::Mapped(_, s) => s.as_ref(),
            Backing::Read(s) => s.as_ref(),
        }
    }

    /// Sub-ranges of `[off, off+len)` that may hold data; holes are left out.
    pub fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        self.storage().data_ranges(off, len)
    }

    /// Hint: `[off, off+len)` will be read soon (see [`Storage::will_need`]).
    /// A disk read once reads past the cache, so this does nothing there:
    /// reading ahead would fill the cache the direct read then bypasses.
    pub fn will_need(&self, off: u64, len: u64) {
        if !self.read_once {
            self.storage().will_need(off, len);
        }
    }

    /// Reads `buf.len()` bytes at `off` with a copy.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.read_once {
            return self.storage().read_at(off, buf);
        }
        if crate::aligned::is_direct_aligned(off, &[&*buf]) {
            let got = self.storage().read_direct_at(off, buf)?;
            return if got < buf.len() { Err(ends_before(off, buf.len())) } else { Ok(()) };
        }
        self.read_direct(off, buf.len(), |bytes| buf.copy_from_slice(bytes))
    }

    /// Calls `f` with `[off, off+len)` read past the page cache (where the
    /// storage can) into this thread's aligned buffer.
    fn read_direct<R>(&self, off: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
        thread_local! {
            static ALIGNED: Cell<Option<AlignedVec>> = const { Cell::new(None) };
        }
        let whole = len.next_multiple_of(DIRECT_ALIGN);
        // Taken out while in use: a read nested in `f` gets a buffer of its own.
        let mut buf = ALIGNED.take().filter(|b| b.as_slice().len() >= whole).unwrap_or_else(|| AlignedVec::new(whole));
        let got = self.storage().read_direct_at(off, &mut buf.as_mut_slice()[..whole])?;
        if got < len {
            return Err(ends_before(off, len));
        }
        let r = f(&buf.as_slice()[..len]);
        ALIGNED.set(Some(buf));
        Ok(r)
    }

    /// Calls `f` with the bytes `[off, off+len)`: borrowed from a map when the
    /// disk is mapped (then also as shared [`Bytes`] that keep the map alive,
    /// for senders that pass them on without a copy), else read into `scratch`.
    ///
    /// A file that shrank below its size at open, while or before its bytes
    /// were read, fails with [`source_changed`]: the bytes `f` saw are then
    /// not the file's, and its result must not be used.
    pub fn with_bytes<R>(
        &self,
        off: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        f: impl FnOnce(&[u8], Option<&Bytes>) -> R,
    ) -> io::Result<R> {
        if len == 0 {
            return Ok(f(&[], None));
        }
        if let Backing::Mapped(file, _) = &self.backing {
            if let Ok(map) = crate::mmap::map_range(file, off, len) {
                let flag = map.fault_flag();
                let shared = Bytes::from_owner(map);
                let r = f(&shared, Some(&shared));
                // `shared` still owns the map, so its mark is still ours to read.
                if flag.faulted() {
                    return Err(source_changed("it was truncated while it was read"));
                }
                self.check_size()?;
                return Ok(r);
            }
        }
        if self.read_once {
            let r = self.read_direct(off, len, |bytes| f(bytes, None))?;
            self.check_size()?;
            return Ok(r);
        }
        scratch.resize(len, 0);
        self.read_at(off, &mut scratch[..len])?;
        let r = f(&scratch[..len], None);
        self.check_size()?;
        Ok(r)
    }

    /// Fails with [`source_changed`] if a file is now shorter than at open
    /// (its holes then hide vanished data). Devices do not shrink in use.
    pub fn check_size(&self) -> io::Result<()> {
        let Backing::Mapped(file, _) = &self.backing else { return Ok(()) };
        if self.kind != DiskKind::File {
            return Ok(());
        }
        let now = file.metadata()?.len();
        if now < self.len {
            return Err(source_changed(&format!("it shrank from {} to {now} bytes while it was read", self.len)));
        }
        Ok(())
    }
}

/// Why a disk's bytes cannot be trusted any more: it shrank or was replaced
/// while read. [`crate::Error::io`] turns it into `E_SOURCE_CHANGED`.
#[derive(Debug)]
pub struct SourceChanged(pub String);

impl std::fmt::Display for SourceChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceChanged {}

/// An `io::Error` carrying [`SourceChanged`].
pub fn source_changed(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, SourceChanged(why.to_string()))
}

/// A direct read came back short: the disk ends before what was asked.
fn ends_before(off: u64, len: usize) -> io::Error {
    source_changed(&format!("it ends before byte {} (read at {off})", off + len as u64))
}

fn describe(mut file: File) -> io::Result<(File, DiskKind, u64)> {
    let md = file.metadata()?;
    let kind = if md.is_file() {
        DiskKind::File
    } else if std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()) {
        DiskKind::BlockDevice
    } else {
        return Err(crate::store::not_a_disk());
    };
    let len = match kind {
        DiskKind::File => md.len(),
        DiskKind::BlockDevice => file.seek(SeekFrom::End(0))?,
    };
    Ok((file, kind, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_read_once_reads_the_same_bytes_past_the_cache_and_notices_a_shorter_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.img");
        // Not a whole number of pages: the last read is rounded up and cut.
        let bytes: Vec<u8> = (0..(3 * 65536 + 1000) as u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let disk = Disk::open(&path).unwrap().read_once();
        let mut buf = vec![0u8; 65536];
        disk.read_at(65536, &mut buf).unwrap();
        assert_eq!(buf, bytes[65536..2 * 65536]);
        // An aligned buffer is read into as it is.
        let mut aligned = AlignedVec::new(65536);
        disk.read_at(2 * 65536, aligned.as_mut_slice()).unwrap();
        assert_eq!(aligned.as_slice(), &bytes[2 * 65536..3 * 65536]);
        let unmapped = disk.unmapped();
        let tail =
            unmapped.with_bytes(3 * 65536, 1000, &mut Vec::new(), |b, shared| (b.to_vec(), shared.is_some())).unwrap();
        assert_eq!(tail, (bytes[3 * 65536..].to_vec(), false));
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(65536).unwrap();
        let err = unmapped.with_bytes(2 * 65536, 65536, &mut Vec::new(), |_, _| ()).unwrap_err();
        assert!(err.get_ref().is_some_and(|e| e.is::<SourceChanged>()), "{err}");
        let err = disk.read_at(65536, aligned.as_mut_slice()).unwrap_err();
        assert!(err.get_ref().is_some_and(|e| e.is::<SourceChanged>()), "{err}");
    }
}
