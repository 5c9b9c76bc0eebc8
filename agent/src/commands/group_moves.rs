//! The moves of a replication group on the recovery site: `points
//! --group`, `failover --group`, `commit --group`, `ungroup`. Every member is opened
//! first (its recovery reads the group record, and its lock is held for the
//! whole move), then the move is made on each.
//!
//! A group point is a generation every member holds (a group push commits
//! the same generation on every member; a member pushed alone gets one of
//! its own). A failover of the group moves each member in turn: a crash
//! in between leaves some moved, and running the same failover again
//! finishes the others (moving a member to the point it is at writes
//! nothing).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use diskferry_protocol::{Consistency, ErrorCode, Generation};
use diskferry_sync_engine::apply::Target;
use diskferry_sync_engine::points::{self, PointInfo};
use diskferry_sync_engine::Error;
use serde_json::json;

use super::target_arg::{open_for_move, open_waiting, state_root, Move, Resolved};
use crate::cli::TargetArg;
use crate::groups;
use crate::jobs::JobResult;
use crate::output::print_json;
use crate::units::format_time;

/// A point every member holds.
struct GroupPoint {
    generation: Generation,
    created_unix_ns: i64,
    /// The weakest of the members' labels.
    consistency: Consistency,
    /// Every member is at it.
    current: bool,
}

/// The group's members, opened (recovered and locked), in the group's order.
fn open_members(
    group: &str,
    config: Option<&Path>,
    state_dir: Option<PathBuf>,
    wait: u64,
) -> Result<(Vec<Resolved>, Vec<Target>), Error> {
    let (resolved, _, targets) = open_members_for(group, config, state_dir, wait, None)?;
    Ok((resolved, targets))
}

/// The members, opened, and their moves (none without a kind).
/// Moves before targets: see [`open_for_move`].
type OpenedMembers = (Vec<Resolved>, Vec<Move>, Vec<Target>);

/// [`open_members`] for the move `kind` (a local agent releases each
/// member first, and shows a job per member).
fn open_members_for(
    group: &str,
    config: Option<&Path>,
    state_dir: Option<PathBuf>,
    wait: u64,
    kind: Option<&str>,
) -> Result<OpenedMembers, Error> {
    let root = state_root(config, state_dir)?;
    let m = groups::load(&root, group)?.ok_or_else(|| {
        Error::new(ErrorCode::NotFound, format!("this agent knows no group {group:?} (in {})", root.display()))
            .hint("a group is learned from its first `diskferry push-group`; check --config or --state-dir")
    })?;
    let resolved: Vec<Resolved> = m
        .members
        .into_iter()
        .map(|(name, path)| Resolved { path, state_root: root.clone(), name: Some(name) })
        .collect();
    let wait = Duration::from_secs(wait);
    let Some(kind) = kind else {
        let targets = resolved.iter().map(|r| open_waiting(r, wait)).collect::<Result<Vec<_>, _>>()?;
        return Ok((resolved, Vec::new(), targets));
    };
    let (moves, targets) =
        resolved.iter().map(|r| open_for_move(r, kind, wait)).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
    Ok((resolved, moves, targets))
}

/// Ends each member's job with the group move's result.
fn finish_moves<T>(moves: &[Move], r: &Result<T>, generation: Option<String>) {
    for m in moves {
        m.job.finish_anyhow(r, |_| JobResult::ok(generation.clone(), None));
    }
}

fn group_points(targets: &[Target]) -> Vec<GroupPoint> {
    let lists: Vec<Vec<PointInfo>> = targets.iter().map(points::list).collect();
    let Some(first) = lists.first() else { return Vec::new() };
    first
        .iter()
        .filter_map(|p| {
            let all: Vec<&PointInfo> =
                lists.iter().filter_map(|l| l.iter().find(|q| q.generation == p.generation)).collect();
            (all.len() == lists.len()).then(|| GroupPoint {
                generation: p.generation,
                created_unix_ns: p.created_unix_ns,
                consistency: all.iter().map(|q| q.consistency).min().unwrap_or(Consistency::Fuzzy),
                current: all.iter().all(|q| q.current),
            })
        })
        .collect()
}

pub fn points(group: &str, config: Option<&Path>, state_dir: Option<PathBuf>, wait: u64, json: bool) -> Result<()> {
    let (resolved, targets) = open_members(group, config, state_dir, wait)?;
    let list = group_points(&targets);
    if json {
        let items: Vec<_> = list
            .iter()
            .map(|p| {
                json!({
                    "generation": p.generation.to_hex(),
                    "created_unix_ns": p.created_unix_ns,
                    "time": format_time(p.created_unix_ns),
                    "consistency": p.consistency.as_str(),
                    "current": p.current,
                })
            })
            .collect();
        let members: Vec<_> = resolved.iter().map(|r| json!({ "name": r.name, "target": r.path })).collect();
        print_json(&json!({ "group": group, "members": members, "points": items }));
        return Ok(());
    }
    let names: Vec<&str> = resolved.iter().filter_map(|r| r.name.as_deref()).collect();
    crate::outln!("group {group}: {}", names.join(", "));
    if list.is_empty() {
        crate::outln!("no group points (no generation every member holds)");
    }
    for p in &list {
        let mark = if p.current { "  (current)" } else { "" };
        crate::outln!(
            "{:<32}  {:<23}  {}{mark}",
            p.generation.to_hex(),
            format_time(p.created_unix_ns),
            p.consistency.as_str()
        );
    }
    Ok(())
}

pub fn failover(
    group: &str,
    point: Option<Generation>,
    a: &TargetArg,
    state_dir: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let (resolved, moves, mut targets) =
        open_members_for(group, a.config.as_deref(), state_dir, a.wait, Some("failover"))?;
    let r = failover_members(group, point, &resolved, &mut targets, json);
    finish_moves(&moves, &r, r.as_ref().ok().map(|g| g.to_hex()));
    r.map(|_| ())
}

fn failover_members(
    group: &str,
    point: Option<Generation>,
    resolved: &[Resolved],
    targets: &mut [Target],
    json: bool,
) -> Result<Generation> {
    let list = group_points(targets);
    let chosen = match point {
        Some(g) => list.iter().find(|p| p.generation == g).ok_or_else(|| {
            Error::new(ErrorCode::NoSuchPoint, format!("{g} is not a point of every member of group {group:?}"))
                .hint("`diskferry points --group NAME` lists the group points")
        })?,
        None => list.iter().find(|p| p.consistency.is_recovery_point()).ok_or_else(|| {
            Error::new(ErrorCode::NoSuchPoint, format!("group {group:?} has no consistent group point"))
                .hint("push the group with a snapshot (push-group --snapshot reflink) first")
        })?,
    };
    let (g, consistency) = (chosen.generation, chosen.consistency);
    let mut moved = Vec::new();
    for (r, t) in resolved.iter().zip(targets.iter_mut()) {
        let m = t.failover(Some(g)).map_err(|e| {
            Error::new(
                e.code,
                format!("member {}: {} (members before it are live at {g})", r.path.display(), e.message),
            )
            .hint("run the same failover again: it finishes the members left")
        })?;
        moved.push(json!({
            "name": r.name, "target": r.path, "moved": m.moved, "from": m.from.to_hex(),
            "bytes_restored": m.bytes_restored,
        }));
    }
    if json {
        print_json(&json!({
            "group": group, "generation": g.to_hex(), "consistency": consistency.as_str(), "members": moved,
        }));
    } else {
        crate::outln!("group {group} is live at {g} ({}) on {} members", consistency.as_str(), moved.len());
    }
    Ok(g)
}

pub fn commit(group: &str, a: &TargetArg, state_dir: Option<PathBuf>, json: bool) -> Result<()> {
    let (resolved, moves, mut targets) =
        open_members_for(group, a.config.as_deref(), state_dir, a.wait, Some("commit"))?;
    let r = commit_members(group, &resolved, &mut targets, json);
    finish_moves(&moves, &r, None);
    r
}

fn commit_members(group: &str, resolved: &[Resolved], targets: &mut [Target], json: bool) -> Result<()> {
    // Only a group point is kept on every member: members at different
    // points would keep no point in common.
    if !group_points(targets).iter().any(|p| p.current) {
        return Err(Error::new(
            ErrorCode::NoSuchPoint,
            format!("the members of group {group:?} are not at one group point"),
        )
        .hint("fail the group over to a group point first (`diskferry failover --group NAME`), then commit")
        .into());
    }
    let mut out = Vec::new();
    for (r, t) in resolved.iter().zip(targets.iter_mut()) {
        let c = t.commit_point()?;
        out.push(json!({
            "name": r.name, "target": r.path, "generation": c.kept.to_hex(),
            "dropped": c.dropped.iter().map(|g| g.to_hex()).collect::<Vec<_>>(),
        }));
    }
    if json {
        print_json(&json!({ "group": group, "members": out }));
    } else {
        crate::outln!("group {group}: every member keeps its current point; older ones dropped");
    }
    Ok(())
}

/// `ungroup --group NAME`: every member recovered (an interrupted group
/// commit ends all old or all new first) and held, then the group's
/// membership goes. Each member keeps its points; they are no longer
/// listed or pruned as one.
pub fn ungroup(a: crate::cli::UngroupArgs) -> Result<()> {
    let (group, json) = (a.group.as_str(), a.common.json);
    let (resolved, moves, targets) =
        open_members_for(group, a.config.as_deref(), a.common.state_dir.clone(), a.wait, Some("ungroup"))?;
    let r = members_apart(group, &resolved, &targets, a.force)
        .and_then(|()| state_root(a.config.as_deref(), a.common.state_dir.clone()))
        .and_then(|root| groups::forget(&root, group));
    let r = r.map_err(anyhow::Error::from);
    finish_moves(&moves, &r, None);
    r?;
    let names: Vec<&str> = resolved.iter().filter_map(|r| r.name.as_deref()).collect();
    if json {
        let members: Vec<_> = resolved.iter().map(|r| json!({ "name": r.name, "target": r.path })).collect();
        print_json(&json!({ "group": group, "members": members, "forgotten": true }));
    } else {
        crate::outln!(
            "group {group} forgotten: {} may be pushed alone or in another group; their points stay",
            names.join(", ")
        );
    }
    Ok(())
}

/// Refuses to forget a group some of whose members are live while they
/// are not all at one group point (a group failover cut part way): only
/// `failover --group` brings them together again, and it needs the group.
fn members_apart(group: &str, resolved: &[Resolved], targets: &[Target], force: bool) -> Result<(), Error> {
    let live = |t: &Target| t.role() == Some(diskferry_sync_engine::apply::Role::Live);
    if force || !targets.iter().any(live) || group_points(targets).iter().any(|p| p.current) {
        return Ok(());
    }
    let roles: Vec<String> = resolved
        .iter()
        .zip(targets)
        .map(|(r, t)| format!("{} {}", r.name.as_deref().unwrap_or("?"), if live(t) { "live" } else { "replica" }))
        .collect();
    Err(Error::new(
        ErrorCode::GroupMembers,
        format!("the members of group {group:?} are not at one group point and some are live ({})", roles.join(", ")),
    )
    .hint("finish the group's failover first (run `diskferry failover --group NAME` again), or pass --force to forget it anyway"))
}

/// Each member's image of a test failover: `DIR/MEMBER.img`.
fn image_of(dir: &Path, r: &Resolved) -> PathBuf {
    dir.join(format!("{}.img", r.name.as_deref().unwrap_or("member")))
}

/// `test-failover --group NAME --point G --out DIR`: a writable image of
/// group point G for every member in DIR, each pinning its point; all or
/// none (a member that fails takes the images made before it back).
pub fn test_failover(
    group: &str,
    point: Generation,
    dir: &Path,
    config: Option<&Path>,
    state_dir: Option<PathBuf>,
    wait: u64,
    json: bool,
) -> Result<()> {
    let (resolved, mut targets) = open_members(group, config, state_dir, wait)?;
    if !group_points(&targets).iter().any(|p| p.generation == point) {
        return Err(Error::new(
            ErrorCode::NoSuchPoint,
            format!("{point} is not a point of every member of group {group:?}"),
        )
        .hint("`diskferry points --group NAME` lists the group points")
        .into());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(diskferry_sync_engine::Place::Target, "creating", dir, e))?;
    let dir = crate::state::canonical_target(dir)?;
    let mut made: Vec<(usize, PathBuf)> = Vec::new();
    let mut out = Vec::new();
    for (i, (r, t)) in resolved.iter().zip(targets.iter_mut()).enumerate() {
        let image = image_of(&dir, r);
        let result = t.pin(point, &image).and_then(|()| {
            points::export(t, point, &image).inspect_err(|_| {
                let _ = t.unpin(&image);
            })
        });
        match result {
            Ok(report) => {
                out.push(json!({ "name": r.name, "target": r.path, "out": image, "reflinked": report.reflinked }));
                made.push((i, image));
            }
            Err(e) => {
                for (j, image) in made {
                    let _ = std::fs::remove_file(&image);
                    let _ = targets[j].unpin(&image);
                }
                return Err(Error::new(e.code, format!("member {}: {}", r.path.display(), e.message))
                    .hint("no test image of the group was kept")
                    .into());
            }
        }
    }
    if json {
        print_json(&json!({ "group": group, "generation": point.to_hex(), "out": dir, "members": out }));
    } else {
        crate::outln!(
            "test images of group {group} at {point} in {}; pinned until `diskferry test-failover --group {group} --cleanup {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// `test-failover --group NAME --cleanup DIR`: removes every member's image
/// in DIR and unpins its point.
pub fn test_cleanup(
    group: &str,
    dir: &Path,
    config: Option<&Path>,
    state_dir: Option<PathBuf>,
    wait: u64,
    json: bool,
) -> Result<()> {
    let (resolved, mut targets) = open_members(group, config, state_dir, wait)?;
    let dir = crate::state::canonical_target(dir)?;
    let mut removed = Vec::new();
    for (r, t) in resolved.iter().zip(targets.iter_mut()) {
        let image = image_of(&dir, r);
        if !t.pins().iter().any(|p| p.clone == image) {
            continue;
        }
        std::fs::remove_file(&image)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|e| Error::io(diskferry_sync_engine::Place::Target, "removing", &image, e))?;
        t.unpin(&image)?;
        removed.push(image);
    }
    if removed.is_empty() {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("{} holds no test image of group {group:?}", dir.display()),
        )
        .hint("give the directory test-failover --group --out made")
        .into());
    }
    if json {
        print_json(&json!({ "group": group, "removed": removed }));
    } else {
        crate::outln!("removed {} test image(s) of group {group}; their points are no longer pinned", removed.len());
    }
    Ok(())
}
