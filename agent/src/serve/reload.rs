//! `SIGHUP`: the agent reads its config file again and goes by it from
//! then on, without dropping anything that did not change.
//!
//! - A config that does not load, or whose targets fail the start-up
//!   checks, changes nothing: the old config keeps running, and the
//!   error is logged and shown in status (`/api/agent`).
//! - Targets: new ones are checked, pinned and recovered before any
//!   session may open them; removed ones refuse new sessions (a session in
//!   flight ends as it would have); unchanged ones keep their pins.
//! - Peers: the TLS verifier is replaced for new connections; connections
//!   already up keep going.
//! - `[[protect]]`: new entries start, removed ones stop at a safe point
//!   (after the push they are in), changed ones are replaced once the old
//!   push ended, unchanged ones run on untouched.
//! - What is bound at start (`listen`, `status_listen`, the token, the
//!   state directory, the memory and session budgets, the MTU and the idle
//!   timeout) keeps its old value until the next start, and the report
//!   names the keys that wait for it.

use serde::Serialize;
use std::collections::BTreeSet;

use super::{budget, targets, ServerCtx};
use crate::config::Config;
use crate::identity::Identity;
use crate::protect::Protector;
use crate::{transport, trust};

/// What the last reload did, for the log and status.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    pub at_unix_ns: i64,
    pub ok: bool,
    /// Why the reload changed nothing.
    pub error: Option<String>,
    /// Changed keys that take effect at the next start.
    pub restart_needed: Vec<String>,
    pub targets_added: Vec<String>,
    pub targets_removed: Vec<String>,
    pub protect_started: Vec<String>,
    pub protect_stopped: Vec<String>,
    pub protect_replaced: Vec<String>,
    pub protect_kept: usize,
}

impl ReloadReport {
    fn failed(error: String) -> ReloadReport {
        ReloadReport {
            at_unix_ns: crate::ids::now_unix_ns(),
            ok: false,
            error: Some(error),
            restart_needed: Vec::new(),
            targets_added: Vec::new(),
            targets_removed: Vec::new(),
            protect_started: Vec::new(),
            protect_stopped: Vec::new(),
            protect_replaced: Vec::new(),
            protect_kept: 0,
        }
    }
}

/// Reads the config file again and applies it (see the module's doc).
pub fn reload(
    ctx: &ServerCtx,
    endpoint: Option<&quinn::Endpoint>,
    identity: &Identity,
    protector: &mut Protector,
) -> ReloadReport {
    let old = ctx.config();
    let report = match apply(ctx, &old, endpoint, identity, protector) {
        Ok(r) => r,
        Err(e) => ReloadReport::failed(match &e.hint {
            Some(h) => format!("error[{}]: {} (hint: {h})", e.code, e.message),
            None => format!("error[{}]: {}", e.code, e.message),
        }),
    };
    match &report.error {
        Some(e) => tracing::error!("config reload refused, the old config keeps running: {e}"),
        None => tracing::info!(
            targets_added = ?report.targets_added,
            targets_removed = ?report.targets_removed,
            protect_started = ?report.protect_started,
            protect_stopped = ?report.protect_stopped,
            protect_replaced = ?report.protect_replaced,
            protect_kept = report.protect_kept,
            "config reloaded"
        ),
    }
    if !report.restart_needed.is_empty() {
        tracing::warn!(keys = ?report.restart_needed, "changed in the config, taking effect at the next start");
    }
    ctx.config.set_last_reload(serde_json::to_value(&report).unwrap_or_default());
    report
}

fn apply(
    ctx: &ServerCtx,
    old: &Config,
    endpoint: Option<&quinn::Endpoint>,
    identity: &Identity,
    protector: &mut Protector,
) -> Result<ReloadReport, diskferry_sync_engine::Error> {
    let mut new = Config::load(&old.file)?;
    let restart_needed = keep_bound_values(old, &mut new);
    let fresh = targets::check(&new, &ctx.state_root)?;
    let unchanged: BTreeSet<String> = new
        .targets
        .iter()
        .filter(|(name, t)| old.targets.get(*name).is_some_and(|o| o.path == t.path))
        .map(|(name, _)| name.clone())
        .collect();
    let added: Vec<String> = new.targets.keys().filter(|n| !unchanged.contains(*n)).cloned().collect();
    let removed: Vec<String> = old.targets.keys().filter(|n| !unchanged.contains(*n)).cloned().collect();
    if let (Some(endpoint), true) = (endpoint, new.peers != old.peers) {
        let tls = trust::server_config(identity, new.peers.clone()).map_err(|e| {
            diskferry_sync_engine::Error::new(diskferry_protocol::ErrorCode::Config, format!("TLS: {e}"))
        })?;
        let qc = new
            .listen
            .as_ref()
            .map(|l| transport::server_config(tls, l, new.max_mtu, new.idle_timeout, budget::PRE_ADMISSION_WINDOW));
        if let Some(qc) = qc {
            let qc = qc.map_err(|e| {
                diskferry_sync_engine::Error::new(diskferry_protocol::ErrorCode::Config, format!("TLS: {e}"))
            })?;
            endpoint.set_server_config(Some(qc));
        }
    }
    ctx.pins.adopt(fresh, &unchanged);
    // Nothing is served from a new target before its recovery ran.
    targets::recover_some(&new, &ctx.state_root, &ctx.vfs, &ctx.pins, |n| !unchanged.contains(n));
    let changed = protector.apply(&new.protect, new.bandwidth_limit);
    ctx.config.set(new);
    Ok(ReloadReport {
        at_unix_ns: crate::ids::now_unix_ns(),
        ok: true,
        error: None,
        restart_needed,
        targets_added: added,
        targets_removed: removed,
        protect_started: changed.started,
        protect_stopped: changed.stopped,
        protect_replaced: changed.replaced,
        protect_kept: changed.kept,
    })
}

/// Puts back what was bound at start into `new`; the keys that differed.
fn keep_bound_values(old: &Config, new: &mut Config) -> Vec<String> {
    let mut keys = Vec::new();
    macro_rules! keep {
        ($($field:ident => $key:literal),*) => {$(
            if new.$field != old.$field {
                keys.push($key.to_string());
                new.$field = old.$field.clone();
            }
        )*};
    }
    keep!(
        listen => "listen",
        state_dir => "state_dir",
        status_listen => "status_listen",
        status_token_file => "status_token_file",
        memory_budget => "memory_budget_mib",
        max_sessions => "max_sessions",
        max_mtu => "max_mtu",
        idle_timeout => "idle_timeout_secs"
    );
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_bound_at_start_wait_for_the_next_start() {
        let path = std::path::Path::new("/etc/df.toml");
        let old = Config::parse("listen = \"127.0.0.1:7400\"\nmax_sessions = 4\n", path).unwrap();
        let mut new =
            Config::parse("listen = \"127.0.0.1:7401\"\nmax_sessions = 4\nbandwidth_limit = \"10M\"\n", path).unwrap();
        assert_eq!(keep_bound_values(&old, &mut new), vec!["listen".to_string()]);
        assert_eq!(new.listen, old.listen);
        // What a reload applies stays as written.
        assert_eq!(new.bandwidth_limit, Some(10 << 20));
    }
}
