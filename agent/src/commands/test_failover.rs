//! `diskferry test-failover`: a writable image of a recovery point while
//! replication into the target goes on; the point stays pinned while the
//! image exists. `--cleanup PATH` removes the image and unpins it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::apply::catalog::read_catalog;
use diskferry_sync_engine::points;
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::Error;
use serde_json::json;

use super::target_arg::{open_waiting, resolve_arg, state_root, Resolved};
use crate::cli::{TargetArg, TestFailoverArgs};
use crate::output::print_json;
use crate::state;
use crate::units::{human_bytes, round_secs};

pub fn run(a: TestFailoverArgs) -> Result<()> {
    if let Some(g) = &a.group {
        let (config, state_dir) = (a.config.as_deref(), a.common.state_dir.clone());
        return match (&a.cleanup, a.point, &a.out) {
            (Some(dir), _, _) => super::group_moves::test_cleanup(g, dir, config, state_dir, a.wait, a.common.json),
            (None, Some(point), Some(dir)) => {
                super::group_moves::test_failover(g, point, dir, config, state_dir, a.wait, a.common.json)
            }
            _ => Err(Error::new(ErrorCode::Usage, "--group needs --point and --out DIR, or --cleanup DIR").into()),
        };
    }
    match a.cleanup.clone() {
        Some(clone) => cleanup(&a, &clone),
        None => create(&a),
    }
}

fn create(a: &TestFailoverArgs) -> Result<()> {
    let (Some(name), Some(point), Some(out)) = (a.target.clone(), a.point, a.out.as_deref()) else {
        return Err(Error::new(ErrorCode::Usage, "TARGET, --point and --out are needed").into());
    };
    let arg = TargetArg { target: Some(name), group: None, config: a.config.clone(), wait: a.wait };
    let r = resolve_arg(&arg, a.common.state_dir.clone())?;
    let out = state::canonical_target(out)?;
    let mut target = open_waiting(&r, Duration::from_secs(a.wait))?;
    let start = Instant::now();
    // Pinned before the image exists, so no push prunes the point meanwhile.
    target.pin(point, &out)?;
    let made = points::export(&target, point, &out);
    let report = match made {
        Ok(x) => x,
        Err(e) => {
            target.unpin(&out)?;
            return Err(e.into());
        }
    };
    let secs = start.elapsed().as_secs_f64();
    if a.common.json {
        print_json(&json!({
            "target": r.path,
            "generation": report.generation.to_hex(),
            "out": out,
            "disk_bytes": report.disk_bytes,
            "reflinked": report.reflinked,
            "pinned": true,
            "seconds": round_secs(secs),
        }));
    } else {
        crate::outln!(
            "test image of {} ({}) at {} ({}); the point is pinned until `diskferry test-failover --cleanup {}`",
            report.generation,
            human_bytes(report.disk_bytes),
            out.display(),
            if report.reflinked { "reflink" } else { "sparse copy" },
            out.display()
        );
    }
    Ok(())
}

fn cleanup(a: &TestFailoverArgs, clone: &Path) -> Result<()> {
    let clone = state::canonical_target(clone)?;
    let r = match &a.target {
        Some(t) => resolve_arg(
            &TargetArg { target: Some(t.clone()), group: None, config: a.config.clone(), wait: a.wait },
            a.common.state_dir.clone(),
        )?,
        None => owner_of(&clone, a.config.as_deref(), a.common.state_dir.clone())?,
    };
    let mut target = open_waiting(&r, Duration::from_secs(a.wait))?;
    if !target.pins().iter().any(|p| p.clone == clone) {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("{} is not a test-failover image of {}", clone.display(), r.path.display()),
        )
        .into());
    }
    std::fs::remove_file(&clone)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .map_err(|e| Error::io(diskferry_sync_engine::Place::Target, "removing", &clone, e))?;
    let g = target.unpin(&clone)?;
    if a.common.json {
        print_json(&json!({ "target": r.path, "removed": clone, "unpinned": g.map(|g| g.to_hex()) }));
    } else {
        crate::outln!(
            "removed {}; {} is no longer pinned",
            clone.display(),
            g.map(|g| g.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

/// The target whose catalog pins `clone` (catalogs are read without their locks).
fn owner_of(clone: &Path, config: Option<&Path>, state_dir: Option<PathBuf>) -> Result<Resolved, Error> {
    let root = state_root(config, state_dir)?;
    let targets = root.join("targets");
    let entries = std::fs::read_dir(&targets)
        .map_err(|e| Error::io(diskferry_sync_engine::Place::State, "listing", &targets, e))?;
    for entry in entries.flatten() {
        let Ok(Some(c)) = read_catalog(&RealFs, &entry.path()) else { continue };
        if c.pins.iter().any(|p| p.clone == clone) {
            return Ok(Resolved { path: c.path.clone(), state_root: root, name: c.name.clone() });
        }
    }
    Err(Error::new(
        ErrorCode::NotFound,
        format!("no target in {} has a test-failover image at {}", root.display(), clone.display()),
    )
    .hint("check the path and --state-dir (or --config)"))
}
