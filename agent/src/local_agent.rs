//! A command's link to the agent (`serve`) running on the same state
//! directory, over its unix socket: the command's job shows on the
//! agent's jobs page (progress about once a second, then its result), and
//! a move on a served target first has the agent release it. With no
//! agent answering, both are nothing: the command runs as it would alone.
//!
//! Reporting never slows the command down: progress is recorded in memory
//! and sent from a thread of its own; an agent that stops answering is
//! given up on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskferry_sync_engine::{Error, Progress};
use serde_json::json;

use crate::jobs::JobResult;
use crate::status::client::{request, Addr};

/// How long a command waits for the agent's answer to a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often progress (and the command's being alive) is reported.
const EVERY: Duration = Duration::from_secs(1);

/// A command's job on the local agent's page.
pub struct AgentJob {
    link: Option<Arc<Link>>,
}

struct Link {
    socket: PathBuf,
    id: u64,
    phase: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
    /// Set once the result is sent; stops the reporting thread.
    ended: AtomicBool,
}

impl Link {
    /// Whether the agent still knows the job (a slow or failed answer is
    /// not taken for "no": the next report tries again).
    fn post(&self, path: &str, body: serde_json::Value) -> bool {
        let a = request(Addr::Unix(&self.socket), "POST", path, None, Some(&body), REPORT_TIMEOUT);
        match a {
            Ok(a) => a.status != 404,
            // The agent is gone (its socket refuses): nobody to report to.
            Err(e) => e.code != diskferry_protocol::ErrorCode::NotFound,
        }
    }

    fn report_progress(&self) -> bool {
        let phase = *self.phase.lock().unwrap_or_else(|p| p.into_inner());
        self.post(
            &format!("/api/jobs/{}/progress", self.id),
            json!({
                "phase": phase,
                "bytes_done": self.done.load(Ordering::Relaxed),
                "bytes_total": self.total.load(Ordering::Relaxed),
            }),
        )
    }

    fn end(&self, result: &JobResult) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            let body = serde_json::to_value(result).unwrap_or_default();
            self.post(&format!("/api/jobs/{}/finish", self.id), body);
        }
    }
}

impl AgentJob {
    /// A job that reports nowhere.
    pub fn none() -> AgentJob {
        AgentJob { link: None }
    }

    /// Registers a job of `kind` with the agent serving `state_root`, if one answers.
    pub fn start(state_root: &Path, kind: &str, disk: &str, peer: &str, target: &str) -> AgentJob {
        let socket = crate::status::socket_path(state_root);
        if !socket.exists() {
            return AgentJob::none();
        }
        let body = json!({ "kind": kind, "disk": disk, "peer": peer, "target": target, "pid": std::process::id() });
        let answer = request(Addr::Unix(&socket), "POST", "/api/jobs", None, Some(&body), REPORT_TIMEOUT);
        let id = match answer.and_then(|a| a.json()) {
            Ok(v) => v["id"].as_u64(),
            Err(e) => {
                tracing::debug!("no agent to report the job to: {}", e.message);
                None
            }
        };
        let Some(id) = id else { return AgentJob::none() };
        let link = Arc::new(Link {
            socket,
            id,
            phase: Mutex::new("starting"),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        });
        let l = link.clone();
        let _ = std::thread::Builder::new().name("df-report".into()).spawn(move || {
            while !l.ended.load(Ordering::SeqCst) {
                std::thread::sleep(EVERY);
                // An agent that went away (or forgot the job) is not asked again.
                if !l.ended.load(Ordering::SeqCst) && !l.report_progress() {
                    break;
                }
            }
        });
        AgentJob { link: Some(link) }
    }

    /// Ends the job with `result`.
    pub fn finish(&self, result: JobResult) {
        if let Some(l) = &self.link {
            l.end(&result);
        }
    }

    /// Ends the job as the command's result says.
    pub fn finish_with<T>(&self, r: &Result<T, Error>, ok: impl FnOnce(&T) -> JobResult) {
        match r {
            Ok(v) => self.finish(ok(v)),
            Err(e) => self.finish(JobResult::failed(e)),
        }
    }

    /// Ends the job with an `anyhow` result (its diskferry error, if it has one).
    pub fn finish_anyhow<T>(&self, r: &anyhow::Result<T>, ok: impl FnOnce(&T) -> JobResult) {
        match r {
            Ok(v) => self.finish(ok(v)),
            Err(e) => {
                let err = match e.downcast_ref::<Error>() {
                    Some(d) => Error { code: d.code, message: d.message.clone(), hint: d.hint.clone(), source: None },
                    None => Error::new(diskferry_protocol::ErrorCode::Internal, format!("{e:#}")),
                };
                self.finish(JobResult::failed(&err));
            }
        }
    }

    /// Names the phase without a byte count.
    pub fn set_phase(&self, name: &'static str) {
        if let Some(l) = &self.link {
            *l.phase.lock().unwrap_or_else(|p| p.into_inner()) = name;
        }
    }
}

impl Drop for AgentJob {
    /// A command that returns without a result (a panic, an early `?`) ends its job as failed.
    fn drop(&mut self) {
        if let Some(l) = &self.link {
            let e = Error::new(diskferry_protocol::ErrorCode::Cancelled, "the command ended without a result")
                .hint("see the command's own output");
            l.end(&JobResult::failed(&e));
        }
    }
}

impl Progress for AgentJob {
    fn phase(&self, name: &'static str, total: u64) {
        if let Some(l) = &self.link {
            *l.phase.lock().unwrap_or_else(|p| p.into_inner()) = name;
            l.total.store(total, Ordering::Relaxed);
            l.done.store(0, Ordering::Relaxed);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(l) = &self.link {
            l.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// A target the agent released for this command; dropping it ends the hold.
pub struct Released {
    socket: PathBuf,
    path: PathBuf,
}

impl Drop for Released {
    fn drop(&mut self) {
        let body = json!({ "path": self.path });
        let _ = request(Addr::Unix(&self.socket), "POST", "/api/release/end", None, Some(&body), REPORT_TIMEOUT);
    }
}

/// Asks the agent serving `state_root` to release the target at `path`
/// (canonical) for `by`: it cancels the target's session at a safe point
/// and refuses new ones until the returned guard is dropped (at most
/// `hold`). `None`: no agent answers, or it serves no target at that path.
pub fn release(state_root: &Path, path: &Path, by: &str, hold: Duration) -> Result<Option<Released>, Error> {
    let socket = crate::status::socket_path(state_root);
    if !socket.exists() {
        return Ok(None);
    }
    let body = json!({ "path": path, "by": by, "hold_seconds": hold.as_secs() });
    // Waits while the session reaches its safe point (up to a minute).
    let answer = match request(Addr::Unix(&socket), "POST", "/api/release", None, Some(&body), Duration::from_secs(70))
    {
        Ok(a) => a,
        // A socket file left by a killed agent.
        Err(e) if e.code == diskferry_protocol::ErrorCode::NotFound => return Ok(None),
        // A hung agent: the target's own lock still keeps the move safe;
        // the move waits for it as it would alone.
        Err(e) => {
            tracing::warn!("the agent did not answer the release of {}: {}", path.display(), e.message);
            return Ok(None);
        }
    };
    match answer.status {
        200 => {
            let v = answer.json()?;
            if v["cancelled"] == true {
                tracing::info!(target = %v["target"], "the agent cancelled the target's session for this command");
            }
            Ok(Some(Released { socket, path: path.to_path_buf() }))
        }
        404 => Ok(None),
        _ => {
            let v = answer.json().unwrap_or_default();
            let code = diskferry_protocol::ErrorCode::ALL
                .iter()
                .copied()
                .find(|c| v["code"].as_str() == Some(c.as_str()))
                .unwrap_or(diskferry_protocol::ErrorCode::Busy);
            Err(Error::new(code, format!("the agent did not release {}: {}", path.display(), v["message"]))
                .hint("stop the push to that target (or the agent), then run this again"))
        }
    }
}
