//! The agent's side of `diskferry bench`: it reads a bench stream to its
//! end and drops the bytes (no target is touched, no session opened),
//! measures an fsync'd write of its own into its state directory, and
//! answers on a stream of its own: `{"received_bytes", "receive_seconds",
//! "write_bytes", "write_seconds", "fsync_seconds"}`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes written for the write measurement.
const WRITE_BYTES: u64 = 256 << 20;
/// The most a bench stream may last and carry (the client sends 3 s).
const MAX_FOR: Duration = Duration::from_secs(15);
const MAX_BYTES: u64 = 16 << 30;
/// The receive window of a bench (as a session's).
const WINDOW: u32 = 16 << 20;

/// One bench at a time on this agent: each costs a 256 MiB fsync'd write.
static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Drains `stream` (`already` bytes were read with its preamble), then answers.
pub async fn sink(mut stream: quinn::RecvStream, already: u64, conn: quinn::Connection, state_root: PathBuf) {
    let Ok(_one) = ONE_AT_A_TIME.try_acquire() else {
        tracing::info!(peer = %conn.remote_address(), "bench refused: another one runs");
        let _ = stream.stop(1u32.into());
        return;
    };
    // The connection's window before admission is small (no session
    // opens): a bench gets a session's, or a WAN would look slow.
    conn.set_receive_window(quinn::VarInt::from_u32(WINDOW));
    let start = Instant::now();
    let mut received = already;
    let drained = tokio::time::timeout(MAX_FOR, async {
        while received < MAX_BYTES {
            match stream.read_chunk(1 << 20, false).await {
                Ok(Some(c)) => received += c.bytes.len() as u64,
                Ok(None) => return true,
                Err(e) => {
                    tracing::debug!("bench stream cut: {e}");
                    return false;
                }
            }
        }
        false
    })
    .await;
    if drained != Ok(true) {
        let _ = stream.stop(2u32.into());
        return;
    }
    let receive_seconds = start.elapsed().as_secs_f64();
    let state_root_for_fsync = state_root.clone();
    let write = tokio::task::spawn_blocking(move || write_rate(&state_root)).await;
    let (write_bytes, write_seconds) = match write {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            tracing::warn!("bench: the write measurement failed: {}", e.message);
            (0, 0.0)
        }
        Err(_) => (0, 0.0),
    };
    let root = state_root_for_fsync;
    let fsync_seconds =
        tokio::task::spawn_blocking(move || crate::bench::fsync_latency(&root).ok()).await.ok().flatten();
    let answer = serde_json::json!({
        "received_bytes": received,
        "receive_seconds": receive_seconds,
        "write_bytes": write_bytes,
        "write_seconds": write_seconds,
        "fsync_seconds": fsync_seconds,
    });
    tracing::info!(peer = %conn.remote_address(), %answer, "bench session");
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(answer.to_string().as_bytes()).await;
        let _ = s.finish();
        let _ = s.stopped().await;
    }
}

/// An fsync'd write of [`WRITE_BYTES`] into the state directory (where
/// this agent's targets' logs go), as an apply writes.
fn write_rate(state_root: &Path) -> Result<(u64, f64), diskferry_sync_engine::Error> {
    let path = crate::bench::scratch_path(state_root);
    let rate = crate::bench::write_rate(&path, WRITE_BYTES)?;
    Ok((WRITE_BYTES, WRITE_BYTES as f64 / rate))
}
