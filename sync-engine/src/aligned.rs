//! Page-aligned buffers for direct I/O, recycled. A full copy writes its
//! blocks with `O_DIRECT` (the storage layer's `write_vectored_at`),
//! which wants buffers aligned to the device's sector; the bytes that
//! arrive from the network lie wherever the packet put them, so each block
//! is gathered once into one of these. Recycling them keeps a long copy
//! from allocating (and faulting in) fresh memory for every block.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The alignment direct I/O gets: a 4 KiB page satisfies 512-byte and
/// 4 KiB sector devices alike.
pub const DIRECT_ALIGN: usize = 4096;

/// Whether `off`, and every buffer's address and length, suit direct I/O.
pub fn is_direct_aligned(off: u64, bufs: &[&[u8]]) -> bool {
    let a = DIRECT_ALIGN;
    off.is_multiple_of(a as u64)
        && bufs.iter().all(|b| (b.as_ptr() as usize).is_multiple_of(a) && b.len().is_multiple_of(a))
}

/// A buffer of fixed size whose bytes start at an aligned address, for
/// sequential files written or read past the page cache
/// (`crate::seqio`). Safe code: over-allocate and start at the first
/// aligned byte (a Vec's heap buffer does not move while it is not resized).
#[derive(Debug)]
pub struct AlignedVec {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedVec {
    /// `len` zero bytes at an aligned address.
    pub fn new(len: usize) -> AlignedVec {
        let vec = vec![0u8; len + DIRECT_ALIGN];
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedVec { vec, start, len }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    /// The buffer's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

/// A pool of aligned buffers, shared by the threads that fill them.
#[derive(Debug, Clone)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Buffers kept for reuse at most (the rest are freed when dropped).
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps up to `keep_bytes` of idle buffers of about `buffer_bytes` each.
    pub fn new(buffer_bytes: usize, keep_bytes: usize) -> BufferPool {
        BufferPool { free: Arc::default(), keep: (keep_bytes / buffer_bytes.max(1)).max(1) }
    }

    /// `len` bytes at an aligned address, filled by `fill`, as shared
    /// [`Bytes`] whose memory returns to the pool when the last clone drops.
    pub fn filled(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Bytes {
        let mut vec = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        if vec.len() < len + DIRECT_ALIGN {
            // Safe code: over-allocate and start at the first aligned byte
            // (a Vec's heap buffer does not move while it is not resized).
            vec.resize(len + DIRECT_ALIGN, 0);
        }
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        fill(&mut vec[start..start + len]);
        Bytes::from_owner(Pooled { vec, start, len, pool: self.clone() })
    }
}

/// A pool buffer lent to [`Bytes`].
struct Pooled {
    vec: Vec<u8>,
    start: usize,
    len: usize,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.vec));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_filled_and_reused() {
        let pool = BufferPool::new(65536, 4 * 65536);
        let a = pool.filled(65536, |b| b.fill(7));
        assert!(is_direct_aligned(0, &[&a]));
        assert!(a.iter().all(|&x| x == 7));
        let addr = a.as_ptr();
        let shared = a.clone();
        drop(a);
        assert_eq!(shared.len(), 65536, "a clone keeps the buffer alive");
        drop(shared);
        let b = pool.filled(100, |b| b.copy_from_slice(&[1; 100]));
        assert_eq!(b.as_ptr(), addr, "the freed buffer is reused");
        assert_eq!(&b[..], &[1; 100][..]);
        assert!(!is_direct_aligned(0, &[&b]), "100 bytes is no whole sector");
        assert!(!is_direct_aligned(512, &[]));
    }
}
