//! Buffered sequential writing and reading over a [`Storage`], and a
//! writer that also keeps a running blake3 of the bytes (for checksummed
//! state files).

use std::io;

use diskferry_protocol::coding::{BufExt, DecodeResult};
use std::sync::Arc;

use crate::aligned::{AlignedVec, DIRECT_ALIGN};
use crate::store::Storage;

const BUF: usize = 1 << 20;

/// Appends to a storage through a buffer.
#[derive(Debug)]
pub struct SeqWriter {
    storage: Arc<dyn Storage>,
    /// Offset of `buf`'s first byte.
    pos: u64,
    buf: AlignedVec,
    filled: usize,
    /// Whole pages go past the page cache ([`SeqWriter::bypass_cache`]).
    bypass: bool,
    /// Writeback hints every so many bytes (none by default).
    pacer: Option<FlushPacer>,
}

/// When to hint [`Storage::start_flush`] for writes that are synced at the
/// end: every `every` bytes written, over the span they covered since the
/// last hint (a log's appends, a replay's scattered writes).
#[derive(Debug)]
pub(crate) struct FlushPacer {
    every: u64,
    written: u64,
    span: Option<(u64, u64)>,
}

impl FlushPacer {
    pub(crate) fn new(every: u64) -> Self {
        FlushPacer { every, written: 0, span: None }
    }

    /// Notes `[start, end)` written; hints `storage` once enough was.
    pub(crate) fn wrote(&mut self, storage: &dyn Storage, start: u64, end: u64) {
        let (lo, hi) = self.span.map_or((start, end), |(lo, hi)| (lo.min(start), hi.max(end)));
        self.written += end - start;
        if self.written >= self.every {
            storage.start_flush(lo, hi - lo);
            (self.span, self.written) = (None, 0);
        } else {
            self.span = Some((lo, hi));
        }
    }
}

impl SeqWriter {
    /// Writes from `pos` onwards.
    pub fn new(storage: Arc<dyn Storage>, pos: u64) -> Self {
        SeqWriter { storage, pos, buf: AlignedVec::new(BUF), filled: 0, bypass: false, pacer: None }
    }

    /// Starts the device writing every `bytes` written
    /// ([`Storage::start_flush`]): a file that is synced at the end (a log
    /// synced at a commit) then finds most of it written already, and the
    /// device works while the writer still gathers the rest.
    pub fn flush_every(mut self, bytes: u64) -> Self {
        self.pacer = Some(FlushPacer::new(bytes));
        self
    }

    /// Writes whole pages past the page cache where the storage allows
    /// ([`Storage::write_vectored_at`]): a log or undo segment written once
    /// and read once at most would take fresh cache pages, and on a VM
    /// whose free memory goes back to the host each fresh page costs more
    /// than the copy into it (issue 11's slow hours: 7–13 ms per MiB). The
    /// part page at the end goes through the cache on [`SeqWriter::flush`]
    /// and is written again, whole, by the next direct write; a start
    /// inside a page reads that page's head first. Call before writing.
    pub fn bypass_cache(mut self) -> io::Result<Self> {
        let page = DIRECT_ALIGN as u64;
        let head = (self.pos % page) as usize;
        if head > 0 && self.filled == 0 {
            let base = self.pos - head as u64;
            self.storage.read_at(base, &mut self.buf.as_mut_slice()[..head])?;
            (self.pos, self.filled) = (base, head);
        }
        self.bypass = self.filled == head;
        Ok(self)
    }

    /// Appends bytes.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if !self.bypass {
            if self.filled + bytes.len() > BUF {
                self.flush()?;
            }
            if bytes.len() >= BUF {
                // Large and through the cache: no need to copy it first.
                self.storage.write_at(self.pos, bytes)?;
                self.wrote(bytes.len() as u64);
                return Ok(());
            }
        }
        while !bytes.is_empty() {
            let n = (BUF - self.filled).min(bytes.len());
            self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BUF {
                self.drain()?;
            }
        }
        Ok(())
    }

    /// Writes what the buffer holds: all of it through the cache, or its
    /// whole pages past it (the rest moves to the front).
    fn drain(&mut self) -> io::Result<()> {
        let n = if self.bypass { self.filled / DIRECT_ALIGN * DIRECT_ALIGN } else { self.filled };
        if n == 0 {
            return Ok(());
        }
        self.storage.write_vectored_at(self.pos, &[&self.buf.as_slice()[..n]], self.bypass)?;
        self.wrote(n as u64);
        self.buf.as_mut_slice().copy_within(n..self.filled, 0);
        self.filled -= n;
        Ok(())
    }

    fn wrote(&mut self, len: u64) {
        if let Some(p) = &mut self.pacer {
            p.wrote(self.storage.as_ref(), self.pos, self.pos + len);
        }
        self.pos += len;
    }

    /// Writes buffered bytes to the storage (not a sync).
    pub fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        if self.filled > 0 {
            // The part page, kept for the next direct write.
            self.storage.write_at(self.pos, &self.buf.as_slice()[..self.filled])?;
        }
        Ok(())
    }

    /// Position after everything written so far.
    pub fn position(&self) -> u64 {
        self.pos + self.filled as u64
    }

    /// The storage written to.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

/// A [`SeqWriter`] that hashes every byte it writes, for files whose
/// checksum covers all their bytes (a manifest, an undo segment). The redo
/// log sums each entry instead: a second pass over a delta's bytes cost its
/// single apply thread ~25 ms per 41 MiB.
#[derive(Debug)]
pub struct HashedWriter {
    out: SeqWriter,
    hasher: blake3::Hasher,
}

impl HashedWriter {
    /// Writes from `pos` onwards; the digest covers what this writer writes.
    pub fn new(storage: Arc<dyn Storage>, pos: u64) -> Self {
        HashedWriter { out: SeqWriter::new(storage, pos), hasher: blake3::Hasher::new() }
    }

    /// See [`SeqWriter::flush_every`].
    pub fn flush_every(self, bytes: u64) -> Self {
        HashedWriter { out: self.out.flush_every(bytes), ..self }
    }

    /// See [`SeqWriter::bypass_cache`].
    pub fn bypass_cache(self) -> io::Result<Self> {
        Ok(HashedWriter { out: self.out.bypass_cache()?, ..self })
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.out.write(bytes)
    }

    /// See [`SeqWriter::flush`].
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Position after everything written so far.
    pub fn position(&self) -> u64 {
        self.out.position()
    }

    /// blake3 of every byte written since creation.
    pub fn digest(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }

    /// The storage written to.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        self.out.storage()
    }
}

/// Reads a storage sequentially through a buffer.
#[derive(Debug)]
pub struct SeqReader {
    storage: Arc<dyn Storage>,
    /// Offset of the byte after those read into `buf`.
    pos: u64,
    end: u64,
    buf: AlignedVec,
    /// The unread bytes in `buf`.
    lo: usize,
    hi: usize,
    /// Reads go past the page cache ([`SeqReader::bypass_cache`]).
    bypass: bool,
}

impl SeqReader {
    /// Reads `[pos, end)`.
    pub fn new(storage: Arc<dyn Storage>, pos: u64, end: u64, buf_size: usize) -> Self {
        let size = buf_size.max(1).next_multiple_of(DIRECT_ALIGN);
        SeqReader { storage, pos, end, buf: AlignedVec::new(size), lo: 0, hi: 0, bypass: false }
    }

    /// Reads past the page cache where the storage allows
    /// ([`Storage::read_direct_at`]): a log read back once at its commit
    /// needs no cache pages (see [`SeqWriter::bypass_cache`]).
    pub fn bypass_cache(mut self) -> Self {
        self.bypass = true;
        self
    }

    /// Offset of the next byte `read_exact` returns.
    pub fn position(&self) -> u64 {
        self.pos - (self.hi - self.lo) as u64
    }

    /// Bytes left before `end`.
    pub fn remaining(&self) -> u64 {
        self.end - self.position()
    }

    fn fill(&mut self) -> io::Result<()> {
        let left = self.end.saturating_sub(self.pos);
        if left == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let cap = self.buf.as_slice().len();
        // Direct reads start on a page: the bytes before `pos` are skipped.
        let skip = if self.bypass { (self.pos % DIRECT_ALIGN as u64) as usize } else { 0 };
        let want = left.min((cap - skip) as u64) as usize;
        let buf = self.buf.as_mut_slice();
        if self.bypass {
            let n = (skip + want).next_multiple_of(DIRECT_ALIGN);
            if self.storage.read_direct_at(self.pos - skip as u64, &mut buf[..n])? < skip + want {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        } else {
            self.storage.read_at(self.pos, &mut buf[..want])?;
        }
        (self.lo, self.hi) = (skip, skip + want);
        self.pos += want as u64;
        Ok(())
    }

    /// Fills `out`; `UnexpectedEof` if fewer bytes remain.
    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.lo == self.hi {
                self.fill()?;
            }
            let n = (out.len() - done).min(self.hi - self.lo);
            out[done..done + n].copy_from_slice(&self.buf.as_slice()[self.lo..self.lo + n]);
            self.lo += n;
            done += n;
        }
        Ok(())
    }

    /// Reads a little-endian u64.
    pub fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads 32 bytes.
    pub fn bytes32(&mut self) -> io::Result<[u8; 32]> {
        let mut b = [0u8; 32];
        self.read_exact(&mut b)?;
        Ok(b)
    }
}

/// blake3 of `storage[0..len]`, read in large chunks.
pub fn digest_range(storage: &dyn Storage, len: u64) -> io::Result<blake3::Hasher> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF.min(len as usize).max(1)];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        storage.read_at(pos, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher)
}

/// Field readers over a byte slice with a cursor, on the protocol's one
/// little-endian decoder ([`BufExt`]); short input is `None`, never a panic.
#[derive(Debug)]
pub struct Fields<'a> {
    rest: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    /// Reads `bytes` from the start.
    pub fn new(bytes: &'a [u8]) -> Self {
        Fields { rest: bytes, pos: 0 }
    }

    fn read<T>(&mut self, n: usize, get: impl FnOnce(&mut &'a [u8]) -> DecodeResult<T>) -> Option<T> {
        let v = get(&mut self.rest).ok()?;
        self.pos += n;
        Some(v)
    }

    /// Next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.rest.get(..n)?, self.rest.get(n..)?);
        self.rest = rest;
        self.pos += n;
        Some(head)
    }

    /// Next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.read(1, |b| b.get_u8_checked())
    }

    /// Next little-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.read(2, |b| b.get_u16_checked())
    }

    /// Next little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.read(4, |b| b.get_u32_checked())
    }

    /// Next little-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.read(8, |b| b.get_u64_checked())
    }

    /// Next little-endian i64.
    pub fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }

    /// Next little-endian u128.
    pub fn u128(&mut self) -> Option<u128> {
        self.read(16, |b| b.get_u128_checked())
    }

    /// Next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A storage that keeps its bytes and the writeback hints it was given.
    #[derive(Debug, Default)]
    struct Recording {
        bytes: Mutex<Vec<u8>>,
        flushes: Mutex<Vec<(u64, u64)>>,
    }

    impl Storage for Recording {
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.lock().unwrap().len() as u64)
        }
        fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            let b = self.bytes.lock().unwrap();
            buf.copy_from_slice(&b[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
            let mut b = self.bytes.lock().unwrap();
            let end = off as usize + buf.len();
            if b.len() < end {
                b.resize(end, 0);
            }
            b[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.bytes.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn zero_range(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn reserve(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn start_flush(&self, off: u64, len: u64) {
            self.flushes.lock().unwrap().push((off, len));
        }
    }

    /// A storage with direct I/O that, like the kernel, refuses direct
    /// transfers off the page grid, and counts what went which way.
    #[derive(Debug, Default)]
    struct Strict {
        inner: Recording,
        direct_written: Mutex<u64>,
        cached_written: Mutex<u64>,
        direct_read: Mutex<u64>,
    }

    impl Storage for Strict {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.read_at(off, buf)
        }
        fn read_direct_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
            assert!(crate::aligned::is_direct_aligned(off, &[buf]), "direct read off the grid at {off}");
            *self.direct_read.lock().unwrap() += buf.len() as u64;
            crate::store::read_up_to(self, off, buf)
        }
        fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
            *self.cached_written.lock().unwrap() += buf.len() as u64;
            self.inner.write_at(off, buf)
        }
        fn write_vectored_at(&self, off: u64, bufs: &[&[u8]], bypass_cache: bool) -> io::Result<()> {
            let len: usize = bufs.iter().map(|b| b.len()).sum();
            if bypass_cache {
                assert!(crate::aligned::is_direct_aligned(off, bufs), "direct write off the grid at {off}");
                *self.direct_written.lock().unwrap() += len as u64;
            } else {
                *self.cached_written.lock().unwrap() += len as u64;
            }
            self.inner.write_at(off, &bufs.concat())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn zero_range(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn reserve(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_bypassing_writer_and_reader_keep_to_whole_pages_and_every_byte() {
        let mut want = vec![0u8; 777];
        want.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
        let storage = Arc::new(Strict::default());
        storage.inner.write_at(0, &want).unwrap();
        // A start inside a page (a resumed log), appends of every size, a
        // flush mid-way (its part page written through the cache and
        // again, whole, by the next direct write), more appends.
        let mut w = SeqWriter::new(storage.clone(), want.len() as u64).bypass_cache().unwrap();
        for i in 0..3000u32 {
            let piece = vec![(i % 241) as u8; 1 + (i as usize * 37) % 3000];
            w.write(&piece).unwrap();
            want.extend_from_slice(&piece);
            if i == 1500 {
                w.flush().unwrap();
                assert_eq!(*storage.inner.bytes.lock().unwrap(), want, "a flush writes everything");
            }
        }
        let big = vec![5u8; BUF * 2 + 123];
        w.write(&big).unwrap();
        want.extend_from_slice(&big);
        w.flush().unwrap();
        assert_eq!(w.position(), want.len() as u64);
        assert_eq!(*storage.inner.bytes.lock().unwrap(), want);
        let (direct, cached) = (*storage.direct_written.lock().unwrap(), *storage.cached_written.lock().unwrap());
        assert!(direct >= want.len() as u64 - 4096, "{direct} of {} direct", want.len());
        assert!(cached < 3 * 4096 + 777, "only part pages through the cache: {cached}");
        // Read back from inside a page to an end inside another, past the
        // cache, in a buffer smaller than the span.
        let (from, to) = (1000u64, want.len() as u64 - 10);
        let mut r = SeqReader::new(storage.clone(), from, to, 64 << 10).bypass_cache();
        let mut got = vec![0u8; (to - from) as usize];
        for piece in got.chunks_mut(9999) {
            r.read_exact(piece).unwrap();
        }
        assert_eq!(&got[..], &want[from as usize..to as usize]);
        assert_eq!(r.remaining(), 0);
        assert!(r.read_exact(&mut [0u8]).is_err(), "nothing past the end");
        assert!(*storage.direct_read.lock().unwrap() >= to - from);
    }

    #[test]
    fn writeback_hints_cover_what_was_written_in_order_and_change_no_byte() {
        let storage = Arc::new(Recording::default());
        let start = 100;
        let mut w = SeqWriter::new(storage.clone(), start).flush_every(2 << 20);
        let mut want = Vec::new();
        // Small appends through the buffer, and one larger than it.
        for i in 0..5000u32 {
            let piece = vec![(i % 251) as u8; 1000 + (i % 7) as usize];
            w.write(&piece).unwrap();
            want.extend_from_slice(&piece);
        }
        let big = vec![9u8; BUF + 17];
        w.write(&big).unwrap();
        want.extend_from_slice(&big);
        w.flush().unwrap();
        let flushes = storage.flushes.lock().unwrap().clone();
        assert!(flushes.len() >= 2, "{flushes:?}");
        // Contiguous from where writing began, each at least the interval,
        // never past what reached the storage.
        let mut at = start;
        for &(off, len) in &flushes {
            assert_eq!(off, at);
            assert!(len >= 2 << 20);
            at += len;
        }
        assert!(at <= w.position());
        assert_eq!(&storage.bytes.lock().unwrap()[start as usize..], &want[..]);
        // Without an interval, no hint.
        let quiet = Arc::new(Recording::default());
        let mut w = SeqWriter::new(quiet.clone(), 0);
        w.write(&big).unwrap();
        w.flush().unwrap();
        assert!(quiet.flushes.lock().unwrap().is_empty());
        // The hashed writer sums what it writes, from any start, and
        // writes the same bytes.
        let hashed = Arc::new(Recording::default());
        let mut w = HashedWriter::new(hashed.clone(), 4096);
        w.write(&want).unwrap();
        w.flush().unwrap();
        assert_eq!(w.digest(), *blake3::hash(&want).as_bytes());
        assert_eq!(w.position(), 4096 + want.len() as u64);
        assert_eq!(&hashed.bytes.lock().unwrap()[4096..], &want[..]);
    }
}
