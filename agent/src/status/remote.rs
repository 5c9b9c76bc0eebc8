//! What local commands tell the agent over its unix socket (never over
//! TCP): the jobs of commands run beside it (`push`, `failover-sync`,
//! `failover`, `plan run` …), so its jobs page shows every move on the
//! host, and requests to release a target (`failover`, `commit`, `abort`).
//!
//! A command's job ends when the command says so; one whose process is
//! gone, or that has not reported for [`SILENT`], is ended as failed
//! (`E_CANCELLED`): a `kill -9` leaves no job running forever.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use diskferry_sync_engine::Error;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::jobs::{JobResult, Jobs, Running};

/// A command that reported nothing for this long is taken for dead.
pub const SILENT: Duration = Duration::from_secs(30);

/// What the routes act on: the agent's jobs, the running jobs of local
/// commands by id, and the server loop (for releases).
pub struct Remote {
    jobs: Arc<Jobs>,
    running: Mutex<HashMap<u64, CommandJob>>,
    control: Option<mpsc::Sender<Control>>,
}

impl Remote {
    pub fn new(jobs: Arc<Jobs>, control: Option<mpsc::Sender<Control>>) -> Arc<Remote> {
        Arc::new(Remote { jobs, running: Mutex::default(), control })
    }
}

/// A command's running job, its pid, and when it last reported.
type CommandJob = (Arc<Running>, u32, Instant);

/// A request for the agent's server loop.
pub enum Control {
    /// Release the target at `path` for the command `by`, for up to `hold`;
    /// the answer: the target's name and whether a session was cancelled
    /// (`None`: no served target has that path).
    Release { path: PathBuf, by: String, hold: Duration, reply: oneshot::Sender<Result<Option<(String, bool)>, Error>> },
    /// The command is done with the target at `path`; answered once the hold is gone.
    EndHold { path: PathBuf, reply: oneshot::Sender<()> },
}

#[derive(Deserialize)]
struct StartJob {
    kind: String,
    disk: String,
    #[serde(default)]
    peer: String,
    #[serde(default)]
    target: String,
    pid: u32,
}

#[derive(Deserialize)]
struct JobProgress {
    phase: String,
    bytes_done: u64,
    bytes_total: u64,
}

#[derive(Deserialize)]
struct ReleaseReq {
    path: PathBuf,
    by: String,
    hold_seconds: u64,
}

#[derive(Deserialize)]
struct EndHoldReq {
    path: PathBuf,
}

/// The routes only the agent's unix socket serves.
pub fn router(remote: Arc<Remote>) -> Router {
    Router::new()
        .route("/api/jobs", post(start_job))
        .route("/api/jobs/{id}/progress", post(progress))
        .route("/api/jobs/{id}/finish", post(finish))
        .route("/api/release", post(release))
        .route("/api/release/end", post(end_hold))
        .with_state(remote)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

async fn start_job(State(s): State<Arc<Remote>>, Json(j): Json<StartJob>) -> Response {
    // The job list is synced to disk: off the runtime's threads.
    let (jobs, pid) = (s.jobs.clone(), j.pid);
    let started = tokio::task::spawn_blocking(move || jobs.start(&j.kind, &j.disk, &j.peer, &j.target)).await;
    let Ok(r) = started else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "E_INTERNAL", "the job was not recorded".into());
    };
    let id = r.id();
    s.running.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (r, pid, Instant::now()));
    Json(json!({ "id": id })).into_response()
}

fn touch(s: &Remote, id: u64) -> Option<Arc<Running>> {
    let mut running = s.running.lock().unwrap_or_else(|p| p.into_inner());
    let entry = running.get_mut(&id)?;
    entry.2 = Instant::now();
    Some(entry.0.clone())
}

async fn progress(State(s): State<Arc<Remote>>, Path(id): Path<u64>, Json(p): Json<JobProgress>) -> Response {
    match touch(&s, id) {
        Some(r) => {
            r.set_progress(&p.phase, p.bytes_done, p.bytes_total);
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(StatusCode::NOT_FOUND, "E_NOT_FOUND", format!("no running job {id} of a local command")),
    }
}

async fn finish(State(s): State<Arc<Remote>>, Path(id): Path<u64>, Json(result): Json<JobResult>) -> Response {
    let taken = s.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    match taken {
        Some((r, _, _)) => {
            let jobs = s.jobs.clone();
            let _ = tokio::task::spawn_blocking(move || jobs.finish(&r, result)).await;
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(StatusCode::NOT_FOUND, "E_NOT_FOUND", format!("no running job {id} of a local command")),
    }
}

async fn release(State(s): State<Arc<Remote>>, Json(r): Json<ReleaseReq>) -> Response {
    let Some(control) = &s.control else {
        return error(StatusCode::NOT_FOUND, "E_NOT_FOUND", "this agent serves no targets".into());
    };
    let (reply, answer) = oneshot::channel();
    let hold = Duration::from_secs(r.hold_seconds);
    if control.send(Control::Release { path: r.path, by: r.by, hold, reply }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "E_CANCELLED", "the agent is shutting down".into());
    }
    match answer.await {
        Ok(Ok(Some((target, cancelled)))) => Json(json!({ "target": target, "cancelled": cancelled })).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "E_NOT_FOUND", "no served target has that path".into()),
        Ok(Err(e)) => error(StatusCode::CONFLICT, e.code.as_str(), e.message),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "E_CANCELLED", "the agent is shutting down".into()),
    }
}

async fn end_hold(State(s): State<Arc<Remote>>, Json(r): Json<EndHoldReq>) -> Response {
    if let Some(control) = &s.control {
        let (reply, done) = oneshot::channel();
        if control.send(Control::EndHold { path: r.path, reply }).await.is_ok() {
            let _ = done.await;
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Ends the jobs of commands that are gone or silent, every few seconds,
/// until `stop` turns true.
pub async fn reap(s: Arc<Remote>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let dead: Vec<(Arc<Running>, u32)> = {
            let mut running = s.running.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<u64> = running
                .iter()
                .filter(|(_, (_, pid, seen))| !alive(*pid) || seen.elapsed() > SILENT)
                .map(|(id, _)| *id)
                .collect();
            gone.iter().filter_map(|id| running.remove(id)).map(|(r, pid, _)| (r, pid)).collect()
        };
        for (r, pid) in dead {
            let e = Error::new(
                diskferry_protocol::ErrorCode::Cancelled,
                format!("the command (pid {pid}) ended or stopped reporting before it finished"),
            )
            .hint("see that command's own output; run it again to finish the move");
            let jobs = s.jobs.clone();
            let _ = tokio::task::spawn_blocking(move || jobs.finish(&r, JobResult::failed(&e))).await;
        }
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The sender side of [`Control`], for the server loop to answer.
pub fn control_channel() -> (mpsc::Sender<Control>, mpsc::Receiver<Control>) {
    mpsc::channel(16)
}
