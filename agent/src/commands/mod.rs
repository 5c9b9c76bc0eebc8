//! One module per subcommand.

mod abort;
mod bench;
mod demo;
mod export;
mod failover;
mod failover_sync;
mod group_moves;
mod hash;
mod net;
mod ops;
pub use ops::long_version;
mod plan;
mod points;
mod push_group;
mod reload;
mod status;
mod sync;
mod target_arg;
mod test_failover;
mod verify;

use crate::cli::Command;

/// Runs a parsed command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Hash(a) => hash::run(a),
        Command::Abort(a) => abort::run(a),
        Command::Failover(a) => failover::failover(a),
        Command::Commit(a) => failover::commit(a),
        Command::Demote(a) => failover::demote(a),
        Command::TestFailover(a) => test_failover::run(a),
        Command::FailoverSync(a) => failover_sync::run(a),
        Command::Sync(a) => sync::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Points(a) => points::run(a),
        Command::Export(a) => export::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Init(a) => net::init(a),
        Command::Id(a) => net::id(a),
        Command::Serve(a) => net::serve(a),
        Command::Push(a) => net::push(a),
        Command::PushGroup(a) => push_group::run(a),
        Command::Plan(c) => plan::run(c),
        Command::Status(a) => status::run(a),
        Command::Reload(a) => reload::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Completions(a) => ops::completions(a),
        Command::Man(a) => ops::man(a),
        Command::Ungroup(a) => group_moves::ungroup(a),
    }
}
