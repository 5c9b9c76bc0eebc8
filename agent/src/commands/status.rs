//! `diskferry status`: what the local agent (`serve`) is doing, asked over
//! its unix socket in the state directory — protected disks with their
//! RPO, running and recent jobs, and the served targets.

use anyhow::Result;
use serde_json::{json, Value};

use crate::cli::StatusArgs;
use crate::output::print_json;
use crate::units::{format_time, human_bytes};

/// Recent finished jobs shown without `--json`.
const RECENT: usize = 10;

pub fn run(a: StatusArgs) -> Result<()> {
    let root = super::target_arg::state_root(a.config.as_deref(), a.common.state_dir.clone())?;
    let socket = crate::status::socket_path(&root);
    let get = |path: &str| crate::status::client::get_json(crate::status::client::Addr::Unix(&socket), path, None);
    let (protect, jobs, targets) = (get("/api/protect")?, get("/api/jobs")?, get("/api/targets")?);
    if a.common.json {
        print_json(&json!({ "state_dir": root, "protect": protect, "jobs": jobs, "targets": targets }));
        return Ok(());
    }
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    crate::outln!("agent at {}", root.display());
    if !list(&protect).is_empty() {
        crate::outln!(
            "\nPROTECTED DISK                           PEER                  TARGET        RPO            LAST POINT"
        );
        for p in list(&protect) {
            let rpo = format!(
                "{:.0}/{:.0} s{}",
                p["rpo_seconds"].as_f64().unwrap_or(0.0),
                p["rpo_target_seconds"].as_f64().unwrap_or(0.0),
                if p["over_rpo"] == true { " OVER" } else { "" }
            );
            crate::outln!(
                "{:<40} {:<21} {:<13} {:<14} {}",
                s(&p["disk"]),
                s(&p["peer"]),
                s(&p["target"]),
                rpo,
                s(&p["last_point"])
            );
            if let Some(e) = p["last_error"].as_str() {
                crate::outln!("  last error: {e}");
            }
        }
    }
    if !list(&targets).is_empty() {
        crate::outln!("\nTARGET           ROLE      POINTS  NEWEST");
        for t in list(&targets) {
            crate::outln!(
                "{:<16} {:<9} {:>6}  {} {}",
                s(&t["name"]),
                s(&t["role"]),
                t["points"],
                s(&t["generation"]),
                s(&t["consistency"])
            );
        }
    }
    let all = list(&jobs);
    let (running, done): (Vec<&Value>, Vec<&Value>) = all.iter().partition(|j| j["result"].is_null());
    crate::outln!("\nJOB    KIND     TARGET        PHASE        BYTES         STARTED                  RESULT");
    for j in running.iter().chain(done.iter().take(RECENT)) {
        let result = match &j["result"] {
            Value::Null => "running".to_string(),
            r if r["ok"] == true => format!("ok {}", s(&r["generation"])),
            r => format!("error[{}]: {}", s(&r["code"]), s(&r["message"])),
        };
        crate::outln!(
            "{:<6} {:<8} {:<13} {:<12} {:<13} {:<24} {result}",
            j["id"],
            s(&j["kind"]),
            s(&j["target"]),
            s(&j["phase"]),
            human_bytes(j["bytes_done"].as_u64().unwrap_or(0)),
            j["started_unix_ns"].as_i64().map(format_time).unwrap_or_default(),
        );
    }
    Ok(())
}
