//! The client side of the NBD protocol, sans I/O: the fixed-newstyle
//! handshake ([`Handshake`]: structured replies, metadata contexts,
//! `NBD_OPT_GO` with export and block-size info), request encoding, and the
//! structured-reply decoder ([`ReplyDecoder`]) that never trusts a length
//! the server sent. Byte layouts are in `docs/design.md` §9.6.
//!
//! Written here because no maintained Rust crate speaks structured replies
//! and block status as a client; the protocol is small and fixed.

mod handshake;
mod reply;

pub use handshake::{Export, Handshake, MetaContext};
pub use reply::{finish, header_len, parse_header, Chunk, Header, Reply, ReplyDecoder};

/// `NBD_STATE_HOLE` of `base:allocation`: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `NBD_STATE_ZERO` of `base:allocation`: reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// Flag of a `qemu:dirty-bitmap:NAME` extent: written since the bitmap started.
pub const STATE_DIRTY: u32 = 1;
/// The allocation context every server of block status offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The largest read this client asks for, and the largest reply chunk it
/// accepts (a hostile length beyond it is an error, not an allocation).
pub const MAX_READ: u32 = 32 << 20;
/// Largest option reply accepted during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;

const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// A transmission-phase command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_DISC`: the client leaves.
    Disconnect,
    /// `NBD_CMD_BLOCK_STATUS` (with `NBD_CMD_FLAG_REQ_ONE` unset: the server
    /// may describe less than asked, the client asks again).
    BlockStatus,
}

impl Command {
    fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Disconnect => 2,
            Command::BlockStatus => 7,
        }
    }
}

/// The 28 bytes of a request.
pub fn request(command: Command, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Command flags stay 0: reads may be split into data and hole chunks.
    b[6..8].copy_from_slice(&command.code().to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// What went wrong talking to an NBD server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// The server broke the protocol (bad magic, impossible length, a reply
    /// for no request, a chunk outside its request…).
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    /// The server lacks something this client needs.
    #[error("the NBD server does not support {0}")]
    Unsupported(String),
    /// The server refused an option (unknown export, policy…).
    #[error("the NBD server refused {option}: {message} (error {code:#x})")]
    Refused {
        /// The option.
        option: &'static str,
        /// The `NBD_REP_ERR_*` code.
        code: u32,
        /// The server's message, if any.
        message: String,
    },
    /// A command failed on the server (`NBD_EIO` and the like).
    #[error("the NBD server failed the request: {message} (errno {code})")]
    Command {
        /// The NBD error number.
        code: u32,
        /// The server's message, if any.
        message: String,
    },
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_big_endian() {
        let r = request(Command::BlockStatus, 0x0102_0304_0506_0708, 1 << 40, 65536);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 0, 0, 7]);
        assert_eq!(be64(&r, 8), 0x0102_0304_0506_0708);
        assert_eq!(be64(&r, 16), 1 << 40);
        assert_eq!(be32(&r, 24), 65536);
    }
}
