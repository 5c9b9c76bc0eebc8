//! Transmission-phase replies: structured chunks (and simple error
//! replies), decoded from a byte stream. Every length is checked before it
//! is used; a hostile server gets an error, never a panic or a large
//! allocation. Whether a chunk fits its request is the client's check
//! (it knows the requests).

use bytes::{Buf, BytesMut};

use super::{be16, be32, be64, NbdError, MAX_READ, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

const FLAG_DONE: u16 = 1;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_ERROR_BIT: u16 = 1 << 15;
const TYPE_ERROR_OFFSET: u16 = TYPE_ERROR_BIT | 2;

/// One piece of a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Nothing (`NBD_REPLY_TYPE_NONE`, only as the last chunk).
    None,
    /// Bytes read at `offset`.
    Data {
        /// Absolute offset in the export.
        offset: u64,
        /// The bytes.
        data: BytesMut,
    },
    /// `len` bytes at `offset` read as zeros.
    Hole {
        /// Absolute offset in the export.
        offset: u64,
        /// Length, nonzero.
        len: u32,
    },
    /// Extents of one metadata context: `(length, flags)`, consecutive from
    /// the request's offset.
    BlockStatus {
        /// The context id.
        context: u32,
        /// The extents.
        extents: Vec<(u32, u32)>,
    },
    /// The request failed (at `offset`, if the server said where).
    Error {
        /// NBD errno.
        code: u32,
        /// The server's message.
        message: String,
        /// Where it failed.
        offset: Option<u64>,
    },
}

/// A decoded reply chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request it answers.
    pub cookie: u64,
    /// The last chunk of that request.
    pub done: bool,
    /// What it says.
    pub chunk: Chunk,
}

/// Splits replies off the server's byte stream.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    buf: BytesMut,
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

impl ReplyDecoder {
    /// A decoder; `leftover` is what followed the handshake.
    pub fn new(leftover: &[u8]) -> ReplyDecoder {
        ReplyDecoder { buf: BytesMut::from(leftover) }
    }

    /// Adds bytes from the server.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete reply, if one is buffered.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, NbdError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let n = header_len(&self.buf[..4])?;
        if self.buf.len() < n {
            return Ok(None);
        }
        let header = parse_header(&self.buf[..n])?;
        let len = header.payload_len();
        if self.buf.len() < n + len {
            self.buf.reserve(n + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(n);
        let payload = self.buf.split_to(len);
        finish(header, payload).map(Some)
    }
}

/// A reply's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A simple reply: only an error is accepted (structured replies were agreed).
    Simple {
        /// The request it answers.
        cookie: u64,
        /// NBD errno, nonzero.
        error: u32,
    },
    /// A structured reply chunk.
    Structured {
        /// `NBD_REPLY_FLAG_DONE` and others.
        flags: u16,
        /// The chunk type.
        kind: u16,
        /// The request it answers.
        cookie: u64,
        /// Payload length, at most [`MAX_READ`] + 64.
        len: u32,
    },
}

impl Header {
    /// Bytes of payload after the header.
    pub fn payload_len(&self) -> usize {
        match self {
            Header::Simple { .. } => 0,
            Header::Structured { len, .. } => *len as usize,
        }
    }

    /// An `OFFSET_DATA` chunk with at least one byte: its payload is a u64
    /// offset and then the data, which a client may read straight into a
    /// buffer of its own (then [`Reply`] is built by the caller).
    pub fn offset_data(&self) -> Option<(u64, bool, usize)> {
        match *self {
            Header::Structured { flags, kind: TYPE_OFFSET_DATA, cookie, len } if len > 8 => {
                Some((cookie, flags & FLAG_DONE != 0, len as usize - 8))
            }
            _ => None,
        }
    }
}

/// The whole header's length (16 or 20 bytes), from its first 4 bytes.
pub fn header_len(magic: &[u8]) -> Result<usize, NbdError> {
    match be32(magic, 0) {
        SIMPLE_REPLY_MAGIC => Ok(16),
        STRUCTURED_REPLY_MAGIC => Ok(20),
        m => Err(protocol(format!("bad reply magic {m:#x}"))),
    }
}

/// Decodes a whole header ([`header_len`] bytes).
pub fn parse_header(b: &[u8]) -> Result<Header, NbdError> {
    if b.len() != header_len(b)? {
        return Err(protocol("a reply header of the wrong length"));
    }
    match be32(b, 0) {
        SIMPLE_REPLY_MAGIC => {
            let (error, cookie) = (be32(b, 4), be64(b, 8));
            if error == 0 {
                // With structured replies negotiated only an error may come
                // as a simple reply: a successful read's length is not in
                // its header.
                return Err(protocol("a simple reply without an error after structured replies were agreed"));
            }
            Ok(Header::Simple { cookie, error })
        }
        _ => {
            let (flags, kind, cookie, len) = (be16(b, 4), be16(b, 6), be64(b, 8), be32(b, 16));
            if len > MAX_READ + 64 {
                return Err(protocol(format!("a reply chunk of {len} bytes")));
            }
            Ok(Header::Structured { flags, kind, cookie, len })
        }
    }
}

/// The reply a header and its whole payload make.
pub fn finish(header: Header, payload: BytesMut) -> Result<Reply, NbdError> {
    match header {
        Header::Simple { cookie, error } => {
            Ok(Reply { cookie, done: true, chunk: Chunk::Error { code: error, message: String::new(), offset: None } })
        }
        Header::Structured { flags, kind, cookie, len } => {
            if payload.len() != len as usize {
                return Err(protocol("a chunk payload of the wrong length"));
            }
            let chunk = decode_chunk(kind, payload)?;
            let done = flags & FLAG_DONE != 0;
            if chunk == Chunk::None && !done {
                return Err(protocol("an empty chunk that does not end its reply"));
            }
            Ok(Reply { cookie, done, chunk })
        }
    }
}

fn decode_chunk(kind: u16, mut p: BytesMut) -> Result<Chunk, NbdError> {
    let len = p.len();
    match kind {
        TYPE_NONE if len == 0 => Ok(Chunk::None),
        TYPE_OFFSET_DATA if len > 8 => {
            let offset = be64(&p, 0);
            p.advance(8);
            Ok(Chunk::Data { offset, data: p })
        }
        TYPE_OFFSET_HOLE if len == 12 => {
            let hole = be32(&p, 8);
            if hole == 0 {
                return Err(protocol("a hole of 0 bytes"));
            }
            Ok(Chunk::Hole { offset: be64(&p, 0), len: hole })
        }
        TYPE_BLOCK_STATUS if len >= 12 && (len - 4).is_multiple_of(8) => {
            let extents: Vec<(u32, u32)> = (4..len).step_by(8).map(|i| (be32(&p, i), be32(&p, i + 4))).collect();
            if extents.iter().any(|&(l, _)| l == 0) {
                return Err(protocol("a block status extent of 0 bytes"));
            }
            Ok(Chunk::BlockStatus { context: be32(&p, 0), extents })
        }
        k if k & TYPE_ERROR_BIT != 0 && len >= 6 => {
            let code = be32(&p, 0);
            let mlen = be16(&p, 4) as usize;
            let extra = if k == TYPE_ERROR_OFFSET { 8 } else { 0 };
            if 6 + mlen + extra > len {
                return Err(protocol("an error chunk shorter than its message"));
            }
            let message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
            let offset = (k == TYPE_ERROR_OFFSET).then(|| be64(&p, 6 + mlen));
            if code == 0 {
                return Err(protocol("an error chunk with error 0"));
            }
            Ok(Chunk::Error { code, message, offset })
        }
        k => Err(protocol(format!("reply chunk type {k} with {len} bytes"))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn chunks_decode_in_pieces() {
        let mut stream = Vec::new();
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend_from_slice(b"hello");
        stream.extend(chunk(0, TYPE_OFFSET_DATA, 9, &data));
        let mut hole = 0u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        stream.extend(chunk(0, TYPE_OFFSET_HOLE, 9, &hole));
        let mut bs = 3u32.to_be_bytes().to_vec();
        for (l, f) in [(65536u32, 3u32), (4096, 0)] {
            bs.extend_from_slice(&l.to_be_bytes());
            bs.extend_from_slice(&f.to_be_bytes());
        }
        stream.extend(chunk(FLAG_DONE, TYPE_BLOCK_STATUS, 10, &bs));
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&2u16.to_be_bytes());
        err.extend_from_slice(b"io");
        err.extend_from_slice(&77u64.to_be_bytes());
        stream.extend(chunk(FLAG_DONE, TYPE_ERROR_OFFSET, 11, &err));
        stream.extend(chunk(FLAG_DONE, TYPE_NONE, 9, &[]));
        let mut d = ReplyDecoder::new(&[]);
        let mut got = Vec::new();
        for b in stream.chunks(3) {
            d.feed(b);
            while let Some(r) = d.next_reply().unwrap_or_else(|e| panic!("{e}")) {
                got.push(r);
            }
        }
        assert_eq!(got.len(), 5);
        assert_eq!(got[0].chunk, Chunk::Data { offset: 4096, data: BytesMut::from(&b"hello"[..]) });
        assert_eq!(got[1].chunk, Chunk::Hole { offset: 0, len: 4096 });
        assert_eq!(got[2].chunk, Chunk::BlockStatus { context: 3, extents: vec![(65536, 3), (4096, 0)] });
        assert!(got[2].done);
        assert_eq!(got[3].chunk, Chunk::Error { code: 5, message: "io".into(), offset: Some(77) });
        assert_eq!((got[4].cookie, got[4].done, &got[4].chunk), (9, true, &Chunk::None));
    }

    #[test]
    fn hostile_replies_are_errors() {
        let bad: Vec<Vec<u8>> = vec![
            b"garbage!garbage!garbage!".to_vec(),
            chunk(0, TYPE_OFFSET_DATA, 1, &[0; 8]),
            chunk(0, TYPE_OFFSET_HOLE, 1, &[0; 12]),
            chunk(0, TYPE_BLOCK_STATUS, 1, &[0; 4]),
            chunk(0, TYPE_BLOCK_STATUS, 1, &[0; 13]),
            chunk(0, TYPE_BLOCK_STATUS, 1, &[0; 12]),
            chunk(0, TYPE_ERROR_BIT | 1, 1, &[0, 0, 0, 5, 0, 9, b'x']),
            chunk(0, TYPE_NONE, 1, &[]),
            chunk(0, 77, 1, &[1, 2, 3]),
            {
                let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                v.extend_from_slice(&[0; 12]);
                v
            },
            {
                let mut v = chunk(0, TYPE_OFFSET_DATA, 1, &[]);
                v[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                v
            },
        ];
        for (i, b) in bad.iter().enumerate() {
            let mut d = ReplyDecoder::new(b);
            assert!(d.next_reply().is_err(), "case {i} decoded");
        }
    }
}
