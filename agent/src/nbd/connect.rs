//! Connecting to an NBD server for a source, and reading a dirty bitmap's
//! extents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_protocol::nbd::BASE_ALLOCATION;
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;

use super::client::{ClientError, NbdClient};
use super::qemu_nbd::QemuNbd;
use super::url::NbdUrl;

/// How long the server may take to answer one request (seconds in
/// `DISKFERRY_NBD_TIMEOUT`, 1 to 86400, override it; another value is
/// ignored with a warning: a deadline that far out overflows the clock).
fn nbd_timeout() -> Duration {
    let default = Duration::from_secs(60);
    let Ok(set) = std::env::var("DISKFERRY_NBD_TIMEOUT") else { return default };
    match set.trim().parse::<u64>() {
        Ok(secs @ 1..=86_400) => Duration::from_secs(secs),
        _ => {
            tracing::warn!("DISKFERRY_NBD_TIMEOUT={set:?} is not 1 to 86400 seconds: 60 s it is");
            default
        }
    }
}

pub(super) fn nbd_error(url: &str, e: ClientError) -> Error {
    let code = match &e {
        ClientError::Timeout { .. } | ClientError::Connection { .. } => ErrorCode::Connection,
        ClientError::Nbd(diskferry_protocol::nbd::NbdError::Refused { .. }) => ErrorCode::NotFound,
        ClientError::Nbd(_) => ErrorCode::Protocol,
    };
    Error::new(code, format!("{url}: {e}")).hint("check that the NBD server runs and exports that name")
}

/// The extents context `ctx` (a dirty bitmap's) marks dirty, over the whole export.
pub(super) fn dirty_extents(client: &NbdClient, ctx: u32) -> Result<Vec<(u64, u64)>, Error> {
    let size = client.export().size;
    let extents = client.extents(ctx, 0, size).map_err(|e| nbd_error(client.url(), e))?;
    Ok(extents
        .into_iter()
        .filter(|&(_, _, flags)| flags & diskferry_protocol::nbd::STATE_DIRTY != 0)
        .map(|(at, len, _)| (at, len))
        .collect())
}

/// Connects to `url` asking for `base:allocation` and `bitmap`'s context.
pub(super) fn connect(
    url: &NbdUrl,
    bitmap: Option<&str>,
    mut server: Option<&mut QemuNbd>,
) -> Result<Arc<NbdClient>, Error> {
    let bitmap_context = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
    let mut asked = vec![BASE_ALLOCATION];
    asked.extend(bitmap_context.as_deref());
    let started = Instant::now();
    loop {
        match NbdClient::connect(url, &asked, nbd_timeout()) {
            Ok(c) => return Ok(Arc::new(c)),
            Err(e) => {
                // A qemu-nbd that could not open the image says why as it
                // exits; one that made its socket but does not listen yet
                // gets a moment.
                if let Some(s) = server.as_deref_mut() {
                    if let Some(why) = s.exited(Duration::from_millis(50)) {
                        return Err(why);
                    }
                    if matches!(e, ClientError::Connection { .. }) && started.elapsed() < Duration::from_secs(5) {
                        continue;
                    }
                }
                return Err(nbd_error(&url.to_string(), e));
            }
        }
    }
}
