//! The writer of a full copy: one thread per session that takes verified
//! blocks off a queue and writes them with the engine's
//! [`DirectSink::write_batch`]. Whatever queued while the last batch was
//! being written goes out as the next batch, so a busy session gets large
//! merged writes (which direct I/O needs: small ones each wait for the
//! device). A writer that keeps up would otherwise write each block as it
//! comes (64 KiB, every other one: the data streams interleave), so it
//! gathers for a few milliseconds first; a quiet session waits no longer.

use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender, TryRecvError};
use diskferry_protocol::Geometry;
use diskferry_sync_engine::apply::DirectSink;
use diskferry_sync_engine::block::VerifiedBlock;
use tokio::sync::OwnedSemaphorePermit;

use super::worker::{Cmd, Reply};

/// A block waiting to be written, with its share of the memory budget.
pub type Queued = (VerifiedBlock, OwnedSemaphorePermit);

/// Blocks merged into one batch at most.
const MAX_BATCH: usize = 512;
/// A batch is written once it holds this many bytes…
const GATHER_BYTES: u64 = 4 << 20;
/// …or this long after its first block came. Measured on this project's
/// virtio disk (strace of a 4 GiB full download): 64 KiB direct writes
/// took 0.49 ms each (130 MB/s), 4–8 MiB ones reached 370–400 MB/s.
const GATHER_WAIT: Duration = Duration::from_millis(8);
/// …or when no block came for this long: the budget may be what holds the
/// next one back (a review measured 1 MiB blocks at a 16 MiB budget
/// waiting out the whole 8 ms on every batch, at half the speed).
const STALL: Duration = Duration::from_millis(1);

/// The running writer.
pub struct Writer {
    queue: Sender<Queued>,
    stop: Option<Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer for `sink`. Written blocks are counted with the
    /// apply worker (`cmds`) and reported (`report`: `Staged` per batch, or `Failed`
    /// once, after which it writes nothing more).
    pub fn spawn(
        name: &str,
        sink: DirectSink,
        geometry: Geometry,
        cmds: Sender<Cmd>,
        report: impl Fn(Reply) + Send + 'static,
    ) -> std::io::Result<Writer> {
        let (queue, rx) = crossbeam_channel::unbounded::<Queued>();
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let handle = std::thread::Builder::new()
            .name(format!("df-write-{name}"))
            .spawn(move || run(&sink, geometry, &rx, &stop_rx, &cmds, &report))?;
        Ok(Writer { queue, stop: Some(stop), handle: Some(handle) })
    }

    /// Where verified blocks go.
    pub fn queue(&self) -> Sender<Queued> {
        self.queue.clone()
    }

    /// Stops the writer and waits for it: a batch being written is
    /// finished, queued blocks are dropped (a resumed push sends them
    /// again). Nothing of this session is written after this returns.
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    sink: &DirectSink,
    g: Geometry,
    rx: &Receiver<Queued>,
    stop: &Receiver<()>,
    cmds: &Sender<Cmd>,
    report: &dyn Fn(Reply),
) {
    loop {
        let first = select! {
            recv(rx) -> m => match m {
                Ok(m) => m,
                Err(_) => return,
            },
            // The sender is dropped to stop: this arm fires at once.
            recv(stop) -> _ => return,
        };
        let mut bytes = first.0.payload_len();
        let mut batch = vec![first];
        let deadline = Instant::now() + GATHER_WAIT;
        while batch.len() < MAX_BATCH {
            let next = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if bytes >= GATHER_BYTES => break,
                Err(TryRecvError::Empty) => select! {
                    recv(rx) -> m => match m {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                    recv(stop) -> _ => return,
                    // A flow that stalls (a small memory budget holds back
                    // the next frame until this batch is written) is not
                    // waited for.
                    recv(crossbeam_channel::at(deadline.min(Instant::now() + STALL))) -> _ => break,
                },
            };
            bytes += next.0.payload_len();
            batch.push(next);
        }
        if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
            return;
        }
        // The budget is held until the bytes are written.
        let (blocks, permits): (Vec<VerifiedBlock>, Vec<OwnedSemaphorePermit>) = batch.into_iter().unzip();
        if let Err(e) = sink.write_batch(&blocks) {
            report(Reply::Failed(e));
            return;
        }
        drop(permits);
        let bytes = blocks.iter().map(VerifiedBlock::payload_len).sum();
        let end = blocks.iter().map(|b| g.block_offset(b.index()) + g.block_len(b.index()) as u64).max().unwrap_or(0);
        let _ = cmds.send(Cmd::Account { blocks: blocks.len() as u64, bytes, end });
        report(Reply::Staged(blocks.iter().map(|b| (b.index(), b.hash(), b.payload_len())).collect()));
    }
}
