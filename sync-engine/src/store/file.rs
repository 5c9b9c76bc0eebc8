//! [`Storage`] and [`Vfs`] over the real filesystem and block devices.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom};
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{FallocateFlags, FlockOperation};

use super::{DiskKind, Meta, OpenHow, Stamp, Storage, Vfs};
use crate::aligned::is_direct_aligned;

/// The error for a write through a symlink (`ELOOP` says too little).
#[derive(Debug)]
pub struct SymlinkRefused;

impl std::fmt::Display for SymlinkRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refusing to write through a symlink")
    }
}

impl std::error::Error for SymlinkRefused {}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

/// An open regular file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    kind: DiskKind,
    /// A second open of the same file with `O_DIRECT`, made on the first
    /// write that asks for it (`None`: the filesystem has no direct I/O).
    direct: OnceLock<Option<File>>,
    /// Its read-only `O_DIRECT` twin, for reads past the cache.
    direct_reader: OnceLock<Option<File>>,
    /// Set when the kernel refused a direct write: buffered from then on.
    direct_refused: AtomicBool,
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> io::Result<Self> {
        let kind = kind_of(&file.metadata()?.file_type())?;
        Ok(FileStorage {
            file,
            kind,
            direct: OnceLock::new(),
            direct_reader: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        })
    }

    /// The `O_DIRECT` twin of the file, if the filesystem has direct I/O.
    /// `O_DIRECT` belongs to an open file description, so it is a second
    /// open (through `/proc/self/fd`: the same inode, never a path that
    /// could have been swapped since), and the first keeps buffered reads.
    fn direct_file(&self) -> Option<&File> {
        self.twin(&self.direct, true)
    }

    /// The read-only `O_DIRECT` twin (the file may be open read-only).
    fn direct_reader(&self) -> Option<&File> {
        self.twin(&self.direct_reader, false)
    }

    fn twin<'a>(&'a self, slot: &'a OnceLock<Option<File>>, write: bool) -> Option<&'a File> {
        if self.direct_refused.load(Ordering::Relaxed) {
            return None;
        }
        slot.get_or_init(|| {
            // A twin opened by path could write a file opened read-only.
            let mode = rustix::fs::fcntl_getfl(&self.file).ok()?;
            if write && mode.intersection(rustix::fs::OFlags::ACCMODE) == rustix::fs::OFlags::RDONLY {
                return None;
            }
            let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
            let twin = OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(proc_path)
                .ok()?;
            let (a, b) = (twin.metadata().ok()?, self.file.metadata().ok()?);
            (a.dev() == b.dev() && a.ino() == b.ino() && a.rdev() == b.rdev()).then_some(twin)
        })
        .as_ref()
    }

    fn write_zeros(&self, off: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Writes all of `bufs` from `off` to `file` (see [`write_all_vectored`]).
fn pwritev_all(file: &File, off: u64, bufs: &[&[u8]]) -> io::Result<()> {
    write_all_vectored(off, bufs, |slices, at| match rustix::io::pwritev(file, slices, at) {
        Err(rustix::io::Errno::INTR) => Ok(None),
        r => r.map(Some).map_err(io::Error::from),
    })
}

/// Writes all of `bufs` from `off` with `writev(slices, offset)`, which
/// returns how much it wrote (`None`: interrupted, try again). A short
/// write (a signal, a nearly full disk) continues where it stopped, so the
/// range either all lands or the error that stopped it comes back
/// (`ENOSPC`, `EIO`; a write of nothing is `WriteZero`).
fn write_all_vectored(
    mut off: u64,
    bufs: &[&[u8]],
    mut writev: impl FnMut(&[IoSlice<'_>], u64) -> io::Result<Option<usize>>,
) -> io::Result<()> {
    // At most IOV_MAX (1024) slices per call.
    for group in bufs.chunks(1024) {
        let mut slices: Vec<IoSlice<'_>> = group.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match writev(rest, off)? {
                None => {}
                Some(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the write stopped short")),
                Some(n) => {
                    off += n as u64;
                    IoSlice::advance_slices(&mut rest, n);
                }
            }
        }
    }
    Ok(())
}

fn kind_of(ft: &fs::FileType) -> io::Result<DiskKind> {
    if ft.is_file() {
        Ok(DiskKind::File)
    } else if ft.is_block_device() {
        Ok(DiskKind::BlockDevice)
    } else {
        Err(super::not_a_disk())
    }
}

fn unsupported(e: &rustix::io::Errno) -> bool {
    *e == rustix::io::Errno::OPNOTSUPP || *e == rustix::io::Errno::NOSYS || *e == rustix::io::Errno::INVAL
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        match self.kind {
            DiskKind::File => Ok(self.file.metadata()?.len()),
            // A block device reports size 0 in stat; seeking to the end gives its capacity.
            DiskKind::BlockDevice => (&self.file).seek(SeekFrom::End(0)),
        }
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn write_vectored_at(&self, off: u64, bufs: &[&[u8]], bypass_cache: bool) -> io::Result<()> {
        if bypass_cache && is_direct_aligned(off, bufs) {
            if let Some(direct) = self.direct_file() {
                match pwritev_all(direct, off, bufs) {
                    Ok(()) => return Ok(()),
                    // EINVAL: this file or device wants another alignment
                    // (or none at all): buffered from now on; the retry
                    // below rewrites the whole range.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        pwritev_all(&self.file, off, bufs)
    }

    fn read_direct_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        if is_direct_aligned(off, &[buf]) {
            if let Some(direct) = self.direct_reader() {
                let mut done = 0;
                loop {
                    match direct.read_at(&mut buf[done..], off + done as u64) {
                        Ok(0) => return Ok(done),
                        Ok(n) => {
                            done += n;
                            // Direct reads move whole sectors: a short one
                            // stopped at the end of the file.
                            if done == buf.len() || !done.is_multiple_of(crate::aligned::DIRECT_ALIGN) {
                                return Ok(done);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) && done == 0 => {
                            self.direct_refused.store(true, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        super::read_up_to(self, off, buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.kind {
            DiskKind::File => self.file.set_len(len),
            DiskKind::BlockDevice => Err(io::Error::new(io::ErrorKind::Unsupported, "cannot resize a block device")),
        }
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let flags = match self.kind {
            DiskKind::File => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            DiskKind::BlockDevice => FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        };
        match rustix::fs::fallocate(&self.file, flags, off, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => self.write_zeros(off, len),
            Err(e) => Err(e.into()),
        }
    }

    fn reserve(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 || self.kind == DiskKind::BlockDevice {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.file, FallocateFlags::KEEP_SIZE, off, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let end = off + len;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.kind == DiskKind::BlockDevice {
            return Ok(vec![(off, len)]);
        }
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                // Filesystems without SEEK_DATA: everything may be data.
                Err(e) if unsupported(&e) => {
                    out.push((pos, end - pos));
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(data)) {
                Ok(h) => h.min(end),
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(out)
    }

    fn identity(&self) -> io::Result<Option<super::FileId>> {
        let md = self.file.metadata()?;
        Ok(Some(file_id(&md)))
    }

    fn start_writeback(&self, off: u64, len: u64) {
        // DONTNEED starts asynchronous writeback of the dirty range (and drops
        // clean pages), so the commit's fsync finds little left to write.
        if let Some(len) = NonZeroU64::new(len) {
            let _ = rustix::fs::fadvise(&self.file, off, Some(len), rustix::fs::Advice::DontNeed);
        }
    }

    fn will_need(&self, off: u64, len: u64) {
        if let Some(len) = NonZeroU64::new(len) {
            let _ = rustix::fs::fadvise(&self.file, off, Some(len), rustix::fs::Advice::WillNeed);
        }
    }

    // The crate's one libc call outside `mmap.rs`: rustix has no
    // sync_file_range, and nix (which has) is not worth a dependency for it.
    #[allow(unsafe_code)]
    fn start_flush(&self, off: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else { return };
        // WRITE starts writeback of the range's dirty pages without waiting
        // for it or dropping them; a hint, so a failure changes nothing.
        // SAFETY: plain integers and an fd this storage owns; no memory is passed.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

/// This boot's id; block-device write counters restart at each boot.
pub fn boot_id() -> io::Result<[u8; 16]> {
    let s = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    diskferry_protocol::from_hex::<16>(&hex)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable boot_id"))
}

fn device_stamp(path: &Path, md: &fs::Metadata) -> io::Result<Stamp> {
    // Flush the device's page cache first: writes still dirty there are not
    // yet in the counter.
    File::open(path)?.sync_all()?;
    let rdev = md.rdev();
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let stat = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))?;
    let sectors_written = stat
        .split_whitespace()
        .nth(6)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable block device stat"))?;
    Ok(Stamp::Device { boot_id: boot_id()?, rdev, sectors_written })
}

/// The identity of what `md` describes (see [`super::Meta::identity`]).
pub fn file_id(md: &fs::Metadata) -> super::FileId {
    if md.file_type().is_block_device() {
        (md.rdev(), u64::MAX)
    } else {
        (md.dev(), md.ino())
    }
}

fn file_stamp(md: &fs::Metadata) -> Stamp {
    Stamp::File {
        len: md.len(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        ino: md.ino(),
    }
}

impl Vfs for RealFs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<Arc<dyn Storage>> {
        let mut o = OpenOptions::new();
        // Written paths are canonical: a symlink in their last component was
        // swapped in later, and writing through it could reach any file.
        let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
        match how {
            OpenHow::Read => {
                o.read(true);
            }
            OpenHow::ReadWrite => {
                o.read(true).write(true);
                let md = fs::symlink_metadata(path)?;
                if md.file_type().is_symlink() {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, SymlinkRefused));
                }
                if md.file_type().is_block_device() {
                    // One writer per device: O_EXCL fails with EBUSY while another
                    // process (or a mount) holds it, and dies with the process.
                    o.custom_flags(nofollow | rustix::fs::OFlags::EXCL.bits() as i32);
                } else {
                    o.custom_flags(nofollow);
                }
            }
            OpenHow::CreateNew => {
                o.read(true).write(true).create_new(true).mode(0o600);
            }
            OpenHow::Truncate => {
                o.read(true).write(true).create(true).truncate(true).mode(0o600).custom_flags(nofollow);
            }
        }
        Ok(Arc::new(FileStorage::new(o.open(path)?)?))
    }

    fn mappable(&self, path: &Path) -> io::Result<Option<File>> {
        File::open(path).map(Some)
    }

    fn metadata(&self, path: &Path) -> io::Result<Option<Meta>> {
        let md = match fs::metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let kind = kind_of(&md.file_type())?;
        Ok(Some(match kind {
            DiskKind::File => Meta { kind, len: md.len(), stamp: file_stamp(&md), identity: file_id(&md) },
            DiskKind::BlockDevice => {
                let len = File::open(path)?.seek(SeekFrom::End(0))?;
                Meta { kind, len, stamp: device_stamp(path, &md)?, identity: file_id(&md) }
            }
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn remove_later(&self, path: &Path) -> io::Result<()> {
        super::trash::remove_later(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in rd {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Box::new(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            Err(e) => Err(e.into()),
        }
    }

    fn reflink(&self, from: &Path, to: &Path) -> io::Result<bool> {
        let src = File::open(from)?;
        if !src.metadata()?.is_file() {
            return Ok(false);
        }
        let dst = OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
        match rustix::fs::ioctl_ficlone(&dst, &src) {
            Ok(()) => Ok(true),
            Err(_) => {
                drop(dst);
                fs::remove_file(to)?;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::BufferPool;

    /// A `writev` into `disk` that writes at most `most` bytes per call and
    /// fails with `fail_at` once the offset reaches it.
    fn short_writer<'a>(
        disk: &'a mut Vec<u8>,
        most: usize,
        fail_at: Option<u64>,
    ) -> impl FnMut(&[IoSlice<'_>], u64) -> io::Result<Option<usize>> + 'a {
        let mut calls = 0;
        move |slices, off| {
            calls += 1;
            if calls % 3 == 0 {
                return Ok(None); // interrupted
            }
            if fail_at.is_some_and(|f| off >= f) {
                return Err(io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()));
            }
            let mut n = 0;
            for s in slices {
                let take = s.len().min(most - n);
                let at = off as usize + n;
                if disk.len() < at + take {
                    disk.resize(at + take, 0);
                }
                disk[at..at + take].copy_from_slice(&s[..take]);
                n += take;
                if n == most {
                    break;
                }
            }
            Ok(Some(n))
        }
    }

    #[test]
    fn short_writes_continue_and_failures_are_reported() {
        let bufs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; 1000 + i as usize * 777]).collect();
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        let want: Vec<u8> = [vec![0u8; 100], bufs.concat()].concat();
        for most in [1, 999, 1000, 4096, 100_000] {
            let mut disk = Vec::new();
            write_all_vectored(100, &slices, short_writer(&mut disk, most, None)).unwrap();
            assert_eq!(disk, want, "at most {most} bytes per write");
        }
        // The disk fills up part way: the error comes back, not success.
        let mut disk = Vec::new();
        let e = write_all_vectored(100, &slices, short_writer(&mut disk, 1500, Some(3000))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::NOSPC.raw_os_error()));
        // A write that writes nothing is an error too, not a hang.
        let e = write_all_vectored(0, &slices, |_, _| Ok(Some(0))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn vectored_writes_land_direct_or_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let disk = FileStorage::new(file).unwrap();
        let pool = BufferPool::new(8192, 1 << 20);
        let a = pool.filled(8192, |b| b.fill(1));
        let b = pool.filled(4096, |b| b.fill(2));
        // Aligned: past the page cache where the filesystem allows it.
        disk.write_vectored_at(4096, &[&a, &b], true).unwrap();
        // Unaligned (offset and buffers): through the page cache.
        let c = vec![3u8; 1000];
        disk.write_vectored_at(20_000, &[&c[..10], &c[10..]], true).unwrap();
        let got = std::fs::read(&path).unwrap();
        let mut want = vec![0u8; 21_000];
        want[4096..12288].fill(1);
        want[12288..16384].fill(2);
        want[20_000..].fill(3);
        assert_eq!(got, want);
        let mut back = vec![0u8; 4096];
        disk.read_at(12288, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 2), "buffered reads see direct writes");
    }

    #[test]
    fn direct_reads_stop_at_the_end_and_see_cached_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut want = vec![0u8; 3 * 4096 + 100];
        want.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        std::fs::write(&path, &want).unwrap();
        // Read-only, as a log is opened for its replay.
        let disk = FileStorage::new(File::open(&path).unwrap()).unwrap();
        // Written through the cache a moment ago, read past it (or through
        // it where the filesystem has no direct I/O): the same bytes.
        let mut buf = crate::aligned::AlignedVec::new(5 * 4096);
        assert_eq!(disk.read_direct_at(0, buf.as_mut_slice()).unwrap(), want.len());
        assert_eq!(&buf.as_slice()[..want.len()], &want[..]);
        assert_eq!(disk.read_direct_at(8192, buf.as_mut_slice()).unwrap(), want.len() - 8192);
        assert_eq!(&buf.as_slice()[..want.len() - 8192], &want[8192..]);
        assert_eq!(disk.read_direct_at(4 * 4096, buf.as_mut_slice()).unwrap(), 0, "past the end");
        // Off the page grid: through the cache, same answer.
        assert_eq!(disk.read_direct_at(5, &mut buf.as_mut_slice()[..100]).unwrap(), 100);
        assert_eq!(&buf.as_slice()[..100], &want[5..105]);
        // A file opened read-only stays read-only past the cache too (its
        // direct twin is opened by path, which would allow a write).
        let page = crate::aligned::AlignedVec::new(4096);
        assert!(disk.write_vectored_at(0, &[page.as_slice()], true).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
