//! One push over QUIC: the protocol's sender state machine driven from the
//! control stream, a hashing thread that feeds it region by region (within
//! the target's window), and blocking tasks that read wanted blocks; frames
//! go out on the data streams as the engine built them.

use std::sync::Arc;

use diskferry_protocol::message::{Committed, Message, Open, Plan, WantBlock, CAP_PAGES, CAP_ZSTD};
use diskferry_protocol::session::{window_units, SenderEvent, SenderSession, SourceRegion};
use diskferry_protocol::{BlockHash, Consistency, ErrorCode, Geometry};
use diskferry_sync_engine::local::Progress;
use diskferry_sync_engine::remote::WireFrame;
use diskferry_sync_engine::session::{Item, Link, SourceSession};
use diskferry_sync_engine::{thread_pool, Error};
use tokio::sync::mpsc;

use super::release::{abort_and_release, cancelled, until_target_released};
use super::{peer_failure, PushOptions, PushReport};
use crate::transport::{write_frames, FrameReader, ReadError};

/// Data streams of a session on a connection of its own (more do not add throughput).
const DATA_STREAMS: usize = 2;
/// Blocks go to the data streams in runs of this many bytes. The streams
/// drift apart by megabytes on the way (each is read by its own task on the
/// target), so blocks dealt out one by one reached the target's writer
/// every other one, and a full download was written in 64 KiB pieces;
/// runs arrive whole and merge into large writes.
const STREAM_RUN_BYTES: u64 = 4 << 20;
/// A full copy's frames go to a data stream's writer in batches of about
/// this many bytes.
const BATCH_BYTES: usize = 1 << 20;
/// Batches queued per data stream (a full-size batch at a time is being written).
const QUEUED_BATCHES: usize = 4;

/// Notes from the helper threads to the session loop.
enum Note {
    /// Regions hashed, in order (a sparse disk's clean regions come by the dozen).
    Regions(Vec<SourceRegion>),
    Hashed,
    Failed(Error),
}

/// Runs the session on an open connection.
pub(super) async fn run(
    conn: &quinn::Connection,
    opts: &PushOptions,
    open: Open,
    source: Arc<SourceSession>,
    progress: Arc<dyn Progress + Send + Sync>,
    app_consistent: bool,
    finish_sent: &mut bool,
) -> Result<PushReport, Error> {
    let lost = |e: &dyn std::fmt::Display| {
        Error::new(ErrorCode::Connection, format!("connection lost: {e}"))
            .hint("push again: it resumes where it stopped")
    };
    let g = source.geometry();
    let (mut ctl_tx, ctl_rx) = conn.open_bi().await.map_err(|e| lost(&e))?;
    // On a connection shared with other sessions (a group push), each data
    // stream says which session it belongs to.
    let preamble = opts.shared.as_ref().map(|_| crate::transport::data_stream_preamble(ctl_tx.id()));
    let mut data_tx = Vec::new();
    let mut writers = Vec::new();
    // A group's members share one connection: one data stream each (more
    // streams interleave in its datagrams, and each half-read datagram
    // holds its whole buffer on the target: 181 against 138 MiB peak for
    // eight members, and no faster).
    let streams = if opts.shared.is_some() { 1 } else { DATA_STREAMS };
    for _ in 0..streams {
        let mut stream = conn.open_uni().await.map_err(|e| lost(&e))?;
        let (tx, mut rx) = mpsc::channel::<Vec<WireFrame>>(QUEUED_BATCHES);
        data_tx.push(tx);
        let preamble = preamble.clone();
        let pace = opts.pace.clone();
        writers.push(tokio::spawn(async move {
            if let Some(p) = preamble {
                stream.write_chunk(p).await?;
            }
            while let Some(batch) = rx.recv().await {
                // Paced frame by frame: a batch taken whole is up to 1 MiB
                // at once, a quarter second of a 4 MiB/s limit, and pushes
                // sharing the limit would take turns in such bursts.
                let groups = if pace.is_empty() { vec![batch] } else { batch.into_iter().map(|f| vec![f]).collect() };
                for group in groups {
                    let mut chunks: Vec<bytes::Bytes> =
                        group.into_iter().flat_map(|f| std::iter::once(f.head).chain(f.tail)).collect();
                    let len = chunks.iter().map(bytes::Bytes::len).sum();
                    for p in &pace {
                        p.take(len).await;
                    }
                    stream.write_all_chunks(&mut chunks).await?;
                }
            }
            stream.finish().map_err(|_| quinn::WriteError::ClosedStream)?;
            Ok::<(), quinn::WriteError>(())
        }));
    }
    let mut session = SenderSession::new(open);
    let mut cancel = opts.cancel.clone();
    let mut reader = FrameReader::control(ctl_rx, diskferry_protocol::MAX_FRAME);
    let (notes_tx, mut notes_rx) = mpsc::unbounded_channel::<Note>();
    let (tokens_tx, tokens_rx) = crossbeam_channel::unbounded::<u32>();
    let mut hashed = false;
    let mut staged_before = 0;
    let mut consistency_sent: Option<Consistency> = None;
    let mut control_sent = 0u64;
    let region_bytes = g.region_blocks() * g.block_size.bytes();
    progress.phase("pushing", g.disk_bytes);
    let sent = Arc::new(SentProgress { progress: progress.clone(), geometry: g, by_region: Default::default() });
    loop {
        // Send the control frames, then act on the session's events.
        let frames: Vec<Message> = std::iter::from_fn(|| session.poll_transmit()).collect();
        control_sent += write_frames(&mut ctl_tx, &frames).await.map_err(|e| lost(&e))?;
        if let Some(Message::Finish { consistency }) = frames.iter().find(|m| matches!(m, Message::Finish { .. })) {
            tracing::debug!(consistency = consistency.as_str(), "finish sent: the target commits now");
        }
        let mut committed: Option<Committed> = None;
        // Window units given back in this turn go to the hashing thread at
        // once: one wake-up, not one per region of a sparse disk.
        let mut units_back = 0u32;
        while let Some(ev) = session.poll_event() {
            match ev {
                SenderEvent::Accepted(a) => {
                    staged_before = a.staged_blocks;
                    // Only what the target speaks: zstd payloads, page patches.
                    let caps = session.capabilities();
                    let level = opts.compress.filter(|_| caps & CAP_ZSTD != 0);
                    let slot = session.slot_units();
                    let started = (|| {
                        source.set_link(Link { level, pages: caps & CAP_PAGES != 0 })?;
                        // Before any region is hashed: the spot check may turn
                        // the hint down, and then every region is read.
                        source.start_hint(a.target_generation, a.plan == Plan::Full)?;
                        let _ = tokens_tx.send(a.window.saturating_mul(slot));
                        let window = Window { tokens: tokens_rx.clone(), slot };
                        spawn_hasher(&source, a.plan, opts.threads, window, &data_tx, &notes_tx, &sent)
                    })();
                    if let Err(e) = started {
                        return Err(abort_and_release(&mut session, &mut ctl_tx, &mut reader, e).await);
                    }
                }
                SenderEvent::SendBlocks { region, blocks } => {
                    let expected = announced(&session, g, region, &blocks);
                    spawn_sender(&source, blocks, expected, &data_tx, &notes_tx, &sent);
                }
                SenderEvent::Resend { index } => {
                    // A full copy's block whose bytes changed after hashing
                    // fails verification: the resend then carries other bytes.
                    let w = vec![WantBlock { index, page_hashes: Vec::new() }];
                    let expected = announced(&session, g, g.region_of(index), &w);
                    spawn_sender(&source, w, expected, &data_tx, &notes_tx, &sent);
                }
                SenderEvent::RegionDone { region, units, .. } => {
                    tracing::trace!(region, "region done");
                    units_back = units_back.saturating_add(units);
                    let start = g.block_offset(g.region_range(region).start);
                    sent.region_done(region, region_bytes.min(g.disk_bytes - start));
                }
                SenderEvent::Committed(c) => {
                    tracing::debug!(generation = %c.generation, "committed");
                    committed = Some(c)
                }
                SenderEvent::Failed { code, message } => {
                    until_target_released(&mut reader).await;
                    return Err(peer_failure(code, &message));
                }
            }
        }
        if units_back > 0 {
            let _ = tokens_tx.send(units_back);
        }
        if let Some(c) = committed {
            let consistency = consistency_sent.unwrap_or(Consistency::Fuzzy);
            drop(data_tx);
            for w in writers {
                let _ = w.await;
            }
            until_target_released(&mut reader).await;
            // The disk's history decides what may overwrite it later: a
            // push whose history could not be kept says so.
            source.commit_history(c.generation, consistency, crate::ids::now_unix_ns()).map_err(|e| {
                Error::new(
                    e.code,
                    format!(
                        "the target committed generation {}, but this disk's history could not be recorded: {}",
                        c.generation, e.message
                    ),
                )
                .hint("fix the state directory and push again: the rerun finds the data in place and records it")
            })?;
            return Ok(PushReport {
                plan: session.plan().unwrap_or(Plan::Full),
                disk_bytes: g.disk_bytes,
                blocks_total: g.block_count(),
                bytes_sent: source.bytes_sent(),
                wire_bytes: 0,
                path_mtu: 0,
                consistency,
                staged_before,
                control_bytes: control_sent + reader.bytes_read(),
                snapshot: Default::default(),
                committed: c,
                changes: source.hint_outcome(),
                source_bytes_read: source.bytes_read(),
                read_through: "file",
            });
        }
        // Finish once everything was hashed and the target has staged every
        // region: only then is the source's stability known.
        if hashed && consistency_sent.is_none() && session.outstanding() == 0 {
            match source.consistency(app_consistent).map(|c| if opts.fuzzy { Consistency::Fuzzy } else { c }) {
                Ok(c) => {
                    consistency_sent = Some(c);
                    *finish_sent = true;
                    session.handle_source_done(c);
                }
                Err(e) => return Err(abort_and_release(&mut session, &mut ctl_tx, &mut reader, e).await),
            }
            continue;
        }
        tokio::select! {
            _ = cancelled(&mut cancel) => {
                let e = Error::new(ErrorCode::Cancelled, "another member of the group failed");
                return Err(abort_and_release(&mut session, &mut ctl_tx, &mut reader, e).await);
            }
            frame = reader.next() => match frame {
                Ok(Some(m)) => {
                    session.handle_message(m);
                    // The frames that came with it too (a sparse disk's
                    // regions are confirmed by the thousand).
                    let more = reader.take_buffered(|m| {
                        session.handle_message(m);
                        !session.is_finished()
                    });
                    if let Err(e) = more {
                        session.abort(ErrorCode::Protocol, format!("bad frame from the target: {e}"));
                    }
                }
                Ok(None) => return Err(lost(&"the target closed the session")),
                Err(ReadError::Decode(e)) => session.abort(ErrorCode::Protocol, format!("bad frame from the target: {e}")),
                Err(ReadError::Stream(e)) => return Err(lost(&e)),
            },
            Some(note) = notes_rx.recv() => {
                // The notes queued meanwhile too (a clean region of a large
                // sparse disk is hashed in microseconds): their frames then
                // leave in one write.
                let mut next = Some(note);
                let mut taken = 0;
                while let Some(note) = next.take() {
                    match note {
                        Note::Regions(regions) => {
                            for r in regions {
                                tracing::trace!(region = r.region, "region hashed");
                                session.handle_region(r)
                            }
                        }
                        Note::Hashed => {
                            tracing::debug!("source hashed");
                            hashed = true
                        }
                        Note::Failed(e) => {
                            return Err(abort_and_release(&mut session, &mut ctl_tx, &mut reader, e).await)
                        }
                    }
                    taken += 1;
                    if taken < NOTES_PER_TURN {
                        next = notes_rx.try_recv().ok();
                    }
                }
            }
        }
    }
}

/// Notes handled before the session's frames are written and its events
/// acted on.
const NOTES_PER_TURN: usize = 64;

/// Regions hashed without reading sent to the session in one note at most.
const REGIONS_PER_NOTE: usize = 64;

/// The hashes announced for `blocks` of `region` (still outstanding).
fn announced(session: &SenderSession, g: Geometry, region: u64, blocks: &[WantBlock]) -> Vec<Option<BlockHash>> {
    let first = g.region_range(region).start;
    blocks.iter().map(|w| session.region_blocks(region).and_then(|b| b.get((w.index - first) as usize))).collect()
}

/// The target's window as the hashing thread draws on it: units given
/// back arrive on `tokens`; a region takes a slot of `slot` units.
struct Window {
    tokens: crossbeam_channel::Receiver<u32>,
    slot: u32,
}

/// Hashes the source region by region, each taking its window units
/// ([`window_units`]: a slot, given back but one unit when the region came
/// out empty); a full copy queues every block's frame as it is hashed.
fn spawn_hasher(
    source: &Arc<SourceSession>,
    plan: Plan,
    threads: Option<usize>,
    window: Window,
    data: &[mpsc::Sender<Vec<WireFrame>>],
    notes: &mpsc::UnboundedSender<Note>,
    progress: &Arc<SentProgress>,
) -> Result<(), Error> {
    let pool = thread_pool(threads).map_err(|e| Error::new(ErrorCode::Internal, format!("thread pool: {e}")))?;
    let (source, data, notes, progress) = (source.clone(), data.to_vec(), notes.clone(), progress.clone());
    let Window { tokens, slot } = window;
    std::thread::Builder::new()
        .name("df-hash".into())
        .spawn(move || {
            let g = source.geometry();
            let batches = FrameBatches::new(pool.current_num_threads(), data.len());
            let out = |item: Item<'_>| -> std::io::Result<()> {
                let stream = match &item {
                    Item::Block(b) => stream_of(&g, b.index(), data.len()),
                    Item::Zero { .. } => 0,
                };
                batches.push(&data, stream, source.encode(&item))?;
                if let Item::Block(b) = &item {
                    progress.block_sent(b.index());
                }
                Ok(())
            };
            let full = plan == Plan::Full;
            let mut units = 0u32;
            // Regions hashed without reading go to the session together,
            // until the window runs dry or a region had to be read.
            let mut batch = Vec::new();
            let send = |batch: &mut Vec<SourceRegion>| {
                batch.is_empty() || notes.send(Note::Regions(std::mem::take(batch))).is_ok()
            };
            for region in 0..g.region_count() {
                // A slot of the target's window per region in flight.
                while units < slot {
                    if let Ok(n) = tokens.try_recv() {
                        units += n;
                        continue;
                    }
                    if !send(&mut batch) {
                        return;
                    }
                    match tokens.recv() {
                        Ok(n) => units += n,
                        Err(_) => return,
                    }
                }
                units -= slot;
                let read_nothing = source.reads_nothing(region, full);
                let hashed = if read_nothing {
                    source.hash_region(region, None)
                } else {
                    pool.install(|| source.hash_region(region, full.then_some(&out))).and_then(|r| {
                        batches
                            .flush(&data)
                            .map(|()| r)
                            .map_err(|()| Error::new(ErrorCode::Cancelled, "the session ended"))
                    })
                };
                match hashed {
                    Ok(r) => {
                        units += slot - window_units(Some(plan), &r.hash, slot);
                        batch.push(r);
                    }
                    // The session ended while a full copy queued frames.
                    Err(e) if e.code == ErrorCode::Cancelled => return,
                    Err(e) => {
                        send(&mut batch);
                        let _ = notes.send(Note::Failed(e));
                        return;
                    }
                }
                if (!read_nothing || batch.len() >= REGIONS_PER_NOTE) && !send(&mut batch) {
                    return;
                }
            }
            if send(&mut batch) {
                let _ = notes.send(Note::Hashed);
            }
        })
        .map(|_| ())
        .map_err(|e| Error::new(ErrorCode::Internal, format!("starting the hashing thread: {e}")))
}

/// A full copy's frames gathered per hashing thread and data stream, and
/// queued for the stream by the megabyte: one hand-off (and at most one
/// wake-up of the network thread) per batch, not per block.
struct FrameBatches {
    /// Per hashing thread: per stream, the frames and their bytes.
    threads: Vec<std::sync::Mutex<Vec<Batch>>>,
}

/// Frames for one data stream, and their bytes.
type Batch = (Vec<WireFrame>, usize);

impl FrameBatches {
    fn new(threads: usize, streams: usize) -> FrameBatches {
        let empty = || std::sync::Mutex::new((0..streams).map(|_| (Vec::new(), 0)).collect());
        FrameBatches { threads: (0..threads.max(1)).map(|_| empty()).collect() }
    }

    /// Adds `frame` to this thread's batch for `stream`, queueing the batch once it is full.
    fn push(&self, data: &[mpsc::Sender<Vec<WireFrame>>], stream: usize, frame: WireFrame) -> std::io::Result<()> {
        let me = rayon::current_thread_index().unwrap_or(0) % self.threads.len();
        let mut mine = self.threads[me].lock().unwrap_or_else(|p| p.into_inner());
        let (frames, bytes) = &mut mine[stream];
        *bytes += frame.head.len() + frame.tail.as_ref().map_or(0, |t| t.len());
        frames.push(frame);
        if *bytes < BATCH_BYTES {
            return Ok(());
        }
        let full = std::mem::take(frames);
        *bytes = 0;
        drop(mine);
        data[stream].blocking_send(full).map_err(|_| std::io::Error::other("session ended"))
    }

    /// Queues every partial batch (at the end of a region, before the
    /// session hears it was hashed).
    fn flush(&self, data: &[mpsc::Sender<Vec<WireFrame>>]) -> Result<(), ()> {
        for t in &self.threads {
            let parts: Vec<(usize, Vec<WireFrame>)> = {
                let mut mine = t.lock().unwrap_or_else(|p| p.into_inner());
                mine.iter_mut()
                    .enumerate()
                    .filter(|(_, (f, _))| !f.is_empty())
                    .map(|(i, (f, b))| {
                        *b = 0;
                        (i, std::mem::take(f))
                    })
                    .collect()
            };
            for (stream, frames) in parts {
                data[stream].blocking_send(frames).map_err(|_| ())?;
            }
        }
        Ok(())
    }
}

/// Progress within a region as its blocks are sent (a region can be the
/// whole disk: a full copy would otherwise show nothing until its end),
/// the rest of the region when it is done; never more than the region.
struct SentProgress {
    progress: Arc<dyn Progress + Send + Sync>,
    geometry: Geometry,
    /// Bytes counted per region in progress, and the regions done (a
    /// block counted late, after its region's end, is not counted again).
    by_region: std::sync::Mutex<(std::collections::HashMap<u64, u64>, std::collections::HashSet<u64>)>,
}

impl SentProgress {
    fn block_sent(&self, index: u64) {
        let g = &self.geometry;
        let region = g.region_of(index);
        let range = g.region_range(region);
        let region_bytes = g.block_offset(range.end).min(g.disk_bytes) - g.block_offset(range.start);
        let bytes = g.block_size.bytes().min(g.disk_bytes.saturating_sub(g.block_offset(index)));
        let mut guard = self.by_region.lock().unwrap_or_else(|p| p.into_inner());
        let (by_region, finished) = &mut *guard;
        if finished.contains(&region) {
            return;
        }
        let done = by_region.entry(region).or_default();
        let add = bytes.min(region_bytes.saturating_sub(*done));
        *done += add;
        drop(guard);
        self.progress.advance(add);
    }

    fn region_done(&self, region: u64, region_bytes: u64) {
        let sent = {
            let mut guard = self.by_region.lock().unwrap_or_else(|p| p.into_inner());
            guard.1.insert(region);
            guard.0.remove(&region).unwrap_or(0)
        };
        self.progress.advance(region_bytes.saturating_sub(sent));
    }
}

/// The data stream (of `streams`) block `index` goes on.
fn stream_of(g: &Geometry, index: u64, streams: usize) -> usize {
    let run_blocks = (STREAM_RUN_BYTES / g.block_size.bytes()).max(1);
    ((index / run_blocks) % streams as u64) as usize
}

/// Reads wanted blocks and queues their frames.
fn spawn_sender(
    source: &Arc<SourceSession>,
    blocks: Vec<WantBlock>,
    expected: Vec<Option<BlockHash>>,
    data: &[mpsc::Sender<Vec<WireFrame>>],
    notes: &mpsc::UnboundedSender<Note>,
    progress: &Arc<SentProgress>,
) {
    let (source, data, notes, progress) = (source.clone(), data.to_vec(), notes.clone(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let g = source.geometry();
        let batches = FrameBatches::new(1, data.len());
        let sent = source.frames(&blocks, &expected, &mut |index, frame| {
            let ok = batches.push(&data, stream_of(&g, index, data.len()), frame).is_ok();
            if ok {
                progress.block_sent(index);
            }
            ok
        });
        match sent {
            Err(e) => {
                let _ = notes.send(Note::Failed(e));
            }
            // The session ended (its streams are gone): nothing to report.
            Ok(()) => {
                let _ = batches.flush(&data);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use diskferry_protocol::{BlockSize, Geometry};

    use super::{stream_of, FrameBatches, BATCH_BYTES, STREAM_RUN_BYTES};
    use diskferry_sync_engine::remote::WireFrame;
    use tokio::sync::mpsc;

    fn frame(tag: u8, payload: usize) -> WireFrame {
        WireFrame { head: vec![tag; 16].into(), tail: Some(vec![tag; payload].into()) }
    }

    #[test]
    fn frames_reach_their_stream_by_the_megabyte_and_a_flush_sends_the_rest() {
        let (tx0, mut rx0) = mpsc::channel::<Vec<WireFrame>>(64);
        let (tx1, mut rx1) = mpsc::channel::<Vec<WireFrame>>(64);
        let data = [tx0, tx1];
        let batches = FrameBatches::new(2, 2);
        let per_batch = BATCH_BYTES.div_ceil(16 + 65536);
        for i in 0..per_batch - 1 {
            batches.push(&data, 0, frame(i as u8, 65536)).expect("queued");
        }
        batches.push(&data, 1, frame(200, 100)).expect("queued");
        assert!(rx0.try_recv().is_err(), "a batch goes out only when it is full");
        batches.push(&data, 0, frame(99, 65536)).expect("queued");
        let full = rx0.try_recv().expect("a full batch");
        assert_eq!(full.len(), per_batch);
        // In the order pushed, heads with their payloads.
        let tags: Vec<u8> = full.iter().map(|f| f.head[0]).collect();
        assert_eq!(&tags[..3], &[0, 1, 2]);
        assert_eq!(full.last().map(|f| f.tail.as_ref().map(|t| t[0])), Some(Some(99)));
        assert!(rx1.try_recv().is_err());
        batches.push(&data, 0, frame(7, 10)).expect("queued");
        batches.flush(&data).expect("flushed");
        assert_eq!(rx0.try_recv().expect("the rest of stream 0").len(), 1);
        assert_eq!(rx1.try_recv().expect("the rest of stream 1").len(), 1);
        batches.flush(&data).expect("nothing left");
        assert!(rx0.try_recv().is_err() && rx1.try_recv().is_err(), "an empty batch is not sent");
        // A stream whose writer is gone fails the push of a full batch and the flush.
        drop(rx0);
        for _ in 0..per_batch - 1 {
            batches.push(&data, 0, frame(1, 65536)).expect("queued");
        }
        assert!(batches.push(&data, 0, frame(1, 65536)).is_err());
        batches.push(&data, 0, frame(1, 1)).expect("queued");
        assert!(batches.flush(&data).is_err());
    }

    #[test]
    fn blocks_go_to_the_streams_in_runs_of_whole_megabytes() {
        for block in [4096u32, 64 << 10, 1 << 20, 4 << 20] {
            let g = Geometry::new(1 << 30, BlockSize::new(block).expect("a valid block size"));
            let streams: Vec<usize> = (0..g.block_count()).map(|i| stream_of(&g, i, 2)).collect();
            // Adjacent blocks stay on one stream for at least STREAM_RUN_BYTES
            // (one block when blocks are larger), and both streams carry half.
            let runs: Vec<usize> = streams.chunk_by(|a, b| a == b).map(<[usize]>::len).collect();
            let least = (STREAM_RUN_BYTES / block as u64).max(1) as usize;
            assert!(runs.iter().all(|r| *r == least), "{block}-byte blocks: runs {:?}", &runs[..4]);
            assert_eq!(streams.iter().filter(|s| **s == 1).count() as u64, g.block_count() / 2);
        }
        let g = Geometry::new(1 << 30, BlockSize::new(64 << 10).expect("a valid block size"));
        assert!((0..g.block_count()).all(|i| stream_of(&g, i, 1) == 0));
    }
}
