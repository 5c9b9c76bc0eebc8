//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use diskferry_protocol::{BlockSize, Generation};

mod ops;
mod plan;
pub use ops::{BenchArgs, CompletionsArgs, ManArgs, UngroupArgs};
pub use plan::{PlanCleanupArgs, PlanCommand, PlanRunArgs, PlanSiteArgs};

/// diskferry replicates virtual disks: it hashes blocks in parallel, ships only
/// what changed (or everything, for a first copy) and applies it so the
/// replica is always a complete recovery point.
#[derive(Parser, Debug)]
#[command(name = "diskferry", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Hash a disk's blocks in parallel and print the root of its hash tree.
    Hash(HashArgs),
    /// Bring a local target disk up to date with a source disk (no network).
    Sync(SyncArgs),
    /// Recover an interrupted apply, then check a target against its committed manifest.
    Verify(VerifyArgs),
    /// List a target's recovery points.
    Points(PointsArgs),
    /// Write an image of one of a target's recovery points.
    Export(ExportArgs),
    /// Discard an interrupted push's staged data (the target stays at its last commit).
    Abort(AbortArgs),
    /// Promote a target to a recovery point (the newest consistent one by default) and mark it live.
    Failover(FailoverArgs),
    /// Keep a target's current point and drop the others (after a failover, or a discarded split brain).
    Commit(MoveArgs),
    /// Write a test image of a recovery point, pinned while it exists; --cleanup removes it.
    TestFailover(TestFailoverArgs),
    /// Turn a live target back into a replica once its VM moved away.
    Demote(MoveArgs),
    /// Sync before failover: delta passes while the VM runs, then the quiesce command, the last delta,
    /// a consistent point (promoted with --promote), and the downtime it took.
    FailoverSync(FailoverSyncArgs),
    /// Create this agent's key and certificate and print its fingerprint.
    Init(InitArgs),
    /// Print this agent's certificate fingerprint.
    Id(InitArgs),
    /// Run the target agent: receive disks from trusted peers over QUIC.
    Serve(ServeArgs),
    /// Send a disk to a target agent over QUIC (delta or full).
    Push(PushArgs),
    /// Push several disks as one replication group: one snapshot moment (the pre hook, every
    /// snapshot, the post hook), and the target commits them as one group point, or none.
    PushGroup(PushGroupArgs),
    /// Forget a replication group on its target agent, so its disks can be pushed alone or
    /// regrouped (their points stay).
    Ungroup(UngroupArgs),
    /// Recovery plans: ordered groups of VMs failed over group after group (docs/plans.md).
    #[command(subcommand)]
    Plan(PlanCommand),
    /// What the local agent (`serve`) is doing: protected disks and their RPO, jobs, targets.
    Status(StatusArgs),
    /// Have the local agent reload its config (SIGHUP) and wait for the result: non-zero when
    /// it was refused (the old config keeps running).
    Reload(StatusArgs),
    /// Push a generated sample disk to an in-process target agent (full, then delta) and print a table.
    Demo(DemoArgs),
    /// Measure this host's read, hash and write, and QUIC to a peer; name what limits a full
    /// download and a delta between them, with an estimate for a disk size.
    Bench(BenchArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(CompletionsArgs),
    /// Write the man pages: diskferry(1) and one per command.
    Man(ManArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML config: listen, state_dir, max_sessions, peer and target tables.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// A zstd level, or none.
#[derive(Clone, Copy, Debug)]
pub struct Compress(pub Option<i32>);

fn compress_level(s: &str) -> Result<Compress, String> {
    if s == "off" {
        return Ok(Compress(None));
    }
    match s.parse::<i32>() {
        Ok(l) if (1..=19).contains(&l) => Ok(Compress(Some(l))),
        _ => Err("a zstd level from 1 to 19, or off".into()),
    }
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Source disk: image file, block device, or NBD URL (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT).
    pub src: PathBuf,
    /// Target name in the target agent's config.
    #[arg(long, value_name = "NAME")]
    pub target: String,
    #[command(flatten)]
    pub opts: PushOpts,
}

#[derive(Args, Debug)]
pub struct PushGroupArgs {
    /// The replication group's name (the target agent learns its members from its first group push).
    #[arg(long, value_name = "NAME")]
    pub group: String,
    /// A member: its source disk and its target name on the peer (repeat for every disk).
    #[arg(long = "disk", value_name = "SRC=TARGET", required = true, value_parser = disk_pair)]
    pub disks: Vec<(PathBuf, String)>,
    #[command(flatten)]
    pub opts: PushOpts,
}

fn disk_pair(s: &str) -> Result<(PathBuf, String), String> {
    match s.rsplit_once('=') {
        Some((src, target)) if !src.is_empty() && !target.is_empty() => Ok((PathBuf::from(src), target.to_string())),
        _ => Err(format!("{s:?} is not SRC=TARGET")),
    }
}

/// What a push of one disk is told besides the disk and its target (shared by `push-group`).
#[derive(Args, Debug, Clone)]
pub struct PushOpts {
    /// How SRC's bytes are read: raw (the file is the disk), or an image format read through a
    /// read-only qemu-nbd that diskferry starts and stops. The replica holds the guest-visible disk.
    #[arg(long, value_enum, default_value = "raw")]
    pub format: crate::nbd::Format,
    /// Target agent address.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer: String,
    /// Hex SHA-256 of the target agent's certificate (`diskferry id` on that host).
    #[arg(long, value_name = "HEX")]
    pub peer_fingerprint: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: ModeArg,
    /// Block size: a power of two from 4K to 4M.
    #[arg(long, default_value = "64K", value_parser = block_size)]
    pub block_size: BlockSize,
    /// zstd level for block payloads (skipped for data it does not shrink), or off.
    #[arg(long, default_value = "1", value_parser = compress_level)]
    pub compress: Compress,
    /// Push to a target that changed behind diskferry's back, or whose disk has a history unrelated to
    /// this source's (full compare; its changes are overwritten). Never into a live target.
    #[arg(long)]
    pub force: bool,
    /// The target's disk advanced past the last point it shares with this source (split brain):
    /// discard its changes, keeping them there as a recovery point until `diskferry commit`.
    #[arg(long)]
    pub discard_target_changes: bool,
    #[command(flatten)]
    pub snapshot: SnapshotArgs,
    /// What says which blocks may have changed since the target's generation: full-scan (read
    /// every block), ranges:FILE (a change list {"since": GEN, "ranges": [[offset, length], ...]}),
    /// extent-map (with --snapshot reflink: the extents the new clone no longer shares with the
    /// last push's), or dirty-bitmap (with --format qcow2, and --qmp for a running VM: the bitmap
    /// started as the last push began reading).
    /// A hint not tied to the target's generation is not used: the disk is then read in full.
    #[arg(long, default_value = "full-scan", value_name = "SOURCE")]
    pub changes: crate::changes::Changes,
    /// The running VM's QMP socket (one of its own for diskferry): with --changes dirty-bitmap,
    /// the VM's disk (--node) is read through QEMU's NBD server and its bitmaps are kept over QMP.
    /// When no QEMU listens there, SRC (the qcow2 image) is read at rest.
    #[arg(long, value_name = "SOCKET", requires = "node")]
    pub qmp: Option<PathBuf>,
    /// The disk's block node in the running VM (its qcow2 format node, as `query-named-block-nodes` names it).
    #[arg(long, value_name = "NAME", requires = "qmp")]
    pub node: Option<String>,
    /// Share of the blocks a hint calls clean that are re-hashed to test it (at least 16 blocks);
    /// one changed block and the disk is read in full.
    #[arg(long, default_value_t = 0.001, value_parser = fraction)]
    pub spot_check: f64,
    /// Seed of the spot check's sample (default: random).
    #[arg(long)]
    pub spot_check_seed: Option<u64>,
    /// Hashing threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest UDP payload to discover (default: 65000 on loopback, 1452 elsewhere).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1200..=65000))]
    pub max_mtu: Option<u16>,
    /// Limit the block payload to RATE bytes a second, paced evenly (binary suffixes: 50M is
    /// 50 MiB/s).
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub bwlimit: Option<u64>,
    /// This host's serve config: its state_dir is used (the agent's one state directory).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds a silent target is waited for before the push fails (it can then be resumed).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout: u64,
    #[command(flatten)]
    pub common: Common,
}

/// How the source is snapshotted, and the hooks around it.
#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// none: read the disk itself (a running disk gives a fuzzy point); reflink: clone it beside
    /// itself (XFS, btrfs) and read the clone; cmd: --snapshot-cmd prints a snapshot's path.
    #[arg(long, value_enum, default_value = "none")]
    pub snapshot: crate::snapshot::SnapshotKind,
    /// Command (sh -c) that takes a snapshot and prints its path as its last line.
    #[arg(long, value_name = "CMD")]
    pub snapshot_cmd: Option<String>,
    /// Command run with the snapshot's path as its last argument afterwards, also after a failure.
    #[arg(long, value_name = "CMD")]
    pub snapshot_cleanup_cmd: Option<String>,
    /// Command run just before the snapshot (e.g. a filesystem freeze through a guest agent).
    #[arg(long, value_name = "CMD")]
    pub pre_snapshot: Option<String>,
    /// Command run right after the snapshot; always, once the pre hook ran.
    #[arg(long, value_name = "CMD")]
    pub post_snapshot: Option<String>,
    /// Seconds a hook or snapshot command may run before it is killed (E_HOOK).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub hook_timeout: u64,
    /// QMP socket of the running QEMU guest these disks belong to: it is paused (QMP stop, which
    /// drains its I/O) while the snapshots are taken, then resumed — one moment for every disk.
    #[arg(long, value_name = "SOCKET")]
    pub pause_vm_qmp: Option<PathBuf>,
}

impl SnapshotArgs {
    /// The options the push takes.
    pub fn options(&self) -> crate::snapshot::SnapshotOptions {
        crate::snapshot::SnapshotOptions {
            kind: self.snapshot,
            cmd: self.snapshot_cmd.clone(),
            cleanup_cmd: self.snapshot_cleanup_cmd.clone(),
            pre: self.pre_snapshot.clone(),
            post: self.post_snapshot.clone(),
            hook_timeout: std::time::Duration::from_secs(self.hook_timeout),
            keep: false,
            pause_qmp: self.pause_vm_qmp.clone(),
        }
    }
}

fn block_size(s: &str) -> Result<BlockSize, String> {
    s.parse::<BlockSize>().map_err(|e| e.to_string())
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err("a share from 0 to 1 (0.001 is 0.1 %)".into()),
    }
}

fn generation(s: &str) -> Result<Generation, String> {
    s.parse::<Generation>().map_err(|e| e.to_string())
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// State directory (default /var/lib/diskferry as root, else $XDG_STATE_HOME/diskferry).
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Print one compact JSON object as the last line of stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long commands show progress on stderr: auto (a bar on a terminal), bar, json (one
    /// object per phase change and about once a second), none.
    #[arg(long, value_enum, global = true, default_value = "auto")]
    pub progress: crate::progress::ProgressMode,
    /// Log lines on stderr: text (colours only on a terminal), or json (one object per line,
    /// for journald and log shippers).
    #[arg(long, value_enum, global = true, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct HashArgs {
    /// Disk image, block device, or NBD URL.
    pub disk: PathBuf,
    /// How the disk's bytes are read (raw, or an image format through qemu-nbd).
    #[arg(long, value_enum, default_value = "raw")]
    pub format: crate::nbd::Format,
    /// Block size: a power of two from 4K to 4M.
    #[arg(long, default_value = "64K", value_parser = block_size)]
    pub block_size: BlockSize,
    /// Hashing threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the manifest (block hashes and hash tree) to this file.
    #[arg(long, value_name = "OUT")]
    pub manifest: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// Delta when the target exists, full otherwise.
    Auto,
    /// Compare and write only what changed.
    Delta,
    /// Copy every non-zero block without comparing.
    Full,
}

impl From<ModeArg> for diskferry_protocol::message::SyncMode {
    fn from(m: ModeArg) -> Self {
        use diskferry_protocol::message::SyncMode;
        match m {
            ModeArg::Auto => SyncMode::Auto,
            ModeArg::Delta => SyncMode::Delta,
            ModeArg::Full => SyncMode::Full,
        }
    }
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Source disk: image file, block device, or NBD URL.
    pub src: PathBuf,
    /// How SRC's bytes are read: raw, or an image format through a read-only qemu-nbd.
    #[arg(long, value_enum, default_value = "raw")]
    pub format: crate::nbd::Format,
    /// Target disk (image file or block device).
    pub dst: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: ModeArg,
    /// Block size: a power of two from 4K to 4M.
    #[arg(long, default_value = "64K", value_parser = block_size)]
    pub block_size: BlockSize,
    /// Sync a target that changed behind diskferry's back, or whose disk has a history unrelated to
    /// this source's (full compare; its changes are overwritten). Never into a live target.
    #[arg(long)]
    pub force: bool,
    /// The target's disk advanced past the last point it shares with the source (split brain):
    /// discard its changes, keeping them as a recovery point until `diskferry commit`.
    #[arg(long)]
    pub discard_target_changes: bool,
    /// Hashing threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Consistent recovery points to keep.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub retention: u32,
    /// A quiesce hook ran before the source was snapshotted: label the point app-consistent.
    #[arg(long)]
    pub app_consistent: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Target disk.
    pub dst: PathBuf,
    /// Hashing threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub wait: WaitArg,
    #[command(flatten)]
    pub common: Common,
}

/// How long a command that reads a target waits for a session to let go.
#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArg {
    /// Seconds to wait while a session holds the target before failing with E_BUSY.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub wait: u64,
}

#[derive(Args, Debug)]
pub struct PointsArgs {
    /// Target disk.
    #[arg(required_unless_present = "group")]
    pub dst: Option<PathBuf>,
    /// A replication group instead: the points every member holds (the group points).
    #[arg(long, value_name = "NAME", conflicts_with = "dst")]
    pub group: Option<String>,
    /// With --group: the target agent's config (its state_dir is used).
    #[arg(long, value_name = "FILE", requires = "group")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub wait: WaitArg,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Target disk.
    pub dst: PathBuf,
    /// Generation of the recovery point (see `diskferry points`).
    #[arg(long, value_parser = generation)]
    pub point: Generation,
    /// Image file to create.
    pub out: PathBuf,
    #[command(flatten)]
    pub wait: WaitArg,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct AbortArgs {
    #[command(flatten)]
    pub target: TargetArg,
    #[command(flatten)]
    pub common: Common,
}

/// A target named on the command line: a path, or a name of a serve config.
#[derive(Args, Debug, Clone)]
pub struct TargetArg {
    /// Target disk path, or with --config a target name from that serve config.
    #[arg(required_unless_present = "group")]
    pub target: Option<String>,
    /// A replication group (see `push-group`) instead of one target: the move applies to every
    /// member (failover, commit, points).
    #[arg(long, value_name = "NAME", conflicts_with = "target")]
    pub group: Option<String>,
    /// The target agent's config: TARGET is one of its target names (and its state_dir is used).
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Seconds to wait while a session holds the target before failing with E_BUSY.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub wait: u64,
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    #[command(flatten)]
    pub target: TargetArg,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub target: TargetArg,
    /// The recovery point (see `diskferry points`); default: the newest consistent one.
    #[arg(long, value_parser = generation)]
    pub point: Option<Generation>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct FailoverSyncArgs {
    /// Source disk: image file, block device, or NBD URL (or --group with --disk for several).
    #[arg(required_unless_present = "group")]
    pub src: Option<PathBuf>,
    /// Target name in the target agent's config.
    #[arg(long, value_name = "NAME", required_unless_present = "group", conflicts_with = "group")]
    pub target: Option<String>,
    /// A VM with several disks: push them as this replication group (one point for all; see
    /// `push-group`), promoted together with --promote.
    #[arg(long, value_name = "NAME", requires = "disks", conflicts_with = "src")]
    pub group: Option<String>,
    /// A member of --group: its source disk and its target name on the peer (repeat for every disk).
    #[arg(long = "disk", value_name = "SRC=TARGET", value_parser = disk_pair, requires = "group")]
    pub disks: Vec<(PathBuf, String)>,
    #[command(flatten)]
    pub opts: PushOpts,
    /// Command (sh -c) that quiesces the VM: shuts it down or freezes it; waited for.
    #[arg(long, value_name = "CMD")]
    pub quiesce_cmd: String,
    /// Command run when the last delta fails after the quiesce (e.g. start the VM again).
    #[arg(long, value_name = "CMD")]
    pub unquiesce_cmd: Option<String>,
    /// Passes while the VM runs, at most.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_passes: u32,
    /// A pass that changed at most this much ends phase 1 (K, M, G suffixes).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = size)]
    pub converge_bytes: u64,
    /// Promote the final point on the target in the same session; a live source is then demoted.
    #[arg(long)]
    pub promote: bool,
    /// Seconds the quiesce command may take (a guest shutdown) before it is killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub quiesce_timeout: u64,
}

fn rate(s: &str) -> Result<u64, String> {
    crate::pace::parse_rate(s).ok_or_else(|| format!("{s:?} is not a rate (e.g. 50M for 50 MiB/s)"))
}

fn size(s: &str) -> Result<u64, String> {
    diskferry_protocol::parse_size(s).ok_or_else(|| format!("{s:?} is not a size (e.g. 64M)"))
}

#[derive(Args, Debug)]
pub struct TestFailoverArgs {
    /// Target disk path, or with --config a target name (not with --cleanup).
    #[arg(required_unless_present_any = ["cleanup", "group"])]
    pub target: Option<String>,
    /// A replication group instead: one image per member, `--out` (and `--cleanup`) being a
    /// directory that holds `MEMBER.img` for each.
    #[arg(long, value_name = "NAME", conflicts_with = "target")]
    pub group: Option<String>,
    /// The recovery point to write.
    #[arg(long, value_parser = generation, required_unless_present = "cleanup")]
    pub point: Option<Generation>,
    /// The image to create (reflink where the filesystem can, else a sparse copy).
    #[arg(long, value_name = "PATH", required_unless_present = "cleanup", conflicts_with = "cleanup")]
    pub out: Option<PathBuf>,
    /// Remove this test image and unpin its point.
    #[arg(long, value_name = "PATH")]
    pub cleanup: Option<PathBuf>,
    /// The target agent's config (its state_dir; TARGET is one of its target names).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds to wait while a session holds the target before failing with E_BUSY.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub wait: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the sample disk.
    #[arg(long, default_value = "512M")]
    pub size: String,
    #[command(flatten)]
    pub common: Common,
}

impl Command {
    pub fn json(&self) -> bool {
        self.common().json
    }

    /// The options every command has.
    pub fn common(&self) -> &Common {
        match self {
            Command::Hash(a) => &a.common,
            Command::Sync(a) => &a.common,
            Command::Verify(a) => &a.common,
            Command::Points(a) => &a.common,
            Command::Export(a) => &a.common,
            Command::Abort(a) => &a.common,
            Command::Failover(a) => &a.common,
            Command::Commit(a) | Command::Demote(a) => &a.common,
            Command::TestFailover(a) => &a.common,
            Command::FailoverSync(a) => &a.opts.common,
            Command::Demo(a) => &a.common,
            Command::Init(a) | Command::Id(a) => &a.common,
            Command::Serve(a) => &a.common,
            Command::Push(a) => &a.opts.common,
            Command::PushGroup(a) => &a.opts.common,
            Command::Plan(PlanCommand::Run(a)) => &a.common,
            Command::Plan(PlanCommand::Cleanup(a)) => &a.common,
            Command::Status(a) | Command::Reload(a) => &a.common,
            Command::Bench(a) => &a.common,
            Command::Completions(a) => &a.common,
            Command::Man(a) => &a.common,
            Command::Ungroup(a) => &a.common,
        }
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The agent's config (its state_dir is where the agent's socket is).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}
