//! `diskferry plan run` and `plan cleanup`: the plan is carried out by
//! `crate::plan`; this prints its summary and turns its errors into the
//! command's.

use anyhow::Result;
use diskferry_protocol::ErrorCode;
use serde_json::Value;

use crate::cli::{PlanCommand, PlanSiteArgs};
use crate::output::{print_json, CommandFailure};
use crate::plan::{self, Mode, Outcome, Plan, PointChoice, ProgressFormat, RunOptions};

pub fn run(c: PlanCommand) -> Result<()> {
    match c {
        PlanCommand::Run(a) => {
            let p = Plan::load(&a.plan)?;
            let mode = match (a.planned, a.unplanned) {
                (true, _) => Mode::Planned,
                (_, true) => Mode::Unplanned,
                _ => Mode::Test,
            };
            if mode == Mode::Planned {
                // Refused before any VM is stopped, not at the group it is in.
                let missing = p.without_quiesce();
                if !missing.is_empty() {
                    return Err(diskferry_sync_engine::Error::new(
                        ErrorCode::Config,
                        format!("plan {}: no quiesce command for {}", p.name, missing.join(", ")),
                    )
                    .hint("a planned failover stops every VM first: give each VM `quiesce`")
                    .into());
                }
            }
            let mut o = options(mode, a.point, &a.site, a.common.state_dir.clone(), a.common.progress.into());
            o.restart = a.restart;
            // The plan is a job on this host's agent; its steps are jobs of their own.
            let job = match crate::plan::this_state_root(&o) {
                Ok(root) => crate::local_agent::AgentJob::start(
                    &root,
                    "plan",
                    &a.plan.display().to_string(),
                    "",
                    &format!("{} ({})", p.name, mode.as_str()),
                ),
                Err(_) => crate::local_agent::AgentJob::none(),
            };
            let out = plan::run(&p, &o);
            job.finish(match out.errors.first() {
                None => crate::jobs::JobResult::ok(None, None),
                Some((at, e)) => crate::jobs::JobResult {
                    ok: false,
                    code: Some(e.code.clone()),
                    message: Some(format!("{at}: {}", e.message)),
                    hint: Some(e.hint.clone()),
                    ..crate::jobs::JobResult::ok(None, None)
                },
            });
            finish(&p, mode, out, a.common.json)
        }
        PlanCommand::Cleanup(a) => {
            let p = Plan::load(&a.plan)?;
            let o =
                options(Mode::Test, PointChoice::Latest, &a.site, a.common.state_dir.clone(), a.common.progress.into());
            let out = plan::cleanup(&p, &o);
            if !a.common.json && out.errors.is_empty() {
                let n = out.summary["removed"].as_array().map_or(0, Vec::len);
                crate::outln!("plan {}: removed {n} test image(s); their points are no longer pinned", p.name);
            }
            fail_with(&p, out, a.common.json, "cleanup")
        }
    }
}

fn options(
    mode: Mode,
    point: PointChoice,
    site: &PlanSiteArgs,
    state_dir: Option<std::path::PathBuf>,
    progress: ProgressFormat,
) -> RunOptions {
    RunOptions {
        mode,
        point,
        config: site.config.clone(),
        state_dir,
        test_dir: site.test_dir.clone(),
        progress,
        restart: false,
    }
}

fn finish(p: &Plan, mode: Mode, out: Outcome, json: bool) -> Result<()> {
    if !json {
        print_table(&out.summary, mode);
    }
    fail_with(p, out, json, mode.as_str())
}

/// Success prints the summary (with --json); errors become the command's
/// failure, the first one's code, the summary riding along in its JSON.
fn fail_with(p: &Plan, out: Outcome, json: bool, what: &str) -> Result<()> {
    let Some((at, first)) = out.errors.first() else {
        if json {
            print_json(&out.summary);
        }
        return Ok(());
    };
    let code = ErrorCode::ALL.iter().copied().find(|c| c.as_str() == first.code).unwrap_or(ErrorCode::Internal);
    let names = |list: &Value| -> String {
        let n: Vec<&str> = list.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if n.is_empty() {
            "none".into()
        } else {
            n.join(", ")
        }
    };
    let message = match out.summary["stopped_at"].as_str() {
        Some(stop) => {
            let untouched: Vec<Value> =
                groups(&out.summary).filter(|g| g["status"] == "untouched").map(|g| g["name"].clone()).collect();
            format!(
                "plan {} ({what}) stopped at {stop}: {at}: {}; VMs failed over: {}; groups untouched: {}",
                p.name,
                first.message,
                names(&out.summary["failed_over"]),
                names(&Value::from(untouched))
            )
        }
        None => format!("plan {} ({what}): {} error(s); the first, {at}: {}", p.name, out.errors.len(), first.message),
    };
    let rerun = match what {
        "planned" | "unplanned" => " — then run the plan again: it skips the VMs it failed over and started",
        _ => "",
    };
    let hint = (!first.hint.is_empty()).then(|| format!("{}{rerun}", first.hint));
    let mut extra = out.summary.clone();
    if let Some(o) = extra.as_object_mut() {
        o.remove("ok");
    }
    Err(CommandFailure { code, message, hint, extra: Some(extra) }.into())
}

fn groups(summary: &Value) -> impl Iterator<Item = &Value> {
    summary["groups"].as_array().into_iter().flatten()
}

/// The summary for people: one line per VM.
fn print_table(summary: &Value, mode: Mode) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    crate::outln!(
        "plan {} ({}{}) in {} s",
        s(&summary["plan"]),
        mode.as_str(),
        summary["point"].as_str().map(|p| format!(", point {p}")).unwrap_or_default(),
        summary["seconds"]
    );
    crate::outln!(
        "{:<14} {:<14} {:<12} {:<33} {:<17} {:>8}  ERROR",
        "GROUP",
        "VM",
        "STATUS",
        "POINT",
        "CONSISTENCY",
        "SECONDS"
    );
    for g in groups(summary) {
        for v in g["vms"].as_array().into_iter().flatten() {
            let error = match v["code"].as_str() {
                Some(c) => format!("{c}: {}", s(&v["message"])),
                None => String::new(),
            };
            crate::outln!(
                "{:<14} {:<14} {:<12} {:<33} {:<17} {:>8}  {error}",
                s(&g["name"]),
                s(&v["name"]),
                s(&v["status"]),
                s(&v["point"]),
                s(&v["consistency"]),
                v["seconds"].as_f64().map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into()),
            );
        }
        for h in g["hooks"].as_array().into_iter().flatten().filter(|h| h["ok"] == false) {
            crate::outln!(
                "{:<14} {:<14} {:<12} error[{}]: {}",
                s(&g["name"]),
                format!("{} hook", s(&h["hook"])),
                "failed",
                s(&h["error"]["code"]),
                s(&h["error"]["message"])
            );
        }
    }
    for h in summary["hooks"].as_array().into_iter().flatten().filter(|h| h["ok"] == false) {
        crate::outln!(
            "plan {} hook failed: error[{}]: {}",
            s(&h["hook"]),
            s(&h["error"]["code"]),
            s(&h["error"]["message"])
        );
    }
}
