//! A storage that counts the bytes read through it: how much of its own
//! disk a target read during a session (`target_bytes_read`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{FileId, Storage};

/// `inner`, with every byte read counted in `read`.
#[derive(Debug)]
pub struct CountingStorage {
    inner: Arc<dyn Storage>,
    read: Arc<AtomicU64>,
}

impl CountingStorage {
    /// Wraps `inner`; reads add to `read`.
    pub fn wrap(inner: Arc<dyn Storage>, read: Arc<AtomicU64>) -> Arc<dyn Storage> {
        Arc::new(CountingStorage { inner, read })
    }
}

impl Storage for CountingStorage {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_at(off, buf)
    }
    fn write_vectored_at(&self, off: u64, bufs: &[&[u8]], bypass_cache: bool) -> io::Result<()> {
        self.inner.write_vectored_at(off, bufs, bypass_cache)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(off, len)
    }
    fn reserve(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.reserve(off, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.data_ranges(off, len)
    }
    fn start_writeback(&self, off: u64, len: u64) {
        self.inner.start_writeback(off, len)
    }
    fn start_flush(&self, off: u64, len: u64) {
        self.inner.start_flush(off, len)
    }
    fn will_need(&self, off: u64, len: u64) {
        self.inner.will_need(off, len)
    }
    fn identity(&self) -> io::Result<Option<FileId>> {
        self.inner.identity()
    }
}
