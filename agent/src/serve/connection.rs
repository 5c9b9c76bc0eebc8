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
use tokio::time::Instant;

use super::{session, ServerCtx};
use crate::transport::{BENCH_STREAM_MAGIC, DATA_STREAM_MAGIC};

/// A data stream and the bytes read off it to route it.
pub type DataStream = (quinn::RecvStream, Bytes);

/// How long a data stream may take to say which session it is for.
const PREAMBLE_WITHIN: Duration = Duration::from_secs(10);
/// Data streams waiting for a session that has not opened yet.
const MAX_WAITING: usize = 256;
/// How long a data stream waits for its session to open.
const SESSION_WITHIN: Duration = Duration::from_secs(10);
/// The code a data stream for no session is stopped with.
const NO_SESSION: u32 = 3;
/// How long the source may take to read the last frames and close, once
/// the connection's sessions ended.
const LINGER: Duration = Duration::from_secs(2);

/// Key of the connection's first session, for streams without a preamble.
const FIRST: u64 = u64::MAX;

/// Routes a connection's data streams (`S`) to its sessions by key.
struct Router<S> {
    sessions: HashMap<u64, mpsc::UnboundedSender<S>>,
    /// Streams whose session has not opened yet, with when they came.
    waiting: HashMap<u64, Vec<(Instant, S)>>,
    first: Option<u64>,
}

impl<S> Default for Router<S> {
    fn default() -> Self {
        Router { sessions: HashMap::new(), waiting: HashMap::new(), first: None }
    }
}

impl<S> Router<S> {
    /// A session on control stream `id`: its data streams, those that came
    /// before it included.
    fn register(&mut self, id: u64) -> mpsc::UnboundedReceiver<S> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut early = self.waiting.remove(&id).unwrap_or_default();
        if self.first.is_none() {
            self.first = Some(id);
            early.extend(self.waiting.remove(&FIRST).unwrap_or_default());
        }
        for (_, s) in early {
            let _ = tx.send(s);
        }
        self.sessions.insert(id, tx);
        rx
    }

    /// Hands `stream` to its session, or keeps it until the session opens.
    /// `Some` gives back a stream that cannot be kept.
    fn deliver(&mut self, key: u64, stream: S, now: Instant) -> Option<S> {
        let key = if key == FIRST { self.first.unwrap_or(FIRST) } else { key };
        match self.sessions.get(&key) {
            Some(tx) => {
                let _ = tx.send(stream);
                None
            }
            None if self.waiting.values().map(Vec::len).sum::<usize>() < MAX_WAITING => {
                self.waiting.entry(key).or_default().push((now, stream));
                None
            }
            // A source that opens streams for sessions it never starts.
            None => Some(stream),
        }
    }

    /// The streams that waited longer than `within` for their session: a
    /// source opens a session's control stream before its data streams,
    /// so such a session is not coming.
    fn expire(&mut self, now: Instant, within: Duration) -> Vec<S> {
        let mut expired = Vec::new();
        for streams in self.waiting.values_mut() {
            let (old, young): (Vec<_>, Vec<_>) =
                streams.drain(..).partition(|(came, _)| now.saturating_duration_since(*came) > within);
            *streams = young;
            expired.extend(old.into_iter().map(|(_, s)| s));
        }
        self.waiting.retain(|_, streams| !streams.is_empty());
        expired
    }
}

/// Refuses a data stream no session takes: its sender's writes fail
/// instead of waiting for as long as the connection lasts.
fn refuse(mut stream: DataStream, why: &str) {
    tracing::warn!("dropped a data stream: {why}");
    let _ = stream.0.stop(NO_SESSION.into());
}

/// Serves the sessions of `conn` from `peer` until it closes.
pub async fn serve(conn: quinn::Connection, peer: String, ctx: Arc<ServerCtx>) {
    let remote = conn.remote_address();
    let router = Arc::new(Mutex::new(Router::<DataStream>::default()));
    let mut sessions = tokio::task::JoinSet::new();
    let mut routing = tokio::task::JoinSet::new();
    let mut shutdown = ctx.shutdown.clone();
    let mut linger: Option<Instant> = None;
    let mut expiry = tokio::time::interval(SESSION_WITHIN / 2);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut opened = 0u32;
    loop {
        let until = linger.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400));
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
                    linger = Some(Instant::now() + LINGER);
                }
            }
            Some(_) = routing.join_next(), if !routing.is_empty() => {}
            _ = expiry.tick() => {
                let expired = router.lock().unwrap_or_else(|p| p.into_inner()).expire(Instant::now(), SESSION_WITHIN);
                for stream in expired {
                    refuse(stream, "its session did not open");
                }
            }
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
    router: Arc<Mutex<Router<DataStream>>>,
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
    let refused = router.lock().unwrap_or_else(|p| p.into_inner()).deliver(key, (stream, rest), Instant::now());
    if let Some(stream) = refused {
        refuse(stream, "too many streams wait for sessions that have not opened");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_wait_for_their_session_then_expire() {
        let mut r = Router::<&str>::default();
        let t0 = Instant::now();
        assert_eq!(r.deliver(FIRST, "first-a", t0), None);
        assert_eq!(r.deliver(7, "seven", t0), None);
        assert_eq!(r.deliver(9, "nine", t0 + Duration::from_secs(8)), None);
        // The first session takes the streams without a preamble and its own.
        let mut first = r.register(5);
        assert_eq!(first.try_recv().ok(), Some("first-a"));
        assert!(first.try_recv().is_err());
        assert_eq!(r.deliver(FIRST, "first-b", t0), None);
        assert_eq!(first.try_recv().ok(), Some("first-b"));
        // Nothing has waited long enough yet.
        assert!(r.expire(t0 + SESSION_WITHIN, SESSION_WITHIN).is_empty());
        // Stream 7's session never opened; 9's came later and still waits.
        assert_eq!(r.expire(t0 + SESSION_WITHIN + Duration::from_secs(1), SESSION_WITHIN), vec!["seven"]);
        let mut nine = r.register(9);
        assert_eq!(nine.try_recv().ok(), Some("nine"));
        assert!(r.waiting.is_empty());
    }

    #[tokio::test]
    async fn waiting_streams_are_bounded() {
        let mut r = Router::<usize>::default();
        let now = Instant::now();
        for i in 0..MAX_WAITING {
            assert_eq!(r.deliver(100 + i as u64, i, now), None);
        }
        assert_eq!(r.deliver(1, MAX_WAITING, now), Some(MAX_WAITING), "one over the bound is given back");
    }
}
