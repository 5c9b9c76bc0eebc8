//! A replication group's push from the source side: one snapshot moment for
//! every member (the pre hook, every snapshot, the post hook), then the
//! members' sessions side by side, each tagged with the same group push so
//! the target commits them as one point — or none, if one fails. Used by
//! `push-group` and by `failover-sync --group`.

use std::sync::Arc;

use diskferry_protocol::message::{GroupTag, MAX_GROUP_MEMBERS};
use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::local::NoProgress;
use diskferry_sync_engine::Error;

use super::{push_with, PushOptions, PushReport};
use crate::identity::Identity;
use crate::snapshot;

/// Checks a group's members before anything is read: at most
/// [`MAX_GROUP_MEMBERS`], no disk or target twice, no QMP node.
pub fn check_members(members: &[PushOptions]) -> Result<(), Error> {
    if members.len() > usize::from(MAX_GROUP_MEMBERS) {
        return Err(Error::new(ErrorCode::Usage, format!("a group has at most {MAX_GROUP_MEMBERS} disks")));
    }
    if members.iter().any(|o| o.qmp.is_some()) {
        return Err(Error::new(ErrorCode::Usage, "--qmp names one disk's node: a group push does not take it"));
    }
    for (i, o) in members.iter().enumerate() {
        let twice = |f: &dyn Fn(&PushOptions) -> String| members[..i].iter().any(|p| f(p) == f(o));
        if twice(&|p| p.source.display().to_string()) || twice(&|p| p.target.as_str().to_string()) {
            return Err(Error::new(
                ErrorCode::Usage,
                format!("{} or {} is in the group twice", o.source.display(), o.target),
            ));
        }
    }
    Ok(())
}

/// Each member's progress (none: nobody watches).
pub type MemberProgress = Vec<Arc<dyn diskferry_sync_engine::local::Progress + Send + Sync>>;

/// Pushes `members` as one group point of group `name`, in the members'
/// order, reporting member `i`'s progress to `progress[i]` if given.
/// `commit_requested` tells whether any member asked its target to
/// commit: a failure after that may have landed (and been promoted).
pub fn push_members(
    rt: &tokio::runtime::Runtime,
    id: &Arc<Identity>,
    name: &TargetName,
    members: &[PushOptions],
    progress: MemberProgress,
    commit_requested: &mut bool,
) -> Result<Vec<PushReport>, Error> {
    rt.block_on(push_members_async(id, name, members, progress, commit_requested))
}

/// [`push_members`] on the caller's runtime (the agent's scheduler).
pub async fn push_members_async(
    id: &Arc<Identity>,
    name: &TargetName,
    members: &[PushOptions],
    progress: MemberProgress,
    commit_requested: &mut bool,
) -> Result<Vec<PushReport>, Error> {
    check_members(members)?;
    let Some(first) = members.first() else {
        return Err(Error::new(ErrorCode::Usage, "a group push needs at least one --disk"));
    };
    let tag = GroupTag {
        name: name.clone(),
        push: rand::random::<u128>() | 1,
        members: u16::try_from(members.len()).unwrap_or(MAX_GROUP_MEMBERS),
    };
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    // One moment for every disk: the pre hook, every snapshot, the post hook.
    let sources: Vec<_> = members.iter().map(|o| o.source.clone()).collect();
    let so = first.snapshot.clone();
    let snaps = tokio::task::spawn_blocking(move || snapshot::take_all(&sources, &so))
        .await
        .map_err(|e| Error::new(ErrorCode::Internal, format!("snapshot task: {e}")))??;
    // Every member on one connection: one handshake, one flow-control
    // budget and one congestion controller for the whole group.
    let (endpoint, conn) = super::connect(id, first).await?;
    let (reports, requested) = {
        let mut set = tokio::task::JoinSet::new();
        for (i, (o, snap)) in members.iter().cloned().zip(snaps).enumerate() {
            let id = id.clone();
            let o = PushOptions {
                group: Some(tag.clone()),
                cancel: Some(cancel_rx.clone()),
                shared: Some(conn.clone()),
                // One limit for the group, as for its one connection.
                pace: first.pace.clone(),
                ..o
            };
            let watched = progress.get(i).cloned().unwrap_or_else(|| Arc::new(NoProgress));
            set.spawn(async move {
                let mut requested = false;
                let r = push_with(&id, o, Some(snap), watched, &mut requested).await;
                (i, r, requested)
            });
        }
        let mut reports: Vec<Option<PushReport>> = vec![None; members.len()];
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut any_requested = false;
        while let Some(joined) = set.join_next().await {
            let (i, r, requested) = match joined {
                Ok(x) => x,
                Err(e) => {
                    let _ = cancel_tx.send(true);
                    failed.push((0, Error::new(ErrorCode::Internal, format!("member task: {e}"))));
                    continue;
                }
            };
            any_requested |= requested;
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
        let result = match failed.into_iter().next() {
            Some((i, e)) => {
                let what = format!("member {} ({}): {}", members[i].target, members[i].source.display(), e.message);
                Err(Error { message: what, ..e })
            }
            None => Ok(reports.into_iter().flatten().collect::<Vec<_>>()),
        };
        (result, any_requested)
    };
    let wire = conn.stats();
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(std::time::Duration::from_millis(5), endpoint.wait_idle()).await;
    *commit_requested = requested;
    // Each member's report has the connection's bytes at its end; the
    // group's are the connection's in all.
    reports.map(|mut all| {
        for r in &mut all {
            r.wire_bytes = wire.udp_tx.bytes + wire.udp_rx.bytes;
        }
        all
    })
}
