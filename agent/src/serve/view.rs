//! The thread that reads a session's target region by region (its
//! "view": what the target holds, for the source to compare against),
//! ahead of the session loop.

use diskferry_protocol::session::RegionView;
use diskferry_protocol::Geometry;
use diskferry_sync_engine::view::ViewProducer;
use diskferry_sync_engine::Error;
use tokio::sync::mpsc;

/// Starts the view thread; a read that fails goes to `failed`.
pub fn spawn(
    mut view: ViewProducer,
    g: Geometry,
    tx: mpsc::Sender<(u64, RegionView)>,
    failed: impl FnOnce(Error) + Send + 'static,
) {
    let spawned = std::thread::Builder::new().name("df-view".into()).spawn(move || {
        for _ in 0..g.region_count() {
            match view.next_region() {
                Ok((r, v)) => {
                    let rv = v;
                    if tx.blocking_send((r, rv)).is_err() {
                        return;
                    }
                }
                Err(e) => return failed(e),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the view thread: {e}");
    }
}
