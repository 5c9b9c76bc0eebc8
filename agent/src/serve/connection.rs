//! One authenticated connection: its sessions (one per control stream —
//! a push has one, a group push one per member, all on one connection
//! and one flow-control budget) and the routing of its data streams to
//! them. A data stream of a connection with several sessions starts with
//! [`DATA_STREAM_MAGIC`] and its session's control stream id; one without
//! belongs to the connection's first session (a push of one disk).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::{session, ServerCtx};
use crate::transport::{BENCH_STREAM_MAGIC, DATA_STREAM_MAGIC};

/// A data stream and the bytes read off it to route it.
pub type DataStream = (quinn::RecvStream, Bytes);

/// How long a data stream may take to say which session it is for.
const PREAMBLE_WITHIN: Duration = Duration::from_secs(10);
/// Data streams waiting for a session that has not opened yet.
const MAX_WAITING: usize = 256;
/// How long the source may take to read the last frames and close, once
/// the connection's sessions ended.
const LINGER: Duration = Duration::from_secs(2);

/// Key of the connection's first session, for streams without a preamble.
const FIRST: u64 = u64::MAX;

#[derive(Default)]
struct Router {
    sessions: HashMap<u64, mpsc::UnboundedSender<DataStream>>,
    waiting: HashMap<u64, Vec<DataStream>>,
    first: Option<u64>,
}

impl Router {
    /// A session on control stream `id`: its data streams, those that came
    /// before it included.
    fn register(&mut self, id: u64) -> mpsc::UnboundedReceiver<DataStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut early = self.waiting.remove(&id).unwrap_or_default();
        if self.first.is_none() {
            self.first = Some(id);
            early.extend(self.waiting.remove(&FIRST).unwrap_or_default());
        }
        for s in early {
            let _ = tx.send(s);
        }
        self.sessions.insert(id, tx);
        rx
    }

    fn deliver(&mut self, key: u64, stream: DataStream) {
        let key = if key == FIRST { self.first.unwrap_or(FIRST) } else { key };
        match self.sessions.get(&key) {
            Some(tx) => {
                let _ = tx.send(stream);
            }
            None if self.waiting.values().map(Vec::len).sum::<usize>() < MAX_WAITING => {
                self.waiting.entry(key).or_default().push(stream);
            }
            // A source that opens streams for sessions it never starts.
            None => tracing::warn!("dropped a data stream for an unknown session"),
        }
    }
}

/// Serves the sessions of `conn` from `peer` until it closes.
pub async fn serve(conn: quinn::Connection, peer: String, ctx: Arc<ServerCtx>) {
    let remote = conn.remote_address();
    let router = Arc::new(Mutex::new(Router::default()));
    let mut sessions = tokio::task::JoinSet::new();
    let mut routing = tokio::task::JoinSet::new();
    let mut shutdown = ctx.shutdown.clone();
    let mut linger: Option<tokio::time::Instant> = None;
    let mut opened = 0u32;
    loop {
        let until = linger.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400));
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((ctl_tx, ctl_rx)) => {
                    linger = None;
                    opened += 1;
                    let id = u64::from(ctl_rx.id());
                    let data = router.lock().unwrap_or_else(|p| p.into_inner()).register(id);
                    sessions.spawn(session::run(conn.clone(), peer.clone(), ctx.clone(), (ctl_tx, ctl_rx), data));
                }
                Err(e) => {
                    tracing::debug!(%remote, "connection ended: {e}");
                    break;
                }
            },
            uni = conn.accept_uni() => match uni {
                Ok(stream) => { routing.spawn(route(stream, router.clone(), conn.clone(), ctx.state_root.clone())); }
                Err(_) => break,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {
                if sessions.is_empty() {
                    // Let the source read the last frames before the connection goes.
                    linger = Some(tokio::time::Instant::now() + LINGER);
                }
            }
            Some(_) = routing.join_next(), if !routing.is_empty() => {}
            _ = tokio::time::sleep_until(until), if linger.is_some() => break,
            _ = shutdown.changed(), if sessions.is_empty() => {
                conn.close(0u32.into(), b"shutting down");
                break;
            }
        }
    }
    while sessions.join_next().await.is_some() {}
    conn.close(0u32.into(), b"done");
    tracing::info!(%remote, %peer, sessions = opened, "connection closed");
}

/// Reads a data stream's preamble and hands the stream to its session.
async fn route(
    mut stream: quinn::RecvStream,
    router: Arc<Mutex<Router>>,
    conn: quinn::Connection,
    state_root: std::path::PathBuf,
) {
    let mut head = BytesMut::new();
    let read = tokio::time::timeout(PREAMBLE_WITHIN, async {
        while head.len() < 12 {
            match stream.read_chunk(12 - head.len(), true).await {
                Ok(Some(c)) => head.extend_from_slice(&c.bytes),
                _ => break,
            }
            if head.len() >= 4 && head[..4] != DATA_STREAM_MAGIC {
                break;
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    if head.len() >= 4 && head[..4] == BENCH_STREAM_MAGIC {
        return super::bench::sink(stream, head.len() as u64 - 4, conn, state_root).await;
    }
    let (key, rest) = match head.len() >= 12 && head[..4] == DATA_STREAM_MAGIC {
        true => {
            let mut id = [0u8; 8];
            id.copy_from_slice(&head[4..12]);
            (u64::from_be_bytes(id), head.split_off(12).freeze())
        }
        false => (FIRST, head.freeze()),
    };
    router.lock().unwrap_or_else(|p| p.into_inner()).deliver(key, (stream, rest));
}
