//! The NBD connection's reader thread: it reads each reply (a data chunk's
//! payload straight into a pooled buffer), checks it against what its
//! request may still receive, and hands it to the waiting request.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use diskferry_protocol::nbd::{finish, header_len, parse_header, Chunk, NbdError, Reply};

use super::error::{lock, ClientError};
use super::stream::Stream;

/// A request waiting for its reply, with what its reply may still bring:
/// the reader drops the connection before it queues more than that (a
/// hostile server cannot make the client buffer without bound).
pub(super) struct Waiter {
    pub(super) tx: Sender<Result<Reply, ClientError>>,
    /// The byte range a read's data and holes must lie in (empty: no data allowed).
    pub(super) range: (u64, u64),
    /// Bytes of data and holes still allowed.
    pub(super) bytes_left: u64,
    /// Chunks still allowed.
    pub(super) chunks_left: u64,
}

/// Requests waiting for replies; `closed` once the connection is unusable.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) waiting: HashMap<u64, Waiter>,
    pub(super) closed: Option<ClientError>,
}

impl Pending {
    pub(super) fn close(&mut self, e: ClientError) {
        for (_, w) in self.waiting.drain() {
            let _ = w.tx.send(Err(e.clone()));
        }
        self.closed.get_or_insert(e);
    }
}

/// Milliseconds since `start`, as the reader last received bytes.
pub(super) fn millis(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Why a chunk does not fit what its request may still receive.
fn over_budget(w: &mut Waiter, chunk: &Chunk) -> Option<String> {
    if w.chunks_left == 0 {
        return Some("a reply with more chunks than its request allows".into());
    }
    w.chunks_left -= 1;
    let (offset, n) = match chunk {
        Chunk::Data { offset, data } => (*offset, data.len() as u64),
        Chunk::Hole { offset, len } => (*offset, u64::from(*len)),
        _ => return None,
    };
    let inside = offset >= w.range.0 && offset.checked_add(n).is_some_and(|e| e <= w.range.1);
    if !inside || n > w.bytes_left {
        return Some(format!("{n} bytes at {offset} outside the request {}..{}", w.range.0, w.range.1));
    }
    w.bytes_left -= n;
    None
}

/// Counts every read as the connection's progress.
struct Progressing<R> {
    inner: R,
    progress: Arc<AtomicU64>,
    epoch: Instant,
}

impl<R: Read> Read for Progressing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.store(millis(self.epoch), Ordering::Relaxed);
        Ok(n)
    }
}

/// Reply buffers handed back after use: a read's data lands in memory
/// that is already mapped (fresh 4 MiB buffers cost a page fault per page).
#[derive(Default)]
pub(super) struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    pub(super) fn take(&self) -> Vec<u8> {
        lock(&self.0).pop().unwrap_or_default()
    }

    pub(super) fn put(&self, v: Vec<u8>) {
        let mut pool = lock(&self.0);
        // Enough for the reads in flight; more would only hold memory.
        if pool.len() < 16 {
            pool.push(v);
        }
    }
}

/// Reads one reply from the server. A data chunk's payload is read
/// straight into a pooled buffer; everything else through the decoder's
/// checks.
fn next_reply(r: &mut impl Read, pool: &BufferPool) -> Result<Reply, ClientError> {
    let mut head = [0u8; 20];
    r.read_exact(&mut head[..4]).map_err(io_error)?;
    let n = header_len(&head[..4])?;
    r.read_exact(&mut head[4..n]).map_err(io_error)?;
    let header = parse_header(&head[..n])?;
    if let Some((cookie, done, len)) = header.offset_data() {
        let mut offset = [0u8; 8];
        r.read_exact(&mut offset).map_err(io_error)?;
        // A reused buffer keeps its length: resizing it writes no zeros.
        let mut data = pool.take();
        data.resize(len, 0);
        r.read_exact(&mut data).map_err(io_error)?;
        let chunk = Chunk::Data { offset: u64::from_be_bytes(offset), data: BytesMut::from(bytes::Bytes::from(data)) };
        return Ok(Reply { cookie, done, chunk });
    }
    let mut payload = BytesMut::zeroed(header.payload_len());
    r.read_exact(&mut payload).map_err(io_error)?;
    Ok(finish(header, payload)?)
}

fn io_error(e: std::io::Error) -> ClientError {
    let message = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the server closed the connection".to_string()
    } else {
        e.to_string()
    };
    ClientError::Connection { url: String::new(), message }
}

pub(super) fn read_replies(
    stream: Stream,
    leftover: Vec<u8>,
    pending: Arc<Mutex<Pending>>,
    url: String,
    progress: Arc<AtomicU64>,
    epoch: Instant,
    pool: Arc<BufferPool>,
) {
    let shut = stream.try_clone().ok();
    let fail = |e: ClientError| {
        let e = match e {
            ClientError::Connection { message, .. } => ClientError::Connection { url: url.clone(), message },
            e => e,
        };
        lock(&pending).close(e);
        if let Some(s) = &shut {
            s.shutdown();
        }
    };
    let inner = std::io::Cursor::new(leftover).chain(stream);
    let mut r = std::io::BufReader::with_capacity(256 << 10, Progressing { inner, progress, epoch });
    loop {
        let reply = match next_reply(&mut r, &pool) {
            Ok(reply) => reply,
            Err(e) => return fail(e),
        };
        let mut p = lock(&pending);
        let Some(w) = p.waiting.get_mut(&reply.cookie) else {
            drop(p);
            return fail(ClientError::Nbd(NbdError::Protocol(format!(
                "a reply for cookie {} that no request is waiting for",
                reply.cookie
            ))));
        };
        if let Some(why) = over_budget(w, &reply.chunk) {
            drop(p);
            return fail(ClientError::Nbd(NbdError::Protocol(why)));
        }
        let tx = if reply.done { p.waiting.remove(&reply.cookie).map(|w| w.tx) } else { Some(w.tx.clone()) };
        if let Some(tx) = tx {
            let _ = tx.send(Ok(reply));
        }
    }
}
