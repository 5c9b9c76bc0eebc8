//! Bytes that arrive in pieces. A frame crosses the network in chunks (a
//! 64 KiB block never fits one QUIC packet); joining them would copy every
//! byte once more on the receiver's hottest path. So a frame body is
//! decoded across its chunks ([`Pieces`]), and a block payload keeps the
//! pieces it came in ([`Payload`]) until whoever consumes it reads them
//! (hashing reads them in order, an aligned write buffer copies them once).

use std::collections::VecDeque;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

/// A block payload: its bytes in order, in one or more pieces.
#[derive(Clone, Default)]
pub struct Payload {
    parts: Vec<Bytes>,
    len: usize,
}

impl Payload {
    /// The payload made of `parts` in order (empty ones are dropped).
    pub fn from_parts(parts: impl IntoIterator<Item = Bytes>) -> Payload {
        let parts: Vec<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let len = parts.iter().map(Bytes::len).sum();
        Payload { parts, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order, none empty.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// Bytes `range` of the payload, sharing its pieces. Panics if the
    /// range passes the end (callers check lengths first, as with slices).
    pub fn slice(&self, range: Range<usize>) -> Payload {
        assert!(range.start <= range.end && range.end <= self.len, "payload slice out of range");
        let mut out = Vec::new();
        let mut at = 0;
        for p in &self.parts {
            let (start, end) = (at, at + p.len());
            at = end;
            if end <= range.start {
                continue;
            }
            if start >= range.end {
                break;
            }
            out.push(p.slice(range.start.max(start) - start..range.end.min(end) - start));
        }
        Payload::from_parts(out)
    }

    /// Copies the bytes into `dst`, which must be exactly as long.
    pub fn copy_to_slice(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len, "payload copy into a buffer of another length");
        let mut at = 0;
        for p in &self.parts {
            dst[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
    }

    /// The bytes in one piece: shared when they already are, else copied.
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut b = BytesMut::with_capacity(self.len);
                for p in many {
                    b.extend_from_slice(p);
                }
                b.freeze()
            }
        }
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        Payload::from_parts([b])
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::from(Bytes::from(v))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.len == other.len && self.parts.iter().flat_map(|p| p.iter()).eq(other.parts.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Payload {}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes in {} pieces)", self.len, self.parts.len())
    }
}

/// A frame body being decoded: a [`Buf`] that also hands over its next
/// bytes as they lie, for a block payload.
pub trait Body: Buf {
    /// Takes the next `n` bytes (the caller checked `n <= remaining()`).
    fn take_payload(&mut self, n: usize) -> Payload;
}

impl Body for Bytes {
    fn take_payload(&mut self, n: usize) -> Payload {
        self.split_to(n).into()
    }
}

/// A frame body in the chunks it arrived in.
#[derive(Debug, Default)]
pub struct Pieces {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Pieces {
    /// Appends a chunk.
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.remaining += b.len();
            self.parts.push_back(b);
        }
    }
}

impl Buf for Pieces {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a frame body");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else { return };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }
}

impl Body for Pieces {
    fn take_payload(&mut self, mut n: usize) -> Payload {
        assert!(n <= self.remaining, "payload past the end of a frame body");
        self.remaining -= n;
        let mut out = Vec::new();
        while n > 0 {
            let Some(mut front) = self.parts.pop_front() else { break };
            if n < front.len() {
                out.push(front.split_to(n));
                self.parts.push_front(front);
                break;
            }
            n -= front.len();
            out.push(front);
        }
        Payload::from_parts(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(data: &[u8], cuts: &[usize]) -> Pieces {
        let mut p = Pieces::default();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            p.push(Bytes::copy_from_slice(&data[at..c]));
            at = c;
        }
        p
    }

    #[test]
    fn payload_taken_across_pieces_keeps_them_and_the_bytes() {
        let data: Vec<u8> = (0..200u8).collect();
        let mut p = pieces(&data, &[3, 70, 71, 150]);
        assert_eq!(p.get_u16_le(), u16::from_le_bytes([0, 1]));
        let pay = p.take_payload(100);
        assert_eq!(pay.len(), 100);
        assert_eq!(pay.parts().len(), 4, "no piece is joined");
        assert_eq!(pay.to_bytes(), &data[2..102]);
        assert_eq!(pay, Payload::from(data[2..102].to_vec()));
        let mut out = vec![0u8; 100];
        pay.copy_to_slice(&mut out);
        assert_eq!(out, &data[2..102]);
        assert_eq!(pay.slice(60..90).to_bytes(), &data[62..92]);
        assert_eq!(pay.slice(0..0).len(), 0);
        assert_eq!(p.remaining(), 98);
        assert_eq!(p.take_payload(98).to_bytes(), &data[102..]);
        assert_eq!(p.remaining(), 0);
    }

    #[test]
    fn equal_bytes_in_other_pieces_are_equal() {
        let a = Payload::from_parts([Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        let b = Payload::from_parts([Bytes::from_static(b"a"), Bytes::new(), Bytes::from_static(b"bcd")]);
        assert_eq!(a, b);
        assert_ne!(a, Payload::from(b"abce".to_vec()));
        assert_eq!(b.parts().len(), 2, "empty pieces are dropped");
    }
}
