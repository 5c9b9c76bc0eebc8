//! Buffered sequential writing and reading over a [`Storage`], and a
//! writer that also keeps a running blake3 of the bytes (for checksummed
//! state files).

use std::io;

use diskferry_protocol::coding::{BufExt, DecodeResult};
use std::sync::Arc;

use crate::store::Storage;

const BUF: usize = 1 << 20;

/// Appends to a storage through a buffer.
#[derive(Debug)]
pub struct SeqWriter {
    storage: Arc<dyn Storage>,
    pos: u64,
    buf: Vec<u8>,
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
        SeqWriter { storage, pos, buf: Vec::with_capacity(BUF), pacer: None }
    }

    /// Starts the device writing every `bytes` written
    /// ([`Storage::start_flush`]): a file that is synced at the end (a log
    /// synced at a commit) then finds most of it written already, and the
    /// device works while the writer still gathers the rest.
    pub fn flush_every(mut self, bytes: u64) -> Self {
        self.pacer = Some(FlushPacer::new(bytes));
        self
    }

    fn wrote(&mut self, len: u64) {
        if let Some(p) = &mut self.pacer {
            p.wrote(self.storage.as_ref(), self.pos, self.pos + len);
        }
        self.pos += len;
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.buf.len() + bytes.len() > BUF {
            self.flush()?;
        }
        if bytes.len() >= BUF {
            self.storage.write_at(self.pos, bytes)?;
            self.wrote(bytes.len() as u64);
        } else {
            self.buf.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// Writes buffered bytes to the storage (not a sync).
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.storage.write_at(self.pos, &self.buf)?;
            self.wrote(self.buf.len() as u64);
            self.buf.clear();
        }
        Ok(())
    }

    /// Position after everything written so far.
    pub fn position(&self) -> u64 {
        self.pos + self.buf.len() as u64
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
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    buf_pos: usize,
}

impl SeqReader {
    /// Reads `[pos, end)`.
    pub fn new(storage: Arc<dyn Storage>, pos: u64, end: u64, buf_size: usize) -> Self {
        SeqReader { storage, pos, end, buf: Vec::with_capacity(buf_size.max(64)), buf_pos: 0 }
    }

    /// Offset of the next byte `read_exact` returns.
    pub fn position(&self) -> u64 {
        self.pos - (self.buf.len() - self.buf_pos) as u64
    }

    /// Bytes left before `end`.
    pub fn remaining(&self) -> u64 {
        self.end - self.position()
    }

    /// Fills `out`; `UnexpectedEof` if fewer bytes remain.
    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.buf_pos == self.buf.len() {
                let n = (self.end - self.pos).min(self.buf.capacity() as u64) as usize;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                self.buf.resize(n, 0);
                self.storage.read_at(self.pos, &mut self.buf)?;
                self.pos += n as u64;
                self.buf_pos = 0;
            }
            let n = (out.len() - done).min(self.buf.len() - self.buf_pos);
            out[done..done + n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
            self.buf_pos += n;
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
