//! `diskferry init`, `id`, `serve` and `push`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::changes::SpotCheck;
use diskferry_sync_engine::Error;
use serde_json::json;

use crate::cli::{InitArgs, PushArgs, PushOpts, ServeArgs};
use crate::config::Config;
use crate::identity::{self, normalize_fingerprint};
use crate::output::print_json;
use crate::progress::Bar;
use crate::push::{self, PushOptions, PushReport};
use crate::serve::Server;
use crate::state;
use crate::units::{cpu_seconds, human_bytes, mb_per_s, round_secs};

/// A tokio runtime for the network commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("df-net").build()?)
}

pub fn init(a: InitArgs) -> Result<()> {
    let dir = state::prepare(&state::resolve(a.common.state_dir.clone()))?;
    print_fingerprint(&identity::init(&dir)?, a.common.json);
    Ok(())
}

pub fn id(a: InitArgs) -> Result<()> {
    let dir = state::resolve(a.common.state_dir.clone());
    print_fingerprint(&identity::load(&dir)?, a.common.json);
    Ok(())
}

/// The fingerprint as the only stdout line (or a JSON object).
fn print_fingerprint(id: &identity::Identity, json: bool) {
    if json {
        print_json(&json!({ "fingerprint": id.fingerprint() }));
    } else {
        crate::outln!("{}", id.fingerprint());
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let config = Config::load(&a.config)?;
    let state_root = state::prepare(&state::resolve(a.common.state_dir.clone().or_else(|| config.state_dir.clone())))?;
    let id = identity::load(&state_root)?;
    let rt = runtime()?;
    rt.block_on(async move {
        // From the start: a reload asked while targets are recovered must
        // not kill the agent (SIGHUP's default); the loop reads it later.
        let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let server = Server::bind(config, state_root, &id)?;
        match server.local_addr()? {
            Some(addr) => eprintln!("diskferry serving on {addr} (fingerprint {})", id.fingerprint()),
            None => eprintln!(
                "diskferry running, sending only (no listen; fingerprint {}, {} protected disks)",
                id.fingerprint(),
                server.protected_disks()
            ),
        }
        server.run(shutdown_signal()).await;
        eprintln!("diskferry: stopped");
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// What a push needs from its arguments: the options, this agent's
/// identity, and a runtime (with the peer resolved on it).
pub fn push_setup(a: &PushArgs) -> Result<(PushOptions, identity::Identity, tokio::runtime::Runtime)> {
    let (id, rt) = setup(&a.opts)?;
    let opts = push_options(&a.src, &a.target, &a.opts, &rt)?;
    Ok((opts, id, rt))
}

/// This agent's identity (from the agent's state directory), and a runtime.
pub fn setup(o: &PushOpts) -> Result<(identity::Identity, tokio::runtime::Runtime)> {
    let id = identity::load(&state_root_of(o)?)?;
    Ok((id, runtime()?))
}

/// The agent's one state directory: the disk's history must be where this
/// host's `serve` looks when the disk later receives.
fn state_root_of(o: &PushOpts) -> Result<std::path::PathBuf> {
    let from_config = match (&o.config, &o.common.state_dir) {
        (Some(file), None) => Config::load(file)?.state_dir,
        _ => None,
    };
    Ok(state::prepare(&state::resolve(o.common.state_dir.clone().or(from_config)))?)
}

/// The options of a push of `src` to `target` (the peer resolved on `rt`).
pub fn push_options(
    src: &std::path::Path,
    target: &str,
    a: &PushOpts,
    rt: &tokio::runtime::Runtime,
) -> Result<PushOptions> {
    let state_root = state_root_of(a)?;
    let fingerprint = normalize_fingerprint(&a.peer_fingerprint).ok_or_else(|| {
        Error::new(
            ErrorCode::Usage,
            "--peer-fingerprint must be 64 hex digits (`diskferry id` on the target host prints it)",
        )
    })?;
    let target = TargetName::new(target).map_err(|e| Error::new(ErrorCode::BadTargetName, e.to_string()))?;
    let peer: SocketAddr = rt.block_on(resolve(&a.peer))?;
    let opts = PushOptions {
        // Canonical: the disk's history is keyed by its path (an NBD URL as written).
        source: std::fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf()),
        peer,
        peer_fingerprint: fingerprint,
        target,
        mode: a.mode.into(),
        block_size: a.block_size,
        compress: a.compress.0,
        force: a.force,
        discard_target_changes: a.discard_target_changes,
        snapshot: crate::snapshot::SnapshotOptions {
            keep: a.changes == crate::changes::Changes::ExtentMap,
            ..a.snapshot.options()
        },
        promote: false,
        fuzzy: false,
        threads: a.threads,
        max_mtu: a.max_mtu,
        state_root: Some(state_root),
        idle_timeout: std::time::Duration::from_secs(a.idle_timeout),
        changes: a.changes.clone(),
        qmp: a.qmp.clone().zip(a.node.clone()),
        format: a.format,
        spot_check: SpotCheck {
            fraction: a.spot_check,
            ..SpotCheck::with_seed(a.spot_check_seed.unwrap_or_else(rand::random))
        },
        group: None,
        cancel: None,
        shared: None,
        pace: a.bwlimit.map(|r| std::sync::Arc::new(crate::pace::Pacer::new(r))).into_iter().collect(),
    };
    Ok(opts)
}

pub fn push(a: PushArgs) -> Result<()> {
    let (opts, id, rt) = push_setup(&a)?;
    let job = Arc::new(job_of_push("push", &opts, &a.opts.peer));
    let bar = Arc::new(Bar::new().reporting(job.clone()));
    let start = Instant::now();
    let report = rt.block_on(push::push(&id, opts, bar.clone()));
    bar.finish();
    job.finish_with(&report, PushReport::job_result);
    let report = report?;
    let secs = start.elapsed().as_secs_f64();
    if a.opts.common.json {
        print_json(&push_json(&report, secs, cpu_seconds()));
    } else {
        crate::outln!("pushed {} to {} at {} ({})", a.src.display(), a.target, a.opts.peer, report.mode());
        crate::outln!("  disk        {} in {} blocks", human_bytes(report.disk_bytes), report.blocks_total);
        crate::outln!(
            "  changed     {} blocks; sent {} of block data, {} on the wire (path MTU {})",
            report.committed.blocks_changed,
            human_bytes(report.bytes_sent),
            human_bytes(report.wire_bytes),
            report.path_mtu
        );
        if report.committed.unchanged {
            crate::outln!(
                "  generation  {} (the target already held this data: nothing changed since)",
                report.committed.generation
            );
        } else {
            crate::outln!("  generation  {} ({})", report.committed.generation, report.consistency.as_str());
        }
        if report.committed.points_dropped > 0 {
            crate::outln!(
                "  dropped     {} recovery points of the target's old chain (--force)",
                report.committed.points_dropped
            );
        }
        if let Some(g) = report.committed.common_point {
            crate::outln!(
                "  common      {g} (the last point both sides held); the target read {} of its disk",
                human_bytes(report.committed.target_bytes_read)
            );
        }
        if let Some(g) = report.committed.discarded_point {
            crate::outln!(
                "  discarded   {} blocks of the target's own changes, kept there as point {g} until `diskferry commit`",
                report.committed.discarded_blocks
            );
        }
        crate::outln!("  time        {secs:.3} s ({:.0} MB/s)", mb_per_s(report.disk_bytes, secs));
    }
    Ok(())
}

/// The push's job on the page of the agent sharing its state directory.
pub fn job_of_push(kind: &str, opts: &PushOptions, peer: &str) -> crate::local_agent::AgentJob {
    match &opts.state_root {
        Some(root) => crate::local_agent::AgentJob::start(
            root,
            kind,
            &opts.source.display().to_string(),
            peer,
            opts.target.as_str(),
        ),
        None => crate::local_agent::AgentJob::none(),
    }
}

pub fn push_json(r: &PushReport, secs: f64, cpu: f64) -> serde_json::Value {
    json!({
        "mode": r.mode(),
        "plan": format!("{:?}", r.plan),
        "disk_bytes": r.disk_bytes,
        "blocks_total": r.blocks_total,
        "blocks_changed": r.committed.blocks_changed,
        "bytes_sent": r.bytes_sent,
        "wire_bytes": r.wire_bytes,
        "path_mtu": r.path_mtu,
        "seconds": round_secs(secs),
        "cpu_seconds": round_secs(cpu),
        "generation": r.committed.generation.to_hex(),
        "consistency": r.consistency.as_str(),
        "root": r.committed.root.to_hex(),
        "resumed_blocks": r.staged_before,
        "control_bytes": r.control_bytes,
        "points_dropped": r.committed.points_dropped,
        "unchanged": r.committed.unchanged,
        "common_point": r.committed.common_point.map(|g| g.to_hex()),
        "discarded_blocks": r.committed.discarded_blocks,
        "discarded_point": r.committed.discarded_point.map(|g| g.to_hex()),
        "target_bytes_read": r.committed.target_bytes_read,
        "snapshot": r.snapshot.as_str(),
        "bytes_written": r.committed.bytes_written,
        "promoted": r.committed.promoted,
        "read_through": r.read_through,
        "change_source": r.changes.source.as_str(),
        "change_note": r.changes.note,
        "hinted_blocks": r.changes.dirty_blocks,
        "spot_checked_blocks": r.changes.spot_checked,
        "source_bytes_read": r.source_bytes_read,
    })
}

pub async fn resolve(peer: &str) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(peer)
        .await
        .map_err(|e| Error::new(ErrorCode::Usage, format!("--peer {peer:?} is not HOST:PORT that resolves: {e}")))?;
    addrs.next().ok_or_else(|| Error::new(ErrorCode::Usage, format!("--peer {peer:?} resolves to no address")).into())
}
