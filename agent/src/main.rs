//! `diskferry`: the binary is glue over the agent, protocol and sync-engine crates.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(diskferry_agent::run());
}
