//! `diskferry failover-sync`: sync before failover. Phase 1 pushes deltas
//! while the VM runs (fuzzy points) until they converge; phase 2 runs the
//! quiesce command, ships the last delta as a consistent point — promoted
//! on the target in the same session with `--promote` — and reports the
//! downtime: from the quiesce command's exit to the commit. A VM with
//! several disks (`--group NAME --disk SRC=TARGET ...`) is pushed as a
//! replication group every pass: one point for all its disks, promoted
//! together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use diskferry_protocol::{Consistency, ErrorCode, TargetName};
use diskferry_sync_engine::apply::{Role, Target, TargetOptions};
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::Error;
use serde_json::json;

use super::net::{push_json, push_options, setup};
use crate::cli::FailoverSyncArgs;
use crate::hooks;
use crate::ids::{new_generation, now_unix_ns};
use crate::output::print_json;
use crate::progress::Bar;
use crate::push::{self, PushOptions, PushReport};
use crate::units::{cpu_seconds, human_bytes, round_secs};

/// One pass while the VM runs.
struct Pass {
    bytes_changed: u64,
    bytes_sent: u64,
    seconds: f64,
}

/// What is pushed every pass: one disk, or a VM's disks as one group.
struct Disks {
    members: Vec<PushOptions>,
    group: Option<TargetName>,
}

/// One push of every disk: the members' reports, in order.
struct Pushed {
    reports: Vec<PushReport>,
    seconds: f64,
}

impl Pushed {
    fn changed(&self) -> u64 {
        self.reports.iter().map(|r| r.committed.bytes_written).sum()
    }
    fn sent(&self) -> u64 {
        self.reports.iter().map(|r| r.bytes_sent).sum()
    }
    fn consistency(&self) -> Consistency {
        self.reports.iter().map(|r| r.consistency).min().unwrap_or(Consistency::Fuzzy)
    }
    fn promoted(&self) -> bool {
        self.reports.iter().all(|r| r.committed.promoted)
    }
    fn generation(&self) -> String {
        self.reports.first().map(|r| r.committed.generation.to_hex()).unwrap_or_default()
    }
    fn mode(&self) -> &'static str {
        match self.reports.iter().any(|r| r.mode() == "full") {
            true => "full",
            false => "delta",
        }
    }
}

impl Disks {
    fn sources(&self) -> std::ffi::OsString {
        let paths: Vec<_> = self.members.iter().map(|o| o.source.display().to_string()).collect();
        paths.join("\n").into()
    }
    fn what(&self) -> String {
        match &self.group {
            Some(g) => format!("group {g} ({} disks)", self.members.len()),
            None => self.members.first().map(|o| o.source.display().to_string()).unwrap_or_default(),
        }
    }
}

fn disks(a: &FailoverSyncArgs, rt: &tokio::runtime::Runtime) -> Result<Disks> {
    match (&a.group, &a.src, &a.target) {
        (Some(g), _, _) => {
            let group = TargetName::new(g).map_err(|e| Error::new(ErrorCode::Usage, format!("--group: {e}")))?;
            let members =
                a.disks.iter().map(|(src, t)| push_options(src, t, &a.opts, rt)).collect::<Result<Vec<_>>>()?;
            crate::push::group::check_members(&members)?;
            Ok(Disks { members, group: Some(group) })
        }
        (None, Some(src), Some(target)) => {
            Ok(Disks { members: vec![push_options(src, target, &a.opts, rt)?], group: None })
        }
        _ => Err(Error::new(ErrorCode::Usage, "give SRC --target NAME, or --group NAME --disk SRC=TARGET ...").into()),
    }
}

pub fn run(a: FailoverSyncArgs) -> Result<()> {
    let (id, rt) = setup(&a.opts)?;
    let d = disks(&a, &rt)?;
    let job = Arc::new(match d.members.first() {
        Some(o) if d.group.is_none() => super::net::job_of_push("failover-sync", o, &a.opts.peer),
        _ => match d.members.first().and_then(|o| o.state_root.as_ref()) {
            Some(root) => crate::local_agent::AgentJob::start(
                root,
                "failover-sync",
                &d.what(),
                &a.opts.peer,
                d.group.as_ref().map_or("", |g| g.as_str()),
            ),
            None => crate::local_agent::AgentJob::none(),
        },
    });
    let r = run_disks(&a, Arc::new(id), &rt, &d, &job);
    job.finish_anyhow(&r, |(g, c)| crate::jobs::JobResult::ok(Some(g.clone()), Some(c.clone())));
    r.map(|_| ())
}

/// The passes, the quiesce and the last delta; the last point's generation and consistency.
fn run_disks(
    a: &FailoverSyncArgs,
    id: Arc<crate::identity::Identity>,
    rt: &tokio::runtime::Runtime,
    d: &Disks,
    job: &Arc<crate::local_agent::AgentJob>,
) -> Result<(String, String)> {
    let json = a.opts.common.json;
    let push_all = |fuzzy: bool, promote: bool, requested: &mut bool| -> Result<Pushed, Error> {
        let start = Instant::now();
        let members: Vec<PushOptions> = d.members.iter().map(|o| PushOptions { fuzzy, promote, ..o.clone() }).collect();
        let reports = match (&d.group, members.first()) {
            (Some(g), _) => push::group::push_members(rt, &id, g, &members, Vec::new(), requested)?,
            (None, Some(o)) => {
                let o = o.clone();
                let bar = Arc::new(Bar::new().reporting(job.clone()));
                let r = rt.block_on(push::push_tracked(&id, o, bar.clone(), requested));
                bar.finish();
                vec![r?]
            }
            (None, None) => return Err(Error::new(ErrorCode::Usage, "no disk to push")),
        };
        Ok(Pushed { reports, seconds: start.elapsed().as_secs_f64() })
    };

    // Phase 1: passes while the VM runs; never recovery points.
    let mut passes: Vec<Pass> = Vec::new();
    let mut not_shrinking = 0;
    for n in 1..=a.max_passes {
        job.set_phase("pass while running");
        let r = push_all(true, false, &mut false)?;
        let (changed, seconds) = (r.changed(), r.seconds);
        if let Some(prev) = passes.last() {
            not_shrinking = if changed >= prev.bytes_changed { not_shrinking + 1 } else { 0 };
        }
        if !json {
            eprintln!(
                "pass {n}: {} changed, {} sent in {seconds:.2} s ({})",
                human_bytes(changed),
                human_bytes(r.sent()),
                r.mode()
            );
        }
        passes.push(Pass { bytes_changed: changed, bytes_sent: r.sent(), seconds });
        if changed <= a.converge_bytes || not_shrinking >= 2 {
            break;
        }
    }

    // Phase 2: quiesce, the last delta, a consistent point.
    let timeout = Duration::from_secs(a.quiesce_timeout);
    let q0 = Instant::now();
    let sources = d.sources();
    let env = [("DISKFERRY_SOURCE", sources.as_os_str())];
    // The downtime starts when the quiesce command exits.
    job.set_phase("quiesce");
    let (_, down) = hooks::run_timed("quiesce", &a.quiesce_cmd, &[], &env, timeout)
        .map_err(|e| unquiesce(a, d, e, "the quiesce command failed; the VM may be partly quiesced"))?;
    let quiesce_seconds = (down - q0).as_secs_f64();
    let mut commit_requested = false;
    job.set_phase("last delta");
    let r = match push_all(false, a.promote, &mut commit_requested) {
        Ok(x) => x,
        // The commit may have landed, and gone live: restarting the VM here
        // could make two live copies. The operator looks first.
        Err(e) if commit_requested => {
            return Err(Error {
                message: format!(
                    "the VM is quiesced; the last delta was sent and may have been committed{} on the target: {}",
                    if a.promote { " and promoted" } else { "" },
                    e.message
                ),
                hint: Some(match &d.group {
                    None => "check `diskferry points` on the target before restarting anything here: if the point \
                             is there, the failover happened; if not, run failover-sync again to resume"
                        .into(),
                    Some(g) => format!(
                        "check `diskferry points --group {g}` on the target before restarting anything here: if a \
                         new group point is there, the failover happened (`diskferry failover --group {g}` there \
                         finishes members left unpromoted); if not, run failover-sync again to resume"
                    ),
                }),
                ..e
            }
            .into());
        }
        Err(e) => {
            return Err(unquiesce(
                a,
                d,
                e,
                "the VM is quiesced and the last delta is not committed; run failover-sync again to resume it",
            )
            .into())
        }
    };
    let downtime = down.elapsed().as_secs_f64();
    if r.consistency() == Consistency::Fuzzy {
        let e = Error::new(
            ErrorCode::SourceChanged,
            format!("{} was still written after the quiesce command: the last point is fuzzy", d.what()),
        )
        .hint("make the quiesce command wait until the VM is down (or frozen), then run failover-sync again");
        return Err(unquiesce(a, d, e, "").into());
    }
    if a.promote && !r.promoted() {
        let fix = match &d.group {
            Some(g) => format!("`diskferry failover --group {g} --point {}`", r.generation()),
            None => "`diskferry failover`".to_string(),
        };
        return Err(Error::new(
            ErrorCode::Internal,
            format!("the VM is quiesced; the target committed {} (consistent) but did not promote it", r.generation()),
        )
        .hint(format!("see the target agent's log, then run {fix} there and start the VM on that side"))
        .into());
    }
    // The source disks, if they are live targets of this agent, step down
    // to replicas at the generation just shipped: the way back is a delta.
    let mut demoted = Vec::new();
    if a.promote {
        for o in &d.members {
            let g = demote_source(o).map_err(|e| Error {
                message: format!(
                    "the target is live at {}, but {} could not be demoted here: {}",
                    r.generation(),
                    o.source.display(),
                    e.message
                ),
                hint: Some(format!(
                    "do not start the VM here; run `diskferry demote {}` (with this agent's --config or --state-dir)",
                    o.source.display()
                )),
                ..e
            })?;
            demoted.extend(g.map(|g| (o.source.clone(), g)));
        }
    }

    if json {
        let mut v = match (&d.group, r.reports.as_slice()) {
            (None, [one]) => push_json(one, r.seconds, cpu_seconds()),
            _ => json!({
                "group": d.group.as_ref().map(|g| g.as_str()),
                "generation": r.generation(),
                "consistency": r.consistency().as_str(),
                "bytes_sent": r.sent(),
                "bytes_written": r.changed(),
                "seconds": round_secs(r.seconds),
                "cpu_seconds": round_secs(cpu_seconds()),
                "members": r.reports.iter().zip(&d.members).map(|(m, o)| {
                    let mut v = push_json(m, r.seconds, 0.0);
                    v["target"] = json!(o.target.as_str());
                    v["source"] = json!(o.source.display().to_string());
                    v
                }).collect::<Vec<_>>(),
            }),
        };
        v["passes"] = passes
            .iter()
            .map(|p| json!({"bytes_changed": p.bytes_changed, "bytes_sent": p.bytes_sent, "seconds": round_secs(p.seconds)}))
            .collect();
        v["quiesce_seconds"] = json!(round_secs(quiesce_seconds));
        v["downtime_seconds"] = json!(round_secs(downtime));
        v["promoted"] = json!(r.promoted());
        v["source_demoted"] = match (&d.group, demoted.as_slice()) {
            (None, [(_, g)]) => json!(g.to_hex()),
            (None, _) => json!(null),
            (Some(_), all) => all.iter().map(|(p, g)| json!({"source": p, "generation": g.to_hex()})).collect(),
        };
        print_json(&v);
    } else {
        let to = match &d.group {
            Some(_) => a.opts.peer.clone(),
            None => d.members.iter().map(|o| o.target.to_string()).collect::<Vec<_>>().join(", "),
        };
        crate::outln!(
            "failover-sync of {} to {to}: {} passes while running, then the last delta ({} changed) as {} point {}",
            d.what(),
            passes.len(),
            human_bytes(r.changed()),
            r.consistency().as_str(),
            r.generation()
        );
        crate::outln!("  quiesce     {quiesce_seconds:.2} s (the quiesce command)");
        crate::outln!("  downtime    {downtime:.2} s (from the quiesce command's exit to the commit)");
        if r.promoted() {
            crate::outln!("  promoted    the target is live at {}", r.generation());
        }
        for (p, g) in &demoted {
            crate::outln!("  demoted     {} is a replica at {g}", p.display());
        }
    }
    Ok((r.generation(), r.consistency().as_str().to_string()))
}

/// Runs `--unquiesce-cmd` after a failure past the quiesce, and says so.
fn unquiesce(a: &FailoverSyncArgs, d: &Disks, e: Error, what: &str) -> Error {
    let mut message = if what.is_empty() { e.message.clone() } else { format!("{what}: {}", e.message) };
    if let Some(cmd) = &a.unquiesce_cmd {
        let sources = d.sources();
        let env = [("DISKFERRY_SOURCE", sources.as_os_str())];
        match hooks::run("unquiesce", cmd, &[], &env, Duration::from_secs(a.quiesce_timeout)) {
            Ok(_) => message.push_str(" (the unquiesce command ran)"),
            Err(u) => message.push_str(&format!(" (and {})", u.message)),
        }
    }
    Error { message, ..e }
}

/// Demotes the source if it is a live target of this agent; its generation.
fn demote_source(o: &PushOptions) -> Result<Option<diskferry_protocol::Generation>, Error> {
    let Some(root) = &o.state_root else { return Ok(None) };
    if !Target::state_dir(root, &o.source).is_dir() {
        return Ok(None);
    }
    let mut t = Target::open(Arc::new(RealFs), root, &o.source, TargetOptions::default())?;
    if t.role() != Some(Role::Live) {
        return Ok(None);
    }
    let d = t.demote(new_generation(), now_unix_ns(), &diskferry_sync_engine::NoProgress)?;
    Ok(Some(d.generation))
}
