//! A target named on the command line (a path, or a name of a serve
//! config), and opening it while a session may hold it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::Error;

use crate::cli::TargetArg;
use crate::config::Config;
use crate::state;

/// Where a named target lives.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The disk's canonical path.
    pub path: PathBuf,
    /// The agent's state directory.
    pub state_root: PathBuf,
    /// Its name in the serve config.
    pub name: Option<String>,
}

/// Resolves `target` (with `config`, one of its target names) and the state
/// directory (`--state-dir`, else the config's, else the default).
pub fn resolve(target: &str, config: Option<&Path>, state_dir: Option<PathBuf>) -> Result<Resolved, Error> {
    let (path, state_dir, name) = match config {
        Some(file) => {
            let config = Config::load(file)?;
            let t = config.targets.get(target).ok_or_else(|| {
                Error::new(ErrorCode::UnknownTarget, format!("{} has no target named {target:?}", file.display()))
                    .hint("give a target name from that config, or a path without --config")
            })?;
            (t.path.clone(), state_dir.or(config.state_dir), Some(target.to_string()))
        }
        None => (state::canonical_target(Path::new(target))?, state_dir, None),
    };
    let state_root = state::prepare(&state::resolve(state_dir))?;
    Ok(Resolved { path, state_root, name })
}

/// The state directory: `--state-dir`, else `config`'s, else the default.
pub fn state_root(config: Option<&Path>, state_dir: Option<PathBuf>) -> Result<PathBuf, Error> {
    let from_config = match (config, &state_dir) {
        (Some(file), None) => Config::load(file)?.state_dir,
        _ => None,
    };
    state::prepare(&state::resolve(state_dir.or(from_config)))
}

/// [`resolve`] for a [`TargetArg`], requiring that diskferry has state for it.
pub fn resolve_arg(a: &TargetArg, state_dir: Option<PathBuf>) -> Result<Resolved, Error> {
    let Some(target) = &a.target else {
        return Err(Error::new(ErrorCode::Usage, "--group applies to failover, commit, points and test-failover")
            .hint("name one target"));
    };
    let r = resolve(target, a.config.as_deref(), state_dir)?;
    if !Target::state_dir(&r.state_root, &r.path).is_dir() {
        return Err(Error::new(
            ErrorCode::NoState,
            format!("{} has no diskferry state in {}", r.path.display(), r.state_root.display()),
        )
        .hint("check the path and --state-dir (or --config: the target agent's state directory)"));
    }
    Ok(r)
}

/// Opens the target (recovering an interrupted apply or move first),
/// waiting up to `wait` while a session holds it. Nothing is pruned.
pub fn open_waiting(r: &Resolved, wait: Duration) -> Result<Target, Error> {
    let deadline = Instant::now() + wait;
    loop {
        let opts = TargetOptions { name: r.name.clone(), ..Default::default() };
        match Target::open(Arc::new(RealFs), &r.state_root, &r.path, opts) {
            Err(e) if e.code == ErrorCode::Busy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.code == ErrorCode::Busy => {
                return Err(Error::new(
                    ErrorCode::Busy,
                    format!("{} is still in use by a session after {} s", r.path.display(), wait.as_secs()),
                )
                .hint("let the push finish (or stop it), then run this again; --wait SECONDS waits longer"))
            }
            other => return other,
        }
    }
}

/// [`open_waiting`] for a disk named by its path in `state_root`.
pub fn open_path_waiting(state_root: &Path, path: &Path, wait_secs: u64) -> Result<Target, Error> {
    let r = Resolved { path: path.to_path_buf(), state_root: state_root.to_path_buf(), name: None };
    open_waiting(&r, Duration::from_secs(wait_secs))
}

/// A move on a target run beside a local agent: its job on the agent's
/// page, and the agent's hold on the target (released when dropped).
pub struct Move {
    pub job: crate::local_agent::AgentJob,
    _released: Option<crate::local_agent::Released>,
}

/// Opens the target for a move (`kind`: `failover`, `commit`, `abort` …):
/// the local agent, if one serves it, cancels its session at a safe point
/// and refuses new ones until the move is done; the move shows as a job.
/// The move comes first: bound in that order, the target (and its lock)
/// is dropped before the agent's hold ends, so a session the agent lets in
/// then does not find the target still locked (`E_BUSY`).
pub fn open_for_move(r: &Resolved, kind: &str, wait: Duration) -> Result<(Move, Target), Error> {
    use crate::jobs::JobResult;
    let job = crate::local_agent::AgentJob::start(
        &r.state_root,
        kind,
        &r.path.display().to_string(),
        "",
        r.name.as_deref().unwrap_or_default(),
    );
    let hold = wait + crate::serve::registry::HOLD_MARGIN;
    let released = match crate::local_agent::release(&r.state_root, &r.path, kind, hold) {
        Ok(x) => x,
        Err(e) => {
            job.finish(JobResult::failed(&e));
            return Err(e);
        }
    };
    match open_waiting(r, wait) {
        Ok(t) => Ok((Move { job, _released: released }, t)),
        Err(e) => {
            job.finish(JobResult::failed(&e));
            Err(e)
        }
    }
}
