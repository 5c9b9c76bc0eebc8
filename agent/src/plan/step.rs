//! The steps of a plan: `diskferry` commands run as children (each with
//! `--json`, its answer or its error object read from the last stdout
//! line), operator hooks, and the progress report of each as it happens.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use diskferry_protocol::ErrorCode;
use serde_json::{json, Value};

/// A step that failed: its code, what happened and what to do.
#[derive(Debug, Clone)]
pub struct StepError {
    pub code: String,
    pub message: String,
    pub hint: String,
}

impl StepError {
    pub fn new(code: ErrorCode, message: impl Into<String>, hint: impl Into<String>) -> StepError {
        StepError { code: code.as_str().to_string(), message: message.into(), hint: hint.into() }
    }

    pub fn json(&self) -> Value {
        json!({ "code": self.code, "message": self.message, "hint": self.hint })
    }
}

impl From<diskferry_sync_engine::Error> for StepError {
    fn from(e: diskferry_sync_engine::Error) -> StepError {
        let hint = e.hint.clone().unwrap_or_default();
        StepError { code: e.code.as_str().to_string(), message: e.message, hint }
    }
}

/// Runs `diskferry ARGS --json` and returns its JSON answer; a step that
/// finds its target or its peer busy (a push in flight, the peer at its
/// session limit) is tried again a few times first.
pub fn diskferry(args: &[OsString]) -> Result<Value, StepError> {
    let mut wait = Duration::from_secs(1);
    for _ in 0..4 {
        match diskferry_once(args) {
            Err(e) if e.code == ErrorCode::Busy.as_str() || e.code == ErrorCode::PeerBusy.as_str() => {
                std::thread::sleep(wait);
                wait *= 2;
            }
            other => return other,
        }
    }
    diskferry_once(args)
}

/// [`diskferry`] without the retries: for a step that must not run twice
/// on its own (a failover-sync may have quiesced its VM before it failed).
pub fn diskferry_once(args: &[OsString]) -> Result<Value, StepError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("diskferry"));
    let mut c = Command::new(&exe);
    c.args(args).arg("--json").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| {
        StepError::new(ErrorCode::Internal, format!("could not start {}: {e}", exe.display()), "check the install")
    })?;
    // Both pipes on threads, so neither can fill up and block the child;
    // the answer is stdout's last line, the cause of a failure stderr's end.
    use crate::hooks::{Drained, Keep};
    let out = Drained::start(child.stdout.take(), Keep::Tail(1 << 20));
    let err = Drained::start(child.stderr.take(), Keep::Tail(64 << 10));
    let status = child.wait();
    let text = |d: Drained| String::from_utf8_lossy(&d.take(Duration::from_secs(2))).into_owned();
    let (out, err) = (text(out), text(err));
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    let last: Option<Value> =
        out.lines().rev().find(|l| !l.trim().is_empty()).and_then(|l| serde_json::from_str(l).ok());
    let what = || {
        let words: Vec<String> = args.iter().take(3).map(|a| a.to_string_lossy().into_owned()).collect();
        format!("`diskferry {}`", words.join(" "))
    };
    match (status, last) {
        (Ok(s), Some(v)) if s.success() => Ok(v),
        (_, Some(v)) if v.get("ok") == Some(&Value::Bool(false)) => Err(StepError {
            code: v["code"].as_str().unwrap_or("E_INTERNAL").to_string(),
            message: v["message"].as_str().unwrap_or_default().to_string(),
            hint: v["hint"].as_str().unwrap_or_default().to_string(),
        }),
        (status, _) => Err(StepError::new(
            ErrorCode::Internal,
            format!("{} ended ({}) without an answer: {tail}", what(), describe(&status)),
            "run the step by hand to see its whole output",
        )),
    }
}

fn describe(s: &std::io::Result<std::process::ExitStatus>) -> String {
    match s {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// Runs an operator hook (`sh -c`) with the plan's environment. With
/// `capture`, what it prints on stderr too is returned (JSON progress
/// lines on stderr must stay JSON), else only stdout (its stderr is ours).
pub fn hook(
    name: &str,
    cmd: &str,
    env: &[(&str, OsString)],
    timeout: Duration,
    capture: bool,
) -> Result<String, StepError> {
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let script = if capture { format!("exec 2>&1\n{cmd}") } else { cmd.to_string() };
    crate::hooks::run(name, &script, &[], &env, timeout).map_err(|e| {
        let hint = e.hint.clone().unwrap_or_default();
        // The error names the operator's command, not the wrapper.
        let message = e.message.replace(&script, cmd);
        StepError { code: e.code.as_str().to_string(), message, hint }
    })
}

/// How progress is told: lines for people, one JSON object per event, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressFormat {
    Human,
    Json,
    None,
}

impl From<crate::progress::ProgressMode> for ProgressFormat {
    fn from(m: crate::progress::ProgressMode) -> Self {
        match m {
            crate::progress::ProgressMode::Json => ProgressFormat::Json,
            crate::progress::ProgressMode::None => ProgressFormat::None,
            _ => ProgressFormat::Human,
        }
    }
}

/// Tells each step as it happens, on stderr (steps of one group run on
/// several threads: one line at a time).
pub struct Reporter {
    pub format: ProgressFormat,
    out: Mutex<()>,
}

impl Reporter {
    pub fn new(format: ProgressFormat) -> Reporter {
        Reporter { format, out: Mutex::new(()) }
    }

    /// One event: `event` names it; `fields` says what about.
    pub fn event(&self, event: &str, fields: Value, human: impl FnOnce() -> String) {
        let _one = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let line = match self.format {
            ProgressFormat::None => return,
            ProgressFormat::Json => {
                let mut v = json!({ "event": event, "time": jiff::Timestamp::now().to_string() });
                if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
                    o.extend(f);
                }
                v.to_string()
            }
            ProgressFormat::Human => {
                format!("[{}] {}", jiff::Zoned::now().strftime("%H:%M:%S"), human())
            }
        };
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "{line}");
    }
}
