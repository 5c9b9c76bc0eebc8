//! `diskferry failover-sync`: sync before failover. Phase 1 pushes deltas
//! while the VM runs (fuzzy points) until they converge; phase 2 runs the
//! quiesce command, ships the last delta as a consistent point — promoted
//! on the target in the same session with `--promote` — and reports the
//! downtime: from the quiesce command's exit to the commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use diskferry_protocol::{Consistency, ErrorCode};
use diskferry_sync_engine::apply::{Role, Target, TargetOptions};
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::Error;
use serde_json::json;

use super::net::{push_json, push_setup};
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

pub fn run(a: FailoverSyncArgs) -> Result<()> {
    let (base, id, rt) = push_setup(&a.push)?;
    let json = a.push.opts.common.json;
    let push_once = |opts: PushOptions| -> Result<(PushReport, f64), Error> {
        let bar = Arc::new(Bar::new());
        let start = Instant::now();
        let r = rt.block_on(push::push(&id, opts, bar.clone()));
        bar.finish();
        Ok((r?, start.elapsed().as_secs_f64()))
    };

    // Phase 1: passes while the VM runs; never recovery points.
    let mut passes: Vec<Pass> = Vec::new();
    let mut not_shrinking = 0;
    for n in 1..=a.max_passes {
        let (r, seconds) = push_once(PushOptions { fuzzy: true, ..base.clone() })?;
        let changed = r.committed.bytes_written;
        if let Some(prev) = passes.last() {
            not_shrinking = if changed >= prev.bytes_changed { not_shrinking + 1 } else { 0 };
        }
        if !json {
            eprintln!(
                "pass {n}: {} changed, {} sent in {seconds:.2} s ({})",
                human_bytes(changed),
                human_bytes(r.bytes_sent),
                r.mode()
            );
        }
        passes.push(Pass { bytes_changed: changed, bytes_sent: r.bytes_sent, seconds });
        if changed <= a.converge_bytes || not_shrinking >= 2 {
            break;
        }
    }

    // Phase 2: quiesce, the last delta, a consistent point.
    let timeout = Duration::from_secs(a.quiesce_timeout);
    let q0 = Instant::now();
    let env = [("DISKFERRY_SOURCE", base.source.as_os_str())];
    // The downtime starts when the quiesce command exits.
    let (_, down) = hooks::run_timed("quiesce", &a.quiesce_cmd, &[], &env, timeout)
        .map_err(|e| unquiesce(&a, &base, e, "the quiesce command failed; the VM may be partly quiesced"))?;
    let quiesce_seconds = (down - q0).as_secs_f64();
    let mut commit_requested = false;
    let last = {
        let bar = Arc::new(Bar::new());
        let start = Instant::now();
        let opts = PushOptions { promote: a.promote, ..base.clone() };
        let r = rt.block_on(push::push_tracked(&id, opts, bar.clone(), &mut commit_requested));
        bar.finish();
        r.map(|r| (r, start.elapsed().as_secs_f64()))
    };
    let (r, last_seconds) = match last {
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
                hint: Some(
                    "check `diskferry points` on the target before restarting anything here: if the point is there, \
                     the failover happened; if not, run failover-sync again to resume"
                        .into(),
                ),
                ..e
            }
            .into());
        }
        Err(e) => {
            return Err(unquiesce(
                &a,
                &base,
                e,
                "the VM is quiesced and the last delta is not committed; run failover-sync again to resume it",
            )
            .into())
        }
    };
    let downtime = down.elapsed().as_secs_f64();
    if r.consistency == Consistency::Fuzzy {
        let e = Error::new(
            ErrorCode::SourceChanged,
            format!("{} was still written after the quiesce command: the last point is fuzzy", base.source.display()),
        )
        .hint("make the quiesce command wait until the VM is down (or frozen), then run failover-sync again");
        return Err(unquiesce(&a, &base, e, "").into());
    }
    if a.promote && !r.committed.promoted {
        return Err(Error::new(
            ErrorCode::Internal,
            format!(
                "the VM is quiesced; the target committed {} (consistent) but did not promote it",
                r.committed.generation
            ),
        )
        .hint("see the target agent's log, then run `diskferry failover` there and start the VM on that side")
        .into());
    }
    // The source disk, if it is a live target of this agent, steps down
    // to a replica at the generation just shipped: the way back is a delta.
    let demoted = match a.promote {
        true => demote_source(&base).map_err(|e| Error {
            message: format!(
                "the target is live at {}, but {} could not be demoted here: {}",
                r.committed.generation,
                base.source.display(),
                e.message
            ),
            hint: Some(format!(
                "do not start the VM here; run `diskferry demote {}` (with this agent's --config or --state-dir)",
                base.source.display()
            )),
            ..e
        })?,
        false => None,
    };

    if json {
        let mut v = push_json(&r, last_seconds, cpu_seconds());
        v["passes"] = passes
            .iter()
            .map(|p| json!({"bytes_changed": p.bytes_changed, "bytes_sent": p.bytes_sent, "seconds": round_secs(p.seconds)}))
            .collect();
        v["quiesce_seconds"] = json!(round_secs(quiesce_seconds));
        v["downtime_seconds"] = json!(round_secs(downtime));
        v["promoted"] = json!(r.committed.promoted);
        v["source_demoted"] = json!(demoted.map(|g| g.to_hex()));
        print_json(&v);
    } else {
        println!(
            "failover-sync of {} to {}: {} passes while running, then the last delta ({} changed) as {} point {}",
            base.source.display(),
            a.push.target,
            passes.len(),
            human_bytes(r.committed.bytes_written),
            r.consistency.as_str(),
            r.committed.generation
        );
        println!("  quiesce     {quiesce_seconds:.2} s (the quiesce command)");
        println!("  downtime    {downtime:.2} s (from the quiesce command's exit to the commit)");
        if r.committed.promoted {
            println!("  promoted    the target is live at {}", r.committed.generation);
        }
        if let Some(g) = demoted {
            println!("  demoted     {} is a replica at {g}", base.source.display());
        }
    }
    Ok(())
}

/// Runs `--unquiesce-cmd` after a failure past the quiesce, and says so.
fn unquiesce(a: &FailoverSyncArgs, base: &PushOptions, e: Error, what: &str) -> Error {
    let mut message = if what.is_empty() { e.message.clone() } else { format!("{what}: {}", e.message) };
    if let Some(cmd) = &a.unquiesce_cmd {
        let env = [("DISKFERRY_SOURCE", base.source.as_os_str())];
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
