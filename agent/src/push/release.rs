//! How a push's session ends on the source's side: the target is told on
//! the control stream (a connection closed at once may drop that), and the
//! source waits until the target released the disk, so the command an
//! operator runs next finds it free.

use diskferry_protocol::session::SenderSession;
use diskferry_sync_engine::Error;

use crate::transport::{write_frame, FrameReader};

/// Ends the session on the source's failure `e`: the target is told with
/// an Error frame on the control stream (a connection closed at once may
/// drop it, and the target then holds the disk until its idle timeout),
/// then waited for until it released the disk.
pub(super) async fn abort_and_release(
    session: &mut SenderSession,
    ctl_tx: &mut quinn::SendStream,
    reader: &mut FrameReader,
    e: Error,
) -> Error {
    session.abort(e.code, e.message.clone());
    while let Some(m) = session.poll_transmit() {
        let _ = write_frame(ctl_tx, &m).await;
    }
    until_target_released(reader).await;
    e
}

/// Returns once the group this push belongs to is cancelled (never
/// without a group, or once the group's push is over).
pub(super) async fn cancelled(cancel: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(c) = cancel {
        if c.wait_for(|c| *c).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// Waits for the target to end the control stream, which it does only
/// after it released the disk: a command run right after the push then
/// finds the target free, not `E_BUSY` while the session is torn down.
/// Bounded, so a stuck target delays the push's exit by this much at most.
pub(super) async fn until_target_released(reader: &mut FrameReader) {
    let drained = async { while let Ok(Some(_)) = reader.next().await {} };
    if tokio::time::timeout(RELEASE_WAIT, drained).await.is_err() {
        tracing::warn!("the target did not end the session within {RELEASE_WAIT:?}: it may hold the disk a while");
    }
}

/// How long a push waits for the target to release the disk at its end.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
