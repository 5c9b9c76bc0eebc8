//! The agent's side of `diskferry bench`: it reads a bench stream to its
//! end and drops the bytes (no target is touched, no session opened),
//! measures an fsync'd write of its own into its state directory, and
//! answers on a stream of its own: `{"received_bytes", "receive_seconds",
//! "write_bytes", "write_seconds", "fsync_seconds"}`.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bytes written for the write measurement.
const WRITE_BYTES: u64 = 256 << 20;

/// Drains `stream` (`already` bytes were read with its preamble), then answers.
pub async fn sink(mut stream: quinn::RecvStream, already: u64, conn: quinn::Connection, state_root: PathBuf) {
    let start = Instant::now();
    let mut received = already;
    loop {
        match stream.read_chunk(1 << 20, false).await {
            Ok(Some(c)) => received += c.bytes.len() as u64,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("bench stream cut: {e}");
                return;
            }
        }
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
    let path = state_root.join(format!("bench-{}.tmp", std::process::id()));
    let rate = crate::bench::write_rate(&path, WRITE_BYTES)?;
    Ok((WRITE_BYTES, WRITE_BYTES as f64 / rate))
}
