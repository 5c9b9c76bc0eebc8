//! Splitting frames off a byte stream that arrives in chunks, sans-IO: the
//! one splitter the agent reads streams with and the fuzzer drives.
//!
//! A frame is `u32 length · body` (`length` counts the type byte and the
//! fields, see [`crate::message`]); a length over the limit is refused as
//! soon as its four bytes are in, before the body is buffered. "Need more
//! bytes" (`Ok(None)`) is kept apart from "bad bytes" (`Err`), as in
//! mini-redis. The splitter says how many bytes it wants next and never
//! more than the frame at hand needs, so a reader that follows it leaves
//! later bytes in its transport's flow-controlled buffers.
//!
//! ```
//! use bytes::Bytes;
//! use diskferry_protocol::frame::FrameSplitter;
//! use diskferry_protocol::{Message, MAX_FRAME};
//! let bytes = Message::Finish { consistency: diskferry_protocol::Consistency::Crash }.to_bytes();
//! let mut s = FrameSplitter::new(MAX_FRAME);
//! s.push(bytes.slice(..3));
//! assert_eq!(s.next_frame().unwrap(), None);
//! assert_eq!(s.wanted().unwrap(), 1);
//! s.push(bytes.slice(3..));
//! assert!(matches!(s.next_frame().unwrap(), Some(Message::Finish { .. })));
//! ```

use std::collections::VecDeque;

use bytes::Bytes;

use crate::coding::{DecodeError, DecodeResult};
use crate::message::Message;
use crate::payload::Pieces;

/// The body length a frame's 4-byte prefix announces, checked against the
/// limit before anything is buffered.
pub fn frame_length(prefix: [u8; 4], max_frame: u32) -> DecodeResult<u32> {
    let len = u32::from_le_bytes(prefix);
    if len == 0 {
        return Err(DecodeError::Truncated);
    }
    if len > max_frame {
        return Err(DecodeError::TooLarge(len as u64));
    }
    Ok(len)
}

/// Frames out of chunks. Chunks are kept as they came and a frame is
/// decoded across them: a block payload keeps its pieces (no copy).
#[derive(Debug)]
pub struct FrameSplitter {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    max_frame: u32,
}

impl FrameSplitter {
    /// A splitter refusing frames longer than `max_frame`.
    pub fn new(max_frame: u32) -> Self {
        FrameSplitter { chunks: VecDeque::new(), buffered: 0, max_frame }
    }

    /// Adds received bytes.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Bytes buffered and not yet taken.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// How many more bytes complete the next step: the length prefix, then
    /// the frame it announces; 0 when a whole frame is buffered. An error
    /// when the prefix announces a frame that is refused.
    pub fn wanted(&self) -> DecodeResult<usize> {
        if self.buffered < 4 {
            return Ok(4 - self.buffered);
        }
        let len = self.length()?;
        Ok((4 + len).saturating_sub(self.buffered))
    }

    /// The next frame's length and its first `head` bytes after the prefix
    /// (fewer if the frame is shorter), without taking it; `None` until
    /// those bytes are buffered. What a reader needs to reserve memory
    /// before it reads the body.
    pub fn peek(&self, head: usize) -> DecodeResult<Option<(u32, Vec<u8>)>> {
        if self.buffered < 4 {
            return Ok(None);
        }
        let len = self.length()?;
        let n = len.min(head);
        if self.buffered < 4 + n {
            return Ok(None);
        }
        let mut front = vec![0u8; 4 + n];
        self.copy_front(&mut front);
        front.drain(..4);
        Ok(Some((len as u32, front)))
    }

    /// The next whole frame, decoded and taken; `Ok(None)` means "read more
    /// bytes" ([`FrameSplitter::wanted`] says how many).
    pub fn next_frame(&mut self) -> DecodeResult<Option<Message>> {
        match self.take_body()? {
            Some(mut body) => Message::decode(&mut body).map(Some),
            None => Ok(None),
        }
    }

    fn length(&self) -> DecodeResult<usize> {
        let mut prefix = [0u8; 4];
        self.copy_front(&mut prefix);
        Ok(frame_length(prefix, self.max_frame)? as usize)
    }

    /// The next whole frame's body (without its length prefix), if
    /// buffered, in the chunks it arrived in: nothing is copied.
    fn take_body(&mut self) -> DecodeResult<Option<Pieces>> {
        if self.buffered < 4 {
            return Ok(None);
        }
        let mut len = self.length()?;
        if self.buffered < 4 + len {
            return Ok(None);
        }
        self.advance(4);
        self.buffered -= len;
        let mut body = Pieces::default();
        while len > 0 {
            let Some(mut c) = self.chunks.pop_front() else { break };
            if c.len() > len {
                body.push(c.split_to(len));
                self.chunks.push_front(c);
                break;
            }
            len -= c.len();
            body.push(c);
        }
        Ok(Some(body))
    }

    fn copy_front(&self, out: &mut [u8]) {
        let mut done = 0;
        for c in &self.chunks {
            let n = (out.len() - done).min(c.len());
            out[done..done + n].copy_from_slice(&c[..n]);
            done += n;
            if done == out.len() {
                break;
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.buffered -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else { return };
            let k = n.min(front.len());
            let _ = front.split_to(k);
            n -= k;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MAX_FRAME;

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let msgs = crate::message::tests::samples();
        let all: Vec<u8> = msgs.iter().flat_map(|m| m.to_bytes().to_vec()).collect();
        for step in [1usize, 3, 7, 64, 1000] {
            let mut s = FrameSplitter::new(MAX_FRAME);
            let mut out = Vec::new();
            for chunk in all.chunks(step) {
                assert!(s.wanted().unwrap() > 0 || s.buffered() > 0);
                s.push(Bytes::copy_from_slice(chunk));
                while let Some(m) = s.next_frame().unwrap() {
                    out.push(m);
                }
            }
            assert_eq!(out, msgs, "step {step}");
            assert_eq!(s.buffered(), 0);
        }
    }

    #[test]
    fn it_never_wants_past_the_frame_at_hand() {
        let m = Message::NeedChunks { region: 258 }.to_bytes();
        let mut s = FrameSplitter::new(MAX_FRAME);
        assert_eq!(s.wanted(), Ok(4));
        s.push(m.slice(..2));
        assert_eq!(s.wanted(), Ok(2));
        s.push(m.slice(2..4));
        assert_eq!(s.wanted(), Ok(m.len() - 4));
        assert_eq!(s.peek(3).unwrap(), None);
        s.push(m.slice(4..7));
        assert_eq!(s.peek(3).unwrap(), Some((9, m[4..7].to_vec())));
        s.push(m.slice(7..));
        assert_eq!(s.wanted(), Ok(0));
        assert_eq!(s.next_frame().unwrap(), Some(Message::NeedChunks { region: 258 }));
    }

    #[test]
    fn bad_prefixes_are_errors_before_the_body() {
        let mut s = FrameSplitter::new(MAX_FRAME);
        s.push(Bytes::from((MAX_FRAME + 1).to_le_bytes().to_vec()));
        assert!(matches!(s.wanted(), Err(DecodeError::TooLarge(_))));
        assert!(matches!(s.next_frame(), Err(DecodeError::TooLarge(_))));
        let mut z = FrameSplitter::new(MAX_FRAME);
        z.push(Bytes::from_static(&[0, 0, 0, 0]));
        assert_eq!(z.next_frame(), Err(DecodeError::Truncated));
    }
}
