//! The target agent: `diskferry serve`. Accepts authenticated connections,
//! runs one session per connection, at most one session per target, and
//! shuts down at safe points.

pub mod budget;
mod connection;
mod group;
mod job;
mod session;
pub mod targets;
mod view;
mod worker;
mod writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::store::{RealFs, Vfs};
use diskferry_sync_engine::Error;
use tokio::sync::{watch, Mutex, Semaphore};

use crate::config::Config;
use crate::identity::Identity;
use crate::{transport, trust};

/// Shared by every session of one agent.
pub struct ServerCtx {
    pub config: Config,
    pub state_root: PathBuf,
    pub vfs: Arc<dyn Vfs>,
    pub registry: Registry,
    /// The agent-wide memory budget: sessions and frames in flight.
    pub budget: budget::Budget,
    pub sessions: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
    /// What each target's path must name (checked at every session).
    pub pins: Arc<targets::Pins>,
    /// Group pushes in progress.
    pub groups: Arc<group::Groups>,
    /// The agent's jobs: received sessions and scheduled pushes.
    pub jobs: Arc<crate::jobs::Jobs>,
}

/// Which session holds which target, so a new push from the same peer can
/// take over a stale one at once.
#[derive(Default)]
pub struct Registry {
    active: Mutex<HashMap<String, Active>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Active {
    id: u64,
    ticket: u64,
    peer: String,
    cancel: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// A session's hold on a target.
pub struct Registration {
    id: u64,
    pub cancel: watch::Receiver<bool>,
    done: watch::Sender<bool>,
}

impl Registry {
    /// A ticket for a session about to register: later sessions get larger
    /// ones, so a stale session can never take over a newer one.
    pub fn ticket(&self) -> u64 {
        self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Claims `target` for `peer`, cancelling that peer's older session on it.
    pub async fn register(&self, target: &str, peer: &str, ticket: u64) -> Result<Registration, Error> {
        for _ in 0..8 {
            let waiting = {
                let mut active = self.active.lock().await;
                match active.get(target) {
                    Some(a) if a.peer != peer => {
                        return Err(Error::new(
                            ErrorCode::PeerBusy,
                            format!("target {target:?} is being written by another peer ({})", a.peer),
                        ))
                    }
                    Some(a) if a.ticket > ticket => {
                        return Err(Error::new(
                            ErrorCode::Cancelled,
                            format!("a newer push from the same peer took over target {target:?}"),
                        ))
                    }
                    Some(a) => {
                        let _ = a.cancel.send(true);
                        Some(a.done.clone())
                    }
                    None => {
                        let id = ticket;
                        let (cancel_tx, cancel_rx) = watch::channel(false);
                        let (done_tx, done_rx) = watch::channel(false);
                        active.insert(
                            target.to_string(),
                            Active { id, ticket, peer: peer.to_string(), cancel: cancel_tx, done: done_rx },
                        );
                        return Ok(Registration { id, cancel: cancel_rx, done: done_tx });
                    }
                }
            };
            if let Some(mut done) = waiting {
                tracing::info!(target = %target, peer = %peer, "taking over the peer's previous session");
                let waited = tokio::time::timeout(Duration::from_secs(60), done.wait_for(|d| *d)).await;
                if waited.is_err() {
                    return Err(Error::new(
                        ErrorCode::Busy,
                        format!("the previous session on {target:?} did not stop"),
                    ));
                }
            }
        }
        Err(Error::new(ErrorCode::Busy, format!("target {target:?} is busy")))
    }

    /// Releases a target once its session stopped.
    pub async fn release(&self, target: &str, r: Registration) {
        let mut active = self.active.lock().await;
        if active.get(target).is_some_and(|a| a.id == r.id) {
            active.remove(target);
        }
        let _ = r.done.send(true);
    }
}

/// A running target agent.
pub struct Server {
    pub endpoint: quinn::Endpoint,
    ctx: Arc<ServerCtx>,
    shutdown_tx: watch::Sender<bool>,
    /// This agent's identity, for the pushes of its protected disks.
    identity: Arc<Identity>,
    /// The status endpoint's socket, bound at start, and its token.
    status: Option<(std::net::TcpListener, Option<String>)>,
    /// The agent's unix socket (`diskferry status`).
    unix: Option<std::os::unix::net::UnixListener>,
}

impl Server {
    /// Checks the targets, recovers every one of them, then binds the
    /// endpoint: nothing is served (or read) before recovery ran.
    pub fn bind(config: Config, state_root: PathBuf, identity: &Identity) -> anyhow::Result<Server> {
        let pins = Arc::new(targets::check(&config, &state_root)?);
        let vfs: Arc<dyn Vfs> = Arc::new(RealFs);
        targets::recover_all(&config, &state_root, &vfs, &pins);
        let tls = trust::server_config(identity, config.peers.clone())?;
        let qc = transport::server_config(
            tls,
            &config.listen,
            config.max_mtu,
            config.idle_timeout,
            budget::PRE_ADMISSION_WINDOW,
        )?;
        let endpoint = transport::server_endpoint(config.listen, qc).map_err(|e| {
            Error::new(ErrorCode::InvalidInput, format!("cannot listen on {}: {e}", config.listen))
                .hint("is another agent using that address?")
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let jobs = Arc::new(crate::jobs::Jobs::load(Some(&state_root)));
        let ctx = Arc::new(ServerCtx {
            budget: budget::Budget::new(config.memory_budget),
            sessions: Arc::new(Semaphore::new(config.max_sessions as usize)),
            config,
            state_root,
            vfs,
            registry: Registry::default(),
            shutdown: shutdown_rx,
            pins,
            groups: Arc::default(),
            jobs,
        });
        let identity = Arc::new(Identity { cert: identity.cert.clone(), key: identity.key.clone_key() });
        let status = match ctx.config.status_listen {
            Some(addr) => {
                let token = match &ctx.config.status_token_file {
                    Some(f) => Some(crate::status::read_token(f)?),
                    None => None,
                };
                Some((crate::status::bind(addr)?, token))
            }
            None => None,
        };
        let unix = match crate::status::bind_unix(&ctx.state_root) {
            Ok(l) => Some(l),
            Err(e) if e.code == ErrorCode::Busy => return Err(e.into()),
            // A path too long for a socket, say: the agent runs, `status` cannot reach it.
            Err(e) => {
                tracing::warn!("no agent socket: error[{}]: {}", e.code, e.message);
                None
            }
        };
        Ok(Server { endpoint, ctx, shutdown_tx, identity, status, unix })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `stop` resolves, then lets sessions reach a safe point.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        let (protected, mut protecting) = crate::protect::spawn_all(
            &self.ctx.config.protect,
            self.identity.clone(),
            self.ctx.state_root.clone(),
            self.ctx.jobs.clone(),
            self.ctx.config.bandwidth_limit,
            self.ctx.shutdown.clone(),
        );
        let c = &self.ctx;
        let targets: Vec<_> = c.config.targets.iter().map(|(n, t)| (n.clone(), t.path.clone())).collect();
        let (token, tcp) = match self.status {
            Some((listener, token)) => (token, Some(listener)),
            None => (None, None),
        };
        let st = Arc::new(crate::status::Status::new(c.jobs.clone(), protected, targets, c.state_root.clone(), token));
        if let Some(listener) = tcp {
            tasks.spawn(crate::status::serve(listener, st.clone(), c.shutdown.clone()));
        }
        if let Some(unix) = self.unix {
            tasks.spawn(crate::status::serve_unix(unix, st, c.shutdown.clone()));
        }
        tokio::pin!(stop);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let ctx = self.ctx.clone();
                    tasks.spawn(handle_connection(incoming, ctx));
                }
                _ = &mut stop => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tracing::info!("shutting down: stopping sessions at a safe point");
        let _ = self.shutdown_tx.send(true);
        while tasks.join_next().await.is_some() {}
        // A scheduled push in flight is cut after a moment: its target keeps
        // what it staged, and the next start resumes it.
        let drained =
            tokio::time::timeout(Duration::from_secs(5), async { while protecting.join_next().await.is_some() {} });
        if drained.await.is_err() {
            protecting.abort_all();
            while protecting.join_next().await.is_some() {}
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
    }
}

async fn handle_connection(incoming: quinn::Incoming, ctx: Arc<ServerCtx>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, "refused connection: {e}");
            return;
        }
    };
    let Some(fp) = trust::peer_fingerprint(&conn) else {
        conn.close(1u32.into(), b"no certificate");
        return;
    };
    let Some(peer) = ctx.config.peers.get(&fp).cloned() else {
        tracing::warn!(%remote, fingerprint = %fp, "refused: unknown peer");
        conn.close(1u32.into(), b"unknown peer");
        return;
    };
    tracing::debug!(%remote, %peer, "connection");
    connection::serve(conn, peer, ctx).await;
}
