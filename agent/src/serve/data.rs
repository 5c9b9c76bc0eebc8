//! A session's data streams on the target: each reserves a frame's memory,
//! reads the frame, verifies it and hands it to the writer (a full copy)
//! or the apply worker (a delta).

use std::sync::Arc;

use diskferry_protocol::message::{BlockFrame, Message};
use diskferry_protocol::{DecodeError, ErrorCode, Geometry};
use diskferry_sync_engine::apply::{DirectSink, OldContent};
use diskferry_sync_engine::remote::{verify_frame, FrameRejection};
use diskferry_sync_engine::Error;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::budget::{frame_bytes, StreamFrames, BLOCK_HEAD};
use super::claims::Claims;
use super::worker::{Cmd, Reply};
use super::writer::Queued;
use super::ServerCtx;
use crate::transport::{FrameReader, ReadError};

/// What the data streams need once the session is open.
#[derive(Clone)]
pub(super) struct Staging {
    pub geometry: Geometry,
    pub old: OldContent,
    /// A full copy's sink, and the queue of its writer thread.
    pub sink: Option<(DirectSink, crossbeam_channel::Sender<Queued>)>,
    pub cmds: crossbeam_channel::Sender<Cmd>,
    /// The session's job: block payload is counted into it.
    pub job: Option<Arc<crate::jobs::Running>>,
    /// Data streams the session's admission holds frame memory for, and
    /// the units each owns ([`super::budget::SessionCost`]).
    pub data_streams: u32,
    pub stream_units: u32,
    /// A full copy's blocks written so far (`None` for a delta).
    pub claims: Option<Arc<Claims>>,
}

/// Messages to the session loop from its helpers.
pub(super) enum Note {
    Reply(Reply),
    VerifyFailed(u64),
    Fail(ErrorCode, String),
}

impl From<Error> for Note {
    fn from(e: Error) -> Self {
        Note::Reply(Reply::Failed(e))
    }
}

/// Runs each data stream of the session as it comes, once the session is
/// open, until `stop`; then stops them all and waits for them: their tasks
/// hold the session's sink (an exclusive descriptor of a block device),
/// which must be gone before the session releases its target.
pub(super) async fn accept_data_streams(
    data: mpsc::UnboundedReceiver<super::connection::DataStream>,
    staging: watch::Receiver<Option<Staging>>,
    notes: mpsc::UnboundedSender<Note>,
    ctx: Arc<ServerCtx>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut streams = tokio::task::JoinSet::new();
    let ended_first = tokio::select! {
        _ = accept(&mut streams, data, staging, notes, ctx) => true,
        _ = &mut stop => false,
    };
    if ended_first {
        // The streams already running go on until the session stops.
        let _ = stop.await;
    }
    streams.shutdown().await;
}

async fn accept(
    streams: &mut tokio::task::JoinSet<()>,
    mut data: mpsc::UnboundedReceiver<super::connection::DataStream>,
    mut staging: watch::Receiver<Option<Staging>>,
    notes: mpsc::UnboundedSender<Note>,
    ctx: Arc<ServerCtx>,
) {
    let mut opened = 0u32;
    while let Some(stream) = data.recv().await {
        let st = loop {
            if let Some(st) = staging.borrow().clone() {
                break Some(st);
            }
            if staging.changed().await.is_err() {
                break None;
            }
        };
        let Some(st) = st else { return };
        opened += 1;
        if opened > st.data_streams {
            // Its frames would have no memory of their own to wait for.
            let _ = notes.send(Note::Fail(
                ErrorCode::Protocol,
                format!("more than {} data streams in one session", st.data_streams),
            ));
            return;
        }
        let frames = StreamFrames::new(st.stream_units);
        streams.spawn(data_stream(stream, st, frames, notes.clone(), ctx.clone()));
    }
}

async fn data_stream(
    (stream, read): super::connection::DataStream,
    st: Staging,
    frames: StreamFrames,
    notes: mpsc::UnboundedSender<Note>,
    ctx: Arc<ServerCtx>,
) {
    let mut reader = FrameReader::with_prefix(stream, read);
    let fail = |e: DecodeError| {
        let code = if matches!(e, DecodeError::TooLarge(_)) { ErrorCode::FrameTooLarge } else { ErrorCode::Protocol };
        let _ = notes.send(Note::Fail(code, format!("bad data frame: {e}")));
    };
    loop {
        // The frame's memory is reserved before its body is read: the one
        // agent-wide budget bounds the blocks between network and disk,
        // however many sessions run; unread bytes wait in QUIC's window.
        let permit = match reader.peek(BLOCK_HEAD).await {
            Ok(Some((len, head))) => match frames.frame(&ctx.budget, frame_bytes(len, &head)).await {
                Some(p) => p,
                None => {
                    let _ = notes.send(Note::Fail(
                        ErrorCode::FrameTooLarge,
                        format!("a {len}-byte frame for blocks of {} bytes", st.geometry.block_size.get()),
                    ));
                    return;
                }
            },
            Ok(None) => return,
            Err(ReadError::Decode(e)) => return fail(e),
            Err(ReadError::Stream(_)) => return,
        };
        let m = match reader.next().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(ReadError::Decode(e)) => return fail(e),
            Err(ReadError::Stream(_)) => return,
        };
        if let (Message::Block(frame), Some(j)) = (&m, &st.job) {
            diskferry_sync_engine::Progress::advance(j.as_ref(), frame.payload.len() as u64);
        }
        match m {
            // A full copy's whole block needs no disk read to verify: done
            // here (tens of microseconds), sparing a thread hop per block.
            Message::Block(frame) if st.sink.is_some() && frame.patches == [(0, frame.block_len)] => {
                verify_and_stage(frame, st.clone(), notes.clone(), permit)
            }
            Message::Block(frame) => {
                let (st, notes) = (st.clone(), notes.clone());
                rayon::spawn(move || verify_and_stage(frame, st, notes, permit));
            }
            Message::Zero { first, count } => {
                // Checked before anything is zeroed: a range out of the
                // disk, across regions, over written blocks or in a delta.
                let claimed = match &st.claims {
                    Some(c) => c.claim(first, count),
                    None => Err("a zero range outside a full copy".into()),
                };
                if let Err(why) = claimed {
                    let _ = notes.send(Note::Fail(ErrorCode::Protocol, why));
                    return;
                }
                if st.cmds.send(Cmd::Zero { first, count }).is_err() {
                    return;
                }
            }
            other => {
                let _ = notes.send(Note::Fail(
                    ErrorCode::Protocol,
                    format!("message type {:#04x} on a data stream", other.type_byte()),
                ));
                return;
            }
        }
    }
}

fn verify_and_stage(frame: BlockFrame, st: Staging, notes: mpsc::UnboundedSender<Note>, permit: OwnedSemaphorePermit) {
    let index = frame.index;
    match verify_frame(&frame, &st.old, &st.geometry, st.sink.as_ref().map(|(s, _)| s.buffers())) {
        // Claimed once verified (a block that failed verification is sent
        // again), before anything is written.
        Ok(_) if st.claims.as_ref().is_some_and(|c| c.claim(index, 1).is_err()) => {
            let _ = notes.send(Note::Fail(ErrorCode::Protocol, format!("block {index} was sent twice")));
        }
        Ok(vb) => match &st.sink {
            // Gathered into an aligned buffer by the verification above, on
            // the thread that just read the bytes; the writer merges it with
            // its neighbours.
            Some((_, writer)) => {
                if writer.send((vb, permit)).is_err() {
                    let _ = notes.send(Note::Fail(ErrorCode::Internal, "the writer stopped".into()));
                }
            }
            None => {
                let _ = st.cmds.send(Cmd::Stage(vb, Some(permit)));
            }
        },
        Err(FrameRejection::Mismatch) => {
            let _ = notes.send(Note::VerifyFailed(index));
        }
        Err(FrameRejection::Invalid(msg)) => {
            let _ = notes.send(Note::Fail(ErrorCode::Protocol, msg));
        }
        Err(FrameRejection::Storage(e)) => {
            let _ = notes.send(Note::Reply(Reply::Failed(e)));
        }
    }
}
