//! The source agent: `diskferry push`. Hashes the source region by region
//! while the session runs, sends what the target asks for, and keeps a
//! manifest of what it sent.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::message::{Committed, Message, Open, Plan, SyncMode, WantBlock, CAP_PAGES, CAP_ZSTD};
use diskferry_protocol::session::{SenderEvent, SenderSession, SourceRegion};
use diskferry_protocol::{BlockHash, BlockSize, Consistency, ErrorCode, Generation, Geometry, SessionId, TargetName};
use diskferry_sync_engine::error::IoContext;
use diskferry_sync_engine::hash::{hash_blocks, hash_blocks_visit, thread_pool};
use diskferry_sync_engine::local::Progress;
use diskferry_sync_engine::manifest::{ManifestMeta, ManifestWriter};
use diskferry_sync_engine::remote::{block_frame, whole_block_frame, WireFrame};
use diskferry_sync_engine::store::{RealFs, Vfs};
use diskferry_sync_engine::tree::{chunk_hashes, region_hash_from_chunks};
use diskferry_sync_engine::{Disk, Error, Place};
use tokio::sync::mpsc;

use crate::identity::Identity;
use crate::transport::{self, write_frame, FrameReader, ReadError};
use crate::trust;

/// Data streams per session (more streams on one connection do not add throughput).
const DATA_STREAMS: usize = 2;

/// What to push where.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub source: PathBuf,
    pub peer: SocketAddr,
    pub peer_fingerprint: String,
    pub target: TargetName,
    pub mode: SyncMode,
    pub block_size: BlockSize,
    pub compress: Option<i32>,
    pub force: bool,
    pub threads: Option<usize>,
    pub max_mtu: Option<u16>,
    /// Where the manifest of what was last sent is kept (none: not kept).
    pub state_root: Option<PathBuf>,
    /// How long a silent target is waited for.
    pub idle_timeout: Duration,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub plan: Plan,
    pub disk_bytes: u64,
    pub blocks_total: u64,
    pub blocks_changed: u64,
    pub bytes_sent: u64,
    pub wire_bytes: u64,
    pub path_mtu: u16,
    pub generation: Generation,
    pub consistency: Consistency,
    pub root: BlockHash,
    pub staged_before: u64,
    /// Bytes of control frames (hash exchange, requests) both ways.
    pub control_bytes: u64,
    /// Recovery points the target dropped to start a new chain (`--force`).
    pub points_dropped: u32,
    /// The target already held this content: `generation` is its existing point.
    pub unchanged: bool,
}

impl PushReport {
    /// `delta` or `full`, as the target decided.
    pub fn mode(&self) -> &'static str {
        match self.plan {
            Plan::Full => "full",
            _ => "delta",
        }
    }
}

/// Notes from the helper threads to the session loop.
enum Note {
    Region(SourceRegion),
    Hashed(Option<Box<ManifestWriter>>),
    Failed(Error),
}

/// Shared counters.
#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    changed_while_read: AtomicBool,
}

/// Runs one push.
pub async fn push(
    id: &Identity,
    opts: PushOptions,
    progress: Arc<dyn Progress + Send + Sync>,
) -> Result<PushReport, Error> {
    let vfs = RealFs;
    let before = vfs
        .metadata(&opts.source)
        .ctx(Place::Source, "reading", &opts.source)?
        .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("source {} does not exist", opts.source.display())))?;
    let disk = Arc::new(Disk::open(&opts.source).ctx(Place::Source, "opening", &opts.source)?);
    let g = Geometry::new(disk.len(), opts.block_size);
    let sent = SentManifests::new(opts.state_root.as_deref(), &opts.peer_fingerprint, &opts.target);
    let open = Open {
        session: SessionId(rand::random::<u128>() | 1),
        target: opts.target.clone(),
        disk_bytes: g.disk_bytes,
        block_size: g.block_size,
        mode: opts.mode,
        force: opts.force,
        source_base: sent.as_ref().and_then(|s| s.last_generation()),
    };

    let endpoint =
        transport::client_endpoint(&opts.peer).ctx(Place::Source, "opening a UDP socket for", Path::new("push"))?;
    let tls = trust::client_config(id, &opts.peer_fingerprint)
        .map_err(|e| Error::new(ErrorCode::Identity, format!("TLS setup: {e}")))?;
    let qc = transport::client_config(tls, &opts.peer, opts.max_mtu, opts.idle_timeout)
        .map_err(|e| Error::new(ErrorCode::Internal, format!("QUIC setup: {e}")))?;
    let connecting = endpoint
        .connect_with(qc, opts.peer, "diskferry")
        .map_err(|e| Error::new(ErrorCode::Connection, format!("cannot connect to {}: {e}", opts.peer)))?;
    tracing::debug!("connecting");
    let conn = connecting.await.map_err(|e| connection_error(e, false, &opts, id))?;
    tracing::debug!("connected");
    let mut finish_sent = false;
    let result = run_session(&conn, &opts, open, disk, g, before, progress, sent, &mut finish_sent).await;
    let result = match (result, conn.close_reason()) {
        // The commit may have landed with only its acknowledgement lost.
        (Err(e), _) if finish_sent && e.code == ErrorCode::Connection => Err(Error::new(
            ErrorCode::Connection,
            format!(
                "the connection to {} was lost after the commit was requested, so the target may hold the new generation ({})",
                opts.peer, e.message
            ),
        )
        .hint("push again: if the commit landed, the rerun says the target already holds this data; if not, it resumes")),
        // With TLS 1.3 the target judges our certificate after we think the
        // handshake is done: a refusal then shows as a lost stream.
        (Err(e), Some(reason)) if e.code == ErrorCode::Connection => Err(connection_error(reason, true, &opts, id)),
        (r, _) => r,
    };
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    // Long enough for the close to leave; the draining period that follows
    // only matters to a peer still sending, and the session is over.
    let _ = tokio::time::timeout(Duration::from_millis(5), endpoint.wait_idle()).await;
    let mut report = result?;
    report.wire_bytes = stats.udp_tx.bytes + stats.udp_rx.bytes;
    report.path_mtu = stats.path.current_mtu;
    Ok(report)
}

/// A failure the session reported: the target's "what happened — what to
/// do", or a default hint by code.
fn peer_failure(code: ErrorCode, message: &str) -> Error {
    let (what, hint) = match message.split_once(" — ") {
        Some((w, h)) => (w.to_string(), h.to_string()),
        None => {
            let h = match code {
                ErrorCode::Connection | ErrorCode::Cancelled | ErrorCode::PeerBusy | ErrorCode::Busy => {
                    "push again: it resumes where it stopped"
                }
                ErrorCode::Diverged => "if the target's changes must be kept, stop; otherwise push again with --force",
                ErrorCode::Protocol | ErrorCode::FrameTooLarge | ErrorCode::Version => {
                    "the agents disagree on the protocol: check that both run the same diskferry version"
                }
                _ => "see the target agent's log for details",
            };
            (message.to_string(), h.to_string())
        }
    };
    Error::new(code, format!("target: {what}")).hint(hint)
}

fn connection_error(e: quinn::ConnectionError, established: bool, opts: &PushOptions, id: &Identity) -> Error {
    use quinn::ConnectionError as C;
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match &e {
        C::TransportError(t) if crypto(u64::from(t.code)) => Error::new(
            ErrorCode::PeerFingerprint,
            format!(
                "the agent at {} is not the one expected: its certificate does not match --peer-fingerprint",
                opts.peer
            ),
        )
        .hint("check the fingerprint with `diskferry id` on the target host"),
        C::ConnectionClosed(c) if crypto(u64::from(c.error_code)) => {
            Error::new(ErrorCode::UnknownPeer, format!("the agent at {} refused this agent's certificate", opts.peer))
                .hint(format!(
                    "add this agent as a [[peer]] in the target's config: fingerprint = \"{}\"",
                    id.fingerprint()
                ))
        }
        C::TimedOut if !established => Error::new(ErrorCode::Connection, format!("no answer from {}", opts.peer))
            .hint("check the address, that `diskferry serve` runs there, and the firewall (UDP)"),
        C::TimedOut => Error::new(ErrorCode::Connection, format!("the target at {} stopped answering", opts.peer))
            .hint("push again: it resumes where it stopped"),
        _ => Error::new(ErrorCode::Connection, format!("connection to {} lost: {e}", opts.peer))
            .hint("push again: it resumes where it stopped"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    conn: &quinn::Connection,
    opts: &PushOptions,
    open: Open,
    disk: Arc<Disk>,
    g: Geometry,
    before: diskferry_sync_engine::store::Meta,
    progress: Arc<dyn Progress + Send + Sync>,
    sent: Option<SentManifests>,
    finish_sent: &mut bool,
) -> Result<PushReport, Error> {
    let lost = |e: &dyn std::fmt::Display| {
        Error::new(ErrorCode::Connection, format!("connection lost: {e}"))
            .hint("push again: it resumes where it stopped")
    };
    let (mut ctl_tx, ctl_rx) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let mut data_tx = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..DATA_STREAMS {
        let mut stream = conn.open_uni().await.map_err(|e| lost(&e))?;
        let (tx, mut rx) = mpsc::channel::<WireFrame>(64);
        data_tx.push(tx);
        writers.push(tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                stream.write_chunk(f.head).await?;
                if let Some(tail) = f.tail {
                    stream.write_chunk(tail).await?;
                }
            }
            stream.finish().map_err(|_| quinn::WriteError::ClosedStream)?;
            Ok::<(), quinn::WriteError>(())
        }));
    }
    let mut session = SenderSession::new(open);
    let mut reader = FrameReader::new(ctl_rx);
    let (notes_tx, mut notes_rx) = mpsc::unbounded_channel::<Note>();
    let counters = Arc::new(Counters::default());
    let (tokens_tx, tokens_rx) = crossbeam_channel::unbounded::<()>();
    let mut hashed: Option<Option<Box<ManifestWriter>>> = None;
    let mut committed: Option<Committed> = None;
    let mut staged_before = 0;
    let mut consistency_sent: Option<Consistency> = None;
    let mut control_sent = 0u64;
    let region_bytes = g.region_blocks() * g.block_size.bytes();
    let mut level = opts.compress;
    let mut caps = CAP_ZSTD | CAP_PAGES;
    progress.phase("pushing", g.disk_bytes);
    loop {
        // Send the control frames, then act on the session's events.
        while let Some(m) = session.poll_transmit() {
            control_sent += m.to_bytes().len() as u64;
            write_frame(&mut ctl_tx, &m).await.map_err(|e| lost(&e))?;
            if let Message::Finish { consistency } = m {
                tracing::debug!(consistency = consistency.as_str(), "finish sent: the target commits now");
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                SenderEvent::Accepted(a) => {
                    staged_before = a.staged_blocks;
                    // Only what the target speaks: zstd payloads, page patches.
                    caps = session.capabilities();
                    if caps & CAP_ZSTD == 0 {
                        level = None;
                    }
                    for _ in 0..a.window {
                        let _ = tokens_tx.send(());
                    }
                    let writer = match &sent {
                        Some(s) => Some(s.writer(g)?),
                        None => None,
                    };
                    spawn_hasher(Hasher {
                        disk: disk.clone(),
                        g,
                        full: a.plan == Plan::Full,
                        level,
                        threads: opts.threads,
                        tokens: tokens_rx.clone(),
                        data: data_tx.clone(),
                        notes: notes_tx.clone(),
                        writer,
                        counters: counters.clone(),
                    })?;
                }
                SenderEvent::SendBlocks { region, mut blocks } => {
                    if caps & CAP_PAGES == 0 {
                        blocks.iter_mut().for_each(|w| w.page_hashes.clear());
                    }
                    let expected: Vec<Option<BlockHash>> = blocks
                        .iter()
                        .map(|w| {
                            let first = g.region_range(region).start;
                            session.region_blocks(region).and_then(|b| b.get((w.index - first) as usize).copied())
                        })
                        .collect();
                    spawn_sender(
                        disk.clone(),
                        g,
                        blocks,
                        expected,
                        level,
                        data_tx.clone(),
                        counters.clone(),
                        notes_tx.clone(),
                    );
                }
                SenderEvent::Resend { index } => {
                    let w = vec![WantBlock { index, page_hashes: Vec::new() }];
                    // A full copy's block whose bytes changed after hashing
                    // fails verification: the resend then carries other bytes.
                    let region = g.region_of(index);
                    let first = g.region_range(region).start;
                    let expected = session.region_blocks(region).and_then(|b| b.get((index - first) as usize).copied());
                    spawn_sender(
                        disk.clone(),
                        g,
                        w,
                        vec![expected],
                        level,
                        data_tx.clone(),
                        counters.clone(),
                        notes_tx.clone(),
                    );
                }
                SenderEvent::RegionDone { region, .. } => {
                    tracing::debug!(region, "region done");
                    let _ = tokens_tx.send(());
                    let start = g.block_offset(g.region_range(region).start);
                    progress.advance(region_bytes.min(g.disk_bytes - start));
                }
                SenderEvent::Committed(c) => {
                    tracing::debug!(generation = %c.generation, "committed");
                    committed = Some(c)
                }
                SenderEvent::Failed { code, message } => return Err(peer_failure(code, &message)),
            }
        }
        if let Some(c) = committed {
            if let (Some(s), Some(Some(w))) = (&sent, hashed.take()) {
                let consistency = consistency_sent.unwrap_or(Consistency::Fuzzy);
                s.commit(*w, c.generation, consistency);
            }
            drop(data_tx);
            for w in writers {
                let _ = w.await;
            }
            return Ok(PushReport {
                plan: session.plan().unwrap_or(Plan::Full),
                disk_bytes: g.disk_bytes,
                blocks_total: g.block_count(),
                blocks_changed: c.blocks_changed,
                bytes_sent: counters.bytes_sent.load(Ordering::Relaxed),
                wire_bytes: 0,
                path_mtu: 0,
                generation: c.generation,
                consistency: consistency_sent.unwrap_or(Consistency::Fuzzy),
                root: c.root,
                staged_before,
                control_bytes: control_sent + reader.bytes_read(),
                points_dropped: c.points_dropped,
                unchanged: c.unchanged,
            });
        }
        // Finish once everything was hashed and the target has staged every
        // region: only then is the source's stability known.
        if hashed.is_some() && consistency_sent.is_none() && session.outstanding() == 0 {
            let after = match source_still_there(&opts.source, &before, g.disk_bytes) {
                Ok(m) => m,
                Err(e) => {
                    session.abort(e.code, e.message.clone());
                    while let Some(m) = session.poll_transmit() {
                        let _ = write_frame(&mut ctl_tx, &m).await;
                    }
                    return Err(e);
                }
            };
            let stable = after.stamp == before.stamp && !counters.changed_while_read.load(Ordering::Relaxed);
            let c = if stable { Consistency::Crash } else { Consistency::Fuzzy };
            consistency_sent = Some(c);
            *finish_sent = true;
            session.handle_source_done(c);
            continue;
        }
        tokio::select! {
            frame = reader.next() => match frame {
                Ok(Some(m)) => session.handle_message(m),
                Ok(None) => return Err(lost(&"the target closed the session")),
                Err(ReadError::Decode(e)) => session.abort(ErrorCode::Protocol, format!("bad frame from the target: {e}")),
                Err(ReadError::Stream(e)) => return Err(lost(&e)),
            },
            Some(note) = notes_rx.recv() => match note {
                Note::Region(r) => {
                    tracing::debug!(region = r.region, "region hashed");
                    session.handle_region(r)
                }
                Note::Hashed(w) => {
                    tracing::debug!("source hashed");
                    hashed = Some(w)
                }
                Note::Failed(e) => {
                    session.abort(e.code, e.message.clone());
                    while let Some(m) = session.poll_transmit() {
                        let _ = write_frame(&mut ctl_tx, &m).await;
                    }
                    return Err(e);
                }
            },
        }
    }
}

/// The source after it was read: written is fine (the point is fuzzy), but
/// a source that shrank, vanished or was replaced by another file is not
/// the disk whose bytes were sent.
fn source_still_there(
    path: &Path,
    before: &diskferry_sync_engine::store::Meta,
    disk_bytes: u64,
) -> Result<diskferry_sync_engine::store::Meta, Error> {
    let changed = |why: String| {
        Error::new(ErrorCode::SourceChanged, format!("source {}: {why} while it was pushed", path.display())).hint(
            "push from a snapshot, or run again once nothing truncates or replaces the source; the target keeps its last committed generation",
        )
    };
    match RealFs.metadata(path).ctx(Place::Source, "reading", path)? {
        None => Err(changed("it was removed".into())),
        Some(m) if m.identity != before.identity => Err(changed("it was replaced by another file".into())),
        Some(m) if m.len < disk_bytes => Err(changed(format!("it shrank from {disk_bytes} to {} bytes", m.len))),
        Some(m) => Ok(m),
    }
}

struct Hasher {
    disk: Arc<Disk>,
    g: Geometry,
    full: bool,
    level: Option<i32>,
    threads: Option<usize>,
    tokens: crossbeam_channel::Receiver<()>,
    data: Vec<mpsc::Sender<WireFrame>>,
    notes: mpsc::UnboundedSender<Note>,
    writer: Option<ManifestWriter>,
    counters: Arc<Counters>,
}

fn spawn_hasher(mut h: Hasher) -> Result<(), Error> {
    let pool = thread_pool(h.threads).map_err(|e| Error::new(ErrorCode::Internal, format!("thread pool: {e}")))?;
    std::thread::Builder::new()
        .name("df-hash".into())
        .spawn(move || {
            let notes = h.notes.clone();
            match pool.install(|| hash_all(&mut h)) {
                Ok(()) => {
                    let _ = notes.send(Note::Hashed(h.writer.take().map(Box::new)));
                }
                Err(e) => {
                    let _ = notes.send(Note::Failed(e));
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::new(ErrorCode::Internal, format!("starting the hashing thread: {e}")))
}

fn hash_all(h: &mut Hasher) -> Result<(), Error> {
    let g = h.g;
    let src = Path::new("source");
    for region in 0..g.region_count() {
        // One token per region in flight: the target's window.
        if h.tokens.recv().is_err() {
            return Ok(());
        }
        let range = g.region_range(region);
        let items = AtomicU32::new(0);
        let hashes = if h.full {
            let closed = AtomicBool::new(false);
            let visit = |b: diskferry_sync_engine::block::VerifiedSlice<'_>| -> std::io::Result<()> {
                let (frame, payload) = whole_block_frame(&b, h.level);
                h.counters.bytes_sent.fetch_add(payload, Ordering::Relaxed);
                if h.data[(b.index() as usize) % h.data.len()].blocking_send(frame).is_err() {
                    closed.store(true, Ordering::Relaxed);
                    return Err(std::io::Error::other("session ended"));
                }
                items.fetch_add(1, Ordering::Relaxed);
                Ok(())
            };
            match hash_blocks_visit(&h.disk, &g, range.clone(), Some(&visit)) {
                Ok(hashes) => hashes,
                Err(_) if closed.load(Ordering::Relaxed) => return Ok(()),
                Err(e) => return Err(Error::io(Place::Source, "reading", src, e)),
            }
        } else {
            hash_blocks(&h.disk, &g, range.clone()).ctx(Place::Source, "reading", src)?
        };
        if h.full {
            // Zero runs travel as ranges, so the target can record them (and
            // zero a block device) without bytes on the wire.
            let mut i = 0;
            while i < hashes.len() {
                if !hashes[i].is_zero() {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < hashes.len() && hashes[i].is_zero() {
                    i += 1;
                }
                let m = Message::Zero { first: range.start + start as u64, count: (i - start) as u64 };
                if h.data[0].blocking_send(m.to_bytes().into()).is_err() {
                    return Ok(());
                }
                items.fetch_add(1, Ordering::Relaxed);
            }
        }
        let chunks = chunk_hashes(&hashes);
        let hash = region_hash_from_chunks(&chunks);
        if let Some(w) = &mut h.writer {
            w.push_region(region, &hashes)?;
        }
        let r = SourceRegion { region, blocks: hashes, chunks, hash, items: items.load(Ordering::Relaxed) };
        if h.notes.send(Note::Region(r)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn spawn_sender(
    disk: Arc<Disk>,
    g: Geometry,
    blocks: Vec<WantBlock>,
    expected: Vec<Option<BlockHash>>,
    level: Option<i32>,
    data: Vec<mpsc::Sender<WireFrame>>,
    counters: Arc<Counters>,
    notes: mpsc::UnboundedSender<Note>,
) {
    tokio::task::spawn_blocking(move || {
        for (w, exp) in blocks.iter().zip(expected) {
            if w.index >= g.block_count() {
                let _ = notes.send(Note::Failed(Error::new(
                    ErrorCode::Protocol,
                    format!("the target asked for block {}", w.index),
                )));
                return;
            }
            let mut bytes = vec![0u8; g.block_len(w.index) as usize];
            if let Err(e) = disk.read_at(g.block_offset(w.index), &mut bytes) {
                let _ = notes.send(Note::Failed(Error::io(Place::Source, "reading", Path::new("source"), e)));
                return;
            }
            let frame = block_frame(w.index, &bytes, &w.page_hashes, level);
            if exp.is_some_and(|e| e != frame.hash) {
                // The source changed since it was hashed: the target gets
                // (and verifies) what is there now, and the point is fuzzy.
                counters.changed_while_read.store(true, Ordering::Relaxed);
            }
            counters.bytes_sent.fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
            if data[(w.index as usize) % data.len()].blocking_send(Message::Block(frame).to_bytes().into()).is_err() {
                return;
            }
        }
    });
}

/// The source's record of what it last sent to a (peer, target): a manifest
/// per committed generation, so the next push can tell the target which
/// generation it believes the target holds.
pub struct SentManifests {
    dir: PathBuf,
}

impl SentManifests {
    fn new(state_root: Option<&Path>, peer_fingerprint: &str, target: &TargetName) -> Option<SentManifests> {
        let root = state_root?;
        let key = blake3::hash(format!("{peer_fingerprint}/{}", target.as_str()).as_bytes());
        let dir = root.join("sent").join(format!("{}-{}", target.as_str(), &key.to_hex()[..16]));
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir) {
            tracing::warn!("cannot keep a record of what is sent in {}: {e}", dir.display());
            return None;
        }
        Some(SentManifests { dir })
    }

    fn last_generation(&self) -> Option<Generation> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".dfm")).and_then(|g| g.parse().ok()))
            .next()
    }

    fn writer(&self, g: Geometry) -> Result<ManifestWriter, Error> {
        ManifestWriter::create(Arc::new(RealFs), &self.dir.join("sending.tmp"), g)
    }

    fn commit(&self, w: ManifestWriter, generation: Generation, consistency: Consistency) {
        let meta =
            ManifestMeta { generation, parent: None, consistency, created_unix_ns: crate::commands::now_unix_ns() };
        // Only a note for the next push: losing it in a crash costs nothing.
        if w.finish_with(meta, false).is_err() {
            return;
        }
        let old: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "dfm"))
                    .collect()
            })
            .unwrap_or_default();
        let to = self.dir.join(format!("{generation}.dfm"));
        if std::fs::rename(self.dir.join("sending.tmp"), &to).is_ok() {
            for p in old {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
