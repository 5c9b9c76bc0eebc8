//! QUIC endpoints tuned for bulk transfer, and framed streams.
//!
//! What the tuning is based on is in `../shared/QUIC-NOTES.md`: packet size
//! dominates CPU per byte, so paths that allow it (loopback: 65000 bytes)
//! use large datagrams with GSO off (GSO batches over 64 KiB are lost);
//! other paths start at 1452 with MTU discovery up to a configured bound and
//! GSO on. Socket buffers are made larger than the flow-control windows so
//! the kernel does not drop packets.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::{DecodeError, FrameSplitter, Message, MAX_FRAME};
use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};

/// Stream flow-control window (per stream).
const STREAM_WINDOW: u32 = 16 << 20;
/// Connection flow-control window.
const CONN_WINDOW: u32 = 32 << 20;
/// Largest UDP payload that crosses IPv4 loopback with headers to spare.
pub const LOOPBACK_MTU: u16 = 65000;
/// A safe datagram size on a 1500-byte Ethernet path (IPv6 + UDP headers).
pub const ETHERNET_MTU: u16 = 1452;
/// Above this, GSO batches exceed what the kernel accepts (QUIC-NOTES trap).
const GSO_LIMIT: u16 = 6500;

/// Datagram sizes for a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathMtu {
    /// The largest UDP payload to use.
    pub bound: u16,
    /// Whether the bound is known to work (loopback) so no probing is needed.
    pub known: bool,
}

/// The MTU for a path: configured, or by whether the path is loopback.
pub fn mtu_for(peer: &SocketAddr, configured: Option<u16>) -> PathMtu {
    let loopback = peer.ip().is_loopback();
    let bound = configured.unwrap_or(if loopback { LOOPBACK_MTU } else { ETHERNET_MTU });
    PathMtu { bound, known: loopback }
}

/// How long a silent peer is waited for, unless configured.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Transport settings for bulk transfer with datagrams up to `mtu.bound`,
/// receiving at most `receive_window` bytes ahead of what is read.
pub fn transport_config(mtu: PathMtu, idle: Duration, receive_window: u64) -> TransportConfig {
    let max_mtu = mtu.bound;
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u64(receive_window).unwrap_or(VarInt::from_u32(CONN_WINDOW)));
    t.send_window(CONN_WINDOW as u64);
    // A group push carries every member on one connection: a control
    // stream and a data stream each, for up to 64 members.
    t.max_concurrent_uni_streams(VarInt::from_u32(160));
    t.max_concurrent_bidi_streams(VarInt::from_u32(72));
    t.keep_alive_interval(Some((idle / 4).max(Duration::from_millis(200))));
    if let Ok(idle) = idle.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    if mtu.known && max_mtu > 1200 {
        // Loopback carries the bound: start there, with no probes (each is a
        // full-size padded packet, hundreds of KB on a small delta). The
        // congestion window must admit ten such packets or the handshake's
        // first large packet is never sent (QUIC-NOTES trap).
        t.initial_mtu(max_mtu);
        t.mtu_discovery_config(None);
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(10 * max_mtu as u64);
        t.congestion_controller_factory(Arc::new(cubic));
    } else {
        let mut discovery = MtuDiscoveryConfig::default();
        discovery.upper_bound(max_mtu.max(1200));
        discovery.interval(Duration::from_secs(60));
        // A coarse binary search reaches a large bound in a few probes.
        discovery.minimum_change(if max_mtu > 9000 { 4096 } else { 20 });
        t.mtu_discovery_config(Some(discovery));
    }
    t.enable_segmentation_offload(max_mtu <= GSO_LIMIT);
    t
}

/// A UDP socket with buffers larger than the flow-control windows.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    let want = 2 * CONN_WINDOW as usize;
    // As root the FORCE variants pass net.core.rmem_max; otherwise take what is allowed.
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, want).is_err() {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, want);
    }
    if rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, want).is_err() {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&socket, want);
    }
    Ok(socket)
}

/// Endpoint settings: accept datagrams as large as loopback carries (the
/// default advertises 1472, which caps MTU discovery on every path).
fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    let _ = c.max_udp_payload_size(LOOPBACK_MTU);
    c
}

/// A client endpoint bound to an ephemeral port of the right family.
pub fn client_endpoint(peer: &SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr =
        if peer.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(std::io::Error::other)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(endpoint_config(), None, udp_socket(bind)?, runtime)
}

/// A server endpoint on `addr`.
pub fn server_endpoint(addr: SocketAddr, config: quinn::ServerConfig) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(endpoint_config(), Some(config), udp_socket(addr)?, runtime)
}

/// Client config: TLS plus transport tuned for the path to `peer`.
pub fn client_config(
    tls: rustls::ClientConfig,
    peer: &SocketAddr,
    max_mtu: Option<u16>,
    idle: Duration,
) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport_config(mtu_for(peer, max_mtu), idle, CONN_WINDOW as u64)));
    Ok(c)
}

/// Server config: TLS plus transport tuned for the listening address. A
/// connection starts with `receive_window`; the agent widens it once the
/// memory budget admits its session.
pub fn server_config(
    tls: rustls::ServerConfig,
    listen: &SocketAddr,
    max_mtu: Option<u16>,
    idle: Duration,
    receive_window: u64,
) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(Arc::new(transport_config(mtu_for(listen, max_mtu), idle, receive_window)));
    Ok(c)
}

/// Reads frames from a QUIC receive stream through the protocol's one
/// [`FrameSplitter`], reading only the bytes it wants: never past the frame
/// at hand, so bytes not yet wanted stay in QUIC's flow-controlled buffers
/// (and stop the sender once its window is used).
pub struct FrameReader {
    stream: quinn::RecvStream,
    splitter: FrameSplitter,
    bytes_read: u64,
    /// Bytes a read may take beyond the frame it completes (control
    /// streams); 0 on data streams, whose frames are paid for one at a time.
    read_ahead: usize,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection or stream failed.
    #[error("{0}")]
    Stream(String),
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame: {0}")]
    Decode(DecodeError),
}

/// Bytes a control stream's read may take at once ([`FrameReader::control`]).
pub const CONTROL_READ_AHEAD: usize = 64 << 10;

/// Frames a session handles before it writes its answers and acts on its
/// events ([`FrameReader::take_buffered`]).
pub const FRAMES_PER_TURN: usize = 64;

impl FrameReader {
    /// A reader of frames up to [`MAX_FRAME`].
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self::with_limit(stream, MAX_FRAME)
    }

    /// A reader whose stream began with `read` (bytes taken off it before).
    pub fn with_prefix(stream: quinn::RecvStream, read: bytes::Bytes) -> Self {
        let mut r = Self::new(stream);
        r.bytes_read = read.len() as u64;
        if !read.is_empty() {
            r.splitter.push(read);
        }
        r
    }

    /// A reader that refuses frames longer than `max_frame`.
    pub fn with_limit(stream: quinn::RecvStream, max_frame: u32) -> Self {
        FrameReader { stream, splitter: FrameSplitter::new(max_frame.min(MAX_FRAME)), bytes_read: 0, read_ahead: 0 }
    }

    /// A control stream's reader: each read takes what has arrived, up to
    /// [`CONTROL_READ_AHEAD`] bytes, and [`FrameReader::take_buffered`]
    /// hands out the frames it holds. A large sparse disk is thousands of small
    /// region frames; one read and one wakeup each was much of a push.
    pub fn control(stream: quinn::RecvStream, max_frame: u32) -> Self {
        FrameReader { read_ahead: CONTROL_READ_AHEAD, ..Self::with_limit(stream, max_frame) }
    }

    /// Hands `handle` the whole frames already received, without waiting
    /// for more, up to [`FRAMES_PER_TURN`] − 1 and while it returns
    /// `true`; a frame that does not decode is the error.
    pub fn take_buffered(&mut self, mut handle: impl FnMut(Message) -> bool) -> Result<(), DecodeError> {
        for _ in 1..FRAMES_PER_TURN {
            let Some(m) = self.splitter.next_frame()? else { break };
            if !handle(m) {
                break;
            }
        }
        Ok(())
    }

    /// Bytes received so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Reads up to `want` more bytes. `false` at a clean end of stream with
    /// nothing buffered.
    async fn read(&mut self, want: usize) -> Result<bool, ReadError> {
        match self.stream.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                self.bytes_read += chunk.bytes.len() as u64;
                self.splitter.push(chunk.bytes);
                Ok(true)
            }
            Ok(None) if self.splitter.buffered() == 0 => Ok(false),
            Ok(None) => Err(ReadError::Decode(DecodeError::Truncated)),
            Err(e) => Err(ReadError::Stream(e.to_string())),
        }
    }

    /// The next frame's length and its first `head` bytes (after the length
    /// prefix), read but not taken: what a reader needs to reserve memory
    /// before it reads the body. `None` at a clean end of stream.
    pub async fn peek(&mut self, head: usize) -> Result<Option<(u32, Vec<u8>)>, ReadError> {
        loop {
            if let Some(p) = self.splitter.peek(head).map_err(ReadError::Decode)? {
                return Ok(Some(p));
            }
            let want = match self.splitter.buffered() {
                n if n < 4 => 4 - n,
                _ => self.splitter.wanted().map_err(ReadError::Decode)?.min(head.max(1)),
            };
            if !self.read(want.max(1)).await? {
                return Ok(None);
            }
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            if let Some(m) = self.splitter.next_frame().map_err(ReadError::Decode)? {
                return Ok(Some(m));
            }
            let want = self.splitter.wanted().map_err(ReadError::Decode)?;
            if !self.read(want.max(1).max(self.read_ahead)).await? {
                return Ok(None);
            }
        }
    }
}

/// Writes one frame.
pub async fn write_frame(stream: &mut quinn::SendStream, m: &Message) -> Result<(), quinn::WriteError> {
    stream.write_chunk(m.to_bytes()).await
}

/// Writes `frames` as one chunk: a session answers thousands of regions of
/// a large disk with small frames, and one write per frame wakes the
/// connection for each. Returns the bytes written.
pub async fn write_frames(stream: &mut quinn::SendStream, frames: &[Message]) -> Result<u64, quinn::WriteError> {
    match frames {
        [] => Ok(0),
        [one] => {
            let bytes = one.to_bytes();
            let n = bytes.len() as u64;
            stream.write_chunk(bytes).await.map(|()| n)
        }
        many => {
            let mut buf = bytes::BytesMut::new();
            for m in many {
                buf.extend_from_slice(&m.to_bytes());
            }
            let n = buf.len() as u64;
            stream.write_chunk(buf.freeze()).await.map(|()| n)
        }
    }
}

/// First bytes of a data stream that belongs to one session of several on
/// a connection (a group push): this magic, then the session's control
/// stream id (u64, big-endian). A stream without it starts with a frame
/// (its length can never be these bytes: far above [`MAX_FRAME`]) and
/// belongs to the connection's only session.
pub const DATA_STREAM_MAGIC: [u8; 4] = *b"DFDS";

/// First bytes of a bench stream (`diskferry bench`): the agent reads and
/// drops what follows, touching no target, then answers on a stream of
/// its own with what it measured (JSON).
pub const BENCH_STREAM_MAGIC: [u8; 4] = *b"DFBN";

/// The preamble of a data stream of the session on control stream `ctl`.
pub fn data_stream_preamble(ctl: quinn::StreamId) -> bytes::Bytes {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&DATA_STREAM_MAGIC);
    b.extend_from_slice(&u64::from(ctl).to_be_bytes());
    b.into()
}
