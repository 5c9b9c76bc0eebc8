//! `diskferry reload`: sends the local agent `SIGHUP` and waits for its
//! reload report, so `systemctl reload` (its unit's `ExecReload`) returns
//! when the new config runs — or fails, saying why, when it was refused.

use std::time::{Duration, Instant};

use anyhow::Result;
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use serde_json::Value;

use crate::cli::StatusArgs;
use crate::output::print_json;
use crate::status::client::{get_json, Addr};

/// A reload recovers new targets first: it may take a while.
const WAIT: Duration = Duration::from_secs(15 * 60);

pub fn run(a: StatusArgs) -> Result<()> {
    let root = super::target_arg::state_root(a.config.as_deref(), a.common.state_dir.clone())?;
    let socket = crate::status::socket_path(&root);
    let agent = || get_json(Addr::Unix(&socket), "/api/agent", None);
    let before = agent()?;
    let last = |v: &Value| v["last_reload"]["at_unix_ns"].as_i64();
    let pid = before["pid"]
        .as_u64()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| Error::new(ErrorCode::Protocol, "the agent did not say its pid"))?;
    rustix::process::kill_process(pid, rustix::process::Signal::HUP)
        .map_err(|e| Error::new(ErrorCode::Io, format!("signalling the agent (pid {}): {e}", pid.as_raw_nonzero())))?;
    let deadline = Instant::now() + WAIT;
    let report = loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = agent()?;
        if last(&now) != last(&before) {
            break now["last_reload"].clone();
        }
        if Instant::now() > deadline {
            return Err(Error::new(ErrorCode::Busy, "the agent did not finish its reload in 15 minutes").into());
        }
    };
    if a.common.json {
        print_json(&report);
    }
    if report["ok"] != true {
        let why = report["error"].as_str().unwrap_or("refused").to_string();
        return Err(Error::new(
            ErrorCode::Config,
            format!("the reload was refused; the old config keeps running: {why}"),
        )
        .hint("fix the config file and reload again")
        .into());
    }
    if !a.common.json {
        let list = |k: &str| {
            let v: Vec<&str> = report[k].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        crate::outln!("reloaded {}", before["config_file"].as_str().unwrap_or("the config"));
        crate::outln!("  targets added    {}", list("targets_added"));
        crate::outln!("  targets removed  {}", list("targets_removed"));
        crate::outln!(
            "  protected disks  started: {}; stopped: {}; replaced: {}; {} unchanged",
            list("protect_started"),
            list("protect_stopped"),
            list("protect_replaced"),
            report["protect_kept"]
        );
        if !list("restart_needed").eq("none") {
            crate::outln!("  at the next start: {}", list("restart_needed"));
        }
    }
    Ok(())
}
