//! `diskferry push-group`: several disks pushed as one replication group.
//! One snapshot moment for all of them; the members' sessions run side by
//! side, each tagged with the group push, and the target agent commits
//! them as one group point (`serve/group.rs`) — or none of them, if one
//! fails.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::Error;
use serde_json::json;

use super::net::{push_json, push_options, setup};
use crate::cli::PushGroupArgs;
use crate::output::print_json;
use crate::push;
use crate::units::{cpu_seconds, human_bytes, round_secs};

pub fn run(a: PushGroupArgs) -> Result<()> {
    let name = TargetName::new(&a.group).map_err(|e| Error::new(ErrorCode::Usage, format!("--group: {e}")))?;
    let (id, rt) = setup(&a.opts)?;
    let all =
        a.disks.iter().map(|(src, target)| push_options(src, target, &a.opts, &rt)).collect::<Result<Vec<_>>>()?;
    // A job per member, as the agent's own group pushes show.
    let jobs: Vec<_> = all.iter().map(|o| Arc::new(super::net::job_of_push("push", o, &a.opts.peer))).collect();
    let progress = jobs.iter().map(|j| j.clone() as Arc<dyn diskferry_sync_engine::Progress + Send + Sync>).collect();
    let start = Instant::now();
    let reports = push::group::push_members(&rt, &Arc::new(id), &name, &all, progress, &mut false);
    for (i, job) in jobs.iter().enumerate() {
        match &reports {
            Ok(r) => job.finish(r.get(i).map_or_else(
                || crate::jobs::JobResult::ok(None, None),
                // The members share one connection: its bytes once.
                |r| crate::jobs::JobResult { wire_bytes: if i == 0 { r.wire_bytes } else { 0 }, ..r.job_result() },
            )),
            Err(e) => job.finish(crate::jobs::JobResult::failed(e)),
        }
    }
    let reports = reports?;
    let secs = start.elapsed().as_secs_f64();
    let generation = reports.first().map(|r| r.committed.generation.to_hex()).unwrap_or_default();
    if a.opts.common.json {
        let members: Vec<serde_json::Value> = reports
            .iter()
            .zip(&all)
            .map(|(r, o)| {
                let mut v = push_json(r, secs, 0.0);
                v["target"] = json!(o.target.as_str());
                v["source"] = json!(o.source.display().to_string());
                v
            })
            .collect();
        print_json(&json!({
            "group": a.group,
            "generation": generation,
            "members": members,
            "bytes_sent": reports.iter().map(|r| r.bytes_sent).sum::<u64>(),
            "wire_bytes": reports.first().map_or(0, |r| r.wire_bytes),
            "seconds": round_secs(secs),
            "cpu_seconds": round_secs(cpu_seconds()),
        }));
    } else {
        crate::outln!("pushed group {} to {} as one point, generation {generation}", a.group, a.opts.peer);
        for (r, o) in reports.iter().zip(&all) {
            crate::outln!(
                "  {:<16} {} changed blocks, {} sent, {} ({})",
                o.target.as_str(),
                r.committed.blocks_changed,
                human_bytes(r.bytes_sent),
                r.consistency.as_str(),
                o.source.display()
            );
        }
    }
    Ok(())
}
