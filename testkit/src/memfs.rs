//! [`MemFs`]: an in-memory [`Vfs`] whose files track holes and whose stamps
//! come from a logical clock.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use diskferry_sync_engine::store::{DiskKind, Meta, OpenHow, Stamp, Storage, Vfs};

use crate::crashlog::CrashLog;
use crate::model::{apply_ns, normalize, split, DataOp, Entries, Image, Inode, Node, NsOp};

/// First value of the logical clock (any positive number would do).
const CLOCK_START: i64 = 1_000_000;

/// An in-memory filesystem: directories, sparse files and simulated block
/// devices, all in one process.
///
/// - Files track holes per 4 KiB page: `data_ranges` leaves out pages never
///   written or punched by `zero_range` (partial pages stay, zeroed).
/// - `metadata` gives [`Stamp::File`] whose mtime/ctime come from a logical
///   counter bumped by every write, `set_len` and `zero_range` (`reserve`
///   bumps ctime only), and whose `ino` is the inode number.
/// - [`MemFs::add_block_device`] registers a fixed-size device
///   ([`DiskKind::BlockDevice`]): `set_len` is `Unsupported`, writes past its
///   end fail, and its [`Stamp::Device`] counts 512-byte sectors written.
/// - `lock` is an in-process exclusive lock per path, released on drop.
/// - Reads past the end fail with `UnexpectedEof`, like `read_exact_at`.
///
/// Cloning a `MemFs` shares it; [`MemFs::snapshot`] copies it.
///
/// ```
/// use std::path::Path;
/// use diskferry_sync_engine::store::{OpenHow, Vfs};
/// use diskferry_testkit::MemFs;
///
/// let fs = MemFs::new();
/// fs.create_dir_all(Path::new("/disks")).unwrap();
/// let f = fs.open(Path::new("/disks/a.img"), OpenHow::CreateNew).unwrap();
/// f.set_len(1 << 20).unwrap();
/// f.write_at(8192, b"hello").unwrap();
/// assert_eq!(f.data_ranges(0, 1 << 20).unwrap(), vec![(8192, 4096)]);
/// ```
#[derive(Clone)]
pub struct MemFs {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    core: Mutex<Core>,
    locks: Mutex<HashSet<PathBuf>>,
}

/// Everything behind the filesystem's lock.
pub(crate) struct Core {
    /// What the code under test sees.
    pub live: Image,
    pub next_ino: u64,
    pub clock: i64,
    /// Boot counter: block-device stamps carry it as their boot id.
    pub boot: u64,
    /// Present on a [`crate::CrashFs`]: the durable shadow and unsynced operations.
    pub log: Option<CrashLog>,
}

impl fmt::Debug for MemFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.core();
        f.debug_struct("MemFs").field("dirs", &core.live.dirs.len()).field("inodes", &core.live.inodes.len()).finish()
    }
}

impl Default for MemFs {
    fn default() -> Self {
        MemFs::new()
    }
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

fn is_a_directory() -> io::Error {
    io::Error::from_raw_os_error(21)
}

fn not_a_directory() -> io::Error {
    io::Error::from_raw_os_error(20)
}

impl MemFs {
    /// An empty filesystem holding only `/`.
    pub fn new() -> MemFs {
        MemFs::from_core(Core { live: Image::new(), next_ino: 2, clock: CLOCK_START, boot: 1, log: None })
    }

    pub(crate) fn from_core(core: Core) -> MemFs {
        MemFs { shared: Arc::new(Shared { core: Mutex::new(core), locks: Mutex::new(HashSet::new()) }) }
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        self.shared.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An independent copy of the current state (no locks held, no crash log).
    pub fn snapshot(&self) -> MemFs {
        let core = self.core();
        MemFs::from_core(Core {
            live: core.live.clone(),
            next_ino: core.next_ino,
            clock: core.clock,
            boot: core.boot,
            log: None,
        })
    }

    /// Creates a simulated block device of `size` bytes (zero-filled) at
    /// `path`, whose parent directory must exist.
    pub fn add_block_device(&self, path: &Path, size: u64) -> io::Result<()> {
        let path = normalize(path);
        let mut core = self.core();
        if core.live.lookup(&path).is_some() {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        core.create(&path, |now| Inode::device(size, now)).map(|_| ())
    }

    /// The boot id block-device stamps carry (it changes at every crash).
    pub fn boot_id(&self) -> [u8; 16] {
        boot_id(self.core().boot)
    }
}

fn boot_id(boot: u64) -> [u8; 16] {
    let mut id = *b"memfs-boot\0\0\0\0\0\0";
    id[10..16].copy_from_slice(&boot.to_le_bytes()[..6]);
    id
}

impl Core {
    fn tick(&mut self) -> i64 {
        self.clock += 1;
        self.clock
    }

    fn inode(&self, ino: u64) -> io::Result<&Inode> {
        self.live.inodes.get(&ino).ok_or_else(not_found)
    }

    fn inode_mut(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.live.inodes.get_mut(&ino).ok_or_else(not_found)
    }

    /// The entries of an existing directory.
    fn dir(&self, dir: &Path) -> io::Result<&Entries> {
        match self.live.lookup(dir) {
            Some(Node::Dir) => self.live.dirs.get(dir).ok_or_else(not_found),
            Some(Node::File(_)) => Err(not_a_directory()),
            None => Err(not_found()),
        }
    }

    /// Applies a namespace operation live and records it.
    fn ns(&mut self, dir: &Path, op: NsOp) {
        if let Some(entries) = self.live.dirs.get_mut(dir) {
            apply_ns(entries, &op);
        }
        if let Some(log) = &mut self.log {
            log.names(dir, op);
        }
    }

    /// Applies a data operation live and records it (only if it succeeded).
    fn data(&mut self, ino: u64, op: DataOp) -> io::Result<()> {
        let now = self.tick();
        let inode = self.inode_mut(ino)?;
        match &op {
            DataOp::Write { off, bytes } => inode.write(*off, bytes)?,
            DataOp::SetLen(len) => inode.set_len(*len)?,
            DataOp::Zero { off, len } => inode.zero(*off, *len),
        }
        inode.mtime = now;
        inode.ctime = now;
        if let Some(log) = &mut self.log {
            log.data(ino, op);
        }
        Ok(())
    }

    fn create(&mut self, path: &Path, make: impl FnOnce(i64) -> Inode) -> io::Result<u64> {
        let (parent, name) = split(path).ok_or_else(is_a_directory)?;
        self.dir(&parent)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let inode = make(self.tick());
        if let Some(log) = &mut self.log {
            log.created(ino, &inode);
        }
        self.live.inodes.insert(ino, inode);
        self.ns(&parent, NsOp::Link { name, node: Node::File(ino) });
        Ok(ino)
    }

    fn file(&self, path: &Path) -> io::Result<Option<u64>> {
        match self.live.lookup(path) {
            Some(Node::File(ino)) => Ok(Some(ino)),
            Some(Node::Dir) => Err(is_a_directory()),
            None => Ok(None),
        }
    }

    fn meta(&self, ino: u64) -> io::Result<Meta> {
        let inode = self.inode(ino)?;
        Ok(if inode.device {
            Meta {
                kind: DiskKind::BlockDevice,
                len: inode.len(),
                stamp: Stamp::Device { boot_id: boot_id(self.boot), rdev: ino, sectors_written: inode.sectors_written },
                identity: (0, ino),
            }
        } else {
            Meta {
                kind: DiskKind::File,
                len: inode.len(),
                stamp: Stamp::File { len: inode.len(), mtime_ns: inode.mtime, ctime_ns: inode.ctime, ino },
                identity: (0, ino),
            }
        })
    }
}

/// An open file or device of a [`MemFs`].
struct MemFile {
    fs: MemFs,
    ino: u64,
    writable: bool,
    path: PathBuf,
}

impl fmt::Debug for MemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemFile").field("path", &self.path).field("ino", &self.ino).finish()
    }
}

impl MemFile {
    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "file opened read-only"))
        }
    }
}

impl Storage for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.fs.core().inode(self.ino)?.len())
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.fs.core().inode(self.ino)?.read(off, buf)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.writable()?;
        let mut core = self.fs.core();
        if core.log.is_none() {
            // Fast path: no copy of the bytes to record.
            let now = core.tick();
            let inode = core.inode_mut(self.ino)?;
            inode.write(off, buf)?;
            inode.mtime = now;
            inode.ctime = now;
            return Ok(());
        }
        core.data(self.ino, DataOp::Write { off, bytes: buf.to_vec() })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.fs.core().data(self.ino, DataOp::SetLen(len))
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        self.fs.core().data(self.ino, DataOp::Zero { off, len })
    }

    fn reserve(&self, _off: u64, _len: u64) -> io::Result<()> {
        self.writable()?;
        let mut core = self.fs.core();
        let now = core.tick();
        let inode = core.inode_mut(self.ino)?;
        if !inode.device {
            // Allocation changes the inode, not its bytes.
            inode.ctime = now;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut core = self.fs.core();
        let core = &mut *core;
        let inode = core.live.inodes.get(&self.ino).ok_or_else(not_found)?;
        if let Some(log) = &mut core.log {
            log.sync_file(self.ino, inode);
        }
        Ok(())
    }

    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(self.fs.core().inode(self.ino)?.data_ranges(off, len))
    }
}

/// Releases an in-process lock when dropped.
struct LockGuard {
    fs: MemFs,
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.fs.shared.locks.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.path);
    }
}

impl Vfs for MemFs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<Arc<dyn Storage>> {
        let path = normalize(path);
        let mut core = self.core();
        let existing = core.file(&path)?;
        let ino = match (how, existing) {
            (OpenHow::Read | OpenHow::ReadWrite, None) => return Err(not_found()),
            (OpenHow::Read | OpenHow::ReadWrite, Some(ino)) => ino,
            (OpenHow::CreateNew, Some(_)) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            (OpenHow::CreateNew | OpenHow::Truncate, None) => core.create(&path, Inode::file)?,
            (OpenHow::Truncate, Some(ino)) => {
                if !core.inode(ino)?.device {
                    core.data(ino, DataOp::SetLen(0))?;
                }
                ino
            }
        };
        Ok(Arc::new(MemFile { fs: self.clone(), ino, writable: how != OpenHow::Read, path }))
    }

    fn metadata(&self, path: &Path) -> io::Result<Option<Meta>> {
        let path = normalize(path);
        let core = self.core();
        match core.live.lookup(&path) {
            None => Ok(None),
            Some(Node::Dir) => Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or block device")),
            Some(Node::File(ino)) => core.meta(ino).map(Some),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normalize(from), normalize(to));
        let mut core = self.core();
        let node = match core.live.lookup(&from) {
            None => return Err(not_found()),
            Some(Node::Dir) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "MemFs does not rename directories"))
            }
            Some(node) => node,
        };
        let (Some((fdir, fname)), Some((tdir, tname))) = (split(&from), split(&to)) else {
            return Err(is_a_directory());
        };
        core.dir(&tdir)?;
        if core.live.lookup(&to) == Some(Node::Dir) {
            return Err(is_a_directory());
        }
        if from == to {
            return Ok(());
        }
        if fdir == tdir {
            core.ns(&fdir, NsOp::Rename { from: fname, to: tname });
        } else {
            core.ns(&tdir, NsOp::Link { name: tname, node });
            core.ns(&fdir, NsOp::Unlink { name: fname });
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path);
        let mut core = self.core();
        match core.live.lookup(&path) {
            None => Ok(()),
            Some(Node::Dir) => Err(is_a_directory()),
            Some(Node::File(_)) => {
                let (dir, name) = split(&path).ok_or_else(is_a_directory)?;
                core.ns(&dir, NsOp::Unlink { name });
                Ok(())
            }
        }
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path);
        let mut core = self.core();
        let mut cur = PathBuf::from("/");
        for c in path.components().skip(1) {
            let parent = cur.clone();
            cur.push(c);
            match core.live.lookup(&cur) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
                None => {
                    core.live.dirs.insert(cur.clone(), Entries::new());
                    if let Some(log) = &mut core.log {
                        log.made_dir(&cur);
                    }
                    let name = c.as_os_str().to_string_lossy().into_owned();
                    core.ns(&parent, NsOp::Link { name, node: Node::Dir });
                }
            }
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let dir = normalize(dir);
        let mut core = self.core();
        let core = &mut *core;
        let entries = core.dir(&dir)?.clone();
        if let Some(log) = &mut core.log {
            log.sync_dir(&dir, &entries);
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let dir = normalize(dir);
        let core = self.core();
        match core.dir(&dir) {
            Ok(entries) => Ok(entries.keys().cloned().collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let path = normalize(path);
        {
            let mut core = self.core();
            if core.file(&path)?.is_none() {
                core.create(&path, Inode::file)?;
            }
        }
        let mut locks = self.shared.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if !locks.insert(path.clone()) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        Ok(Box::new(LockGuard { fs: self.clone(), path }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    #[test]
    fn files_dirs_and_renames() {
        let fs = MemFs::new();
        assert!(fs.open(p("/d/x"), OpenHow::CreateNew).is_err());
        fs.create_dir_all(p("/d/e")).unwrap();
        let f = fs.open(p("/d/x"), OpenHow::CreateNew).unwrap();
        f.write_at(3, b"abc").unwrap();
        assert_eq!(fs.open(p("/d/x"), OpenHow::CreateNew).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs.list_dir(p("/d")).unwrap(), vec!["e", "x"]);
        assert!(fs.list_dir(p("/nope")).unwrap().is_empty());
        fs.open(p("/d/y"), OpenHow::Truncate).unwrap().write_at(0, b"old").unwrap();
        fs.rename(p("/d/x"), p("/d/y")).unwrap();
        let y = fs.open(p("/d/y"), OpenHow::Read).unwrap();
        let mut b = [0u8; 6];
        y.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"\0\0\0abc");
        assert!(y.write_at(0, b"z").is_err(), "read-only handle");
        assert_eq!(fs.metadata(p("/d/x")).unwrap(), None);
        fs.remove_file(p("/d/y")).unwrap();
        fs.remove_file(p("/d/y")).unwrap();
        assert!(fs.metadata(p("/d")).is_err());
        // The open handle keeps the unlinked inode.
        assert_eq!(y.len().unwrap(), 6);
    }

    #[test]
    fn stamps_follow_the_logical_clock() {
        let fs = MemFs::new();
        let f = fs.open(p("/a"), OpenHow::CreateNew).unwrap();
        let s0 = fs.metadata(p("/a")).unwrap().unwrap().stamp;
        f.write_at(0, b"x").unwrap();
        let s1 = fs.metadata(p("/a")).unwrap().unwrap().stamp;
        assert_ne!(s0, s1);
        f.read_at(0, &mut [0u8; 1]).unwrap();
        assert_eq!(fs.metadata(p("/a")).unwrap().unwrap().stamp, s1);
        f.reserve(0, 4096).unwrap();
        assert_ne!(fs.metadata(p("/a")).unwrap().unwrap().stamp, s1);
    }

    #[test]
    fn block_devices() {
        let fs = MemFs::new();
        fs.create_dir_all(p("/dev")).unwrap();
        fs.add_block_device(p("/dev/sdz"), 1 << 16).unwrap();
        let m = fs.metadata(p("/dev/sdz")).unwrap().unwrap();
        assert_eq!((m.kind, m.len), (DiskKind::BlockDevice, 1 << 16));
        let d = fs.open(p("/dev/sdz"), OpenHow::ReadWrite).unwrap();
        assert_eq!(d.set_len(5).unwrap_err().kind(), io::ErrorKind::Unsupported);
        d.write_at(0, &[1; 4096]).unwrap();
        let Stamp::Device { sectors_written, .. } = fs.metadata(p("/dev/sdz")).unwrap().unwrap().stamp else {
            panic!("device stamp")
        };
        assert_eq!(sectors_written, 8);
        assert!(d.write_at((1 << 16) - 1, &[1, 2]).is_err());
    }

    #[test]
    fn locks_are_exclusive_until_dropped() {
        let fs = MemFs::new();
        let g = fs.lock(p("/l")).unwrap();
        assert_eq!(fs.lock(p("/l")).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let other = fs.lock(p("/m")).unwrap();
        drop(g);
        drop(fs.lock(p("/l")).unwrap());
        drop(other);
    }

    #[test]
    fn snapshot_is_independent() {
        let fs = MemFs::new();
        fs.open(p("/a"), OpenHow::CreateNew).unwrap().write_at(0, b"1").unwrap();
        let snap = fs.snapshot();
        fs.open(p("/a"), OpenHow::ReadWrite).unwrap().write_at(0, b"2").unwrap();
        let mut b = [0u8; 1];
        snap.open(p("/a"), OpenHow::Read).unwrap().read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"1");
    }
}
