//! The failover moves on a target: `failover`, `commit`, `demote`.

use std::time::{Duration, Instant};

use anyhow::Result;
use diskferry_sync_engine::apply::{Recovery, Target};
use diskferry_sync_engine::error::{IoContext, Place};
use diskferry_sync_engine::thread_pool;
use serde_json::json;

use super::target_arg::{open_for_move, resolve_arg, Move, Resolved};
use crate::cli::{FailoverArgs, MoveArgs};
use crate::ids::{new_generation, now_unix_ns};
use crate::jobs::JobResult;
use crate::output::print_json;
use crate::progress::Bar;
use crate::units::{human_bytes, round_secs};

/// Opens the target for the move `kind` (the local agent releases it
/// first), saying what its recovery had to finish.
fn open(r: &Resolved, wait: u64, kind: &str) -> Result<(Move, Target)> {
    let (mv, target) = open_for_move(r, kind, Duration::from_secs(wait))?;
    match target.recovery() {
        Recovery::Finished(g) => eprintln!("recovered: finished the interrupted commit or move to {g}"),
        Recovery::Discarded => eprintln!("recovered: discarded an interrupted, uncommitted apply or move"),
        _ => {}
    }
    Ok((mv, target))
}

pub fn failover(a: FailoverArgs) -> Result<()> {
    if let Some(g) = &a.target.group {
        return super::group_moves::failover(g, a.point, &a.target, a.common.state_dir.clone(), a.common.json);
    }
    let r = resolve_arg(&a.target, a.common.state_dir.clone())?;
    let (mv, mut target) = open(&r, a.target.wait, "failover")?;
    let start = Instant::now();
    // A replica whose stamp cannot tell is hashed first: on all cores.
    let m = thread_pool(None)
        .ctx(Place::Target, "starting threads for", &r.path)
        .and_then(|pool| pool.install(|| target.failover(a.point)));
    mv.job.finish_with(&m, |m| JobResult::ok(Some(m.to.to_hex()), None));
    let m = m?;
    let secs = start.elapsed().as_secs_f64();
    if a.common.json {
        print_json(&json!({
            "target": r.path,
            "name": r.name,
            "generation": m.to.to_hex(),
            "from": m.from.to_hex(),
            "moved": m.moved,
            "role": "live",
            "undo_segments": m.segments,
            "bytes_restored": m.bytes_restored,
            "undo_bytes": m.undo_bytes,
            "seconds": round_secs(secs),
        }));
    } else if m.moved {
        crate::outln!(
            "{} is live at {} (moved from {}: {} restored through {} undo segment(s), {} saved to move back) in {secs:.3} s",
            r.path.display(),
            m.to,
            m.from,
            human_bytes(m.bytes_restored),
            m.segments,
            human_bytes(m.undo_bytes)
        );
    } else {
        crate::outln!("{} is live at {} (its current point; nothing written) in {secs:.3} s", r.path.display(), m.to);
    }
    Ok(())
}

pub fn commit(a: MoveArgs) -> Result<()> {
    if let Some(g) = &a.target.group {
        return super::group_moves::commit(g, &a.target, a.common.state_dir.clone(), a.common.json);
    }
    let r = resolve_arg(&a.target, a.common.state_dir.clone())?;
    let (mv, mut target) = open(&r, a.target.wait, "commit")?;
    let c = target.commit_point();
    mv.job.finish_with(&c, |c| JobResult::ok(Some(c.kept.to_hex()), None));
    let c = c?;
    if a.common.json {
        print_json(&json!({
            "target": r.path,
            "generation": c.kept.to_hex(),
            "dropped": c.dropped.iter().map(|g| g.to_hex()).collect::<Vec<_>>(),
            "undo_bytes_freed": c.undo_bytes_freed,
            "pinned": c.pinned.iter().map(|g| g.to_hex()).collect::<Vec<_>>(),
        }));
    } else {
        crate::outln!(
            "{} keeps {}; dropped {} other point(s) and {} of undo data",
            r.path.display(),
            c.kept,
            c.dropped.len(),
            human_bytes(c.undo_bytes_freed)
        );
        for g in &c.pinned {
            crate::outln!("  kept {g}: a test-failover image pins it (`diskferry test-failover --cleanup`)");
        }
    }
    Ok(())
}

pub fn demote(a: MoveArgs) -> Result<()> {
    let r = resolve_arg(&a.target, a.common.state_dir.clone())?;
    let (mv, mut target) = open(&r, a.target.wait, "demote")?;
    let pool = thread_pool(None).ctx(Place::Target, "starting threads for", &r.path)?;
    let bar = Bar::new();
    let d = pool.install(|| target.demote(new_generation(), now_unix_ns(), &bar));
    bar.finish();
    mv.job.finish_with(&d, |d| JobResult::ok(Some(d.generation.to_hex()), None));
    let d = d?;
    if a.common.json {
        print_json(&json!({
            "target": r.path,
            "role": "replica",
            "generation": d.generation.to_hex(),
            "hashed": d.hashed,
            "points_dropped": d.points_dropped,
        }));
    } else if d.hashed {
        crate::outln!(
            "{} is a replica again, at {} (hashed: it was written since its last push; {} older point(s) dropped)",
            r.path.display(),
            d.generation,
            d.points_dropped
        );
    } else {
        crate::outln!("{} is a replica again, at {}", r.path.display(), d.generation);
    }
    Ok(())
}
