//! Arguments of the commands that serve the operator's tooling: shell
//! completions and man pages (for packages), the host bench, and
//! `ungroup`.

use std::path::PathBuf;

use clap::Args;

use super::Common;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write completions for (on stdout).
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Where to write the pages: diskferry.1 and one diskferry-COMMAND.1 per command.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The peer agent to measure QUIC throughput and its write to (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT", requires = "peer_fingerprint")]
    pub peer: Option<String>,
    /// Hex SHA-256 of the peer agent's certificate (`diskferry id` there).
    #[arg(long, value_name = "HEX")]
    pub peer_fingerprint: Option<String>,
    /// A disk (file or block device) to measure reads on; its first GiB is read (default: a
    /// 256 MiB sample written in the state directory).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// The disk size to estimate a full download and a delta for, like 2T or 500G (default: the
    /// --disk's size, else 1T).
    #[arg(long)]
    pub size: Option<String>,
    /// Hashing threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Upper bound for MTU discovery (default: 65000 on loopback, 1452 elsewhere).
    #[arg(long)]
    pub max_mtu: Option<u16>,
    /// The agent's config (its state_dir holds this agent's identity).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct UngroupArgs {
    /// The replication group to forget (see `diskferry points --group`).
    #[arg(long, value_name = "NAME")]
    pub group: String,
    /// The target agent's config (its state_dir is used).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds to wait while a session holds a member before failing with E_BUSY.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub wait: u64,
    /// Forget it even when some members are live and the members are not at one group point (a
    /// group failover cut part way, which `failover --group` could still finish).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub common: Common,
}
