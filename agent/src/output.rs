//! The output contract: with `--json` the last stdout line is one compact JSON
//! object; errors are one `error[E_CODE]: what happened — what to do` line on
//! stderr, a JSON error object on stdout with `--json`, and the exit code of
//! the error's class.

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error as EngineError;
use serde_json::{json, Value};

/// Prints one compact JSON object as a line on stdout.
pub fn print_json(v: &Value) {
    println!("{v}");
}

/// A failure ready to report.
#[derive(Debug)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    pub hint: Option<String>,
    pub extra: Option<Value>,
}

impl Failure {
    /// Classifies any error from a command: engine errors keep their code,
    /// anything else is internal.
    pub fn from_error(e: &anyhow::Error) -> Failure {
        for cause in e.chain() {
            if let Some(ee) = cause.downcast_ref::<EngineError>() {
                return Failure { code: ee.code, message: ee.message.clone(), hint: ee.hint.clone(), extra: None };
            }
            if let Some(f) = cause.downcast_ref::<CommandFailure>() {
                return Failure {
                    code: f.code,
                    message: f.message.clone(),
                    hint: f.hint.clone(),
                    extra: f.extra.clone(),
                };
            }
        }
        Failure {
            code: ErrorCode::Internal,
            message: format!("{e:#}"),
            hint: Some("this is a bug; please report it with the command and RUST_LOG=debug output".into()),
            extra: None,
        }
    }

    /// Prints the failure and returns the process exit code.
    pub fn report(&self, json: bool) -> i32 {
        match &self.hint {
            Some(h) => eprintln!("error[{}]: {} — {}", self.code, self.message, h),
            None => eprintln!("error[{}]: {}", self.code, self.message),
        }
        if json {
            let mut v = json!({
                "ok": false,
                "code": self.code.as_str(),
                "message": self.message,
                "hint": self.hint,
                "retryable": self.code.retryable(),
            });
            if let (Some(Value::Object(extra)), Some(obj)) = (&self.extra, v.as_object_mut()) {
                for (k, val) in extra {
                    obj.insert(k.clone(), val.clone());
                }
            }
            print_json(&v);
        }
        self.code.class().exit_code()
    }
}

/// An error raised by the CLI layer itself, with a code and extra JSON fields.
#[derive(Debug)]
pub struct CommandFailure {
    pub code: ErrorCode,
    pub message: String,
    pub hint: Option<String>,
    pub extra: Option<Value>,
}

impl std::fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandFailure {}
