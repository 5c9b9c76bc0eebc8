//! [`FaultyFs`]: a [`Vfs`] whose operations start failing after the N-th.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use diskferry_sync_engine::store::{Meta, OpenHow, Storage, Vfs};

/// The error an injected failure returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: the device failed.
    Eio,
    /// `ENOSPC`: the filesystem is full.
    Enospc,
}

impl Fault {
    /// The `io::Error` it produces (a raw OS error, as the kernel gives it).
    pub fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Fault::Eio => 5,
            Fault::Enospc => 28,
        })
    }
}

/// Shared operation counter and failure point.
#[derive(Debug)]
struct Counter {
    ops: AtomicU64,
    fail_after: AtomicU64,
    fault: Fault,
    /// Fail only operation `fail_after` (a transient error), not all later ones.
    once: bool,
    /// Bytes named by writeback hints (`start_flush`, not operations), by
    /// the path the file was opened as.
    flush_hinted: std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, u64>>,
    /// Read-ahead hints (`will_need`) and the reads they did not cover, by path.
    read_ahead: std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, ReadAhead>>,
    /// Writes, by path.
    writes: std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, Writes>>,
    /// Whether sources may be memory-mapped ([`FaultyFs::mapping_sources`]).
    map_sources: std::sync::atomic::AtomicBool,
}

/// The writes into a file opened through a [`FaultyFs`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    /// Write calls.
    pub calls: u64,
    /// Bytes written asking to bypass the page cache (the inner storage
    /// decides whether it can).
    pub bypass_bytes: u64,
    /// Bytes written through the page cache.
    pub cached_bytes: u64,
}

/// What a file opened through a [`FaultyFs`] was told it would be read,
/// and how much was read without such a hint first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadAhead {
    /// `(offset, length)` of each [`Storage::will_need`], in order.
    pub advised: Vec<(u64, u64)>,
    /// Bytes read outside every range advised before the read.
    pub unadvised_bytes: u64,
    /// Bytes read asking to bypass the page cache
    /// ([`Storage::read_direct_at`]; not counted above).
    pub bypass_bytes: u64,
}

impl Counter {
    /// Counts one operation; fails it if `fail_after` operations already ran.
    fn tick(&self) -> io::Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        let at = self.fail_after.load(Ordering::SeqCst);
        if n == at || (n > at && !self.once) {
            Err(self.fault.error())
        } else {
            Ok(())
        }
    }
}

/// Wraps a [`Vfs`] and fails every operation after the first `N` with an
/// injected I/O error.
///
/// Every fallible call counts as one operation: each [`Vfs`] method (except
/// `open_disk`, which is `open` underneath) and each [`Storage`] method of a
/// file opened through it (`start_writeback` returns nothing and is not
/// counted). With `fail_after(n)`, operations `0..n` reach the inner
/// filesystem and every later one fails without touching it. With
/// [`FaultyFs::fail_once`] only operation `n` fails (a transient error: a
/// caller that swallows it carries on). Run once with
/// [`FaultyFs::unlimited`] to count the operations of a scenario.
///
/// ```
/// use std::path::Path;
/// use std::sync::Arc;
/// use diskferry_sync_engine::store::{OpenHow, Vfs};
/// use diskferry_testkit::{Fault, FaultyFs, MemFs};
///
/// let fs = FaultyFs::new(Arc::new(MemFs::new()), 2, Fault::Enospc);
/// let f = fs.open(Path::new("/a"), OpenHow::CreateNew).unwrap();
/// f.write_at(0, b"ok").unwrap();
/// assert_eq!(f.write_at(2, b"full").unwrap_err().raw_os_error(), Some(28));
/// assert_eq!(fs.ops(), 3);
/// ```
#[derive(Clone)]
pub struct FaultyFs {
    inner: Arc<dyn Vfs>,
    counter: Arc<Counter>,
}

impl fmt::Debug for FaultyFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyFs").field("inner", &self.inner).field("counter", &self.counter).finish()
    }
}

impl FaultyFs {
    /// Wraps `inner`; operations after the first `fail_after` fail with `fault`.
    pub fn new(inner: Arc<dyn Vfs>, fail_after: u64, fault: Fault) -> FaultyFs {
        let counter = Counter {
            ops: AtomicU64::new(0),
            fail_after: AtomicU64::new(fail_after),
            fault,
            once: false,
            flush_hinted: Default::default(),
            read_ahead: Default::default(),
            writes: Default::default(),
            map_sources: Default::default(),
        };
        FaultyFs { inner, counter: Arc::new(counter) }
    }

    /// Wraps `inner`; only operation number `n` (0-based) fails, with `fault`.
    pub fn fail_once(inner: Arc<dyn Vfs>, n: u64, fault: Fault) -> FaultyFs {
        let counter = Counter {
            ops: AtomicU64::new(0),
            fail_after: AtomicU64::new(n),
            fault,
            once: true,
            flush_hinted: Default::default(),
            read_ahead: Default::default(),
            writes: Default::default(),
            map_sources: Default::default(),
        };
        FaultyFs { inner, counter: Arc::new(counter) }
    }

    /// Wraps `inner` without failing anything (to count operations).
    pub fn unlimited(inner: Arc<dyn Vfs>) -> FaultyFs {
        FaultyFs::new(inner, u64::MAX, Fault::Eio)
    }

    /// Bytes that writeback hints ([`Storage::start_flush`]) named so far
    /// in the file opened as `path`.
    pub fn flush_hinted(&self, path: &Path) -> u64 {
        self.counter.flush_hinted.lock().unwrap_or_else(|p| p.into_inner()).get(path).copied().unwrap_or(0)
    }

    /// The read-ahead hints given to the file opened as `path`, and the
    /// bytes read from it outside them.
    pub fn read_ahead(&self, path: &Path) -> ReadAhead {
        self.counter.read_ahead.lock().unwrap_or_else(|p| p.into_inner()).get(path).cloned().unwrap_or_default()
    }

    /// The writes into the file opened as `path` so far.
    pub fn writes(&self, path: &Path) -> Writes {
        self.counter.writes.lock().unwrap_or_else(|p| p.into_inner()).get(path).copied().unwrap_or_default()
    }

    /// Lets sources be memory-mapped from the inner filesystem, as the
    /// real one allows (each map counts as an operation); by default they
    /// are read through [`Storage::read_at`], where reads are noted.
    pub fn mapping_sources(self) -> FaultyFs {
        self.counter.map_sources.store(true, Ordering::SeqCst);
        self
    }

    /// Operations attempted so far (failed ones included).
    pub fn ops(&self) -> u64 {
        self.counter.ops.load(Ordering::SeqCst)
    }

    /// Moves the failure point to operation number `n` (for
    /// [`FaultyFs::fail_once`]: the one operation that fails).
    pub fn fail_after(&self, n: u64) {
        self.counter.fail_after.store(n, Ordering::SeqCst);
    }

    /// The wrapped filesystem.
    pub fn inner(&self) -> &Arc<dyn Vfs> {
        &self.inner
    }
}

/// A file opened through a [`FaultyFs`].
#[derive(Debug)]
struct FaultyStorage {
    inner: Arc<dyn Storage>,
    counter: Arc<Counter>,
    path: std::path::PathBuf,
}

impl FaultyStorage {
    fn note_write(&self, bytes: usize, bypass_cache: bool) {
        let mut writes = self.counter.writes.lock().unwrap_or_else(|p| p.into_inner());
        let w = writes.entry(self.path.clone()).or_default();
        w.calls += 1;
        if bypass_cache {
            w.bypass_bytes += bytes as u64;
        } else {
            w.cached_bytes += bytes as u64;
        }
    }
}

impl Storage for FaultyStorage {
    fn len(&self) -> io::Result<u64> {
        self.counter.tick()?;
        self.inner.len()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.counter.tick()?;
        let end = off + buf.len() as u64;
        let mut hints = self.counter.read_ahead.lock().unwrap_or_else(|p| p.into_inner());
        let seen = hints.entry(self.path.clone()).or_default();
        if !seen.advised.iter().any(|&(o, l)| o <= off && end <= o + l) {
            seen.unadvised_bytes += buf.len() as u64;
        }
        drop(hints);
        self.inner.read_at(off, buf)
    }

    fn read_direct_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.counter.tick()?;
        let mut hints = self.counter.read_ahead.lock().unwrap_or_else(|p| p.into_inner());
        hints.entry(self.path.clone()).or_default().bypass_bytes += buf.len() as u64;
        drop(hints);
        self.inner.read_direct_at(off, buf)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.counter.tick()?;
        self.note_write(buf.len(), false);
        self.inner.write_at(off, buf)
    }

    fn write_vectored_at(&self, off: u64, bufs: &[&[u8]], bypass_cache: bool) -> io::Result<()> {
        self.counter.tick()?;
        self.note_write(bufs.iter().map(|b| b.len()).sum(), bypass_cache);
        self.inner.write_vectored_at(off, bufs, bypass_cache)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.set_len(len)
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.zero_range(off, len)
    }

    fn reserve(&self, off: u64, len: u64) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.reserve(off, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.sync()
    }

    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        self.counter.tick()?;
        self.inner.data_ranges(off, len)
    }

    fn start_writeback(&self, off: u64, len: u64) {
        self.inner.start_writeback(off, len)
    }

    fn start_flush(&self, off: u64, len: u64) {
        *self.counter.flush_hinted.lock().unwrap_or_else(|p| p.into_inner()).entry(self.path.clone()).or_default() +=
            len;
        self.inner.start_flush(off, len)
    }

    fn will_need(&self, off: u64, len: u64) {
        let mut hints = self.counter.read_ahead.lock().unwrap_or_else(|p| p.into_inner());
        hints.entry(self.path.clone()).or_default().advised.push((off, len));
        drop(hints);
        self.inner.will_need(off, len)
    }
}

impl Vfs for FaultyFs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<Arc<dyn Storage>> {
        self.counter.tick()?;
        let inner = self.inner.open(path, how)?;
        Ok(Arc::new(FaultyStorage { inner, counter: self.counter.clone(), path: path.to_path_buf() }))
    }

    fn mappable(&self, path: &Path) -> io::Result<Option<std::fs::File>> {
        if !self.counter.map_sources.load(Ordering::SeqCst) {
            return Ok(None);
        }
        self.counter.tick()?;
        self.inner.mappable(path)
    }

    fn metadata(&self, path: &Path) -> io::Result<Option<Meta>> {
        self.counter.tick()?;
        self.inner.metadata(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.create_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.counter.tick()?;
        self.inner.sync_dir(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.counter.tick()?;
        self.inner.list_dir(dir)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        self.counter.tick()?;
        self.inner.lock(path)
    }

    fn reflink(&self, from: &Path, to: &Path) -> io::Result<bool> {
        self.counter.tick()?;
        self.inner.reflink(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFs;

    #[test]
    fn fails_from_the_nth_operation_on() {
        let mem = MemFs::new();
        let fs = FaultyFs::new(Arc::new(mem.clone()), 3, Fault::Eio);
        fs.create_dir_all(Path::new("/d")).unwrap();
        let f = fs.open(Path::new("/d/a"), OpenHow::CreateNew).unwrap();
        f.write_at(0, b"x").unwrap();
        assert_eq!(f.sync().unwrap_err().raw_os_error(), Some(5));
        assert!(fs.metadata(Path::new("/d/a")).is_err());
        assert_eq!(fs.ops(), 5);
        // The failed operations did not reach the inner filesystem... and the others did.
        assert_eq!(mem.metadata(Path::new("/d/a")).unwrap().unwrap().len, 1);
        fs.fail_after(u64::MAX);
        assert!(fs.sync_dir(Path::new("/d")).is_ok());
    }

    #[test]
    fn transient_fault_fails_one_operation() {
        let fs = FaultyFs::fail_once(Arc::new(MemFs::new()), 1, Fault::Enospc);
        let f = fs.open(Path::new("/a"), OpenHow::CreateNew).unwrap();
        assert_eq!(f.write_at(0, b"x").unwrap_err().raw_os_error(), Some(28));
        f.write_at(0, b"y").unwrap();
        assert_eq!(fs.ops(), 3);
    }
}
