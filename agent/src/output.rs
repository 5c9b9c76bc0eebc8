//! The output contract: with `--json` the last stdout line is one compact JSON
//! object; errors are one `error[E_CODE]: what happened — what to do` line on
//! stderr, a JSON error object on stdout with `--json`, and the exit code of
//! the error's class.

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error as EngineError;
use serde_json::{json, Value};

/// Prints one compact JSON object as a line on stdout.
pub fn print_json(v: &Value) {
    crate::outln!("{v}");
}

/// `println!` for command output. A reader that stopped reading
/// (`diskferry hash X | head -1`) ends the command quietly, with success, as
/// the reader chose; `println!` would panic. SIGPIPE stays ignored (a
/// closed unix socket must be an error, not the end of the agent).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}

/// Ends the process with `code`, once the files left to background
/// threads are freed (a commit's garbage, a discarded snapshot clone): the
/// one way the binary exits.
pub fn exit(code: i32) -> ! {
    diskferry_sync_engine::store::wait_for_removals();
    std::process::exit(code)
}

/// Writes one line to stdout: see [`outln!`].
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let written = writeln!(std::io::stdout().lock(), "{args}");
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit(0),
        Err(e) => {
            let code = ErrorCode::Io;
            eprintln!("error[{}]: writing to stdout: {e} — check where the output goes (a full disk?)", code.as_str());
            exit(code.class().exit_code());
        }
    }
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
        let hint = self.hint.clone().unwrap_or_else(|| default_hint(self.code).to_string());
        eprintln!("error[{}]: {} — {}", self.code, self.message, hint);
        if json {
            let mut v = json!({
                "ok": false,
                "code": self.code.as_str(),
                "message": self.message,
                "hint": hint,
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

/// What to do about an error that came without a specific hint.
fn default_hint(code: ErrorCode) -> &'static str {
    use diskferry_protocol::ErrorClass::*;
    match (code, code.class()) {
        (ErrorCode::BadTargetName, _) => "use the target's logical name from the target agent's config",
        (_, Usage) => "see `diskferry --help` or `diskferry COMMAND --help`",
        (_, Input) => "check the paths and arguments",
        (_, Peer) => "see the target agent's log for details",
        (_, Diverged) => "see `diskferry verify`; resync with --force to overwrite the target's changes",
        (_, Storage) => {
            "check the disk, its free space and the kernel log; the target keeps its last committed generation"
        }
        (_, Internal) => "this is a bug; please report it with RUST_LOG=debug output",
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
