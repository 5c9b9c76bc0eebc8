//! The state of an in-memory filesystem, shared by [`crate::MemFs`] (the live
//! view) and [`crate::CrashFs`] (its durable shadow and crash images).
//!
//! A filesystem is a map from directory path to its entries (name → file
//! inode or subdirectory) plus a map of inodes. Every change is one of two
//! kinds of operation, each replayable onto any copy of the state:
//! [`DataOp`] on an inode (write, size change, zeroing) and [`NsOp`] on a
//! directory (link, unlink, rename inside it).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path, PathBuf};

/// Granularity of hole tracking and of torn writes.
pub(crate) const SECTOR: u64 = 4096;

/// What a directory entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// A file or block device inode.
    File(u64),
    /// A subdirectory (its entries live under its own path).
    Dir,
}

/// A regular file or a simulated block device.
#[derive(Clone, Debug)]
pub(crate) struct Inode {
    /// A block device: fixed size, no `set_len`, no holes.
    pub device: bool,
    /// The bytes; `data.len()` is the size.
    pub data: Vec<u8>,
    /// Per 4 KiB page of a file: whether it is allocated (not a hole).
    pub alloc: Vec<bool>,
    /// Logical modification time.
    pub mtime: i64,
    /// Logical change time.
    pub ctime: i64,
    /// 512-byte sectors written since boot (devices).
    pub sectors_written: u64,
}

/// A change to an inode's content or size.
#[derive(Clone, Debug)]
pub(crate) enum DataOp {
    /// Positional write.
    Write { off: u64, bytes: Vec<u8> },
    /// New size.
    SetLen(u64),
    /// Range made to read as zeros (clipped to the size).
    Zero { off: u64, len: u64 },
}

/// A change to one directory's entries.
#[derive(Clone, Debug)]
pub(crate) enum NsOp {
    /// `name` now names `node` (replacing any previous entry).
    Link { name: String, node: Node },
    /// `name` is gone.
    Unlink { name: String },
    /// `from` is renamed to `to` in the same directory, replacing `to`.
    Rename { from: String, to: String },
}

/// Directory entries by name.
pub(crate) type Entries = BTreeMap<String, Node>;

/// A whole filesystem: directories and inodes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Image {
    /// Every directory (by normalized absolute path) and its entries.
    pub dirs: BTreeMap<PathBuf, Entries>,
    /// Every inode ever created (unlinked ones stay; they are unreachable).
    pub inodes: BTreeMap<u64, Inode>,
}

fn pages(len: u64) -> usize {
    len.div_ceil(SECTOR) as usize
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")
}

impl Inode {
    /// An empty file.
    pub fn file(now: i64) -> Inode {
        Inode { device: false, data: Vec::new(), alloc: Vec::new(), mtime: now, ctime: now, sectors_written: 0 }
    }

    /// A zero-filled block device of `size` bytes.
    pub fn device(size: u64, now: i64) -> Inode {
        Inode {
            device: true,
            data: vec![0; size as usize],
            alloc: Vec::new(),
            mtime: now,
            ctime: now,
            sectors_written: 0,
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// Like `read_exact_at`: fails if the range passes the end.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > self.len() {
            return Err(eof());
        }
        buf.copy_from_slice(&self.data[off as usize..end as usize]);
        Ok(())
    }

    /// Writes `bytes` at `off`, extending a file.
    pub fn write(&mut self, off: u64, bytes: &[u8]) -> io::Result<()> {
        let end = off + bytes.len() as u64;
        if self.device {
            if end > self.len() {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the device"));
            }
            self.sectors_written += (bytes.len() as u64).div_ceil(512);
        } else if end > self.len() {
            self.data.resize(end as usize, 0);
            self.alloc.resize(pages(end), false);
        }
        self.data[off as usize..end as usize].copy_from_slice(bytes);
        if !self.device && !bytes.is_empty() {
            for p in (off / SECTOR) as usize..pages(end) {
                self.alloc[p] = true;
            }
        }
        Ok(())
    }

    /// Sets a file's size (zeros when growing); devices: `Unsupported`.
    pub fn set_len(&mut self, len: u64) -> io::Result<()> {
        if self.device {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "cannot resize a block device"));
        }
        self.data.resize(len as usize, 0);
        self.alloc.resize(pages(len), false);
        Ok(())
    }

    /// Zeros `[off, off+len)` within the size; a file's whole pages become holes.
    pub fn zero(&mut self, off: u64, len: u64) {
        let end = (off + len).min(self.len());
        if off >= end {
            return;
        }
        self.data[off as usize..end as usize].fill(0);
        if self.device {
            self.sectors_written += (end - off).div_ceil(512);
            return;
        }
        let first_whole = off.div_ceil(SECTOR);
        // The last page may be short: it is whole if the range reaches the end of the file.
        let end_whole = if end == self.len() { pages(end) as u64 } else { end / SECTOR };
        for p in first_whole..end_whole.max(first_whole) {
            self.alloc[p as usize] = false;
        }
    }

    /// The sub-ranges of `[off, off+len)` that may hold data.
    pub fn data_ranges(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        if len == 0 {
            return Vec::new();
        }
        if self.device {
            return vec![(off, len)];
        }
        let end = (off + len).min(self.len());
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut p = off / SECTOR;
        while p * SECTOR < end {
            if self.alloc[p as usize] {
                let s = (p * SECTOR).max(off);
                let e = ((p + 1) * SECTOR).min(end);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == s => *l += e - s,
                    _ => out.push((s, e - s)),
                }
            }
            p += 1;
        }
        out
    }

    /// Applies a recorded operation (it succeeded once, so it cannot fail on
    /// any state of the same inode, except a write past a device's end).
    pub fn apply(&mut self, op: &DataOp) {
        let _ = match op {
            DataOp::Write { off, bytes } => self.write(*off, bytes),
            DataOp::SetLen(len) => self.set_len(*len),
            DataOp::Zero { off, len } => {
                self.zero(*off, *len);
                Ok(())
            }
        };
    }
}

/// Applies a namespace operation to a directory's entries. Lenient: a
/// rename or unlink of a missing name does nothing (it cannot happen live,
/// where operations are checked first).
pub(crate) fn apply_ns(entries: &mut Entries, op: &NsOp) {
    match op {
        NsOp::Link { name, node } => {
            entries.insert(name.clone(), *node);
        }
        NsOp::Unlink { name } => {
            entries.remove(name);
        }
        NsOp::Rename { from, to } => {
            if let Some(node) = entries.remove(from) {
                entries.insert(to.clone(), node);
            }
        }
    }
}

/// `/`-rooted path with `.` and `..` resolved lexically.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A normalized path's parent and file name (`None` for `/`).
pub(crate) fn split(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    Some((path.parent()?.to_path_buf(), name))
}

impl Image {
    /// An image holding only the root directory.
    pub fn new() -> Image {
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::from("/"), Entries::new());
        Image { dirs, inodes: BTreeMap::new() }
    }

    /// What a normalized path names.
    pub fn lookup(&self, path: &Path) -> Option<Node> {
        match split(path) {
            None => Some(Node::Dir),
            Some((parent, name)) => self.dirs.get(&parent)?.get(&name).copied(),
        }
    }

    /// Drops directories that no chain of entries from `/` reaches.
    pub fn prune_unreachable(&mut self) {
        let mut reachable = BTreeSet::new();
        let mut todo = vec![PathBuf::from("/")];
        while let Some(d) = todo.pop() {
            let entries = self.dirs.entry(d.clone()).or_default().clone();
            for (name, node) in entries {
                if node == Node::Dir {
                    todo.push(d.join(name));
                }
            }
            reachable.insert(d);
        }
        self.dirs.retain(|d, _| reachable.contains(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_follow_writes_and_punches() {
        let mut f = Inode::file(0);
        f.set_len(5 * SECTOR + 10).unwrap();
        assert!(f.data_ranges(0, f.len()).is_empty());
        f.write(SECTOR + 5, &[1; 10]).unwrap();
        assert_eq!(f.data_ranges(0, f.len()), vec![(SECTOR, SECTOR)]);
        f.write(4 * SECTOR, &[2; 100]).unwrap();
        assert_eq!(f.data_ranges(SECTOR + 7, 100 * SECTOR), vec![(SECTOR + 7, SECTOR - 7), (4 * SECTOR, SECTOR)]);
        // A punch keeps partial pages allocated, zeroed.
        f.zero(SECTOR + 6, 4 * SECTOR);
        assert_eq!(f.data_ranges(0, f.len()), vec![(SECTOR, SECTOR)]);
        assert_eq!(f.data[SECTOR as usize + 5], 1);
        assert_eq!(f.data[SECTOR as usize + 6], 0);
        // The short last page is whole when the punch reaches the end.
        f.write(5 * SECTOR, &[3; 10]).unwrap();
        f.zero(5 * SECTOR, 1 << 20);
        assert_eq!(f.len(), 5 * SECTOR + 10);
        assert_eq!(f.data_ranges(0, f.len()), vec![(SECTOR, SECTOR)]);
        let mut buf = [0u8; 11];
        assert_eq!(f.read(5 * SECTOR, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn device_is_fixed() {
        let mut d = Inode::device(8192, 0);
        assert_eq!(d.set_len(1).unwrap_err().kind(), io::ErrorKind::Unsupported);
        assert!(d.write(8000, &[1; 500]).is_err());
        d.write(0, &[1; 1024]).unwrap();
        assert_eq!(d.sectors_written, 2);
        assert_eq!(d.data_ranges(10, 20), vec![(10, 20)]);
    }

    #[test]
    fn paths_normalize() {
        assert_eq!(normalize(Path::new("a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(split(&normalize(Path::new("/x/y"))), Some((PathBuf::from("/x"), "y".to_string())));
        assert_eq!(split(Path::new("/")), None);
    }
}
