//! `diskferry`: the binary is glue over the protocol and sync-engine crates.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod config;
mod identity;
mod output;
mod progress;
mod push;
mod serve;
mod state;
mod transport;
mod trust;

use clap::Parser;
use diskferry_protocol::ErrorCode;

use output::Failure;

fn main() {
    let cli = match cli::Cli::try_parse() {
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
                std::process::exit(if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { 2 } else { 0 });
            }
            let json = std::env::args().any(|a| a == "--json");
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            let f = Failure {
                code: ErrorCode::Usage,
                message: first.to_string(),
                hint: Some("see `diskferry --help` or `diskferry COMMAND --help`".into()),
                extra: None,
            };
            std::process::exit(f.report(json));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let json = cli.command.json();
    if let Err(e) = commands::run(cli.command) {
        let code = Failure::from_error(&e).report(json);
        std::process::exit(code);
    }
}
