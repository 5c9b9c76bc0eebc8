//! `diskferry push-group`: several disks pushed as one replication group.
//! One snapshot moment for all of them; the members' sessions run side by
//! side, each tagged with the group push, and the target agent commits
//! them as one group point (`serve/group.rs`) — or none of them, if one
//! fails.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use diskferry_protocol::message::{GroupTag, MAX_GROUP_MEMBERS};
use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::local::NoProgress;
use diskferry_sync_engine::Error;
use serde_json::json;

use super::net::{push_json, push_options, setup};
use crate::cli::PushGroupArgs;
use crate::output::print_json;
use crate::push::{self, PushReport};
use crate::snapshot;
use crate::units::{cpu_seconds, human_bytes, round_secs};

pub fn run(a: PushGroupArgs) -> Result<()> {
    let name = TargetName::new(&a.group).map_err(|e| Error::new(ErrorCode::Usage, format!("--group: {e}")))?;
    let members = u16::try_from(a.disks.len()).unwrap_or(u16::MAX);
    if members > MAX_GROUP_MEMBERS {
        return Err(Error::new(ErrorCode::Usage, format!("a group has at most {MAX_GROUP_MEMBERS} disks")).into());
    }
    if a.opts.qmp.is_some() {
        return Err(Error::new(ErrorCode::Usage, "--qmp names one disk's node: push-group does not take it").into());
    }
    let (id, rt) = setup(&a.opts)?;
    let tag = GroupTag { name, push: rand::random::<u128>() | 1, members };
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let mut all = Vec::with_capacity(a.disks.len());
    for (src, target) in &a.disks {
        let mut o = push_options(src, target, &a.opts, &rt)?;
        o.group = Some(tag.clone());
        o.cancel = Some(cancel_rx.clone());
        all.push(o);
    }
    for (i, o) in all.iter().enumerate() {
        let twice = |f: &dyn Fn(&push::PushOptions) -> String| all[..i].iter().any(|p| f(p) == f(o));
        if twice(&|p| p.source.display().to_string()) || twice(&|p| p.target.as_str().to_string()) {
            return Err(Error::new(
                ErrorCode::Usage,
                format!("{} or {} is in the group twice", o.source.display(), o.target),
            )
            .into());
        }
    }
    // One moment for every disk: the pre hook, every snapshot, the post hook.
    let sources: Vec<_> = all.iter().map(|o| o.source.clone()).collect();
    let snaps = snapshot::take_all(&sources, &all[0].snapshot)?;
    let start = Instant::now();
    let id = Arc::new(id);
    let results: Result<Vec<PushReport>, Error> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, (o, snap)) in all.iter().cloned().zip(snaps).enumerate() {
            let id = id.clone();
            set.spawn(async move {
                let r = push::push_with(&id, o, Some(snap), Arc::new(NoProgress), &mut false).await;
                (i, r)
            });
        }
        let mut reports: Vec<Option<PushReport>> = vec![None; all.len()];
        let mut failed: Vec<(usize, Error)> = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|e| Error::new(ErrorCode::Internal, format!("member task: {e}")))?;
            match r {
                Ok(report) => reports[i] = Some(report),
                Err(e) => {
                    // The others close their connections: the target lets
                    // go of every member at once and commits none of them.
                    let _ = cancel_tx.send(true);
                    failed.push((i, e));
                }
            }
        }
        // The cause, not a member cancelled because of it.
        let rank = |e: &Error| match e.code {
            ErrorCode::Cancelled => 2,
            ErrorCode::Connection => 1,
            _ => 0,
        };
        failed.sort_by_key(|(_, e)| rank(e));
        if let Some((i, e)) = failed.into_iter().next() {
            let what = format!("member {} ({}): {}", all[i].target, all[i].source.display(), e.message);
            return Err(Error { message: what, ..e });
        }
        Ok(reports.into_iter().flatten().collect())
    });
    let reports = results?;
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
            "seconds": round_secs(secs),
            "cpu_seconds": round_secs(cpu_seconds()),
        }));
    } else {
        println!("pushed group {} to {} as one point, generation {generation}", a.group, a.opts.peer);
        for (r, o) in reports.iter().zip(&all) {
            println!(
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
