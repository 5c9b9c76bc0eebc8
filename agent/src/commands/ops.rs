//! `diskferry completions SHELL`, `diskferry man --out DIR`, and the long
//! version text (`diskferry --version`).

use anyhow::Result;
use clap::CommandFactory;
use diskferry_sync_engine::error::{IoContext, Place};

use crate::cli::{Cli, CompletionsArgs, ManArgs};

/// `--version`: the version, the commit, the protocol and what is built in.
pub fn long_version() -> String {
    format!(
        "{} (commit {})\nprotocol {} (ALPN {})\nfeatures: {}",
        env!("CARGO_PKG_VERSION"),
        env!("DISKFERRY_GIT_COMMIT"),
        diskferry_protocol::VERSION,
        String::from_utf8_lossy(diskferry_protocol::ALPN),
        FEATURES.join(", "),
    )
}

/// What this build can do, for bug reports and fleet inventories.
const FEATURES: &[&str] = &[
    "quic (quinn, rustls with aws-lc-rs, TLS 1.3)",
    "zstd",
    "nbd-client (qcow2, vmdk, vhdx, vdi through qemu-nbd)",
    "qmp (dirty bitmaps, pause)",
    "reflink snapshots and extent maps",
    "status-http (axum)",
    "metrics (prometheus)",
    "systemd-notify",
];

pub fn completions(a: CompletionsArgs) -> Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "diskferry", &mut std::io::stdout());
    Ok(())
}

/// diskferry.1, and diskferry-COMMAND.1 (diskferry-plan-run.1 for
/// nested commands), each with its command's options.
pub fn man(a: ManArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).ctx(Place::Target, "creating", &a.out)?;
    let cmd = Cli::command().long_version(long_version());
    let mut written = Vec::new();
    write_pages(&cmd, "diskferry", "diskferry", &a.out, &mut written)?;
    if a.common.json {
        crate::output::print_json(&serde_json::json!({ "pages": written }));
    } else {
        for p in &written {
            crate::outln!("{}", p.display());
        }
    }
    Ok(())
}

/// `name` is the page's (`diskferry-push-group`), `invoked` how it is run
/// (`diskferry push-group`).
fn write_pages(
    cmd: &clap::Command,
    name: &str,
    invoked: &str,
    dir: &std::path::Path,
    written: &mut Vec<std::path::PathBuf>,
) -> Result<()> {
    let page = cmd.clone().name(name.to_string()).bin_name(invoked.to_string());
    let mut bytes = Vec::new();
    clap_mangen::Man::new(page).render(&mut bytes)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, bytes).ctx(Place::Target, "writing", &path)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(
            sub,
            &format!("{name}-{}", sub.get_name()),
            &format!("{invoked} {}", sub.get_name()),
            dir,
            written,
        )?;
    }
    Ok(())
}
