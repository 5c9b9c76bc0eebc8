//! The arguments of `diskferry plan run` and `plan cleanup`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::Common;

#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    /// Fail a plan's VMs over, group after group: --planned on the primary (failover-sync
    /// --promote of each VM; stops at the first error), --unplanned on the recovery site
    /// (failover to --point; goes on past errors), --test (test-failover images instead).
    Run(PlanRunArgs),
    /// Remove the test images a `plan run --test` made, unpinning their points.
    Cleanup(PlanCleanupArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["planned", "unplanned", "test"])))]
pub struct PlanRunArgs {
    /// The plan file (TOML).
    pub plan: PathBuf,
    /// On the primary: sync before failover and promote, group after group.
    #[arg(long)]
    pub planned: bool,
    /// On the recovery site: fail every VM over to --point.
    #[arg(long)]
    pub unplanned: bool,
    /// On the recovery site: writable test images of --point, replication untouched.
    #[arg(long)]
    pub test: bool,
    /// latest (newest crash- or app-consistent point), latest-app (newest point app-consistent on
    /// every disk of the VM), or an RFC 3339 time (the newest point not after it).
    #[arg(long, default_value = "latest", value_parser = plan_point, conflicts_with = "planned")]
    pub point: crate::plan::PointChoice,
    #[command(flatten)]
    pub site: PlanSiteArgs,
    /// Start over: ignore what an earlier run of the plan that failed got done (by default a
    /// rerun skips the VMs it failed over and started).
    #[arg(long)]
    pub restart: bool,
    #[command(flatten)]
    pub common: Common,
}

/// Where this host's agent is.
#[derive(Args, Debug)]
pub struct PlanSiteArgs {
    /// This host's agent config: on the recovery site its serve config (default: the plan's
    /// recovery_config); on the primary, the config whose state_dir holds the disks' history.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where test images go (default: the plan's test_dir, else STATE_DIR/plan-tests/PLAN).
    #[arg(long, value_name = "DIR")]
    pub test_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PlanCleanupArgs {
    /// The plan file (TOML).
    pub plan: PathBuf,
    #[command(flatten)]
    pub site: PlanSiteArgs,
    #[command(flatten)]
    pub common: Common,
}

fn plan_point(s: &str) -> Result<crate::plan::PointChoice, String> {
    crate::plan::PointChoice::parse(s)
}
