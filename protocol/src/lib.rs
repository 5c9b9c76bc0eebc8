//! The diskferry wire format and the value types every layer shares.
//!
//! This crate does no I/O and knows no clock: [`Message`] turns into bytes and
//! back ([`FrameSplitter`] splits frames off a stream of chunks), the
//! [`session::SenderSession`] and [`session::ReceiverSession`] state machines
//! hold the protocol's logic, and it holds the small newtypes ([`BlockHash`], [`BlockSize`],
//! [`Generation`], [`Geometry`], [`TargetName`]) and the stable
//! [`ErrorCode`]s that the engine, the agent and the wire agree on.
//!
//! ```
//! use diskferry_protocol::{BlockSize, Geometry};
//! let g = Geometry::new(10 << 20, "64K".parse::<BlockSize>().unwrap());
//! assert_eq!(g.block_count(), 160);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod coding;
pub mod error;
pub mod frame;
pub mod message;
pub mod nbd;
pub mod payload;
pub mod region_hashes;
pub mod session;
pub mod types;

pub use coding::DecodeError;
pub use error::{ErrorClass, ErrorCode};
pub use frame::FrameSplitter;
pub use message::{Message, ALPN, MAX_FRAME, VERSION};
pub use payload::Payload;
pub use region_hashes::RegionHashes;
pub use types::{
    from_hex, parse_size, to_hex, BlockHash, BlockIndex, BlockSize, Consistency, Generation, Geometry,
    InvalidBlockSize, InvalidGeneration, InvalidTargetName, SessionId, TargetName, CHUNK_BLOCKS, PAGE_SIZE,
    REGION_BYTES,
};
