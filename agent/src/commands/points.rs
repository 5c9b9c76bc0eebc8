//! `diskferry points`.

use anyhow::Result;

use diskferry_sync_engine::points;
use serde_json::json;

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;

use crate::cli::PointsArgs;
use crate::output::print_json;
use crate::state;
use crate::units::{format_time, human_bytes};

pub fn run(a: PointsArgs) -> Result<()> {
    let dst = match (&a.dst, &a.group) {
        (Some(d), _) => d.clone(),
        (None, Some(g)) => {
            let state_dir = a.common.state_dir.clone();
            return super::group_moves::points(g, a.config.as_deref(), state_dir, a.wait.wait, a.common.json);
        }
        (None, None) => return Err(Error::new(ErrorCode::Usage, "name a target disk or --group").into()),
    };
    let state_root = state::prepare(&state::resolve(a.common.state_dir.clone()))?;
    let path = state::canonical_target(&dst)?;
    let target = super::target_arg::open_path_waiting(&state_root, &path, a.wait.wait)?;
    let list = points::list(&target);
    if a.common.json {
        let items: Vec<_> = list
            .iter()
            .map(|p| {
                json!({
                    "generation": p.generation.to_hex(),
                    "created_unix_ns": p.created_unix_ns,
                    "time": format_time(p.created_unix_ns),
                    "consistency": p.consistency.as_str(),
                    "disk_bytes": p.disk_bytes,
                    "undo_bytes": p.undo_bytes,
                    "current": p.current,
                    "pinned": p.pinned,
                    "discarded": p.discarded,
                })
            })
            .collect();
        let role = target.role().map(|r| r.as_str());
        print_json(&json!({ "target": path, "role": role, "points": items }));
        return Ok(());
    }
    if let Some(role) = target.role() {
        crate::outln!("{}: {}", dst.display(), role.as_str());
    }
    if list.is_empty() {
        crate::outln!("{}: no recovery points", dst.display());
        return Ok(());
    }
    crate::outln!("{:<32}  {:<23}  {:<16}  {:>12}  {:>12}", "GENERATION", "TIME", "CONSISTENCY", "SIZE", "UNDO");
    for p in &list {
        crate::outln!(
            "{:<32}  {:<23}  {:<16}  {:>12}  {:>12}{}",
            p.generation.to_hex(),
            format_time(p.created_unix_ns),
            p.consistency.as_str(),
            human_bytes(p.disk_bytes),
            human_bytes(p.undo_bytes),
            [(p.current, "  (current)"), (p.pinned, "  (pinned)"), (p.discarded, "  (discarded changes)")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, s)| *s)
                .collect::<String>()
        );
    }
    Ok(())
}
