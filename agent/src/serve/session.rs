//! One session on the target: moves frames between the QUIC streams, the
//! [`ReceiverSession`] state machine and the apply worker.

use std::sync::Arc;

use diskferry_protocol::message::{Message, Open, Plan};
use diskferry_protocol::session::{ReceiverEvent, ReceiverSession};
use diskferry_protocol::{DecodeError, ErrorCode, Geometry};
use diskferry_sync_engine::Error;
use tokio::sync::{mpsc, watch};

use super::budget::{Admission, MAX_CONTROL_FRAME};
use super::claims::Claims;
use super::data::{accept_data_streams, Note, Staging};
use super::worker::{self, Cmd, CompletedRegion, OpenRequest, Reply};
use super::writer::Writer;
use super::{Registration, ServerCtx};
use crate::transport::{write_frames, FrameReader, ReadError};

/// Runs one session of `conn` from `peer`, on its control stream `ctl`;
/// its data streams come through `data` (`connection.rs` routes them).
pub async fn run(
    conn: quinn::Connection,
    peer: String,
    ctx: Arc<ServerCtx>,
    ctl: (quinn::SendStream, quinn::RecvStream),
    data: mpsc::UnboundedReceiver<super::connection::DataStream>,
) {
    let remote = conn.remote_address();
    let mut shutdown = ctx.shutdown.clone();
    let (ctl_tx, ctl_rx) = ctl;
    let mut s = Session {
        ctx: ctx.clone(),
        peer,
        conn: conn.clone(),
        ctl_tx,
        rs: ReceiverSession::new(),
        notes_tx: None,
        staging_tx: watch::channel(None).0,
        worker: None,
        writer: None,
        registration: None,
        target: String::new(),
        admission: None,
        stream_frames: (0, 0),
        group: None,
        job: None,
    };
    let (notes_tx, mut notes_rx) = mpsc::unbounded_channel::<Note>();
    s.notes_tx = Some(notes_tx.clone());
    let (view_tx, mut view_rx) = mpsc::channel::<super::view::ViewBatch>(super::budget::VIEWS_QUEUED);
    let mut view_tx = Some(view_tx);
    let mut next_view = 0u64;
    let (stop_data, data_stopped) = tokio::sync::oneshot::channel();
    let data =
        tokio::spawn(accept_data_streams(data, s.staging_tx.subscribe(), notes_tx.clone(), ctx.clone(), data_stopped));
    // Control frames are small; a larger one is refused before it is buffered.
    let mut reader = FrameReader::control(ctl_rx, MAX_CONTROL_FRAME);
    let mut cancel: Option<watch::Receiver<Option<String>>> = None;
    // A cancel stays set: once handled it is not polled again (a session
    // in its commit would otherwise spin on it).
    let mut cancel_handled = false;
    loop {
        let mut cancel_rx = cancel.clone();
        tokio::select! {
            frame = reader.next() => match frame {
                Ok(Some(m)) => {
                    s.rs.handle_message(m);
                    // The frames that came with it too: their answers then
                    // leave in one write.
                    let more = reader.take_buffered(|m| {
                        s.rs.handle_message(m);
                        !s.rs.is_finished()
                    });
                    match more {
                        Err(e @ DecodeError::TooLarge(_)) => s.rs.abort(ErrorCode::FrameTooLarge, format!("control frame refused: {e}")),
                        Err(e) => s.rs.abort(ErrorCode::Protocol, format!("bad control frame: {e}")),
                        Ok(()) => {}
                    }
                }
                Ok(None) => s.rs.abort(ErrorCode::Connection, "the source closed the session"),
                Err(ReadError::Decode(e @ DecodeError::TooLarge(_))) => s.rs.abort(ErrorCode::FrameTooLarge, format!("control frame refused: {e}")),
                Err(ReadError::Decode(e)) => s.rs.abort(ErrorCode::Protocol, format!("bad control frame: {e}")),
                Err(ReadError::Stream(e)) => s.rs.abort(ErrorCode::Connection, format!("connection lost: {e}")),
            },
            Some(note) = notes_rx.recv() => s.handle_note(note),
            Some(batch) = view_rx.recv(), if s.rs.wants_view(next_view) => {
                super::view::hand_over(batch, &mut view_rx, &mut s.rs, &mut next_view)
            }
            _ = shutdown.changed() => {
                if !s.rs.is_committing() {
                    s.rs.abort(ErrorCode::Cancelled, "the target agent is shutting down; push again to resume");
                }
                s.fail_group("the target agent is shutting down");
            }
            why = super::registry::wait_cancel(&mut cancel_rx), if !cancel_handled => {
                cancel_handled = true;
                if !s.rs.is_committing() {
                    s.rs.abort(ErrorCode::Cancelled, why.clone());
                }
                // A group member waiting for the others in its commit: the
                // push it belongs to is over (after the group record, this
                // changes nothing).
                s.fail_group(&format!("a member's session was cancelled: {why}"));
            }
        }
        if let Err(e) = s.pump(&mut view_tx).await {
            tracing::debug!(%remote, "control stream: {e}");
            s.rs.abort(ErrorCode::Connection, format!("connection lost: {e}"));
        }
        if cancel.is_none() {
            cancel = s.registration.as_ref().map(|r| r.cancel.clone());
        }
        if s.rs.is_finished() {
            let _ = s.flush().await;
            break;
        }
    }
    // The data streams' tasks hold the session's sink: gone before the
    // target is released.
    let _ = stop_data.send(());
    let _ = data.await;
    s.finish().await;
    // Only now: the source waits for this end of stream before it exits,
    // so the command an operator runs next finds the target free.
    let _ = s.ctl_tx.finish();
}

struct Session {
    ctx: Arc<ServerCtx>,
    peer: String,
    conn: quinn::Connection,
    ctl_tx: quinn::SendStream,
    rs: ReceiverSession,
    notes_tx: Option<mpsc::UnboundedSender<Note>>,
    staging_tx: watch::Sender<Option<Staging>>,
    worker: Option<(crossbeam_channel::Sender<Cmd>, std::thread::JoinHandle<()>)>,
    /// A full copy's writer thread.
    writer: Option<Writer>,
    registration: Option<Registration>,
    target: String,
    /// The session's share of the memory budget, held until it ends.
    /// Its share of the memory budget (a group push's members share one).
    admission: Option<Arc<Admission>>,
    /// Data streams the admission holds frame memory for, and the units each owns.
    stream_frames: (u32, u32),
    /// The group push this session is a member of.
    group: Option<(Arc<super::group::Run>, Arc<super::group::Groups>)>,
    /// This session as one of the agent's jobs, once its target is granted.
    job: Option<super::job::ReceiveJob>,
}

impl Session {
    fn handle_note(&mut self, note: Note) {
        match note {
            Note::Reply(Reply::Staged(blocks)) => {
                for (index, hash, bytes) in blocks {
                    self.rs.handle_staged(index, hash, bytes);
                }
            }
            Note::Reply(Reply::Zeroed { first, count }) => self.rs.handle_zeroed(first, count),
            Note::Reply(Reply::Resolved { region, wants }) => self.rs.handle_resolved(region, wants),
            Note::Reply(Reply::Committed(c)) => {
                tracing::info!(target = %self.target, peer = %self.peer, generation = %c.generation, "committed");
                if let Some(j) = &mut self.job {
                    j.committed(&c);
                }
                self.rs.handle_committed(c);
            }
            Note::Reply(Reply::Failed(e)) => self.rs.abort(e.code, with_hint(&e)),
            Note::VerifyFailed(index) => self.rs.handle_verify_failed(index),
            Note::Fail(code, message) => self.rs.abort(code, message),
        }
    }

    async fn flush(&mut self) -> Result<(), quinn::WriteError> {
        let frames: Vec<Message> = std::iter::from_fn(|| self.rs.poll_transmit()).collect();
        write_frames(&mut self.ctl_tx, &frames).await.map(|_| ())
    }

    async fn pump(
        &mut self,
        view_tx: &mut Option<mpsc::Sender<super::view::ViewBatch>>,
    ) -> Result<(), quinn::WriteError> {
        // Regions completed in a row go to the worker as one command: one
        // wake-up of its thread, not one per region of a sparse disk.
        let mut completed = Vec::new();
        loop {
            if let Err(e) = self.flush().await {
                self.send_completed(&mut completed);
                return Err(e);
            }
            let Some(ev) = self.rs.poll_event() else {
                self.send_completed(&mut completed);
                return Ok(());
            };
            if let ReceiverEvent::RegionComplete { region, hashes, expected } = ev {
                tracing::trace!(region, "region complete");
                completed.push(CompletedRegion { region, hashes, expected });
                continue;
            }
            self.send_completed(&mut completed);
            match ev {
                ReceiverEvent::Open(o) => self.open(o, view_tx).await,
                ReceiverEvent::Resolve { region, blocks } => self.cmd(Cmd::Resolve { region, blocks }),
                ReceiverEvent::RegionComplete { .. } => {} // batched above
                ReceiverEvent::Commit { consistency } => {
                    tracing::debug!("commit starts");
                    if let Some(j) = &mut self.job {
                        j.committing(consistency);
                    }
                    self.cmd(Cmd::Commit { consistency })
                }
                ReceiverEvent::Failed { code, message } => {
                    tracing::warn!(peer = %self.peer, target = %self.target, "session failed: error[{code}]: {message}");
                    if let Some(j) = &mut self.job {
                        j.failed(code, &message);
                    }
                }
            }
        }
    }

    /// Fails the group push this session is a member of, if any.
    fn fail_group(&self, why: &str) {
        if let Some((run, groups)) = &self.group {
            run.fail(groups, why);
        }
    }

    fn send_completed(&mut self, completed: &mut Vec<CompletedRegion>) {
        if !completed.is_empty() {
            self.cmd(Cmd::Regions(std::mem::take(completed)));
        }
    }

    fn cmd(&mut self, c: Cmd) {
        match &self.worker {
            Some((tx, _)) => {
                if tx.send(c).is_err() {
                    self.rs.abort(ErrorCode::Internal, "the apply worker stopped");
                }
            }
            None => self.rs.abort(ErrorCode::Internal, "no apply worker"),
        }
    }

    async fn open(&mut self, o: Open, view_tx: &mut Option<mpsc::Sender<super::view::ViewBatch>>) {
        let name = o.target.as_str().to_string();
        self.target = name.clone();
        let Some(tc) = self.ctx.config().targets.get(&name).cloned() else {
            tracing::warn!(peer = %self.peer, target = %name, "refused: unknown target");
            return self.rs.reject(
                ErrorCode::UnknownTarget,
                format!("this agent has no target named {name:?} — check --target against the target agent's config"),
            );
        };
        if !tc.allowed_peers.contains(&self.peer) {
            tracing::warn!(peer = %self.peer, target = %name, "refused: peer not allowed to write this target");
            return self.rs.reject(
                ErrorCode::NotAuthorized,
                format!(
                    "peer {:?} may not write target {name:?} — add it to the target's allowed_peers in the config",
                    self.peer
                ),
            );
        }
        // Refused before the target is registered: a refusal must not take
        // the target from a push that runs.
        let g = Geometry::new(o.disk_bytes, o.block_size);
        let cost = match &o.group {
            Some(tag) => self.ctx.budget.group_cost(&g, tag.members),
            None => self.ctx.budget.session_cost(&g),
        };
        if !self.ctx.budget.can_hold(&cost) {
            let who = if o.group.is_some() { "this group's members" } else { "a session" };
            return self.rs.reject(
                ErrorCode::MemoryBudget,
                format!(
                    "{} KiB blocks need more frame memory for {who} than this agent's budget holds — set \
                     memory_budget_mib = {} (or more) in the target agent's config, or push with smaller blocks",
                    o.block_size.get() >> 10,
                    cost.budget_needed_mib()
                ),
            );
        }
        let ticket = self.ctx.registry.ticket();
        let registration = match self.ctx.registry.register(&name, &self.peer, ticket).await {
            Ok(r) => r,
            Err(e) if e.code == ErrorCode::PeerBusy => {
                let idle = self.ctx.config().idle_timeout.as_secs();
                return self.rs.reject(
                    e.code,
                    format!(
                        "{} — retry when it is done; if that peer's push died, this agent notices it after its idle \
                         timeout ({idle} s) and releases the target then",
                        e.message
                    ),
                );
            }
            Err(e) => return self.rs.reject(e.code, with_hint(&e)),
        };
        self.registration = Some(registration);
        self.job = Some(super::job::ReceiveJob::start(&self.ctx.jobs, &tc.path, &self.peer, &name, o.disk_bytes));
        let group = match &o.group {
            Some(tag) => match self.ctx.groups.join(&self.ctx.state_root, &self.peer, tag, &name, &tc.path) {
                Ok(run) => {
                    self.group = Some((run.clone(), self.ctx.groups.clone()));
                    Some((run, self.ctx.groups.clone()))
                }
                Err(e) => return self.rs.reject(e.code, with_hint(&e)),
            },
            None => None,
        };
        let Ok(permit) = self.ctx.sessions.clone().try_acquire_owned() else {
            if let Some((run, groups)) = &group {
                run.fail(groups, "the target agent is at its session limit");
            }
            return self.rs.reject(ErrorCode::PeerBusy, "the target agent is at its session limit — retry later");
        };
        // Wait (never fail) for the session's share of the memory budget.
        // A group push's members share one session's share (the first
        // member waits for it), each with a slice of its window: members
        // waiting for each other in their commits never starve one still
        // waiting for memory.
        self.stream_frames = (cost.data_streams, cost.stream_units);
        let shared = group.as_ref().map(|(run, _)| run.admission.clone());
        let mut slot = match &shared {
            Some(m) => Some(m.lock().await),
            None => None,
        };
        let admission = match slot.as_deref() {
            // The group's share holds frames for its first member's blocks.
            Some(Some(permit)) if permit.stream_units < cost.stream_units => {
                drop(slot);
                if let Some((run, groups)) = &group {
                    run.fail(groups, "the members' block sizes differ");
                }
                return self.rs.reject(
                    ErrorCode::GroupMembers,
                    "the members of a group push differ in block size — push them with one --block-size",
                );
            }
            Some(Some(permit)) => Some(permit.clone()),
            _ => {
                if !self.ctx.budget.fits_now(&cost) {
                    tracing::info!(peer = %self.peer, target = %name, "waiting for the memory budget");
                }
                let mut shutdown = self.ctx.shutdown.clone();
                let permit = tokio::select! {
                    a = self.ctx.budget.admit(&cost) => a.map(Arc::new),
                    _ = self.conn.closed() => None,
                    _ = shutdown.changed() => None,
                };
                if let (Some(slot), Some(p)) = (slot.as_deref_mut(), &permit) {
                    *slot = Some(p.clone());
                }
                permit
            }
        };
        drop(slot);
        let Some(admission) = admission else {
            return self.rs.reject(ErrorCode::Cancelled, "the session ended while it waited for memory");
        };
        self.admission = Some(admission);
        // A group's members share their connection. Its window is a quarter
        // of theirs together: interleaved in its datagrams, unread bytes hold
        // whole datagram buffers (eight 512 MiB members peaked at 138-178 MiB
        // RssAnon with all of it, 100 MiB with a quarter, still within the
        // speed goal: benches/group.sh).
        let members = o.group.as_ref().map_or(1, |t| u64::from(t.members.max(1)));
        let window = cost.receive_window * members.div_ceil(4);
        if let Ok(w) = quinn::VarInt::from_u64(window) {
            self.conn.set_receive_window(w);
        }
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
        let Some(notes) = self.notes_tx.clone() else { return };
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<Reply>();
        tokio::spawn(async move {
            let _permit = permit;
            while let Some(r) = reply_rx.recv().await {
                if notes.send(Note::Reply(r)).is_err() {
                    break;
                }
            }
        });
        // A group member keeps the group's points whole, pushed alone too.
        let in_group = o.group.is_some();
        let config = self.ctx.config();
        let (retention, mut keep_points) =
            crate::groups::retention(&self.ctx.state_root, &name, tc.retention, in_group, |n| {
                config.targets.get(n).map(|t| t.retention)
            });
        keep_points.extend(super::targets::young_points(&self.ctx.state_root, &tc.path, tc.max_age));
        let req = OpenRequest {
            vfs: self.ctx.vfs.clone(),
            state_root: self.ctx.state_root.clone(),
            path: tc.path.clone(),
            name: name.clone(),
            retention,
            keep_points,
            open: o.clone(),
            pins: self.ctx.pins.clone(),
            regions_in_flight: cost.regions_in_flight,
            index_entries: cost.index_entries,
            kept_bytes: cost.kept_bytes,
            group,
        };
        let handle = match worker::spawn(req, cmd_rx, reply_tx, opened_tx) {
            Ok(h) => h,
            Err(e) => return self.rs.reject(ErrorCode::Internal, format!("starting the apply worker: {e}")),
        };
        self.worker = Some((cmd_tx.clone(), handle));
        let opened = match opened_rx.await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.peer, target = %name, "refused: error[{}]: {}", e.code, e.message);
                return self.rs.reject(e.code, with_hint(&e));
            }
            Err(_) => return self.rs.reject(ErrorCode::Internal, "the apply worker stopped while opening"),
        };
        tracing::info!(
            peer = %self.peer,
            target = %name,
            plan = ?opened.accept.plan,
            disk_bytes = o.disk_bytes,
            lineage = o.lineage.len(),
            discard_target_changes = o.discard_target_changes,
            target_generation = ?opened.accept.target_generation,
            "session accepted"
        );
        if let (Some(view), Some(tx)) = (opened.view, view_tx.take()) {
            let notes = self.notes_tx.clone();
            super::view::spawn(view, opened.geometry, tx, move |e| {
                if let Some(n) = notes {
                    let _ = n.send(Note::Reply(Reply::Failed(e)));
                }
            });
        }
        let sink = match opened.sink {
            Some(sink) => {
                let Some(notes) = self.notes_tx.clone() else { return };
                let report = move |r: Reply| {
                    let _ = notes.send(Note::Reply(r));
                };
                match Writer::spawn(&name, sink.clone(), opened.geometry, cmd_tx.clone(), report) {
                    Ok(w) => {
                        let queue = w.queue();
                        self.writer = Some(w);
                        Some((sink, queue))
                    }
                    Err(e) => return self.rs.reject(ErrorCode::Internal, format!("starting the writer: {e}")),
                }
            }
            None => None,
        };
        let _ = self.staging_tx.send(Some(Staging {
            geometry: opened.geometry,
            old: opened.old,
            sink,
            cmds: cmd_tx,
            job: self.job.as_ref().map(|j| j.progress()),
            data_streams: self.stream_frames.0,
            stream_units: self.stream_frames.1,
            claims: (opened.accept.plan == Plan::Full).then(|| Arc::new(Claims::new(opened.geometry))),
        }));
        self.rs.accept(opened.accept, opened.geometry);
    }

    /// Stops the worker (dropping its channel keeps staged blocks for
    /// resume) and releases the target for the next session.
    async fn finish(&mut self) {
        self.staging_tx.send_replace(None);
        // Nothing of this session may be written once the target is released.
        if let Some(mut w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.stop()).await;
        }
        if let Some((run, groups)) = self.group.take() {
            // Its worker may wait for the other members: a session that
            // ends first fails the group push (after the group record, this
            // changes nothing).
            run.fail(&groups, &format!("the session of member {} ended", self.target));
        }
        if let Some((tx, handle)) = self.worker.take() {
            let _ = tx.send(Cmd::Stop);
            drop(tx);
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        if let Some(r) = self.registration.take() {
            self.ctx.registry.release(&self.target, r).await;
        }
        self.admission = None;
        if let Some(j) = self.job.take() {
            j.end();
        }
    }
}

/// The message a source prints: what happened — what to do.
fn with_hint(e: &Error) -> String {
    match &e.hint {
        Some(h) => format!("{} — {h}", e.message),
        None => e.message.clone(),
    }
}
