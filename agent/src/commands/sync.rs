//! `diskferry sync`.

use std::time::Instant;

use anyhow::Result;
use diskferry_sync_engine::error::{IoContext, Place};
use diskferry_sync_engine::local::{self, SyncJob, SyncOptions, SyncReport};
use diskferry_sync_engine::thread_pool;
use serde_json::{json, Value};

use crate::cli::SyncArgs;
use crate::ids::{new_generation, new_session, now_unix_ns};
use crate::output::print_json;
use crate::progress::Bar;
use crate::state;
use crate::units::{human_bytes, mb_per_s, round_secs};

pub fn run(a: SyncArgs) -> Result<()> {
    let state_root = state::prepare(&state::resolve(a.common.state_dir.clone()))?;
    let target = state::canonical_target(&a.dst)?;
    let opts = SyncOptions {
        mode: a.mode.into(),
        block_size: a.block_size,
        force: a.force,
        retention: a.retention,
        app_consistent: a.app_consistent,
        discard_target_changes: a.discard_target_changes,
    };
    // Canonical: the disk's history is keyed by its path (an NBD URL as written).
    let src = std::fs::canonicalize(&a.src).unwrap_or_else(|_| a.src.clone());
    // Kept until the sync ends: it may own the qemu-nbd it reads through.
    let reader = crate::nbd::open_source(&src, a.format, None)?;
    let shown = std::sync::Arc::new(crate::local_agent::AgentJob::start(
        &state_root,
        "sync",
        &src.display().to_string(),
        "",
        &target.display().to_string(),
    ));
    let job = SyncJob {
        vfs: reader.vfs.clone(),
        state_root,
        source: reader.read_path.clone(),
        target,
        generation: new_generation(),
        session: new_session(),
        now_unix_ns: now_unix_ns(),
    };
    let pool = thread_pool(a.threads).ctx(Place::Source, "starting threads for", &a.src)?;
    let bar = Bar::new().reporting(shown.clone());
    let start = Instant::now();
    let report = pool.install(|| local::sync(&job, &opts, &bar));
    bar.finish();
    shown.finish_with(&report, |r| crate::jobs::JobResult {
        written_bytes: r.bytes_written,
        ..crate::jobs::JobResult::ok(Some(r.generation.to_hex()), Some(r.consistency.as_str().to_string()))
    });
    let report = report?;
    let secs = start.elapsed().as_secs_f64();
    if a.common.json {
        print_json(&report_json(&report, secs));
    } else {
        print_human(&a, &report, secs);
    }
    Ok(())
}

pub fn report_json(r: &SyncReport, secs: f64) -> Value {
    json!({
        "mode": r.mode,
        "compare": r.compare,
        "disk_bytes": r.disk_bytes,
        "blocks_total": r.blocks_total,
        "blocks_changed": r.blocks_changed,
        "bytes_written": r.bytes_written,
        "log_bytes": r.log_bytes,
        "undo_bytes": r.undo_bytes,
        "seconds": round_secs(secs),
        "mb_per_s": (mb_per_s(r.disk_bytes, secs) * 10.0).round() / 10.0,
        "generation": r.generation.to_hex(),
        "consistency": r.consistency.as_str(),
        "root": r.root.to_hex(),
        "points_dropped": r.points_dropped,
        "unchanged": r.unchanged,
    })
}

fn print_human(a: &SyncArgs, r: &SyncReport, secs: f64) {
    let how = if r.compare == "none" { r.mode.to_string() } else { format!("{}, {}", r.mode, r.compare) };
    crate::outln!("synced {} -> {} ({how})", a.src.display(), a.dst.display());
    crate::outln!("  disk        {} in {} blocks", human_bytes(r.disk_bytes), r.blocks_total);
    crate::outln!(
        "  changed     {} blocks, {} written (redo log {}, undo {})",
        r.blocks_changed,
        human_bytes(r.bytes_written),
        human_bytes(r.log_bytes),
        human_bytes(r.undo_bytes)
    );
    if r.unchanged {
        crate::outln!("  generation  {} (the target already held this data: nothing changed since)", r.generation);
    } else {
        crate::outln!("  generation  {} ({})", r.generation, r.consistency.as_str());
    }
    if r.points_dropped > 0 {
        crate::outln!("  dropped     {} recovery points of the target's old chain (--force)", r.points_dropped);
    }
    crate::outln!("  time        {secs:.3} s ({:.0} MB/s)", mb_per_s(r.disk_bytes, secs));
}
