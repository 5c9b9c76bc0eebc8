//! A disk-to-disk sync with no network: the engine's source and target
//! sessions joined in memory through the protocol's state machines — the
//! same decisions, comparison and commit as a push, with no encoding, no
//! encryption and no extra copy of block data. Blocks the source hashed
//! are written as they are (they are verified by construction); where the
//! target compares by its bytes, they are compared with the source's bytes
//! instead of being hashed (one pass, no second hash).
//!
//! ```no_run
//! use std::sync::Arc;
//! use diskferry_sync_engine::local::{sync, NoProgress, SyncJob, SyncOptions};
//! use diskferry_sync_engine::store::RealFs;
//! use diskferry_protocol::{Generation, SessionId};
//!
//! let job = SyncJob {
//!     vfs: Arc::new(RealFs),
//!     state_root: "/var/lib/diskferry".into(),
//!     source: "/srv/vm1.img".into(),
//!     target: "/backup/vm1.img".into(),
//!     generation: Generation(7),
//!     session: SessionId(9),
//!     now_unix_ns: 0,
//! };
//! let report = sync(&job, &SyncOptions::default(), &NoProgress)?;
//! println!("{} blocks changed", report.blocks_changed);
//! # Ok::<(), diskferry_sync_engine::Error>(())
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use diskferry_protocol::message::SyncMode;
use diskferry_protocol::message::{Open, Plan, WantBlock};
use diskferry_protocol::session::{exchange, ReceiverEvent, ReceiverSession, SenderEvent, SenderSession, ViewBlocks};
use diskferry_protocol::{BlockHash, BlockSize, Consistency, ErrorCode, Generation, SessionId, TargetName};
use rayon::prelude::*;

use crate::apply::{DirectSink, OldContent, Recovery, RunWriter, Target, TargetOptions};
use crate::block::VerifiedBlock;
use crate::error::{Error, IoContext, Place, Result};
use crate::hash::hash_and_compare;
pub use crate::progress::{NoProgress, Progress};
use crate::session::{Item, Link, Outcome, Request, SourceSession, TargetRequest, TargetSession};
use crate::store::Vfs;
use crate::view::{view_of, ViewProducer};

/// Regions in flight between the two sessions (they run in one thread, so
/// this only bounds what is buffered).
const WINDOW: u32 = 4;

/// Sync options.
#[derive(Clone, Copy, Debug)]
pub struct SyncOptions {
    /// Delta, full or auto.
    pub mode: SyncMode,
    /// Block size.
    pub block_size: BlockSize,
    /// Sync a diverged target anyway (full compare, its changes overwritten),
    /// or a full copy over recovery points (dropped).
    pub force: bool,
    /// Consistent recovery points to keep.
    pub retention: u32,
    /// Label a stable read `app-consistent` (a quiesce hook ran) instead of `crash-consistent`.
    pub app_consistent: bool,
    /// Proceed over a split brain, keeping the target's own changes as a
    /// recovery point until `commit`.
    pub discard_target_changes: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            mode: SyncMode::Auto,
            block_size: BlockSize::DEFAULT,
            force: false,
            retention: 2,
            app_consistent: false,
            discard_target_changes: false,
        }
    }
}

/// What a sync runs on: paths, and the values the engine does not make itself.
#[derive(Debug, Clone)]
pub struct SyncJob {
    /// The filesystem.
    pub vfs: Arc<dyn Vfs>,
    /// Root of the state directory.
    pub state_root: PathBuf,
    /// Source disk.
    pub source: PathBuf,
    /// Target disk (canonical path: it keys the state).
    pub target: PathBuf,
    /// Id of the generation to commit.
    pub generation: Generation,
    /// Session id (staged blocks of an interrupted session are not reused locally).
    pub session: SessionId,
    /// Commit time, ns since the epoch.
    pub now_unix_ns: i64,
}

/// What a sync did.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// `delta` or `full`.
    pub mode: &'static str,
    /// How the target side was known: `manifest`, `full-compare` or `none`.
    pub compare: &'static str,
    /// Source size.
    pub disk_bytes: u64,
    /// Blocks in the disk.
    pub blocks_total: u64,
    /// Blocks whose content changed (sent, copied or zeroed).
    pub blocks_changed: u64,
    /// Content bytes written into the target in place.
    pub bytes_written: u64,
    /// Redo log bytes.
    pub log_bytes: u64,
    /// Old content kept for the previous recovery point.
    pub undo_bytes: u64,
    /// The committed generation.
    pub generation: Generation,
    /// Its consistency.
    pub consistency: Consistency,
    /// Root of its hash tree.
    pub root: BlockHash,
    /// What opening the target recovered first.
    pub recovery: Recovery,
    /// Recovery points dropped by starting a new chain (`--force`).
    pub points_dropped: u32,
    /// The target already held exactly this content: no new generation,
    /// `generation` is its existing point.
    pub unchanged: bool,
}

/// Runs one local sync on the current rayon pool.
pub fn sync(job: &SyncJob, opts: &SyncOptions, progress: &dyn Progress) -> Result<SyncReport> {
    // The source's history is kept as for a push: a disk synced from today
    // may receive tomorrow, and must then be known for what it holds.
    let source = SourceSession::open(job.vfs.clone(), &job.source, opts.block_size, Some(&job.state_root))?;
    let same = job
        .vfs
        .metadata(&job.target)
        .ctx(Place::Target, "reading", &job.target)?
        .is_some_and(|t| t.identity == source.before().identity);
    if job.source == job.target || same {
        return Err(Error::new(ErrorCode::InvalidInput, "source and target are the same file or device")
            .hint("give a different target path"));
    }
    let mut target = Target::open(
        job.vfs.clone(),
        &job.state_root,
        &job.target,
        TargetOptions { retention: Some(opts.retention), name: None, expect_identity: None, keep_points: Vec::new() },
    )?;
    // Local sessions do not resume: staged blocks are cheaper to redo than to trust.
    target.discard()?;
    let recovery = target.recovery().clone();
    let mut join = Join::new(job, opts, &source, progress)?;
    let ready = join.run_to_commit(&mut target)?;
    let Ready { plan, consistency, accepted } = ready;
    let Accepted { session, view, old, sink } = accepted;
    let outcome = session.commit(consistency, job.generation, job.now_unix_ns)?;
    drop((view, old, sink));
    let mut report = join.committed(outcome, consistency, plan)?;
    report.recovery = recovery;
    Ok(report)
}

/// Syncs each `(job, options)` pair as a member of replication group
/// `name`: every member is compared and staged, then all commit as one
/// point (the first job's generation id), or none does. Members are synced
/// one after another on the current rayon pool.
pub fn sync_group(name: &str, members: &[(SyncJob, SyncOptions)], progress: &dyn Progress) -> Result<Vec<SyncReport>> {
    let Some((first, _)) = members.first() else { return Err(internal("a group with no members")) };
    let (generation, now) = (first.generation, first.now_unix_ns);
    let mut sources = Vec::with_capacity(members.len());
    let mut targets = Vec::with_capacity(members.len());
    for (job, opts) in members {
        if job.state_root != first.state_root {
            return Err(internal("a group's members share one state directory"));
        }
        sources.push(SourceSession::open(job.vfs.clone(), &job.source, opts.block_size, Some(&job.state_root))?);
        let mut t = Target::open(
            job.vfs.clone(),
            &job.state_root,
            &job.target,
            TargetOptions {
                retention: Some(opts.retention),
                name: None,
                expect_identity: None,
                keep_points: Vec::new(),
            },
        )?;
        t.discard()?;
        targets.push(t);
    }
    let mut joins = Vec::with_capacity(members.len());
    for ((job, opts), source) in members.iter().zip(&sources) {
        joins.push(Join::new(job, opts, source, progress)?);
    }
    let mut ready = Vec::with_capacity(members.len());
    for (join, target) in joins.iter_mut().zip(targets.iter_mut()) {
        ready.push(join.run_to_commit(target)?);
    }
    let mut kept = Vec::with_capacity(ready.len());
    let mut prepared = Vec::with_capacity(ready.len());
    for Ready { plan, consistency, accepted } in ready {
        let Accepted { session, view, old, sink } = accepted;
        prepared.push(session.prepare_member(consistency, generation, now)?);
        kept.push((plan, consistency, (view, old, sink)));
    }
    let outcomes = crate::session::commit_group(first.vfs.as_ref(), &first.state_root, name, prepared)?;
    let mut reports = Vec::with_capacity(outcomes.len());
    for ((join, outcome), (plan, consistency, _)) in joins.iter_mut().zip(outcomes).zip(kept) {
        reports.push(join.committed(outcome, consistency, plan)?);
    }
    Ok(reports)
}

/// The two sessions and their state machines, in one thread.
struct Join<'a> {
    job: &'a SyncJob,
    opts: &'a SyncOptions,
    source: &'a SourceSession,
    progress: &'a dyn Progress,
    sender: SenderSession,
    receiver: ReceiverSession,
}

/// A session whose target was asked to commit (what it holds is kept
/// until the commit is done).
struct Ready<'t> {
    plan: Plan,
    consistency: Consistency,
    accepted: Accepted<'t>,
}

/// The target side once accepted.
struct Accepted<'t> {
    session: TargetSession<'t>,
    view: Option<ViewProducer>,
    old: OldContent,
    sink: Option<DirectSink>,
}

impl<'a> Join<'a> {
    fn new(
        job: &'a SyncJob,
        opts: &'a SyncOptions,
        source: &'a SourceSession,
        progress: &'a dyn Progress,
    ) -> Result<Self> {
        let g = source.geometry();
        let target = TargetName::new("local").map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?;
        let open = Open {
            session: job.session,
            target,
            disk_bytes: g.disk_bytes,
            block_size: g.block_size,
            mode: opts.mode,
            force: opts.force,
            discard_target_changes: opts.discard_target_changes,
            lineage: source.lineage().to_vec(),
            promote: false,
            group: None,
        };
        Ok(Join { job, opts, source, progress, sender: SenderSession::new(open), receiver: ReceiverSession::new() })
    }

    /// Runs both sessions until the target is asked to commit.
    fn run_to_commit<'t>(&mut self, target: &'t mut Target) -> Result<Ready<'t>> {
        let g = self.source.geometry();
        let mut accepted: Option<Accepted<'t>> = None;
        let mut next_region = 0u64;
        let mut finished = false;
        let mut target = Some(target);
        loop {
            let mut progressed = self.exchange();
            while let Some(ev) = self.receiver.poll_event() {
                progressed = true;
                match ev {
                    ReceiverEvent::Open(o) => {
                        let Some(t) = target.take() else { return Err(internal("opened twice")) };
                        let req = TargetRequest {
                            // Generation ids are random; the discarded
                            // state's only needs to differ from the sync's own.
                            request: Request::from_open(
                                &o,
                                g,
                                Generation(self.job.generation.0 ^ (1 << 127)),
                                self.job.now_unix_ns,
                            ),
                            session: o.session,
                            resumable: false,
                            window: WINDOW,
                            index_entries: None,
                            kept_bytes: None,
                        };
                        let (session, a) = TargetSession::open(t, &req)?;
                        self.receiver.accept(a.accept, a.geometry);
                        self.source.set_link(Link { level: None, pages: true })?;
                        let phase = if a.accept.plan == Plan::Full { "copying" } else { "comparing" };
                        self.progress.phase(phase, g.disk_bytes);
                        accepted = Some(Accepted { session, view: a.view, old: a.old, sink: a.sink });
                    }
                    ReceiverEvent::Resolve { region, blocks } => {
                        let t = accepted.as_mut().ok_or_else(|| internal("resolve before open"))?;
                        let wants = t.session.resolve(&blocks)?;
                        self.receiver.handle_resolved(region, wants);
                    }
                    ReceiverEvent::RegionComplete { region, hashes, expected } => {
                        let t = accepted.as_mut().ok_or_else(|| internal("region before open"))?;
                        t.session.region(region, &hashes, expected)?;
                    }
                    ReceiverEvent::Commit { consistency } => {
                        let t = accepted.take().ok_or_else(|| internal("commit before open"))?;
                        let plan = t.session.plan();
                        return Ok(Ready { plan, consistency, accepted: t });
                    }
                    ReceiverEvent::Failed { code, message } => return Err(Error::new(code, message)),
                }
            }
            let mut wanted = Vec::new();
            while let Some(ev) = self.sender.poll_event() {
                progressed = true;
                match ev {
                    SenderEvent::Accepted(_) | SenderEvent::Committed(_) => {}
                    SenderEvent::SendBlocks { region, blocks } => wanted.push((region, blocks)),
                    SenderEvent::Resend { index } => {
                        wanted.push((g.region_of(index), vec![WantBlock { index, page_hashes: Vec::new() }]))
                    }
                    SenderEvent::RegionDone { region, .. } => {
                        let r = g.region_range(region);
                        self.progress.advance(g.block_offset(r.end).min(g.disk_bytes) - g.block_offset(r.start));
                    }
                    SenderEvent::Failed { code, message } => return Err(Error::new(code, message)),
                }
            }
            if let Some(t) = accepted.as_mut() {
                for (region, blocks) in wanted {
                    self.send_blocks(t, region, &blocks)?;
                }
                if next_region < g.region_count() && self.sender.window_open() {
                    self.feed_region(t, next_region)?;
                    next_region += 1;
                    continue;
                }
                if next_region == g.region_count() && !finished && self.sender.outstanding() == 0 {
                    finished = true;
                    let c = self.source.consistency(self.opts.app_consistent)?;
                    self.sender.handle_source_done(c);
                    continue;
                }
            }
            if !progressed {
                // Nothing moves: the two sessions wait on each other, a bug.
                return Err(internal("the sessions stopped without a commit"));
            }
        }
    }

    /// After the commit: the source's history, the sessions' last exchange, the report.
    fn committed(&mut self, outcome: Outcome, consistency: Consistency, plan: Plan) -> Result<SyncReport> {
        let g = self.source.geometry();
        let c = outcome.committed;
        self.source.commit_history(c.generation, consistency, self.job.now_unix_ns)?;
        self.receiver.handle_committed(c);
        self.exchange();
        Ok(SyncReport {
            mode: if plan == Plan::Full { "full" } else { "delta" },
            compare: match plan {
                Plan::Full => "none",
                Plan::CompareManifest => "manifest",
                Plan::CompareHash => "full-compare",
            },
            disk_bytes: g.disk_bytes,
            blocks_total: g.block_count(),
            blocks_changed: c.blocks_changed,
            bytes_written: c.bytes_written,
            log_bytes: outcome.report.map_or(0, |r| r.log_bytes),
            undo_bytes: outcome.report.map_or(0, |r| r.undo_bytes),
            generation: c.generation,
            consistency,
            root: c.root,
            recovery: Recovery::Clean,
            points_dropped: c.points_dropped,
            unchanged: c.unchanged,
        })
    }

    fn exchange(&mut self) -> bool {
        exchange(&mut self.sender, &mut self.receiver)
    }

    /// Hashes the next region, gives the target its view, and, for a full
    /// copy, writes every block as it is hashed.
    fn feed_region(&mut self, t: &mut Accepted<'_>, region: u64) -> Result<()> {
        let g = self.source.geometry();
        let range = g.region_range(region);
        if let Some(sink) = &t.sink {
            if t.session.plan() == Plan::Full {
                let written = Mutex::new(Vec::new());
                let zeros = Mutex::new(Vec::new());
                let failed = Mutex::new(None);
                let bytes = AtomicU64::new(0);
                let runs = RunWriter::new(sink);
                let out = |item: Item<'_>| -> std::io::Result<()> {
                    match item {
                        Item::Block(b) => {
                            if let Err(e) = runs.add(&b) {
                                let msg = e.to_string();
                                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                                return Err(std::io::Error::other(msg));
                            }
                            bytes.fetch_add(b.bytes().len() as u64, Ordering::Relaxed);
                            written.lock().unwrap_or_else(|p| p.into_inner()).push((
                                b.index(),
                                b.hash(),
                                b.bytes().len(),
                            ));
                        }
                        Item::Zero { first, count } => {
                            zeros.lock().unwrap_or_else(|p| p.into_inner()).push((first, count))
                        }
                    }
                    Ok(())
                };
                let hashed = self.source.hash_region(region, Some(&out));
                if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    return Err(e);
                }
                let sr = hashed?;
                // Staged means written: the runs still gathered go first.
                runs.finish()?;
                let written = written.into_inner().unwrap_or_else(|p| p.into_inner());
                let end = g.block_offset(range.end).min(g.disk_bytes);
                t.session.account_direct(written.len() as u64, bytes.load(Ordering::Relaxed), end);
                for (index, hash, len) in written {
                    self.receiver.handle_staged(index, hash, len as u64);
                }
                for (first, count) in zeros.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    t.session.stage_zero(first, count)?;
                    self.receiver.handle_zeroed(first, count);
                }
                self.sender.handle_region(sr);
                return Ok(());
            }
        }
        let Some(view) = t.view.as_mut() else { return Err(internal("a compare without a view")) };
        let (sr, rv) = match view.disk() {
            // The target's bytes are at hand: compare them with the source's
            // instead of hashing them.
            Some(disk) => {
                let pairs = hash_and_compare(self.source.disk(), disk, &g, range.clone())
                    .map_err(|e| Error::io(Place::Source, "reading", &self.job.source, e))?;
                self.source.check_size()?;
                let (hashes, tgt): (Vec<BlockHash>, Vec<Option<BlockHash>>) =
                    pairs.into_iter().map(|(h, equal)| (h, equal.then_some(h))).unzip();
                let v = view_of(ViewBlocks::Partial(tgt));
                (self.source.region_of(region, hashes)?, v)
            }
            None => {
                let (r, v) = view.next_region()?;
                debug_assert_eq!(r, region);
                (self.source.hash_region(region, None)?, v)
            }
        };
        self.receiver.handle_view(region, rv);
        self.sender.handle_region(sr);
        Ok(())
    }

    /// The wanted blocks, read and diffed against the target's current bytes
    /// in parallel, staged in order.
    fn send_blocks(&mut self, t: &mut Accepted<'_>, region: u64, blocks: &[WantBlock]) -> Result<()> {
        let g = self.source.geometry();
        let first = g.region_range(region).start;
        let announced = self.sender.region_blocks(region).map(|b| b.to_vec());
        let built: Vec<Result<VerifiedBlock>> = blocks
            .par_iter()
            .map(|w| {
                let expected = announced.as_ref().and_then(|b| b.get((w.index - first) as usize).copied());
                let new = self.source.read_block(w.index, expected)?;
                let old = t.old.read(w.index)?;
                Ok(VerifiedBlock::from_local(w.index, &new, Some(&old)))
            })
            .collect();
        for vb in built {
            let vb = vb?;
            if !vb.patches().is_empty() {
                t.session.stage(&vb)?;
            }
            self.receiver.handle_staged(vb.index(), vb.hash(), vb.payload_len());
        }
        Ok(())
    }
}

fn internal(what: &str) -> Error {
    Error::new(ErrorCode::Internal, format!("local sync: {what}"))
}
