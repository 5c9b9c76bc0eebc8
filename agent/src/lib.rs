//! The `diskferry` agent as a library: the CLI, the state directory, the
//! QUIC transport with pinned-certificate trust, the target agent
//! ([`serve`]) and the source agent ([`push`]). `main.rs` only calls [`run`].
#![forbid(unsafe_code)]

pub mod bench;
pub mod changes;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod groups;
pub mod hooks;
pub mod identity;
pub mod ids;
pub mod jobs;
pub mod local_agent;
pub mod metrics;
pub mod nbd;
pub mod notify;
pub mod output;
pub mod pace;
pub mod plan;
pub mod progress;
pub mod protect;
pub mod push;
pub mod serve;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod transport;
pub mod trust;
pub mod units;

use diskferry_protocol::ErrorCode;

use output::Failure;

/// Parses the command line, runs the command and returns the exit code.
pub fn run() -> i32 {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = cli::Cli::command()
        .long_version(commands::long_version())
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { 2 } else { 0 };
            }
            let json = std::env::args().any(|a| a == "--json");
            let f = Failure {
                code: ErrorCode::Usage,
                message: usage_message(&e),
                hint: Some("see `diskferry --help` or `diskferry COMMAND --help`".into()),
                extra: None,
            };
            return f.report(json);
        }
    };
    // A daemon logs its sessions; a command only what went wrong.
    let default = if matches!(cli.command, cli::Command::Serve(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: journald and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.command.common().log_format {
        cli::LogFormat::Text => logs.with_ansi(ansi).init(),
        cli::LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
    let json = cli.command.json();
    progress::set_mode(cli.command.common().progress);
    match commands::run(cli.command) {
        Ok(()) => 0,
        Err(e) => Failure::from_error(&e).report(json),
    }
}

/// A usage error in one line, from clap's error kind and context (not its
/// rendered text): what was wrong, with which argument and value, and why.
fn usage_message(e: &clap::Error) -> String {
    use clap::error::ContextKind;
    let ctx = |k| e.get(k).map(|v| v.to_string());
    let what = match (ctx(ContextKind::InvalidArg), ctx(ContextKind::InvalidValue)) {
        (Some(arg), Some(value)) => format!("invalid value {value:?} for {arg}"),
        (Some(arg), None) => format!("{}: {arg}", e.kind()),
        (None, _) => match ctx(ContextKind::InvalidSubcommand) {
            Some(sub) => format!("{}: {sub}", e.kind()),
            None => e.kind().to_string(),
        },
    };
    let what = match ctx(ContextKind::ValidValue) {
        Some(valid) => format!("{what} (one of {valid})"),
        None => what,
    };
    match std::error::Error::source(e) {
        Some(why) => format!("{what}: {why}"),
        None => what,
    }
}
