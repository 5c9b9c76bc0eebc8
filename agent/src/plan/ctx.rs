//! What the steps of one plan run share: the mode, the point choice, the
//! options, this host's agent and the recovery site, the hooks' runner,
//! the progress reporter and the journal.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use diskferry_protocol::ErrorCode;
use serde_json::{json, Value};

use super::journal::Journal;
use super::step::{self, ProgressFormat, Reporter, StepError};
use super::Plan;
use crate::units::round_secs;

/// The recovery site: its serve config, state directory and targets.
pub struct Site {
    pub config: PathBuf,
    pub state_root: PathBuf,
    pub targets: std::collections::BTreeMap<String, PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Planned,
    Unplanned,
    Test,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Planned => "planned",
            Mode::Unplanned => "unplanned",
            Mode::Test => "test",
        }
    }
}

/// Which point each VM goes to (unplanned and test modes).
#[derive(Clone, Copy, Debug)]
pub enum PointChoice {
    /// The newest recovery point (crash- or app-consistent).
    Latest,
    /// The newest point that is app-consistent on every disk of the VM.
    LatestApp,
    /// The newest recovery point not after this time.
    NotAfter(jiff::Timestamp),
}

impl PointChoice {
    pub fn parse(s: &str) -> Result<PointChoice, String> {
        match s {
            "latest" => Ok(PointChoice::Latest),
            "latest-app" => Ok(PointChoice::LatestApp),
            t => t
                .parse::<jiff::Timestamp>()
                .map(PointChoice::NotAfter)
                .map_err(|e| format!("{t:?} is not latest, latest-app or an RFC 3339 time ({e})")),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PointChoice::Latest => "a recovery point (crash- or app-consistent)".into(),
            PointChoice::LatestApp => "app-consistent on every disk".into(),
            PointChoice::NotAfter(t) => format!("a recovery point not after {t}"),
        }
    }

    pub fn as_json(&self) -> String {
        match self {
            PointChoice::Latest => "latest".into(),
            PointChoice::LatestApp => "latest-app".into(),
            PointChoice::NotAfter(t) => t.to_string(),
        }
    }
}

/// How a plan is run.
pub struct RunOptions {
    pub mode: Mode,
    pub point: PointChoice,
    /// This host's agent config: on the recovery site its serve config
    /// (else the plan's `recovery_config`); on the primary, where its
    /// state directory is (given to every failover-sync).
    pub config: Option<PathBuf>,
    /// This agent's state directory, given to every step.
    pub state_dir: Option<PathBuf>,
    /// Where test images go (else the plan's `test_dir`, else under the state directory).
    pub test_dir: Option<PathBuf>,
    pub progress: ProgressFormat,
    /// Ignore what an earlier run of the plan got done (its journal).
    pub restart: bool,
}

/// What every step of one run shares.
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub mode: Mode,
    pub point: PointChoice,
    pub opts: &'a RunOptions,
    pub site: OnceLock<Result<Site, StepError>>,
    pub report: Reporter,
    /// What this run and earlier ones of the plan got done (planned and unplanned).
    pub journal: Option<Journal>,
}

impl Ctx<'_> {
    /// `--state-dir DIR` when the run was given one.
    pub fn state_dir_args(&self) -> Vec<OsString> {
        match &self.opts.state_dir {
            Some(d) => vec!["--state-dir".into(), d.into()],
            None => Vec::new(),
        }
    }

    /// `--config FILE` and `--state-dir DIR` as given: where this host's
    /// agent keeps its state (a primary's failover-sync needs the disks'
    /// history, and demotes a live source there).
    pub fn agent_args(&self) -> Vec<OsString> {
        let mut a = self.state_dir_args();
        if let Some(c) = &self.opts.config {
            a.extend(["--config".into(), c.into()]);
        }
        a
    }

    /// Hooks' own output is captured when stderr carries JSON progress.
    pub fn capture_hooks(&self) -> bool {
        self.report.format == ProgressFormat::Json
    }

    /// The recovery site, read once.
    pub fn site(&self) -> Result<&Site, StepError> {
        self.site.get_or_init(|| load_site(self.plan, self.opts)).as_ref().map_err(Clone::clone)
    }

    pub fn test_dir(&self) -> Result<PathBuf, StepError> {
        match self.opts.test_dir.clone().or_else(|| self.plan.test_dir.clone()) {
            Some(d) => Ok(d),
            None => Ok(self.site()?.state_root.join("plan-tests").join(&self.plan.name)),
        }
    }

    /// The environment of hooks and start commands.
    pub fn env(&self, group: Option<&str>) -> Vec<(&'static str, OsString)> {
        let mut env = vec![
            ("DISKFERRY_PLAN", OsString::from(&self.plan.name)),
            ("DISKFERRY_MODE", OsString::from(self.mode.as_str())),
        ];
        if let Some(g) = group {
            env.push(("DISKFERRY_GROUP", g.into()));
        }
        env
    }

    /// Runs one hook, telling it; `None` when there is none.
    pub fn hook(&self, scope: &str, name: &str, cmd: Option<&String>, group: Option<&str>) -> Option<Value> {
        let cmd = cmd?;
        let start = Instant::now();
        let label = format!("{scope} {name} hook");
        let capture = self.capture_hooks();
        let r = step::hook(&format!("{scope}-{name}"), cmd, &self.env(group), self.plan.hook_timeout, capture);
        let secs = start.elapsed().as_secs_f64();
        let mut v =
            json!({ "scope": scope, "hook": name, "group": group, "ok": r.is_ok(), "seconds": round_secs(secs) });
        match &r {
            Ok(out) => {
                if capture {
                    let from = out.char_indices().rev().nth(2000).map_or(0, |(i, _)| i);
                    v["output"] = json!(&out[from..]);
                }
                self.report.event("hook", v.clone(), || format!("{label}: done in {secs:.1} s"))
            }
            Err(e) => {
                v["error"] = e.json();
                self.report
                    .event("hook", v.clone(), || format!("{label}: error[{}]: {} — {}", e.code, e.message, e.hint));
            }
        }
        Some(v)
    }
}

fn load_site(plan: &Plan, o: &RunOptions) -> Result<Site, StepError> {
    let Some(config) = o.config.clone().or_else(|| plan.recovery_config.clone()) else {
        return Err(StepError::new(
            ErrorCode::Usage,
            "this mode runs on the recovery site and needs its serve config",
            "give --config FILE, or recovery_config in the plan",
        ));
    };
    let c = crate::config::Config::load(&config)?;
    let state_root = crate::state::prepare(&crate::state::resolve(o.state_dir.clone().or(c.state_dir)))?;
    let targets = c.targets.into_iter().map(|(name, t)| (name, t.path)).collect();
    Ok(Site { config, state_root, targets })
}

/// This host's state directory: `--state-dir`, else its config's, else the default.
pub fn this_state_root(o: &RunOptions) -> Result<PathBuf, StepError> {
    let from_config = match (&o.config, &o.state_dir) {
        (Some(c), None) => crate::config::Config::load(c)?.state_dir,
        _ => None,
    };
    Ok(crate::state::prepare(&crate::state::resolve(o.state_dir.clone().or(from_config)))?)
}
