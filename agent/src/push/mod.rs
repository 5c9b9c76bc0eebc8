//! The source agent: `diskferry push`. The engine's [`SourceSession`]
//! hashes the source and builds the frames; this module connects, moves
//! frames between QUIC streams and the protocol's [`SenderSession`]
//! (`session.rs`), and reports.
//!
//! [`SenderSession`]: diskferry_protocol::session::SenderSession

pub mod group;
mod release;
mod session;

use crate::snapshot::{self, SnapshotKind, SnapshotOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::message::{Committed, Open, Plan, SyncMode};
use diskferry_protocol::{BlockSize, Consistency, ErrorCode, SessionId, TargetName};
use diskferry_sync_engine::changes::{ChangeHint, ChangeSource, HintOutcome, SpotCheck};
use diskferry_sync_engine::error::IoContext;
use diskferry_sync_engine::history::History;
use diskferry_sync_engine::local::Progress;
use diskferry_sync_engine::session::SourceSession;
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::{Error, Place};

use crate::changes::Changes;

use crate::identity::Identity;
use crate::{transport, trust};

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
    /// Proceed over a split brain (the target's own changes are kept there
    /// as a recovery point until `commit`).
    pub discard_target_changes: bool,
    /// How the source is snapshotted, and the hooks around it.
    pub snapshot: SnapshotOptions,
    /// Promote the committed point on the target in this session.
    pub promote: bool,
    /// Label the point fuzzy whatever the read saw (a pass of
    /// `failover-sync` while the VM runs is never a recovery point).
    pub fuzzy: bool,
    pub threads: Option<usize>,
    pub max_mtu: Option<u16>,
    /// Where the manifest of what was last sent is kept (none: not kept).
    pub state_root: Option<PathBuf>,
    /// How the source's bytes are read (raw, or an image format through qemu-nbd).
    pub format: crate::nbd::Format,
    /// What says which blocks may have changed, and how a hint is tested.
    pub changes: Changes,
    /// A running VM's QMP socket and the disk's node in it.
    pub qmp: Option<(PathBuf, String)>,
    pub spot_check: SpotCheck,
    /// How long a silent target is waited for.
    pub idle_timeout: Duration,
    /// This push is one member of a replication group's push.
    pub group: Option<diskferry_protocol::message::GroupTag>,
    /// Set when another member of the group failed: the session is
    /// closed at once (so the target lets go of every member now).
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
    /// The group push's one connection, which this member's session
    /// shares with the others' (none: a connection of its own).
    pub shared: Option<quinn::Connection>,
    /// Bandwidth limits the block payload is paced to (this push's, a daemon's).
    pub pace: Vec<std::sync::Arc<crate::pace::Pacer>>,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub plan: Plan,
    pub disk_bytes: u64,
    pub blocks_total: u64,
    pub bytes_sent: u64,
    pub wire_bytes: u64,
    pub path_mtu: u16,
    pub consistency: Consistency,
    pub staged_before: u64,
    /// Bytes of control frames (hash exchange, requests) both ways.
    pub control_bytes: u64,
    /// How the source was read.
    pub snapshot: SnapshotKind,
    /// The target's answer: the generation, what changed and was read,
    /// the common point, what was discarded and promoted.
    pub committed: Committed,
    /// Whether a change hint was used, and why not.
    pub changes: HintOutcome,
    /// Source bytes read: hashing (holes are not read), spot check, sending.
    pub source_bytes_read: u64,
    /// `file`, `qemu-nbd` (an image diskferry served), `qemu-storage-daemon`
    /// (an image at rest with `--changes dirty-bitmap`), `nbd` (a URL), or
    /// `qmp` (a running VM's node through QEMU's NBD server).
    pub read_through: &'static str,
}

impl PushReport {
    /// How the push ends as a job.
    pub fn job_result(&self) -> crate::jobs::JobResult {
        crate::jobs::JobResult {
            payload_bytes: self.bytes_sent,
            wire_bytes: self.wire_bytes,
            unchanged: self.committed.unchanged,
            ..crate::jobs::JobResult::ok(
                Some(self.committed.generation.to_hex()),
                Some(self.consistency.as_str().to_string()),
            )
        }
    }

    /// `delta` or `full`, as the target decided.
    pub fn mode(&self) -> &'static str {
        match self.plan {
            Plan::Full => "full",
            _ => "delta",
        }
    }
}

/// Runs one push.
pub async fn push(
    id: &Identity,
    opts: PushOptions,
    progress: Arc<dyn Progress + Send + Sync>,
) -> Result<PushReport, Error> {
    push_tracked(id, opts, progress, &mut false).await
}

/// [`push`], telling through `commit_requested` whether the target was asked
/// to commit: a failure after that may still have landed (and, with
/// `promote`, gone live) on the target.
pub async fn push_tracked(
    id: &Identity,
    opts: PushOptions,
    progress: Arc<dyn Progress + Send + Sync>,
    commit_requested: &mut bool,
) -> Result<PushReport, Error> {
    push_with(id, opts, None, progress, commit_requested).await
}

/// [`push_tracked`] reading `taken` (a snapshot taken with the other
/// members' of a group) instead of taking one.
pub async fn push_with(
    id: &Identity,
    opts: PushOptions,
    taken: Option<snapshot::Snapshot>,
    progress: Arc<dyn Progress + Send + Sync>,
    commit_requested: &mut bool,
) -> Result<PushReport, Error> {
    let through_nbd =
        opts.format != crate::nbd::Format::Raw || crate::nbd::url::is_nbd_url(&opts.source.to_string_lossy());
    if through_nbd && opts.snapshot.kind != SnapshotKind::None {
        return Err(Error::new(
            ErrorCode::Usage,
            "--snapshot reads a raw disk file; an NBD source or an image read through qemu-nbd is read as it is served",
        )
        .hint("serve a snapshot over NBD (QEMU's block-export of a backup point), or use --format raw"));
    }
    // Hooks and the snapshot block: they run off the runtime's threads.
    let (src, so) = (opts.source.clone(), opts.snapshot.clone());
    let mut snap = match taken {
        Some(s) => s,
        None => tokio::task::spawn_blocking(move || snapshot::take(&src, &so))
            .await
            .map_err(|e| Error::new(ErrorCode::Internal, format!("snapshot task: {e}")))??,
    };
    // Why a requested hint could not even be offered (the report says so).
    let mut unoffered = None;
    let (mut pass, node) = match opts.changes {
        Changes::DirtyBitmap => {
            let o = opts.clone();
            let (pass, node) = tokio::task::spawn_blocking(move || begin_bitmaps(&o))
                .await
                .map_err(|e| Error::new(ErrorCode::Internal, format!("bitmap task: {e}")))??;
            unoffered.clone_from(&pass.why_not);
            (PassGuard(Some(pass)), Some(node))
        }
        _ if opts.qmp.is_some() => {
            return Err(Error::new(ErrorCode::Usage, "--qmp reads a running VM's disk with --changes dirty-bitmap")
                .hint("add --changes dirty-bitmap --format qcow2"))
        }
        _ => (PassGuard(None), None),
    };
    let bitmap = pass.0.as_ref().and_then(|p| p.to_read().cloned());
    let pending = pass.0.as_ref().map(|p| p.pending().to_string());
    let reading_pending = pending.clone();
    let (read, format, b) = (snap.read_path.clone(), opts.format, bitmap.as_ref().map(|b| b.1.clone()));
    let read_through = match (&node, format) {
        (Some(n), _) if n.image_at_rest().is_some() => "qemu-storage-daemon",
        (Some(_), _) => "qmp",
        (None, crate::nbd::Format::Raw) if crate::nbd::url::is_nbd_url(&read.to_string_lossy()) => "nbd",
        (None, crate::nbd::Format::Raw) => "file",
        (None, _) => "qemu-nbd",
    };
    // Kept until the push ends: it may own the qemu-nbd or the QEMU export it reads through.
    let opened = tokio::task::spawn_blocking(move || match (&node, pending) {
        (Some(node), Some(pending)) => crate::nbd::open_running(node, b.as_deref(), &pending),
        _ => crate::nbd::open_source(&read, format, b.as_deref()),
    })
    .await
    .map_err(|e| Error::new(ErrorCode::Internal, format!("source task: {e}")))?;
    let reader = match opened {
        Ok(r) => r,
        // The guard abandons the pass.
        Err(e) => return Err(e),
    };
    let source = SourceSession::open_as(
        reader.vfs.clone(),
        &reader.read_path,
        &opts.source,
        opts.block_size,
        opts.state_root.as_deref(),
    )?;
    // A snapshot is read for this push alone: what is copied out of it need
    // not stay in the page cache.
    let source =
        Arc::new(if snap.kind != SnapshotKind::None && read_through == "file" { source.read_once() } else { source });
    match &opts.changes {
        Changes::FullScan => {}
        Changes::DirtyBitmap => {
            if let Some((since, name)) = &bitmap {
                match reader.dirty_ranges(name)? {
                    Some(ranges) => source.offer_hint(
                        ChangeHint {
                            since: *since,
                            source: ChangeSource::DirtyBitmap,
                            ranges,
                            live: live_writes(&reader, &reading_pending),
                        },
                        opts.spot_check,
                    ),
                    None => unoffered = Some(format!("the NBD server did not export the bitmap {name}")),
                }
            }
        }
        Changes::Ranges(file) => source.offer_hint(crate::changes::read_change_list(file)?, opts.spot_check),
        Changes::ExtentMap => {
            let kept = match opts.state_root.as_deref() {
                Some(root) => snapshot::kept_snapshot(&opts.source, root)?,
                None => None,
            };
            match kept {
                Some((kept, since)) => match crate::changes::extent_changes(&kept, &snap.read_path) {
                    Ok(ranges) => source.offer_hint(
                        ChangeHint { since, source: ChangeSource::ExtentMap, ranges, live: None },
                        opts.spot_check,
                    ),
                    Err(e) => unoffered = Some(format!("the extent maps could not be read: {e}")),
                },
                None => {
                    unoffered =
                        Some("no snapshot is kept from an earlier push of this disk (this push keeps one)".into())
                }
            }
        }
    }
    let g = source.geometry();
    let open = Open {
        session: SessionId(rand::random::<u128>() | 1),
        target: opts.target.clone(),
        disk_bytes: g.disk_bytes,
        block_size: g.block_size,
        mode: opts.mode,
        force: opts.force,
        discard_target_changes: opts.discard_target_changes,
        lineage: source.lineage().to_vec(),
        promote: opts.promote,
        group: opts.group.clone(),
    };

    // A group's members share the group's connection; it is the group's to close.
    let (endpoint, conn) = match &opts.shared {
        Some(c) => (None, c.clone()),
        None => {
            let (e, c) = connect(id, &opts).await?;
            (Some(e), c)
        }
    };
    let finish_sent = commit_requested;
    *finish_sent = false;
    let run = session::run(&conn, &opts, open, source, progress, snap.app_consistent, finish_sent);
    // A group's cancel is the session's to act on: it tells the target
    // and waits for the release, as for its own failure.
    let result = run.await;
    let result = match (result, conn.close_reason()) {
        // The commit may have landed with only its acknowledgement lost.
        (Err(e), _) if *finish_sent && e.code == ErrorCode::Connection => Err(Error::new(
            ErrorCode::Connection,
            format!(
                "the connection to {} was lost after the commit was requested, so the target may hold the new generation ({})",
                opts.peer, e.message
            ),
        )
        .hint("push again: if the commit landed, the rerun says the target already holds this data; if not, it resumes")),
        // With TLS 1.3 the target judges our certificate after we think the
        // handshake is done: a refusal then shows as a lost stream.
        (Err(e), Some(reason)) if e.code == ErrorCode::Connection => Err(connection_error(reason, true, opts.peer, id)),
        (r, _) => r,
    };
    let stats = conn.stats();
    if let Some(endpoint) = endpoint {
        conn.close(0u32.into(), b"done");
        // Long enough for the close to leave; the draining period that follows
        // only matters to a peer still sending, and the session is over.
        let _ = tokio::time::timeout(Duration::from_millis(5), endpoint.wait_idle()).await;
    }
    if let (Ok(r), Some(root), true) = (&result, opts.state_root.as_deref(), opts.changes == Changes::ExtentMap) {
        // The next push compares its clone with this one. Not keeping it
        // costs that push a full read, not correctness.
        if let Err(e) = snap.keep_for(&opts.source, root, r.committed.generation) {
            tracing::warn!("the snapshot was not kept for the next push: {}", e.message);
        }
    }
    snap.finish();
    drop(reader);
    if let Some(pass) = pass.0.take() {
        // The pending bitmap becomes the new generation's; on a failure it
        // stays in the chain the next push reads. Not renamed, the next
        // push reads in full: never a missed write.
        let generation = result.as_ref().ok().map(|r| r.committed.generation);
        let done = tokio::task::spawn_blocking(move || match generation {
            Some(g) => pass.commit(g),
            None => {
                pass.abandon();
                Ok(())
            }
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the dirty bitmap was not handed on to the next push: {}", e.message),
            Err(e) => tracing::warn!("bitmap task: {e}"),
        }
    }
    let mut report = result?;
    if report.changes.source == ChangeSource::FullScan && report.changes.note.is_none() {
        report.changes.note = unoffered;
    }
    report.snapshot = snap.kind;
    report.read_through = read_through;
    report.wire_bytes = stats.udp_tx.bytes + stats.udp_rx.bytes;
    report.path_mtu = stats.path.current_mtu;
    tracing::debug!(
        tx_datagrams = stats.udp_tx.datagrams,
        tx_ios = stats.udp_tx.ios,
        rx_datagrams = stats.udp_rx.datagrams,
        rx_ios = stats.udp_rx.ios,
        acks_received = stats.frame_rx.acks,
        lost_packets = stats.path.lost_packets,
        congestion_events = stats.path.congestion_events,
        "connection statistics"
    );
    Ok(report)
}

/// Connects to `opts.peer`, checking its certificate against the
/// fingerprint (and it ours).
pub async fn connect(id: &Identity, opts: &PushOptions) -> Result<(quinn::Endpoint, quinn::Connection), Error> {
    connect_peer(id, opts.peer, &opts.peer_fingerprint, opts.max_mtu, opts.idle_timeout).await
}

/// An authenticated connection to the agent at `peer` whose certificate
/// has `fingerprint` (a push's, or a bench session's).
pub async fn connect_peer(
    id: &Identity,
    peer: SocketAddr,
    fingerprint: &str,
    max_mtu: Option<u16>,
    idle_timeout: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), Error> {
    let endpoint =
        transport::client_endpoint(&peer).ctx(Place::Source, "opening a UDP socket for", Path::new("push"))?;
    let tls = trust::client_config(id, fingerprint)
        .map_err(|e| Error::new(ErrorCode::Identity, format!("TLS setup: {e}")))?;
    let qc = transport::client_config(tls, &peer, max_mtu, idle_timeout)
        .map_err(|e| Error::new(ErrorCode::Internal, format!("QUIC setup: {e}")))?;
    let connecting = endpoint
        .connect_with(qc, peer, "diskferry")
        .map_err(|e| Error::new(ErrorCode::Connection, format!("cannot connect to {peer}: {e}")))?;
    tracing::debug!("connecting");
    let conn = connecting.await.map_err(|e| connection_error(e, false, peer, id))?;
    tracing::debug!("connected");
    Ok((endpoint, conn))
}

/// A bitmap pass that a push leaving early (an error, a cancel) abandons
/// on a blocking thread: its QMP steps, and the stop of diskferry's own
/// storage daemon, block.
struct PassGuard(Option<crate::nbd::bitmap::BitmapPass>);

impl Drop for PassGuard {
    fn drop(&mut self) {
        if let Some(pass) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                // A runtime waits for its blocking tasks as it shuts down.
                Ok(rt) => drop(rt.spawn_blocking(move || pass.abandon())),
                Err(_) => pass.abandon(),
            }
        }
    }
}

/// For a running VM: what the guest wrote since this pass began (its
/// pending bitmap), asked when the spot check finds a clean block changed.
fn live_writes(
    reader: &crate::nbd::Source,
    pending: &Option<String>,
) -> Option<diskferry_sync_engine::changes::LiveWrites> {
    let (export, pending) = (reader.export.as_ref()?, pending.clone()?);
    let (node, socket) = (export.node().clone(), export.socket());
    Some(diskferry_sync_engine::changes::LiveWrites(Arc::new(move || {
        crate::nbd::running::written_ranges(&node, &socket, &pending).map_err(|e| std::io::Error::other(e.message))
    })))
}

/// Starts a `--changes dirty-bitmap` pass: over QMP when a VM runs at
/// `--qmp`, else on the qcow2 image at rest (served by diskferry's own
/// storage daemon, over QMP too); picks the bitmap to read for
/// the generation the disk's history last recorded.
fn begin_bitmaps(opts: &PushOptions) -> Result<(crate::nbd::bitmap::BitmapPass, crate::nbd::running::Node), Error> {
    if opts.format != crate::nbd::Format::Qcow2 {
        return Err(Error::new(
            ErrorCode::Usage,
            "--changes dirty-bitmap reads the persistent dirty bitmaps of a qcow2 image: use it with --format qcow2",
        ));
    }
    let last = match opts.state_root.as_deref() {
        Some(root) => History::load(&RealFs, root, &opts.source)?.and_then(|h| h.last()),
        None => None,
    };
    let node = match &opts.qmp {
        Some((socket, name)) => match crate::nbd::qmp::Qmp::connect(socket)? {
            Some(q) => {
                let node = crate::nbd::running::Node::open(q, socket, name)?;
                // A killed agent's export keeps its bitmaps busy.
                node.clear_leftovers()?;
                Some(node)
            }
            None => {
                tracing::info!("no QEMU listens at {}: {} is read at rest", socket.display(), opts.source.display());
                None
            }
        },
        None => None,
    };
    // At rest: diskferry's own storage daemon serves the image, through the same QMP steps.
    let node = match node {
        Some(n) => n,
        None => crate::nbd::storage_daemon::serve(&opts.source)?,
    };
    Ok((crate::nbd::bitmap::BitmapPass::begin(Box::new(node.clone()), last)?, node))
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

pub(crate) fn connection_error(e: quinn::ConnectionError, established: bool, peer: SocketAddr, id: &Identity) -> Error {
    use quinn::ConnectionError as C;
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match &e {
        C::TransportError(t) if crypto(u64::from(t.code)) => Error::new(
            ErrorCode::PeerFingerprint,
            format!("the agent at {} is not the one expected: its certificate does not match --peer-fingerprint", peer),
        )
        .hint("check the fingerprint with `diskferry id` on the target host"),
        C::ConnectionClosed(c) if crypto(u64::from(c.error_code)) => {
            Error::new(ErrorCode::UnknownPeer, format!("the agent at {} refused this agent's certificate", peer)).hint(
                format!("add this agent as a [[peer]] in the target's config: fingerprint = \"{}\"", id.fingerprint()),
            )
        }
        C::TimedOut if !established => Error::new(ErrorCode::Connection, format!("no answer from {}", peer))
            .hint("check the address, that `diskferry serve` runs there, and the firewall (UDP)"),
        C::TimedOut => Error::new(ErrorCode::Connection, format!("the target at {} stopped answering", peer))
            .hint("push again: it resumes where it stopped"),
        _ => Error::new(ErrorCode::Connection, format!("connection to {} lost: {e}", peer))
            .hint("push again: it resumes where it stopped"),
    }
}
