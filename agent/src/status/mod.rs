//! The agent's status endpoint (`status_listen`, off unless set): a jobs
//! page for people (`/`), JSON for tools (`/api/jobs`, `/api/jobs/ID`,
//! `/api/targets`, `/api/protect`) and Prometheus metrics (`/metrics`),
//! documented in `docs/status.md`. With `status_token_file` every request
//! must carry `Authorization: Bearer TOKEN`; one without gets 401 and no
//! body. Any address other than loopback requires the token (the config
//! refuses it otherwise).

pub mod client;
mod page;
pub mod remote;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::apply::catalog::read_catalog;
use diskferry_sync_engine::apply::Target;
use diskferry_sync_engine::Error;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::jobs::Jobs;
use crate::protect::ProtectStatus;

/// What the endpoint reads.
pub struct Status {
    pub jobs: Arc<Jobs>,
    pub protect: Arc<ProtectStatus>,
    /// The config in force (its targets are the served ones).
    pub config: Arc<crate::config::LiveConfig>,
    pub state_root: PathBuf,
    token: Option<String>,
}

/// The bearer token in `file` (its first line, at least 16 characters).
pub fn read_token(file: &std::path::Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::new(ErrorCode::Config, format!("status_token_file {}: {e}", file.display()))
            .hint("create it with the token on its first line, readable only by the agent (0600)")
    })?;
    let t = text.lines().next().unwrap_or_default().trim().to_string();
    if t.len() < 16 {
        return Err(Error::new(
            ErrorCode::Config,
            format!("status_token_file {}: the token is shorter than 16 characters", file.display()),
        )
        .hint("put a long random token in it (e.g. `openssl rand -hex 32`)"));
    }
    Ok(t)
}

impl Status {
    pub fn new(
        jobs: Arc<Jobs>,
        protect: Arc<ProtectStatus>,
        config: Arc<crate::config::LiveConfig>,
        state_root: PathBuf,
        token: Option<String>,
    ) -> Status {
        Status { jobs, protect, config, state_root, token }
    }

    /// The agent itself: its config file, addresses, and the last reload.
    fn agent_json(&self) -> Value {
        let c = self.config.get();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "config_file": c.file,
            "state_dir": self.state_root,
            "listen": c.listen.map(|a| a.to_string()),
            "started_unix_ns": self.protect.started_unix_ns,
            "last_reload": self.config.last_reload(),
        })
    }

    fn protect_json(&self) -> Vec<Value> {
        let start = self.protect.started_unix_ns;
        self.protect
            .list()
            .into_iter()
            .map(|p| {
                let rpo = p.rpo_seconds(start);
                let over = p.over_rpo(start);
                let mut v = serde_json::to_value(&p).unwrap_or_default();
                v["rpo_seconds"] = json!((rpo * 1000.0).round() / 1000.0);
                v["over_rpo"] = json!(over);
                v
            })
            .collect()
    }

    fn targets_json(&self) -> Vec<Value> {
        let config = self.config.get();
        config
            .targets
            .iter()
            .map(|(name, t)| {
                let path = &t.path;
                // Read without the target's lock: the catalog is replaced whole.
                let c = read_catalog(&diskferry_sync_engine::store::RealFs, &Target::state_dir(&self.state_root, path))
                    .ok()
                    .flatten();
                let newest = c.as_ref().and_then(|c| c.points.first());
                json!({
                    "name": name,
                    "path": path,
                    "role": c.as_ref().map(|c| c.role.as_str()),
                    "points": c.as_ref().map_or(0, |c| c.points.len()),
                    "generation": newest.map(|p| p.generation.to_hex()),
                    "point_time": newest.map(|p| crate::units::format_time(p.created_unix_ns)),
                    "consistency": newest.map(|p| p.consistency.as_str()),
                })
            })
            .collect()
    }

    fn metrics(&self) -> String {
        let start = self.protect.started_unix_ns;
        let rpo: Vec<(String, f64)> =
            self.protect.list().iter().map(|p| (p.disk.clone(), p.rpo_seconds(start))).collect();
        self.jobs.metrics.encode(self.jobs.running(), &rpo)
    }
}

/// Binds `addr` now (a taken port fails the agent's start), and serves
/// until `stop` turns true.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        Error::new(ErrorCode::InvalidInput, format!("cannot listen on status_listen {addr}: {e}"))
            .hint("is another agent using that address? give each agent its own status_listen")
    })?;
    l.set_nonblocking(true).map_err(|e| Error::new(ErrorCode::Internal, format!("status socket: {e}")))?;
    Ok(l)
}

fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/", get(page_handler))
        .route("/api/jobs", get(|State(s): State<Arc<Status>>| async move { Json(s.jobs.list()) }))
        .route("/api/jobs/{id}", get(job_handler))
        .route("/api/agent", get(|State(s): State<Arc<Status>>| async move { Json(s.agent_json()) }))
        .route("/api/targets", get(|State(s): State<Arc<Status>>| async move { Json(s.targets_json()) }))
        .route("/api/protect", get(|State(s): State<Arc<Status>>| async move { Json(s.protect_json()) }))
        .route("/metrics", get(metrics_handler))
        // No Allow header to tell which paths exist.
        .method_not_allowed_fallback(|| async { StatusCode::NOT_FOUND })
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(status.clone(), require_token))
        .with_state(status)
}

/// Where `diskferry status` finds the agent: a unix socket in its state
/// directory, readable by its owner only (no token: the file's mode is the
/// access check).
pub fn socket_path(state_root: &std::path::Path) -> PathBuf {
    state_root.join("agent.sock")
}

/// Binds the agent's unix socket; refused while another agent serves the
/// same state directory.
pub fn bind_unix(state_root: &std::path::Path) -> Result<std::os::unix::net::UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_root);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(Error::new(
            ErrorCode::Busy,
            format!("another agent serves the state directory {} (its socket answers)", state_root.display()),
        )
        .hint("stop it first, or give this one its own state_dir"));
    }
    // A socket file left by an agent that was killed.
    let _ = std::fs::remove_file(&path);
    let io = |e: std::io::Error| Error::io(diskferry_sync_engine::Place::State, "binding", &path, e);
    let l = std::os::unix::net::UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    l.set_nonblocking(true).map_err(io)?;
    Ok(l)
}

/// Serves the endpoint on TCP (`status_listen`) until `stop` turns true.
pub async fn serve(listener: std::net::TcpListener, status: Arc<Status>, stop: watch::Receiver<bool>) {
    match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => serve_on(l, router(status), stop).await,
        Err(e) => tracing::error!("status endpoint: {e}"),
    }
}

/// Serves the endpoint on the agent's unix socket until `stop` turns true.
/// Besides the status API, it takes the reports and requests of local
/// commands ([`remote`]); `control` reaches the server loop.
pub async fn serve_unix(
    listener: std::os::unix::net::UnixListener,
    status: Arc<Status>,
    control: Option<tokio::sync::mpsc::Sender<remote::Control>>,
    stop: watch::Receiver<bool>,
) {
    let unix = Arc::new(Status {
        jobs: status.jobs.clone(),
        protect: status.protect.clone(),
        config: status.config.clone(),
        state_root: status.state_root.clone(),
        token: None,
    });
    let commands = remote::Remote::new(status.jobs.clone(), control);
    let reaper = tokio::spawn(remote::reap(commands.clone(), stop.clone()));
    match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => serve_on(l, remote::router(commands).merge(router(unix)), stop).await,
        Err(e) => tracing::error!("agent socket: {e}"),
    }
    reaper.abort();
}

async fn serve_on<L>(listener: L, app: Router, mut stop: watch::Receiver<bool>)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let mut stopping = stop.clone();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    // A client that holds its connection open does not hold the agent's
    // shutdown: two seconds after it begins, the endpoint is gone.
    let cut = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    tokio::select! {
        r = served => if let Err(e) = r { tracing::error!("status endpoint: {e}") },
        _ = cut => {}
    }
}

async fn require_token(State(s): State<Arc<Status>>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !given.is_some_and(|g| carries_token(g, token)) {
            // Basic too: a browser asks for it (any user name, the token as
            // the password), where it cannot send a bearer token.
            let mut r = StatusCode::UNAUTHORIZED.into_response();
            r.headers_mut().append(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r.headers_mut()
                .append(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"status\""));
            return r;
        }
    }
    next.run(req).await
}

/// `Bearer TOKEN`, or `Basic` with the token as the password.
fn carries_token(authorization: &str, token: &str) -> bool {
    use base64::Engine;
    if let Some(t) = authorization.strip_prefix("Bearer ") {
        return constant_time_eq(t.trim(), token);
    }
    let Some(b) = authorization.strip_prefix("Basic ") else { return false };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else { return false };
    let Ok(text) = String::from_utf8(raw) else { return false };
    text.split_once(':').is_some_and(|(_, password)| constant_time_eq(password, token))
}

/// Compares digests (blake3's equality is constant-time): no timing
/// oracle, not even the token's length.
fn constant_time_eq(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

async fn job_handler(State(s): State<Arc<Status>>, Path(id): Path<String>) -> Response {
    match id.parse::<u64>().ok().and_then(|id| s.jobs.get(id)) {
        Some(j) => Json(j).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "code": "E_NOT_FOUND", "message": format!("no job {id}") })))
            .into_response(),
    }
}

async fn metrics_handler(State(s): State<Arc<Status>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics()).into_response()
}

async fn page_handler(State(s): State<Arc<Status>>) -> Html<String> {
    Html(page::render(&s.jobs.list(), &s.protect_json(), s.config.last_reload().as_ref()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_or_basic_with_the_token_as_password() {
        let t = "0123456789abcdef";
        assert!(super::carries_token("Bearer 0123456789abcdef", t));
        // "anyone:0123456789abcdef"
        assert!(super::carries_token("Basic YW55b25lOjAxMjM0NTY3ODlhYmNkZWY=", t));
        assert!(!super::carries_token("Basic YW55b25lOndyb25n", t));
        assert!(!super::carries_token("Basic !!!", t));
        assert!(!super::carries_token("Bearer wrong", t));
        assert!(!super::carries_token("Digest x", t));
    }
}
