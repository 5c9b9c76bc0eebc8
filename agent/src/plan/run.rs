//! Carrying out a plan, group after group: the plan's and each group's
//! hooks around the group's VMs (run side by side). A planned failover
//! stops at the first error (the groups before it failed over, the ones
//! after it untouched); an unplanned one and a test go on and report every
//! error.

use std::sync::OnceLock;
use std::time::Instant;

use diskferry_protocol::ErrorCode;
use serde_json::{json, Value};

use super::ctx::{this_state_root, Ctx, Mode, RunOptions};
use super::journal::Journal;
use super::step::{Reporter, StepError};
use super::vm::{self, VmResult};
use super::Plan;
use crate::units::round_secs;

/// What a run did: the summary, and the errors in the order they came.
pub struct Outcome {
    pub summary: Value,
    pub errors: Vec<(String, StepError)>,
}

/// Runs `plan` in `o.mode`.
pub fn run(plan: &Plan, o: &RunOptions) -> Outcome {
    let mut ctx = Ctx {
        plan,
        mode: o.mode,
        point: o.point,
        opts: o,
        site: OnceLock::new(),
        report: Reporter::new(o.progress),
        journal: None,
    };
    let start = Instant::now();
    let stop_at_error = o.mode == Mode::Planned;
    let mut errors: Vec<(String, StepError)> = Vec::new();
    // Where the journal lives: this host's state directory (on the
    // recovery site, the one its config names).
    let journal = match o.mode {
        Mode::Test => None,
        Mode::Planned => {
            Some(this_state_root(o).and_then(|root| Journal::open(&root, &plan.name, "planned", o.restart)))
        }
        Mode::Unplanned => {
            Some(ctx.site().and_then(|site| Journal::open(&site.state_root, &plan.name, "unplanned", o.restart)))
        }
    };
    match journal {
        Some(Ok(j)) => ctx.journal = Some(j),
        Some(Err(e)) => errors.push(("the plan's journal".into(), e)),
        None => {}
    }
    let ctx = ctx;
    if !errors.is_empty() {
        // Without its journal a run could fail a VM over twice.
        return Outcome { summary: json!({ "plan": plan.name, "mode": o.mode.as_str(), "groups": [] }), errors };
    }
    let mut hooks = Vec::new();
    let mut groups_out = Vec::new();
    let mut stopped: Option<String> = None;
    let vms: usize = plan.groups.iter().map(|g| g.vms.len()).sum();
    ctx.report.event(
        "plan_start",
        json!({ "plan": plan.name, "mode": o.mode.as_str(), "point": o.point.as_json(), "groups": plan.groups.len(), "vms": vms }),
        || format!("plan {} ({}): {} groups, {vms} VMs", plan.name, o.mode.as_str(), plan.groups.len()),
    );
    let hook_failed = |v: &Value| v["ok"] == Value::Bool(false);
    let note_hook = |v: Value, errors: &mut Vec<(String, StepError)>, hooks: &mut Vec<Value>| -> bool {
        let failed = hook_failed(&v);
        if failed {
            let e = &v["error"];
            let scope = match v["group"].as_str() {
                Some(g) => format!("group {g}"),
                None => "plan".into(),
            };
            errors.push((
                format!("{scope} {} hook", v["hook"].as_str().unwrap_or_default()),
                StepError {
                    code: e["code"].as_str().unwrap_or("E_HOOK").into(),
                    message: e["message"].as_str().unwrap_or_default().into(),
                    hint: e["hint"].as_str().unwrap_or_default().into(),
                },
            ));
        }
        hooks.push(v);
        failed
    };
    if let Some(v) = ctx.hook("plan", "pre", plan.pre.as_ref(), None) {
        if note_hook(v, &mut errors, &mut hooks) && stop_at_error {
            stopped = Some("the plan's pre hook".into());
        }
    }
    for g in &plan.groups {
        if stopped.is_some() {
            ctx.report.event("group_skipped", json!({ "group": g.name }), || format!("group {}: untouched", g.name));
            let vms: Vec<Value> = g.vms.iter().map(|v| json!({ "name": v.name, "status": "untouched" })).collect();
            groups_out.push(json!({ "name": g.name, "status": "untouched", "hooks": [], "vms": vms }));
            continue;
        }
        let group_start = Instant::now();
        ctx.report.event("group_start", json!({ "group": g.name, "vms": g.vms.len() }), || {
            format!("group {}: {} VMs", g.name, g.vms.len())
        });
        let mut group_hooks = Vec::new();
        let mut group_failed = false;
        if let Some(v) = ctx.hook("group", "pre", g.pre.as_ref(), Some(&g.name)) {
            group_failed = note_hook(v, &mut errors, &mut group_hooks);
        }
        let results: Vec<VmResult> =
            if group_failed && stop_at_error { Vec::new() } else { run_vms(&ctx, &g.name, &g.vms) };
        for r in &results {
            if let Some(e) = &r.error {
                errors.push((format!("group {} vm {}", g.name, r.name), e.clone()));
                group_failed = true;
            }
        }
        if !(group_failed && stop_at_error) {
            if let Some(v) = ctx.hook("group", "post", g.post.as_ref(), Some(&g.name)) {
                group_failed |= note_hook(v, &mut errors, &mut group_hooks);
            }
        }
        let mut vms_out: Vec<Value> = results.iter().map(|r| r.json(o.mode)).collect();
        if results.is_empty() {
            vms_out = g.vms.iter().map(|v| json!({ "name": v.name, "status": "untouched" })).collect();
        }
        let status = match (group_failed, stop_at_error) {
            (false, _) => "done",
            (true, true) => "failed",
            (true, false) => "errors",
        };
        ctx.report.event(
            "group_done",
            json!({ "group": g.name, "status": status, "seconds": round_secs(group_start.elapsed().as_secs_f64()) }),
            || format!("group {}: {status}", g.name),
        );
        groups_out.push(json!({ "name": g.name, "status": status, "hooks": group_hooks, "vms": vms_out }));
        if group_failed && stop_at_error {
            stopped = Some(format!("group {}", g.name));
        }
    }
    if stopped.is_none() {
        if let Some(v) = ctx.hook("plan", "post", plan.post.as_ref(), None) {
            if note_hook(v, &mut errors, &mut hooks) && stop_at_error {
                stopped = Some("the plan's post hook".into());
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = errors.is_empty();
    if let (true, Some(j)) = (ok, &ctx.journal) {
        j.remove();
    }
    // The VMs that run on the recovery site now, whatever else failed.
    let failed_over: Vec<Value> = groups_out
        .iter()
        .flat_map(|g| g["vms"].as_array().cloned().unwrap_or_default())
        .filter(|v| matches!(v["status"].as_str(), Some("failed-over" | "start-failed" | "done-earlier")))
        .map(|v| v["name"].clone())
        .collect();
    ctx.report.event(
        "plan_done",
        json!({ "plan": plan.name, "ok": ok, "errors": errors.len(), "seconds": round_secs(secs) }),
        || match ok {
            true => format!("plan {}: done in {secs:.1} s", plan.name),
            false => format!("plan {}: {} error(s) in {secs:.1} s", plan.name, errors.len()),
        },
    );
    let summary = json!({
        "plan": plan.name,
        "file": plan.file,
        "mode": o.mode.as_str(),
        "point": (o.mode != Mode::Planned).then(|| o.point.as_json()),
        "ok": ok,
        "stopped_at": stopped,
        "failed_over": (o.mode != Mode::Test).then_some(failed_over),
        "seconds": round_secs(secs),
        "hooks": hooks,
        "groups": groups_out,
        "errors": errors.iter().map(|(at, e)| { let mut v = e.json(); v["at"] = json!(at); v }).collect::<Vec<_>>(),
    });
    Outcome { summary, errors }
}

/// Runs the VMs of a group side by side, at most the plan's `parallel` at
/// once (each holds sessions on its peer, which has a limit); their
/// results in the group's order.
fn run_vms(ctx: &Ctx, group: &str, vms: &[super::Vm]) -> Vec<VmResult> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<VmResult>>> = std::sync::Mutex::new(vms.iter().map(|_| None).collect());
    let workers = ctx.plan.parallel.clamp(1, vms.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(v) = vms.get(i) else { return };
                ctx.report.event("vm_start", json!({ "group": group, "vm": v.name }), || {
                    format!("  {}: {}", v.name, step_name(ctx.mode))
                });
                let r = vm::run(ctx, group, v);
                tell_vm(ctx, group, &r);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results
        .into_iter()
        .zip(vms)
        .map(|(r, v)| {
            r.unwrap_or_else(|| VmResult {
                error: Some(StepError::new(ErrorCode::Internal, "the VM's step panicked", "a bug")),
                ..VmResult::new(&v.name)
            })
        })
        .collect()
}

fn step_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Planned => "failover-sync --promote",
        Mode::Unplanned => "failover",
        Mode::Test => "test-failover",
    }
}

fn tell_vm(ctx: &Ctx, group: &str, r: &VmResult) {
    let mut v = r.json(ctx.mode);
    v["group"] = json!(group);
    v["vm"] = json!(r.name);
    ctx.report.event("vm_done", v, || match (&r.error, &r.point) {
        _ if r.earlier => format!("  {}: done by an earlier run of the plan", r.name),
        (Some(e), _) => format!("  {}: {}: error[{}]: {} — {}", r.name, r.status(ctx.mode), e.code, e.message, e.hint),
        (None, Some(p)) => format!("  {}: at {} ({}) in {:.1} s", r.name, p.generation, p.consistency, r.seconds),
        (None, None) => format!("  {}: done in {:.1} s", r.name, r.seconds),
    });
}

/// `plan cleanup`: removes every test image of the plan, unpinning its
/// point; goes on past errors. The images removed, and the errors.
pub fn cleanup(plan: &Plan, o: &RunOptions) -> Outcome {
    let ctx = Ctx {
        plan,
        mode: Mode::Test,
        point: o.point,
        opts: o,
        site: OnceLock::new(),
        report: Reporter::new(o.progress),
        journal: None,
    };
    let mut removed = Vec::new();
    let mut left = Vec::new();
    let mut errors = Vec::new();
    for v in plan.groups.iter().flat_map(|g| &g.vms) {
        match vm::cleanup(&ctx, v) {
            Ok(c) => {
                ctx.report.event("vm_cleaned", json!({ "vm": v.name, "removed": c.removed, "left": c.left }), || {
                    let mut line = format!("{}: removed {} test image(s)", v.name, c.removed.len());
                    for l in &c.left {
                        line.push_str(&format!("; left {} (no target pins it: not a test image)", l.display()));
                    }
                    line
                });
                removed.extend(c.removed);
                left.extend(c.left);
            }
            Err(e) => {
                ctx.report.event("vm_cleaned", json!({ "vm": v.name, "error": e.json() }), || {
                    format!("{}: error[{}]: {} — {}", v.name, e.code, e.message, e.hint)
                });
                errors.push((format!("vm {}", v.name), e));
            }
        }
    }
    if let Ok(dir) = ctx.test_dir() {
        let _ = std::fs::remove_dir(dir);
    }
    let summary = json!({
        "plan": plan.name,
        "ok": errors.is_empty(),
        "removed": removed,
        "left": left,
        "errors": errors.iter().map(|(at, e): &(String, StepError)| { let mut v = e.json(); v["at"] = json!(at); v }).collect::<Vec<_>>(),
    });
    Outcome { summary, errors }
}
