//! The thread that reads a session's target region by region (its
//! "view": what the target holds, for the source to compare against),
//! ahead of the session loop.

use diskferry_protocol::session::{ReceiverSession, RegionView};
use diskferry_protocol::Geometry;
use diskferry_sync_engine::view::ViewProducer;
use diskferry_sync_engine::Error;
use tokio::sync::mpsc;

/// Views handed over together: a run of empty regions followed by at most
/// one region that holds data.
pub type ViewBatch = Vec<(u64, RegionView)>;

/// Empty regions' views per batch at most. An empty region's view is
/// produced in microseconds: one at a time, a 1 TiB sparse disk (16,384
/// regions) cost a wake-up of this thread and of the session per region.
/// Batches are few kilobytes; the channel's bound still holds at most
/// `VIEWS_QUEUED` views that list their blocks.
pub const EMPTY_VIEWS_PER_BATCH: usize = 64;

/// Starts the view thread; a read that fails goes to `failed`.
pub fn spawn(
    mut view: ViewProducer,
    g: Geometry,
    tx: mpsc::Sender<ViewBatch>,
    failed: impl FnOnce(Error) + Send + 'static,
) {
    let spawned = std::thread::Builder::new().name("df-view".into()).spawn(move || {
        let mut batch = ViewBatch::new();
        for _ in 0..g.region_count() {
            match view.next_region() {
                Ok((r, v)) => {
                    let empty = !v.lists_blocks();
                    batch.push((r, v));
                    if (!empty || batch.len() >= EMPTY_VIEWS_PER_BATCH)
                        && tx.blocking_send(std::mem::take(&mut batch)).is_err()
                    {
                        return;
                    }
                }
                Err(e) => return failed(e),
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the view thread: {e}");
    }
}

/// Hands `batch` to the receiver, and the batches queued behind it while
/// it wants them. A batch is wanted whole once its first view is: the rest
/// are empty regions' (about a kilobyte each) and at most one that lists
/// its blocks.
pub fn hand_over(
    batch: ViewBatch,
    queued: &mut mpsc::Receiver<ViewBatch>,
    rs: &mut ReceiverSession,
    next_view: &mut u64,
) {
    let mut batch = Some(batch);
    while let Some(views) = batch.take() {
        for (region, view) in views {
            tracing::trace!(region, "view ready");
            *next_view = region + 1;
            rs.handle_view(region, view);
        }
        if rs.wants_view(*next_view) {
            batch = queued.try_recv().ok();
        }
    }
}
