//! The apply worker: one thread per session that owns the target (its lock
//! and its [`Apply`]) and does everything that writes it, in order.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use diskferry_protocol::message::{Accept, Committed, Open, Plan, SyncMode, WantBlock};
use diskferry_protocol::session::Differing;
use diskferry_protocol::{BlockHash, Consistency, ErrorCode, Generation, Geometry};
use diskferry_sync_engine::apply::{
    partial_path, Apply, ApplyMode, BeginSpec, CommitMeta, DirectSink, OldContent, Target, TargetOptions, Trust,
};
use diskferry_sync_engine::block::VerifiedBlock;
use diskferry_sync_engine::manifest::Manifest;
use diskferry_sync_engine::remote::{region_matches, resolve};
use diskferry_sync_engine::store::{DiskKind, Vfs};
use diskferry_sync_engine::view::{ViewProducer, ViewSource};
use diskferry_sync_engine::{Error, Place};
use tokio::sync::mpsc::UnboundedSender;

use diskferry_sync_engine::error::IoContext;

/// What the worker needs to open a target for a session.
pub struct OpenRequest {
    pub vfs: Arc<dyn Vfs>,
    pub state_root: PathBuf,
    pub path: PathBuf,
    pub name: String,
    pub retention: u32,
    pub open: Open,
    pub pins: Arc<super::targets::Pins>,
    /// Regions the source may have in flight (what the memory budget allows).
    pub regions_in_flight: u32,
    /// Manifest index entries held in memory before spilling.
    pub index_entries: usize,
}

/// The session as the worker opened it.
pub struct Opened {
    pub accept: Accept,
    pub geometry: Geometry,
    pub view: Option<ViewProducer>,
    pub old: OldContent,
    pub sink: Option<DirectSink>,
}

/// Work for the worker.
pub enum Cmd {
    /// A verified block, with the memory-budget permit it holds until staged.
    Stage(VerifiedBlock, Option<tokio::sync::OwnedSemaphorePermit>),
    Zero {
        first: u64,
        count: u64,
    },
    Resolve {
        region: u64,
        blocks: Vec<Differing>,
    },
    Account {
        blocks: u64,
        bytes: u64,
        end: u64,
    },
    Region {
        region: u64,
        hashes: Vec<BlockHash>,
        expected: Option<BlockHash>,
    },
    Commit {
        consistency: Consistency,
    },
    /// The session ended without a commit: stop, keeping staged blocks.
    Stop,
}

/// What the worker reports to the session.
pub enum Reply {
    Staged { index: u64, hash: BlockHash, bytes: u64 },
    Zeroed { first: u64, count: u64 },
    Resolved { region: u64, wants: Vec<WantBlock> },
    Committed(Committed),
    Failed(Error),
}

/// Starts the worker. The first message on `opened` is the open result; the
/// worker then serves `cmds` until it commits, fails, or `cmds` closes
/// (the session ended early: staged blocks are kept for resume).
pub fn spawn(
    req: OpenRequest,
    cmds: Receiver<Cmd>,
    replies: UnboundedSender<Reply>,
    opened: tokio::sync::oneshot::Sender<Result<Opened, Error>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("df-apply-{}", req.name)).spawn(move || {
        if let Err(e) = run(req, cmds, &replies, opened) {
            let _ = replies.send(Reply::Failed(e));
        }
    })
}

struct Decision {
    plan: Plan,
    mode: ApplyMode,
    base: Option<Generation>,
    view: Option<ViewSource>,
    trusted_manifest: Option<Manifest>,
    /// Recovery points a new chain drops (forced).
    points_dropped: u32,
}

fn decide(target: &mut Target, open: &Open, g: &Geometry) -> Result<Decision, Error> {
    let vfs = target.vfs().clone();
    let path = target.path().to_path_buf();
    let meta = vfs.metadata(&path).ctx(Place::Target, "reading", &path)?;
    let device = meta.is_some_and(|m| m.kind == DiskKind::BlockDevice);
    if let Some(m) = meta.filter(|m| m.kind == DiskKind::BlockDevice && m.len < g.disk_bytes) {
        return Err(Error::new(
            ErrorCode::TargetTooSmall,
            format!("target {} holds {} bytes but the source has {}", open.target, m.len, g.disk_bytes),
        )
        .hint("give the target a block device at least as large as the source; it was not touched"));
    }
    let staged_partial = target.staged().is_some_and(|s| {
        s.header.kind == diskferry_sync_engine::apply::journal::JournalKind::Partial && s.header.geometry == *g
    });
    let incomplete_device = device && matches!(target.trust()?, Trust::Incomplete);
    let full = match (open.mode, meta) {
        (SyncMode::Full, _) | (SyncMode::Auto, None) => true,
        (SyncMode::Delta, None) => {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("target {} does not exist yet; a delta needs it", open.target),
            )
            .hint("push with --mode full or auto"))
        }
        _ => false,
    };
    let disk_view = |p: &PathBuf| -> Result<ViewSource, Error> {
        Ok(ViewSource::Disk(vfs.open_disk(p).ctx(Place::Target, "opening", p)?))
    };
    if full {
        target.check_full_overwrite(open.force)?;
        return Ok(if staged_partial {
            // A full copy was interrupted: compare with what it already wrote.
            Decision {
                plan: Plan::CompareHash,
                mode: ApplyMode::Partial,
                base: None,
                view: Some(disk_view(&partial_path(&path))?),
                trusted_manifest: None,
                points_dropped: 0,
            }
        } else if incomplete_device {
            Decision {
                plan: Plan::CompareHash,
                mode: ApplyMode::Direct,
                base: None,
                view: Some(disk_view(&path)?),
                trusted_manifest: None,
                points_dropped: 0,
            }
        } else {
            let mode = if device { ApplyMode::Direct } else { ApplyMode::Partial };
            Decision { plan: Plan::Full, mode, base: None, view: None, trusted_manifest: None, points_dropped: 0 }
        });
    }
    if incomplete_device {
        return Ok(Decision {
            plan: Plan::CompareHash,
            mode: ApplyMode::Direct,
            base: None,
            view: Some(disk_view(&path)?),
            trusted_manifest: None,
            points_dropped: 0,
        });
    }
    let hashed = |base: Option<Generation>| -> Result<Decision, Error> {
        Ok(Decision {
            plan: Plan::CompareHash,
            mode: ApplyMode::Journal,
            base,
            view: Some(disk_view(&path)?),
            trusted_manifest: None,
            points_dropped: 0,
        })
    };
    match target.settle_trust()? {
        Trust::Trusted(p) => {
            let m = target.manifest_of(&p)?;
            if p.geometry.block_size != g.block_size {
                return hashed(Some(p.generation));
            }
            let cursor = m.cursor();
            Ok(Decision {
                plan: Plan::CompareManifest,
                mode: ApplyMode::Journal,
                base: Some(p.generation),
                view: Some(ViewSource::Manifest { manifest: Box::new(m.clone()), cursor: Box::new(cursor), device }),
                trusted_manifest: Some(m),
                points_dropped: 0,
            })
        }
        Trust::Diverged { why, .. } if !open.force => Err(target.diverged(&why)),
        // No state, forced, or unprovable: compare with the bytes; never a blind overwrite.
        _ => hashed(None),
    }
}

fn run(
    req: OpenRequest,
    cmds: Receiver<Cmd>,
    replies: &UnboundedSender<Reply>,
    opened: tokio::sync::oneshot::Sender<Result<Opened, Error>>,
) -> Result<(), Error> {
    let g = Geometry::new(req.open.disk_bytes, req.open.block_size);
    let expect_identity = match req.pins.precheck(&req.name, &req.path) {
        Ok(id) => id,
        Err(e) => {
            let _ = opened.send(Err(e));
            return Ok(());
        }
    };
    let opts = TargetOptions { retention: Some(req.retention), name: Some(req.name.clone()), expect_identity };
    let mut target = match Target::open(req.vfs.clone(), &req.state_root, &req.path, opts) {
        Ok(t) => t,
        Err(e) => {
            let _ = opened.send(Err(e));
            return Ok(());
        }
    };
    let result = serve_session(&mut target, &req, &g, cmds, replies, opened);
    // What the path names after this session wrote it (a full copy renames a new file into place).
    req.pins.update(&req.name, target.expected_identity());
    result
}

fn serve_session(
    target: &mut Target,
    req: &OpenRequest,
    g: &Geometry,
    cmds: Receiver<Cmd>,
    replies: &UnboundedSender<Reply>,
    opened: tokio::sync::oneshot::Sender<Result<Opened, Error>>,
) -> Result<(), Error> {
    let g = *g;
    let mut decision = match decide(target, &req.open, &g) {
        Ok(d) => d,
        Err(e) => {
            let _ = opened.send(Err(e));
            return Ok(());
        }
    };
    if decision.base.is_none() {
        // A new chain: the points kept so far go (only ever when forced).
        decision.points_dropped = target.kept_points() as u32;
    }
    let current = target.catalog().and_then(|c| c.current()).map(|p| p.generation);
    let staged = target.staged().map_or(0, |s| s.entries);
    let spec = BeginSpec {
        session: req.open.session,
        geometry: g,
        mode: decision.mode,
        base: decision.base,
        resumable: true,
        index_entries: Some(req.index_entries),
    };
    let mut apply = match target.begin(spec) {
        Ok(a) => a,
        Err(e) => {
            let _ = opened.send(Err(e));
            return Ok(());
        }
    };
    let overlay = (**apply.overlay()).clone();
    let view = decision.view.map(|v| ViewProducer::new(v, g, overlay));
    let old = apply.old_content();
    let accept = Accept {
        plan: decision.plan,
        target_generation: current,
        staged_blocks: staged,
        window: req.regions_in_flight,
    };
    let sink = apply.direct_sink();
    if opened.send(Ok(Opened { accept, geometry: g, view, old: old.clone(), sink })).is_err() {
        return Ok(());
    }
    let trusted = decision.trusted_manifest.is_some();
    let mut blocks_changed = 0u64;
    while let Ok(cmd) = cmds.recv() {
        match cmd {
            Cmd::Stage(vb, _permit) => {
                let (index, hash, bytes) = (vb.index(), vb.hash(), vb.payload_len());
                apply.stage(&vb)?;
                blocks_changed += 1;
                let _ = replies.send(Reply::Staged { index, hash, bytes });
            }
            Cmd::Zero { first, count } => {
                apply.stage_zero(first, count)?;
                // Zeros in a new file change nothing: it is all holes already.
                if !(decision.plan == Plan::Full && decision.mode == ApplyMode::Partial) {
                    blocks_changed += count;
                }
                let _ = replies.send(Reply::Zeroed { first, count });
            }
            Cmd::Resolve { region, blocks } => {
                let wants = resolve(&mut apply, &old, &blocks, decision.trusted_manifest.as_ref(), trusted)?;
                blocks_changed += (blocks.len() - wants.len()) as u64;
                let _ = replies.send(Reply::Resolved { region, wants });
            }
            Cmd::Account { blocks, bytes, end } => {
                blocks_changed += blocks;
                apply.account_direct(blocks, bytes, end);
            }
            Cmd::Region { region, hashes, expected } => {
                if let Some(e) = expected {
                    if !region_matches(&hashes, &e) {
                        return Err(Error::new(
                            ErrorCode::Protocol,
                            format!("region {region} does not hash to what the source announced"),
                        ));
                    }
                }
                apply.push_region(region, &hashes)?;
            }
            Cmd::Commit { consistency } => {
                if let Some(point) = apply.unchanged_point(consistency) {
                    // The target holds this content already (say, a rerun
                    // after the last acknowledgement was lost): no new point.
                    apply.abandon();
                    let root = target.manifest_of(&point)?.header().root;
                    let _ = replies.send(Reply::Committed(Committed {
                        generation: point.generation,
                        root,
                        blocks_changed: 0,
                        bytes_written: 0,
                        points_dropped: 0,
                        unchanged: true,
                    }));
                    return Ok(());
                }
                let generation = crate::commands::new_generation();
                let report = commit(apply, generation, consistency, crate::commands::now_unix_ns())?;
                let _ = replies.send(Reply::Committed(Committed {
                    generation: report.generation,
                    root: report.root,
                    blocks_changed,
                    bytes_written: report.bytes_written,
                    points_dropped: decision.points_dropped,
                    unchanged: false,
                }));
                return Ok(());
            }
            Cmd::Stop => break,
        }
    }
    // The session ended without a commit: dropping the apply keeps the
    // staged blocks (resumable) and leaves the target at its last commit.
    Ok(())
}

fn commit(
    apply: Apply<'_>,
    generation: Generation,
    consistency: Consistency,
    now_unix_ns: i64,
) -> Result<diskferry_sync_engine::apply::CommitReport, Error> {
    apply.commit(CommitMeta { generation, consistency, created_unix_ns: now_unix_ns })
}
