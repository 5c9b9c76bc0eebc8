//! The source agent: `diskferry push`. The engine's [`SourceSession`]
//! hashes the source and builds the frames; this module connects, moves
//! frames between QUIC streams and the protocol's [`SenderSession`]
//! (`session.rs`), and reports.
//!
//! [`SenderSession`]: diskferry_protocol::session::SenderSession

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
use diskferry_sync_engine::store::{RealFs, Vfs};
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
    pub spot_check: SpotCheck,
    /// How long a silent target is waited for.
    pub idle_timeout: Duration,
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
    let mut snap = tokio::task::spawn_blocking(move || snapshot::take(&src, &so))
        .await
        .map_err(|e| Error::new(ErrorCode::Internal, format!("snapshot task: {e}")))??;
    // Why a requested hint could not even be offered (the report says so).
    let mut unoffered = None;
    let bitmap = match opts.changes {
        Changes::DirtyBitmap => bitmap_to_read(&opts, &mut unoffered)?,
        _ => None,
    };
    // The image's stamp before it is read: a bitmap is started after the
    // commit only if nothing wrote the image since.
    let image_before = RealFs.metadata(&opts.source).ok().flatten();
    let (read, format, b) = (snap.read_path.clone(), opts.format, bitmap.as_ref().map(|b| b.1.clone()));
    // Kept until the push ends: it may own the qemu-nbd it reads through.
    let reader = tokio::task::spawn_blocking(move || crate::nbd::open_source(&read, format, b.as_deref()))
        .await
        .map_err(|e| Error::new(ErrorCode::Internal, format!("source task: {e}")))??;
    let source = Arc::new(SourceSession::open_as(
        reader.vfs.clone(),
        &reader.read_path,
        &opts.source,
        opts.block_size,
        opts.state_root.as_deref(),
    )?);
    match &opts.changes {
        Changes::FullScan => {}
        Changes::DirtyBitmap => {
            if let Some((since, name)) = &bitmap {
                match reader.dirty_ranges(name)? {
                    Some(ranges) => source.offer_hint(
                        ChangeHint { since: *since, source: ChangeSource::DirtyBitmap, ranges },
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
                    Ok(ranges) => source
                        .offer_hint(ChangeHint { since, source: ChangeSource::ExtentMap, ranges }, opts.spot_check),
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
    let finish_sent = commit_requested;
    *finish_sent = false;
    let result = session::run(&conn, &opts, open, source, progress, snap.app_consistent, finish_sent).await;
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
        (Err(e), Some(reason)) if e.code == ErrorCode::Connection => Err(connection_error(reason, true, &opts, id)),
        (r, _) => r,
    };
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    // Long enough for the close to leave; the draining period that follows
    // only matters to a peer still sending, and the session is over.
    let _ = tokio::time::timeout(Duration::from_millis(5), endpoint.wait_idle()).await;
    if let (Ok(r), Some(root), true) = (&result, opts.state_root.as_deref(), opts.changes == Changes::ExtentMap) {
        // The next push compares its clone with this one. Not keeping it
        // costs that push a full read, not correctness.
        if let Err(e) = snap.keep_for(&opts.source, root, r.committed.generation) {
            tracing::warn!("the snapshot was not kept for the next push: {}", e.message);
        }
    }
    snap.finish();
    drop(reader);
    if let (Ok(r), Changes::DirtyBitmap) = (&result, &opts.changes) {
        // After the read, with diskferry's qemu-nbd stopped: the bitmap of
        // the new generation counts every later write. Not starting one
        // costs the next push a full read, not correctness.
        let still = RealFs.metadata(&opts.source).ok().flatten();
        let at_rest =
            matches!((&image_before, &still), (Some(a), Some(b)) if a.stamp == b.stamp && a.identity == b.identity);
        let image = opts.source.clone();
        let generation = r.committed.generation;
        let done = tokio::task::spawn_blocking(move || {
            if at_rest {
                crate::nbd::bitmap::rotate(&image, generation)
            } else {
                crate::nbd::bitmap::drop_all(&image)
            }
        })
        .await;
        match done {
            Ok(Ok(())) if at_rest => {}
            Ok(Ok(())) => tracing::warn!(
                "the image was written while it was read: no bitmap was started, the next push reads it in full"
            ),
            Ok(Err(e)) => tracing::warn!("no dirty bitmap was started for the next push: {}", e.message),
            Err(e) => tracing::warn!("bitmap task: {e}"),
        }
    }
    let mut report = result?;
    if report.changes.source == ChangeSource::FullScan && report.changes.note.is_none() {
        report.changes.note = unoffered;
    }
    report.snapshot = snap.kind;
    report.wire_bytes = stats.udp_tx.bytes + stats.udp_rx.bytes;
    report.path_mtu = stats.path.current_mtu;
    Ok(report)
}

/// The bitmap a `--changes dirty-bitmap` push reads: `diskferry-<G>` for
/// the generation G its history last recorded, if it exists and QEMU did
/// not leave it in use. Otherwise `None`, and `why` says so.
fn bitmap_to_read(
    opts: &PushOptions,
    why: &mut Option<String>,
) -> Result<Option<(diskferry_protocol::Generation, String)>, Error> {
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
    let Some(last) = last else {
        *why = Some("the image has no history yet: this push starts its dirty bitmap".into());
        return Ok(None);
    };
    let name = crate::nbd::bitmap::name_for(last);
    let found = crate::nbd::bitmap::list(&opts.source)?.into_iter().find(|b| b.name == name);
    Ok(match found {
        Some(b) if !b.inconsistent => Some((last, name)),
        Some(_) => {
            *why = Some(format!(
                "the bitmap {name} is marked in use (its writer stopped without closing the image) or is disabled: it may have missed writes"
            ));
            None
        }
        None => {
            *why = Some(format!("the image has no bitmap {name} (removed, renamed, or never started)"));
            None
        }
    })
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
