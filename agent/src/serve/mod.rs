//! The target agent: `diskferry serve`. Accepts authenticated connections,
//! runs one session per connection, at most one session per target, and
//! shuts down at safe points.

mod bench;
pub mod budget;
mod claims;
mod connection;
mod data;
mod group;
mod job;
pub mod registry;
pub mod reload;
mod session;
pub mod targets;
mod view;
mod worker;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::store::{RealFs, Vfs};
use diskferry_sync_engine::Error;
use tokio::sync::{watch, Semaphore};

use crate::config::{Config, LiveConfig};
use crate::identity::Identity;
use crate::{transport, trust};
pub use registry::{Registration, Registry};

/// Shared by every session of one agent.
pub struct ServerCtx {
    /// Replaced whole by a reload; read with [`ServerCtx::config`].
    pub config: Arc<LiveConfig>,
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

impl ServerCtx {
    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }
}

/// A running target agent.
pub struct Server {
    /// `None`: the agent only sends (no `listen`).
    pub endpoint: Option<quinn::Endpoint>,
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
        let endpoint = match config.listen {
            Some(listen) => {
                let tls = trust::server_config(identity, config.peers.clone())?;
                let qc = transport::server_config(
                    tls,
                    &listen,
                    config.max_mtu,
                    config.idle_timeout,
                    budget::PRE_ADMISSION_WINDOW,
                )?;
                Some(transport::server_endpoint(listen, qc).map_err(|e| {
                    Error::new(ErrorCode::InvalidInput, format!("cannot listen on {listen}: {e}"))
                        .hint("is another agent using that address?")
                })?)
            }
            None => None,
        };
        // Scratch files of a bench cut by a kill.
        crate::bench::sweep(&state_root);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let jobs = Arc::new(crate::jobs::Jobs::load(Some(&state_root)));
        let ctx = Arc::new(ServerCtx {
            budget: budget::Budget::new(config.memory_budget),
            sessions: Arc::new(Semaphore::new(config.max_sessions as usize)),
            config: Arc::new(LiveConfig::new(config)),
            state_root,
            vfs,
            registry: Registry::default(),
            shutdown: shutdown_rx,
            pins,
            groups: Arc::default(),
            jobs,
        });
        let identity = Arc::new(Identity { cert: identity.cert.clone(), key: identity.key.clone_key() });
        let config = ctx.config();
        let status = match config.status_listen {
            Some(addr) => {
                let token = match &config.status_token_file {
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

    /// How many `[[protect]]` entries it runs.
    pub fn protected_disks(&self) -> usize {
        self.ctx.config().protect.len()
    }

    /// The bound address (`None`: the agent only sends).
    pub fn local_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.endpoint.as_ref().map(|e| e.local_addr()).transpose()
    }

    /// Serves until `stop` resolves, then lets sessions reach a safe point.
    /// `SIGHUP` reloads the config ([`reload`]).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        let c = &self.ctx;
        let config = c.config();
        let mut protector = crate::protect::Protector::start(
            &config.protect,
            self.identity.clone(),
            c.state_root.clone(),
            c.jobs.clone(),
            config.bandwidth_limit,
            c.shutdown.clone(),
        );
        let (token, tcp) = match self.status {
            Some((listener, token)) => (token, Some(listener)),
            None => (None, None),
        };
        let (control_tx, mut control) = crate::status::remote::control_channel();
        let st = Arc::new(crate::status::Status::new(
            c.jobs.clone(),
            protector.status(),
            c.config.clone(),
            c.state_root.clone(),
            token,
        ));
        if let Some(listener) = tcp {
            tasks.spawn(crate::status::serve(listener, st.clone(), c.shutdown.clone()));
        }
        if let Some(unix) = self.unix {
            tasks.spawn(crate::status::serve_unix(unix, st, Some(control_tx), c.shutdown.clone()));
        }
        // Requests of local commands are answered beside this loop: a
        // reload in progress does not hold a failover's release up.
        let ctx = self.ctx.clone();
        tasks.spawn(async move {
            let mut answering = tokio::task::JoinSet::new();
            while let Some(request) = control.recv().await {
                answering.spawn(handle_control(ctx.clone(), request));
                while answering.try_join_next().is_some() {}
            }
        });
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // Targets were recovered in `bind`, the endpoint listens: ready.
        let serving = match self.endpoint.as_ref().and_then(|e| e.local_addr().ok()) {
            Some(addr) => format!("serving on {addr}; {} protected disk(s)", config.protect.len()),
            None => format!("sending only; {} protected disk(s)", config.protect.len()),
        };
        crate::notify::ready(&serving);
        // Pinged from a task of its own: a reload that recovers a large
        // target (blocking this loop) is not taken for a hung agent.
        if let Some(every) = crate::notify::watchdog_every() {
            let mut stop = c.shutdown.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => crate::notify::watchdog(),
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            });
        }
        tokio::pin!(stop);
        loop {
            tokio::select! {
                incoming = accept(self.endpoint.as_ref()) => {
                    let Some(incoming) = incoming else { break };
                    let ctx = self.ctx.clone();
                    tasks.spawn(handle_connection(incoming, ctx));
                }
                _ = &mut stop => break,
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    crate::notify::reloading();
                    // Reading the file, checking and recovering new targets
                    // block: off the runtime's other tasks.
                    let report = tokio::task::block_in_place(|| {
                        reload::reload(&self.ctx, self.endpoint.as_ref(), &self.identity, &mut protector)
                    });
                    protector.reap();
                    match &report.error {
                        None => crate::notify::ready(&serving),
                        Some(e) => crate::notify::ready(&format!("{serving}; the last reload was refused: {e}")),
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tracing::info!("shutting down: stopping sessions at a safe point");
        crate::notify::stopping();
        let _ = self.shutdown_tx.send(true);
        while tasks.join_next().await.is_some() {}
        // A scheduled push in flight is cut after a moment: its target keeps
        // what it staged, and the next start resumes it.
        protector.drain().await;
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(0u32.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        }
    }
}

/// Answers a local command's request (over the agent's socket).
pub async fn handle_control(ctx: Arc<ServerCtx>, request: crate::status::remote::Control) {
    use crate::status::remote::Control;
    let name_of =
        |path: &std::path::Path| ctx.config().targets.iter().find(|(_, t)| t.path == path).map(|(n, _)| n.clone());
    match request {
        Control::Release { path, by, hold, reply } => {
            let answer = match name_of(&path) {
                Some(name) => ctx.registry.release_for_command(&name, &by, hold).await.map(|c| Some((name, c))),
                None => Ok(None),
            };
            let _ = reply.send(answer);
        }
        Control::EndHold { path, reply } => {
            if let Some(name) = name_of(&path) {
                ctx.registry.unhold(&name).await;
            }
            let _ = reply.send(());
        }
    }
}

/// The next connection (never, for an agent that only sends).
async fn accept(endpoint: Option<&quinn::Endpoint>) -> Option<quinn::Incoming> {
    match endpoint {
        Some(e) => e.accept().await,
        None => std::future::pending().await,
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
    let Some(peer) = ctx.config().peers.get(&fp).cloned() else {
        tracing::warn!(%remote, fingerprint = %fp, "refused: unknown peer");
        conn.close(1u32.into(), b"unknown peer");
        return;
    };
    tracing::debug!(%remote, %peer, "connection");
    connection::serve(conn, peer, ctx).await;
}
