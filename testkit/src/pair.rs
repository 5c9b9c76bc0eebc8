//! A push in memory: the engine's source and target sessions joined through
//! the protocol's state machines the way the two agents join them — frames
//! encoded, split and decoded exactly as on the wire, every block verified
//! against its blake3 before it is staged (journal) or written in place
//! (`.partial`, device) through the target's sink, and the target session
//! resumable — on any [`Vfs`], so crash and fault sweeps can run over the
//! networked apply. One thread: runs on the same filesystem operations in
//! the same order every time.
//!
//! [`PushSpec::stop_after`] ends the push after that many block and zero
//! frames were staged (a source that died, or a session a newer push took
//! over): the target keeps what it staged, as the serve agent does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::message::{Committed, Message, Open, Plan, SyncMode, WantBlock};
use diskferry_protocol::session::{exchange, ReceiverEvent, ReceiverSession, SenderEvent, SenderSession};
use diskferry_protocol::{BlockSize, ErrorCode, FrameSplitter, Generation, SessionId, TargetName, MAX_FRAME};
use diskferry_sync_engine::apply::{DirectSink, OldContent, Target, TargetOptions};
use diskferry_sync_engine::block::VerifiedBlock;
use diskferry_sync_engine::remote::{verify_frame, FrameRejection, WireFrame};
use diskferry_sync_engine::session::{Item, Link, Request, SourceSession, TargetRequest, TargetSession};
use diskferry_sync_engine::store::Vfs;
use diskferry_sync_engine::view::ViewProducer;
use diskferry_sync_engine::{Error, Result};

/// One push.
#[derive(Clone, Debug)]
pub struct PushSpec {
    /// Root of the target agent's state directory.
    pub state_root: PathBuf,
    /// The source disk.
    pub source: PathBuf,
    /// The target (canonical path).
    pub target: PathBuf,
    /// Delta, full or auto.
    pub mode: SyncMode,
    /// `--force`.
    pub force: bool,
    /// Block size.
    pub block_size: BlockSize,
    /// Recovery points the target keeps.
    pub retention: u32,
    /// The generation a commit makes.
    pub generation: Generation,
    /// The session id.
    pub session: SessionId,
    /// zstd level (`None`: raw payloads).
    pub level: Option<i32>,
    /// End the push after this many staged frames.
    pub stop_after: Option<u64>,
}

/// How a push ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushEnd {
    /// The target committed (or already held the content).
    Committed(Committed),
    /// Stopped as asked, before the commit.
    Stopped,
}

/// Runs one push on `vfs`.
pub fn push(vfs: Arc<dyn Vfs>, spec: &PushSpec) -> Result<PushEnd> {
    let source = SourceSession::open(vfs.clone(), &spec.source, spec.block_size, None)?;
    let g = source.geometry();
    let mut target = Target::open(
        vfs,
        &spec.state_root,
        &spec.target,
        TargetOptions { retention: Some(spec.retention), name: Some("t".into()), ..Default::default() },
    )?;
    let open = Open {
        session: spec.session,
        target: TargetName::new("t").map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?,
        disk_bytes: g.disk_bytes,
        block_size: g.block_size,
        mode: spec.mode,
        force: spec.force,
        discard_target_changes: false,
        lineage: Vec::new(),
        promote: false,
        group: None,
    };
    let mut pair = Pair {
        spec,
        source: &source,
        sender: SenderSession::new(open),
        receiver: ReceiverSession::new(),
        staged: 0,
        wire: FrameSplitter::new(MAX_FRAME),
        packets: 0,
        packet_left: 0,
    };
    pair.run(&mut target)
}

struct Pair<'a> {
    spec: &'a PushSpec,
    source: &'a SourceSession,
    sender: SenderSession,
    receiver: ReceiverSession,
    /// Frames staged so far (for `stop_after`).
    staged: u64,
    /// Data frames pass through the one splitter, as bytes.
    wire: FrameSplitter,
    /// Packets cut so far, and the room left in the current one.
    packets: usize,
    packet_left: usize,
}

/// Sizes the stream is cut at, as QUIC chunks would cut it: never in line
/// with frames, so payloads arrive in pieces of every shape.
const PACKET_SIZES: [usize; 5] = [64_937, 1_452, 30_001, 65_000, 4_099];

struct Side<'t> {
    session: TargetSession<'t>,
    view: Option<ViewProducer>,
    old: OldContent,
    sink: Option<DirectSink>,
}

enum Step {
    Go,
    Stop,
}

impl Pair<'_> {
    fn run<'t>(&mut self, target: &'t mut Target) -> Result<PushEnd> {
        let g = self.source.geometry();
        let mut target = Some(target);
        let mut side: Option<Side<'t>> = None;
        let mut next_region = 0;
        let mut finished = false;
        loop {
            let mut moved = self.exchange();
            while let Some(ev) = self.receiver.poll_event() {
                moved = true;
                match ev {
                    ReceiverEvent::Open(o) => {
                        let Some(t) = target.take() else { return Err(internal("opened twice")) };
                        let req = TargetRequest {
                            request: Request::from_open(&o, g, Generation(o.session.0 ^ (1 << 127)), 0),
                            session: o.session,
                            resumable: true,
                            window: 4,
                            index_entries: Some(1024),
                            kept_bytes: None,
                        };
                        let (session, a) = TargetSession::open(t, &req)?;
                        self.receiver.accept(a.accept, a.geometry);
                        side = Some(Side { session, view: a.view, old: a.old, sink: a.sink });
                    }
                    ReceiverEvent::Resolve { region, blocks } => {
                        let s = side.as_mut().ok_or_else(|| internal("resolve before open"))?;
                        let wants = s.session.resolve(&blocks)?;
                        self.receiver.handle_resolved(region, wants);
                    }
                    ReceiverEvent::RegionComplete { region, hashes, expected } => {
                        let s = side.as_mut().ok_or_else(|| internal("region before open"))?;
                        s.session.region(region, &hashes, expected)?;
                    }
                    ReceiverEvent::Commit { consistency } => {
                        let s = side.take().ok_or_else(|| internal("commit before open"))?;
                        let outcome = s.session.commit(consistency, self.spec.generation, 0)?;
                        self.receiver.handle_committed(outcome.committed);
                        self.exchange();
                        return Ok(PushEnd::Committed(outcome.committed));
                    }
                    ReceiverEvent::Failed { code, message } => return Err(Error::new(code, message)),
                }
            }
            let mut frames: Vec<WireFrame> = Vec::new();
            while let Some(ev) = self.sender.poll_event() {
                moved = true;
                match ev {
                    SenderEvent::Accepted(_) => {
                        self.source.set_link(Link { level: self.spec.level, pages: true })?;
                    }
                    SenderEvent::SendBlocks { region, blocks } => {
                        let first = g.region_range(region).start;
                        let announced = self.sender.region_blocks(region).map(|b| b.to_vec());
                        let expected: Vec<_> = blocks
                            .iter()
                            .map(|w| announced.as_ref().and_then(|b| b.get((w.index - first) as usize).copied()))
                            .collect();
                        self.source.frames(&blocks, &expected, &mut |_, f| {
                            frames.push(f);
                            true
                        })?;
                    }
                    SenderEvent::Resend { index } => {
                        let w = [WantBlock { index, page_hashes: Vec::new() }];
                        self.source.frames(&w, &[None], &mut |_, f| {
                            frames.push(f);
                            true
                        })?;
                    }
                    SenderEvent::RegionDone { .. } | SenderEvent::Committed(_) => {}
                    SenderEvent::Failed { code, message } => return Err(Error::new(code, message)),
                }
            }
            if let Some(s) = side.as_mut() {
                if let Step::Stop = self.deliver(s, frames)? {
                    return Ok(PushEnd::Stopped);
                }
                if next_region < g.region_count() && self.sender.window_open() {
                    if let Step::Stop = self.feed(s, next_region)? {
                        return Ok(PushEnd::Stopped);
                    }
                    next_region += 1;
                    continue;
                }
                if next_region == g.region_count() && !finished && self.sender.outstanding() == 0 {
                    finished = true;
                    let c = self.source.consistency(false)?;
                    self.sender.handle_source_done(c);
                    continue;
                }
            }
            if !moved {
                return Err(internal("the sessions stopped without a commit"));
            }
        }
    }

    fn exchange(&mut self) -> bool {
        exchange(&mut self.sender, &mut self.receiver)
    }

    /// Hashes the next region: the target gets its view, and a full copy's
    /// frames travel as the source hashes them.
    fn feed(&mut self, s: &mut Side<'_>, region: u64) -> Result<Step> {
        if s.session.plan() == Plan::Full {
            let frames = std::sync::Mutex::new(Vec::new());
            let out = |item: Item<'_>| -> std::io::Result<()> {
                frames.lock().unwrap_or_else(|p| p.into_inner()).push(self.source.encode(&item));
                Ok(())
            };
            let r = self.source.hash_region(region, Some(&out))?;
            let frames = frames.into_inner().unwrap_or_else(|p| p.into_inner());
            let step = self.deliver(s, frames)?;
            self.sender.handle_region(r);
            return Ok(step);
        }
        let view = s.view.as_mut().ok_or_else(|| internal("a compare without a view"))?;
        let (at, v) = view.next_region()?;
        if at != region {
            return Err(internal("views out of order"));
        }
        self.receiver.handle_view(region, v);
        self.sender.handle_region(self.source.hash_region(region, None)?);
        Ok(Step::Go)
    }

    /// Frames through the wire format, verified, then staged or (a full
    /// copy) gathered and written as one batch, as the agent's writer does.
    fn deliver(&mut self, s: &mut Side<'_>, frames: Vec<WireFrame>) -> Result<Step> {
        let g = self.source.geometry();
        let mut batch = Vec::new();
        let step = self.verify_into(s, frames, &mut batch);
        if let (Some(sink), false) = (&s.sink, batch.is_empty()) {
            sink.write_batch(&batch)?;
            for vb in &batch {
                let end = g.block_offset(vb.index()) + g.block_len(vb.index()) as u64;
                s.session.account_direct(1, vb.payload_len(), end);
                self.receiver.handle_staged(vb.index(), vb.hash(), vb.payload_len());
            }
        }
        step
    }

    fn verify_into(
        &mut self,
        s: &mut Side<'_>,
        frames: Vec<WireFrame>,
        batch: &mut Vec<VerifiedBlock>,
    ) -> Result<Step> {
        let g = self.source.geometry();
        for f in frames {
            for mut part in std::iter::once(f.head).chain(f.tail) {
                while !part.is_empty() {
                    if self.packet_left == 0 {
                        self.packet_left = PACKET_SIZES[self.packets % PACKET_SIZES.len()];
                        self.packets += 1;
                    }
                    let n = self.packet_left.min(part.len());
                    self.wire.push(part.split_to(n));
                    self.packet_left -= n;
                }
            }
            while let Some(m) = self.wire.next_frame().map_err(|e| Error::new(ErrorCode::Protocol, e.to_string()))? {
                if self.spec.stop_after.is_some_and(|n| self.staged >= n) {
                    return Ok(Step::Stop);
                }
                self.staged += 1;
                match m {
                    Message::Block(frame) => {
                        match verify_frame(&frame, &s.old, &g, s.sink.as_ref().map(|k| k.buffers())) {
                            Ok(vb) => match &s.sink {
                                Some(_) => batch.push(vb),
                                None => {
                                    s.session.stage(&vb)?;
                                    self.receiver.handle_staged(vb.index(), vb.hash(), vb.payload_len());
                                }
                            },
                            Err(FrameRejection::Mismatch) => self.receiver.handle_verify_failed(frame.index),
                            Err(FrameRejection::Invalid(msg)) => return Err(Error::new(ErrorCode::Protocol, msg)),
                            Err(FrameRejection::Storage(e)) => return Err(e),
                        }
                    }
                    Message::Zero { first, count } => {
                        s.session.stage_zero(first, count)?;
                        self.receiver.handle_zeroed(first, count);
                    }
                    other => return Err(internal(&format!("message {:#04x} on a data stream", other.type_byte()))),
                }
            }
        }
        Ok(Step::Go)
    }
}

fn internal(what: &str) -> Error {
    Error::new(ErrorCode::Internal, format!("session pair: {what}"))
}

/// A spec for `source` → `target` under `state_root`, other fields defaulted.
pub fn spec(state_root: &Path, source: &Path, target: &Path, generation: u128) -> PushSpec {
    PushSpec {
        state_root: state_root.to_path_buf(),
        source: source.to_path_buf(),
        target: target.to_path_buf(),
        mode: SyncMode::Auto,
        force: false,
        block_size: BlockSize::DEFAULT,
        retention: 3,
        generation: Generation(generation),
        session: SessionId(generation + 1000),
        level: Some(1),
        stop_after: None,
    }
}
