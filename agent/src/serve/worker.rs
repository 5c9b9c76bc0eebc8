//! The apply worker: one thread per session that owns the target (its lock
//! and its engine [`TargetSession`]) and does everything that writes it, in order.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use diskferry_protocol::message::{Committed, Open, WantBlock};
use diskferry_protocol::session::Differing;
use diskferry_protocol::{BlockHash, Consistency, Geometry, RegionHashes};
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::block::VerifiedBlock;
use diskferry_sync_engine::session::{Accepted, Request, TargetRequest, TargetSession};
use diskferry_sync_engine::store::Vfs;
use diskferry_sync_engine::Error;
use tokio::sync::mpsc::UnboundedSender;

/// What the worker needs to open a target for a session.
pub struct OpenRequest {
    pub vfs: Arc<dyn Vfs>,
    pub state_root: PathBuf,
    pub path: PathBuf,
    pub name: String,
    pub retention: u32,
    /// A group's points kept besides the retention count (`groups::retention`).
    pub keep_points: Vec<diskferry_protocol::Generation>,
    pub open: Open,
    pub pins: Arc<super::targets::Pins>,
    /// Regions the source may have in flight (what the memory budget allows).
    pub regions_in_flight: u32,
    /// Manifest index entries held in memory before spilling.
    pub index_entries: usize,
    /// Bytes of current block content kept for their patches.
    pub kept_bytes: u64,
    /// The group push this session is a member of.
    pub group: Option<(Arc<super::group::Run>, Arc<super::group::Groups>)>,
}

/// The session as the worker opened it (the engine's answer).
pub type Opened = Accepted;

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
    /// Regions completed, in region order.
    Regions(Vec<CompletedRegion>),
    Commit {
        consistency: Consistency,
    },
    /// The session ended without a commit: stop, keeping staged blocks.
    Stop,
}

/// A region the receiver completed: its hashes go into the manifest.
pub struct CompletedRegion {
    pub region: u64,
    pub hashes: RegionHashes,
    /// The region hash the source announced (a full copy's check).
    pub expected: Option<BlockHash>,
}

/// What the worker reports to the session.
pub enum Reply {
    /// Blocks staged or written: `(index, hash, bytes)` each (a full
    /// copy's writer reports a whole batch at once).
    Staged(Vec<(u64, BlockHash, u64)>),
    Zeroed {
        first: u64,
        count: u64,
    },
    Resolved {
        region: u64,
        wants: Vec<WantBlock>,
    },
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
    let opts = TargetOptions {
        retention: Some(req.retention),
        name: Some(req.name.clone()),
        expect_identity,
        keep_points: req.keep_points.clone(),
    };
    let mut target = match Target::open(req.vfs.clone(), &req.state_root, &req.path, opts) {
        Ok(t) => t,
        Err(e) => {
            let _ = opened.send(Err(e));
            return Ok(());
        }
    };
    let result = serve_session(&mut target, &req, &g, cmds, replies, opened);
    if let (Some((run, groups)), false) = (&req.group, matches!(result, Ok(true))) {
        let why = match &result {
            Err(e) => format!("member {} failed: {}", req.name, e.message),
            _ => format!("member {} stopped before its commit", req.name),
        };
        run.fail(groups, &why);
    }
    let result = result.map(|_| ());
    // What the path names after this session wrote it (a full copy renames a new file into place).
    req.pins.update(&req.name, &req.path, target.expected_identity());
    result
}

fn serve_session(
    target: &mut Target,
    req: &OpenRequest,
    g: &Geometry,
    cmds: Receiver<Cmd>,
    replies: &UnboundedSender<Reply>,
    opened: tokio::sync::oneshot::Sender<Result<Opened, Error>>,
) -> Result<bool, Error> {
    let treq = TargetRequest {
        request: Request::from_open(&req.open, *g, crate::ids::new_generation(), crate::ids::now_unix_ns()),
        session: req.open.session,
        resumable: true,
        window: req.regions_in_flight,
        index_entries: Some(req.index_entries),
        kept_bytes: Some(req.kept_bytes),
    };
    let (mut session, accepted) = match TargetSession::open(target, &treq) {
        Ok(x) => x,
        Err(e) => {
            let _ = opened.send(Err(e));
            return Ok(false);
        }
    };
    if opened.send(Ok(accepted)).is_err() {
        return Ok(false);
    }
    while let Ok(cmd) = cmds.recv() {
        match cmd {
            Cmd::Stage(vb, _permit) => {
                session.stage(&vb)?;
                let _ = replies.send(Reply::Staged(vec![(vb.index(), vb.hash(), vb.payload_len())]));
            }
            Cmd::Zero { first, count } => {
                session.stage_zero(first, count)?;
                let _ = replies.send(Reply::Zeroed { first, count });
            }
            Cmd::Resolve { region, blocks } => {
                let wants = session.resolve(&blocks)?;
                let _ = replies.send(Reply::Resolved { region, wants });
            }
            Cmd::Account { blocks, bytes, end } => session.account_direct(blocks, bytes, end),
            Cmd::Regions(done) => {
                for c in done {
                    session.region(c.region, &c.hashes, c.expected)?
                }
            }
            Cmd::Commit { consistency } => {
                let outcome = match &req.group {
                    Some((run, groups)) => commit_member(session, consistency, req, run, groups)?,
                    None => session.commit(consistency, crate::ids::new_generation(), crate::ids::now_unix_ns())?,
                };
                let mut committed = outcome.committed;
                if req.open.promote {
                    // The last step of `failover-sync --promote`, in the same
                    // session: the point just committed goes live.
                    match target.failover(Some(committed.generation)) {
                        Ok(_) => committed.promoted = true,
                        Err(e) => {
                            tracing::warn!(target = %req.name, "committed, but not promoted: error[{}]: {}", e.code, e.message)
                        }
                    }
                }
                let _ = replies.send(Reply::Committed(committed));
                return Ok(true);
            }
            Cmd::Stop => break,
        }
    }
    // The session ended without a commit: dropping the apply keeps the
    // staged blocks (resumable) and leaves the target at its last commit.
    Ok(false)
}

/// Commits this session as a member of its group push: prepared and
/// sealed here, the group record written by the last member to seal, then
/// finished here. An error before the record fails every member.
fn commit_member(
    session: TargetSession<'_>,
    consistency: Consistency,
    req: &OpenRequest,
    run: &super::group::Run,
    groups: &super::group::Groups,
) -> Result<diskferry_sync_engine::session::Outcome, Error> {
    let member = session.prepare_member(consistency, run.generation, crate::ids::now_unix_ns())?;
    let sealed = member.seal()?;
    run.sealed(req.vfs.as_ref(), &req.state_root)?;
    // Past the group's commit point: a failure from here on is finished by
    // recovery when the target is next opened.
    let outcome = sealed.finish()?;
    run.finished(groups, req.vfs.as_ref(), &req.state_root);
    Ok(outcome)
}
