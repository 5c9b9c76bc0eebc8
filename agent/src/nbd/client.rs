//! A blocking NBD client over a unix socket or TCP: the handshake of
//! `diskferry_protocol::nbd`, then requests from any thread with several in
//! flight (one reader thread hands each reply chunk to the request that
//! waits for it). Every chunk is checked against its request; a server that
//! stalls gets a timeout, one that breaks the protocol a typed error, and
//! either way the connection is closed for every request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diskferry_protocol::nbd::{request, Chunk, Command, Export, Handshake, NbdError, Reply, MAX_READ};

use super::error::lock;
pub use super::error::ClientError;
use super::reader::{millis, read_replies, BufferPool, Pending, Waiter};
use super::stream::Stream;
use super::url::{NbdUrl, Transport};

/// The largest read request this client sends (the server's limit may be lower).
const READ_PIECE: u32 = 1 << 20;

/// An open NBD export.
pub struct NbdClient {
    url: String,
    export: Export,
    writer: Mutex<Stream>,
    /// For shutting the socket down while a write holds `writer`.
    control: Stream,
    pending: Arc<Mutex<Pending>>,
    cookie: AtomicU64,
    timeout: Duration,
    /// When the reader last received bytes (ms since `epoch`): a request
    /// times out only when the whole connection made no progress.
    progress: Arc<AtomicU64>,
    epoch: Instant,
    pool: Arc<BufferPool>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("url", &self.url).field("export", &self.export).finish()
    }
}

impl NbdClient {
    /// Connects, runs the handshake asking for `contexts`, and starts the
    /// reader. `timeout` bounds the handshake and every request.
    pub fn connect(url: &NbdUrl, contexts: &[&str], timeout: Duration) -> Result<NbdClient, ClientError> {
        let name = url.to_string();
        let conn_err = |m: String| ClientError::Connection { url: name.clone(), message: m };
        let mut stream = match &url.transport {
            Transport::Unix(p) => {
                Stream::Unix(UnixStream::connect(p).map_err(|e| conn_err(format!("{}: {e}", p.display())))?)
            }
            Transport::Tcp(addr) => {
                let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                    .map_err(|e| conn_err(format!("{addr}: {e}")))?
                    .collect();
                // Every address the name resolves to, in order, until one answers.
                let mut last = conn_err(format!("{addr} resolves to no address"));
                let mut connected = None;
                for a in &addrs {
                    match TcpStream::connect_timeout(a, timeout) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = conn_err(format!("{a}: {e}")),
                    }
                }
                let s = connected.ok_or(last)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        stream.set_read_timeout(Some(timeout)).map_err(|e| conn_err(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut h = Handshake::new(&url.export, contexts);
        let mut buf = vec![0u8; 64 << 10];
        while !h.is_done() {
            while let Some(out) = h.poll_transmit() {
                stream.write_all(&out).map_err(|e| conn_err(e.to_string()))?;
            }
            if Instant::now() > deadline {
                return Err(ClientError::Timeout { url: name, secs: timeout.as_secs() });
            }
            let n = match stream.read(&mut buf) {
                Ok(0) => return Err(conn_err("the server closed the connection during the handshake".into())),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout { url: name, secs: timeout.as_secs() })
                }
                Err(e) => return Err(conn_err(e.to_string())),
            };
            h.feed(&buf[..n])?;
        }
        let export = h.finish().ok_or_else(|| conn_err("the handshake ended without an export".into()))?;
        if export.min_block > 64 << 10 {
            return Err(ClientError::Nbd(NbdError::Unsupported(format!(
                "reads in units of {} bytes (its minimum block size)",
                export.min_block
            ))));
        }
        // The reader blocks for as long as requests take; each request has
        // its own timeout. A server that stops reading fails our writes.
        stream.set_read_timeout(None).map_err(|e| conn_err(e.to_string()))?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| conn_err(e.to_string()))?;
        let reader = stream.try_clone().map_err(|e| conn_err(e.to_string()))?;
        let control = stream.try_clone().map_err(|e| conn_err(e.to_string()))?;
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let leftover = h.leftover().to_vec();
        let epoch = Instant::now();
        let progress = Arc::new(AtomicU64::new(0));
        let pool: Arc<BufferPool> = Arc::default();
        let (p, n, pr, po) = (pending.clone(), name.clone(), progress.clone(), pool.clone());
        std::thread::Builder::new()
            .name("df-nbd".into())
            .spawn(move || read_replies(reader, leftover, p, n, pr, epoch, po))
            .map_err(|e| conn_err(e.to_string()))?;
        Ok(NbdClient {
            url: name,
            export,
            writer: Mutex::new(stream),
            control,
            pending,
            cookie: AtomicU64::new(1),
            timeout,
            progress,
            epoch,
            pool,
        })
    }

    /// The export as the server described it.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The server's address, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn send(
        &self,
        command: Command,
        offset: u64,
        len: u32,
    ) -> Result<Receiver<Result<Reply, ClientError>>, ClientError> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        let waiter = match command {
            // Data chunks do not overlap: at most one per byte, and errors.
            Command::Read => Waiter {
                tx,
                range: (offset, offset + u64::from(len)),
                bytes_left: u64::from(len),
                chunks_left: u64::from(len) + 16,
            },
            // One status chunk per context, and a few errors.
            _ => Waiter { tx, range: (0, 0), bytes_left: 0, chunks_left: 16 + self.export.contexts.len() as u64 },
        };
        {
            let mut p = lock(&self.pending);
            if let Some(e) = &p.closed {
                return Err(e.clone());
            }
            p.waiting.insert(cookie, waiter);
        }
        let sent = lock(&self.writer).write_all(&request(command, cookie, offset, len));
        if let Err(e) = sent {
            let err = ClientError::Connection { url: self.url.clone(), message: e.to_string() };
            lock(&self.pending).close(err.clone());
            return Err(err);
        }
        Ok(rx)
    }

    /// The next chunk of a request. Replies come one after another on one
    /// connection, so the timeout runs from the connection's last progress,
    /// not from when this request was sent.
    fn chunk(&self, rx: &Receiver<Result<Reply, ClientError>>) -> Result<Reply, ClientError> {
        loop {
            match rx.recv_timeout(self.timeout) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => {
                    let idle = millis(self.epoch).saturating_sub(self.progress.load(Ordering::Relaxed));
                    if Duration::from_millis(idle) < self.timeout {
                        continue;
                    }
                    let e = ClientError::Timeout { url: self.url.clone(), secs: self.timeout.as_secs() };
                    lock(&self.pending).close(e.clone());
                    self.control.shutdown();
                    return Err(e);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(lock(&self.pending).closed.clone().unwrap_or_else(|| ClientError::Connection {
                        url: self.url.clone(),
                        message: "the reader stopped".into(),
                    }))
                }
            }
        }
    }

    fn broken(&self, msg: String) -> ClientError {
        let e = ClientError::Nbd(NbdError::Protocol(msg));
        lock(&self.pending).close(e.clone());
        self.control.shutdown();
        e
    }

    /// Reads `buf.len()` bytes at `offset`: requests of at most the server's
    /// limit, all in flight at once, each reply checked against its range.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.export.size);
        if end.is_none() {
            return Err(ClientError::Nbd(NbdError::Protocol(format!(
                "a read of {} bytes at {offset} past the export's {} bytes",
                buf.len(),
                self.export.size
            ))));
        }
        // The server's limits, as we asked for them: a multiple of its
        // minimum, at most its maximum (and ours). 1 MiB requests: qemu-nbd
        // takes a fresh bounce buffer per request, and at 4 MiB each of
        // them costs page faults (hashing a 4 GiB qcow2 went 2.5 → 2.0 s).
        let min = self.export.min_block.max(1);
        let piece = (self.export.max_block.min(MAX_READ).min(READ_PIECE) / min * min).max(min) as usize;
        let mut waits = Vec::new();
        for (i, part) in buf.chunks(piece).enumerate() {
            let at = offset + (i * piece) as u64;
            waits.push((at, part.len(), self.send(Command::Read, at, part.len() as u32)?));
        }
        for ((at, len, rx), out) in waits.into_iter().zip(buf.chunks_mut(piece)) {
            self.collect_read(at, len, &rx, out)?;
        }
        Ok(())
    }

    fn collect_read(
        &self,
        at: u64,
        len: usize,
        rx: &Receiver<Result<Reply, ClientError>>,
        out: &mut [u8],
    ) -> Result<(), ClientError> {
        let mut covered: Vec<(usize, usize)> = Vec::new();
        let mut failed = None;
        loop {
            // The reader already bounded this reply's chunks and bytes.
            let r = self.chunk(rx)?;
            let place = |offset: u64, n: usize| -> Option<usize> {
                let start = offset.checked_sub(at)? as usize;
                (start.checked_add(n)? <= len).then_some(start)
            };
            match r.chunk {
                Chunk::Data { offset, data } => {
                    let Some(s) = place(offset, data.len()) else {
                        return Err(self.broken(format!("read data at {offset} outside the request {at}+{len}")));
                    };
                    out[s..s + data.len()].copy_from_slice(&data);
                    covered.push((s, s + data.len()));
                    self.pool.put(Vec::from(data));
                }
                Chunk::Hole { offset, len: n } => {
                    let Some(s) = place(offset, n as usize) else {
                        return Err(self.broken(format!("a hole at {offset} outside the request {at}+{len}")));
                    };
                    out[s..s + n as usize].fill(0);
                    covered.push((s, s + n as usize));
                }
                Chunk::Error { code, message, .. } => {
                    failed.get_or_insert(ClientError::Nbd(NbdError::Command { code, message }));
                }
                Chunk::None => {}
                Chunk::BlockStatus { .. } => return Err(self.broken("block status in reply to a read".into())),
            }
            if r.done {
                break;
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // Chunks must tile the request exactly: no gap, no overlap.
        covered.sort_unstable();
        let mut next = 0;
        for (s, e) in covered {
            if s != next {
                return Err(
                    self.broken(format!("read chunks of {at}+{len} overlap or leave a gap at {}", at + s as u64))
                );
            }
            next = e;
        }
        if next != len {
            return Err(self.broken(format!("read of {at}+{len} ended after {next} bytes")));
        }
        Ok(())
    }

    /// The extents of context `context` from `offset` on: `(length, flags)`
    /// covering at least one byte and at most `len` (a server may describe
    /// less than asked; the caller asks again from where it stopped).
    pub fn block_status(&self, context: u32, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, ClientError> {
        let len = len.min(self.export.size.saturating_sub(offset)).min(u64::from(u32::MAX - 65535));
        if len == 0 {
            return Ok(Vec::new());
        }
        let rx = self.send(Command::BlockStatus, offset, len as u32)?;
        let mut mine: Option<Vec<(u64, u32)>> = None;
        let mut failed = None;
        for n in 0.. {
            // One status chunk per context, and little else.
            if n > 64 + self.export.contexts.len() {
                return Err(self.broken(format!("a block status reply at {offset} that never ends")));
            }
            let r = self.chunk(&rx)?;
            match r.chunk {
                Chunk::BlockStatus { context: c, extents } if c == context => {
                    if mine.is_some() {
                        return Err(self.broken(format!("two status chunks for context {c}")));
                    }
                    let mut out = Vec::with_capacity(extents.len());
                    let mut at = offset;
                    for (l, flags) in extents {
                        // The last extent may run past the request (not the export).
                        let end = at.checked_add(u64::from(l)).filter(|&e| e <= self.export.size);
                        let Some(end) = end else {
                            return Err(self.broken(format!("an extent at {at} of {l} bytes past the export's end")));
                        };
                        if at >= offset + len {
                            break;
                        }
                        out.push((end.min(offset + len) - at, flags));
                        at = end;
                    }
                    mine = Some(out);
                }
                Chunk::BlockStatus { .. } | Chunk::None => {}
                Chunk::Error { code, message, .. } => {
                    failed.get_or_insert(ClientError::Nbd(NbdError::Command { code, message }));
                }
                Chunk::Data { .. } | Chunk::Hole { .. } => {
                    return Err(self.broken("read data in reply to block status".into()))
                }
            }
            if r.done {
                break;
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        match mine {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.broken(format!("no extents of context {context} at {offset}"))),
        }
    }

    /// Every extent of `context` over `[offset, offset+len)`, asking again
    /// where a reply stopped short.
    pub fn extents(&self, context: u32, offset: u64, len: u64) -> Result<Vec<(u64, u64, u32)>, ClientError> {
        let end = offset.saturating_add(len).min(self.export.size);
        let mut at = offset;
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        while at < end {
            for (l, flags) in self.block_status(context, at, end - at)? {
                match out.last_mut() {
                    Some((o, ol, f)) if *f == flags && *o + *ol == at => *ol += l,
                    _ => out.push((at, l, flags)),
                }
                at += l;
            }
        }
        Ok(out)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // Not behind the writer's lock: a stuck write must not hang the drop.
        if let Ok(mut w) = self.writer.try_lock() {
            let _ = w.write_all(&request(Command::Disconnect, 0, 0, 0));
        }
        self.control.shutdown();
    }
}
