//! One VM's steps in each mode of a plan: the `diskferry` commands that
//! fail it over (or make its test images, or remove them), and its start
//! command.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use diskferry_protocol::ErrorCode;
use serde_json::{json, Value};

use super::ctx::{Ctx, Mode, PointChoice, Site};
use super::journal::Done;
use super::step::{self, StepError};
use super::Vm;
use crate::units::{format_time, round_secs};

/// What became of one VM.
pub struct VmResult {
    pub name: String,
    pub seconds: f64,
    /// The point it was failed over to (or its test images show), once it was.
    pub point: Option<Point>,
    pub downtime: Option<f64>,
    /// Its disks on this site: live targets, or test images.
    pub disks: Vec<PathBuf>,
    /// The failover (or test images) went through.
    pub moved: bool,
    /// An earlier run of the plan did it all (its journal says so).
    pub earlier: bool,
    pub error: Option<StepError>,
}

#[derive(Clone)]
pub struct Point {
    pub generation: String,
    pub created_unix_ns: Option<i64>,
    pub consistency: String,
}

impl VmResult {
    /// Nothing done yet.
    pub fn new(name: &str) -> VmResult {
        VmResult {
            name: name.to_string(),
            seconds: 0.0,
            point: None,
            downtime: None,
            disks: Vec::new(),
            moved: false,
            earlier: false,
            error: None,
        }
    }

    /// `failed` (nothing moved), `start-failed` (failed over, its start
    /// command failed), `failed-over`, `test-image`, `done-earlier`.
    pub fn status(&self, mode: Mode) -> &'static str {
        match (&self.error, self.moved, mode) {
            (_, _, _) if self.earlier => "done-earlier",
            (Some(_), false, _) => "failed",
            (Some(_), true, _) => "start-failed",
            (None, _, Mode::Test) => "test-image",
            (None, _, _) => "failed-over",
        }
    }

    pub fn json(&self, mode: Mode) -> Value {
        let mut v = json!({
            "name": self.name,
            "status": self.status(mode),
            "point": self.point.as_ref().map(|p| &p.generation),
            "point_time": self.point.as_ref().and_then(|p| p.created_unix_ns).map(format_time),
            "consistency": self.point.as_ref().map(|p| &p.consistency),
            "seconds": round_secs(self.seconds),
            "disks": self.disks,
            "code": self.error.as_ref().map(|e| &e.code),
            "message": self.error.as_ref().map(|e| &e.message),
            "hint": self.error.as_ref().map(|e| &e.hint),
        });
        if let Some(d) = self.downtime {
            v["downtime_seconds"] = json!(round_secs(d));
        }
        v
    }
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// Fails `vm` over (or makes its test images), then runs its start
/// command; with a journal, skips what an earlier run of the plan did.
pub fn run(ctx: &Ctx, group: &str, vm: &Vm) -> VmResult {
    let start = Instant::now();
    let mut r = VmResult::new(&vm.name);
    let earlier = ctx.journal.as_ref().and_then(|j| j.get(&vm.name));
    let done = match (&earlier, ctx.mode) {
        (Some(d), _) if d.started => {
            r.earlier = true;
            r.point = Some(Point {
                generation: d.generation.clone(),
                created_unix_ns: None,
                consistency: d.consistency.clone(),
            });
            r.seconds = start.elapsed().as_secs_f64();
            return r;
        }
        // Failed over by an earlier run whose start command failed: the start only.
        (Some(d), _) => {
            r.point = Some(Point {
                generation: d.generation.clone(),
                created_unix_ns: None,
                consistency: d.consistency.clone(),
            });
            r.disks = earlier_disks(ctx, vm);
            Ok(())
        }
        (None, Mode::Planned) => planned(ctx, vm, &mut r),
        (None, Mode::Unplanned) => unplanned(ctx, vm, &mut r),
        (None, Mode::Test) => test(ctx, vm, &mut r),
    };
    r.moved = done.is_ok();
    let record = |started: bool| match (&ctx.journal, &r.point) {
        (Some(j), Some(p)) => {
            j.record(&vm.name, Done { generation: p.generation.clone(), consistency: p.consistency.clone(), started })
        }
        _ => Ok(()),
    };
    let start_cmd = match ctx.mode {
        Mode::Test => vm.test_start.as_ref(),
        _ => vm.start.as_ref(),
    };
    r.error = match (done, start_cmd) {
        (Err(e), _) => Some(e),
        (Ok(()), None) => record(true).err(),
        (Ok(()), Some(cmd)) => match record(false) {
            Err(e) => Some(e),
            Ok(()) => {
                let disks: Vec<String> = r.disks.iter().map(|p| p.display().to_string()).collect();
                let mut env = ctx.env(Some(group));
                env.push(("DISKFERRY_VM", os(&vm.name)));
                env.push(("DISKFERRY_POINT", os(r.point.as_ref().map(|p| p.generation.clone()).unwrap_or_default())));
                env.push(("DISKFERRY_DISKS", os(disks.join("\n"))));
                match step::hook("start", cmd, &env, ctx.plan.hook_timeout, ctx.capture_hooks()) {
                    Ok(_) => record(true).err(),
                    Err(e) => Some(e),
                }
            }
        },
    };
    r.seconds = start.elapsed().as_secs_f64();
    r
}

/// The disks a VM failed over by an earlier run starts from.
fn earlier_disks(ctx: &Ctx, vm: &Vm) -> Vec<PathBuf> {
    match (ctx.mode, ctx.site()) {
        (Mode::Unplanned, Ok(site)) => paths(site, vm).unwrap_or_default(),
        _ => vm.disks.iter().map(|d| PathBuf::from(&d.target)).collect(),
    }
}

/// The disks as `failover-sync` takes them: `--target T SRC`, or the group.
fn disk_args(vm: &Vm) -> Vec<OsString> {
    match (&vm.replication_group, vm.disks.as_slice()) {
        (None, [one]) => vec![os("--target"), os(&one.target), os(&one.source)],
        (rg, disks) => {
            let mut a = vec![os("--group"), os(rg.clone().unwrap_or_else(|| vm.name.clone()))];
            for d in disks {
                let mut pair = d.source.clone().into_os_string();
                pair.push("=");
                pair.push(&d.target);
                a.extend([os("--disk"), pair]);
            }
            a
        }
    }
}

fn planned(ctx: &Ctx, vm: &Vm, r: &mut VmResult) -> Result<(), StepError> {
    let quiesce = vm.quiesce.as_deref().ok_or_else(|| {
        StepError::new(ErrorCode::Config, "no quiesce command", "a planned failover needs `quiesce` for every VM")
    })?;
    let mut a = vec![os("failover-sync")];
    a.extend([os("--peer"), os(&vm.peer), os("--peer-fingerprint"), os(&vm.peer_fingerprint)]);
    a.extend([os("--quiesce-cmd"), os(quiesce), os("--promote")]);
    let timeout = vm.quiesce_timeout.unwrap_or(ctx.plan.hook_timeout.as_secs());
    a.extend([os("--quiesce-timeout"), os(timeout.to_string())]);
    if let Some(u) = &vm.unquiesce {
        a.extend([os("--unquiesce-cmd"), os(u)]);
    }
    if let Some(f) = &vm.format {
        a.extend([os("--format"), os(f)]);
    }
    a.extend(ctx.agent_args());
    // The source path last: SRC is positional.
    a.extend(disk_args(vm));
    // Never again by itself: it may have quiesced the VM before it failed.
    let v = step::diskferry_once(&a)?;
    r.point = Some(Point {
        generation: v["generation"].as_str().unwrap_or_default().to_string(),
        created_unix_ns: None,
        consistency: v["consistency"].as_str().unwrap_or_default().to_string(),
    });
    r.downtime = v["downtime_seconds"].as_f64();
    r.disks = vm.disks.iter().map(|d| PathBuf::from(&d.target)).collect();
    Ok(())
}

/// The target paths of `vm`'s disks on the recovery site.
fn paths(site: &Site, vm: &Vm) -> Result<Vec<PathBuf>, StepError> {
    vm.disks
        .iter()
        .map(|d| {
            site.targets.get(&d.target).cloned().ok_or_else(|| {
                StepError::new(
                    ErrorCode::UnknownTarget,
                    format!("{} has no target named {:?}", site.config.display(), d.target),
                    "the plan's disk targets are names from the recovery site's serve config",
                )
            })
        })
        .collect()
}

fn group_of(vm: &Vm) -> Option<String> {
    match (&vm.replication_group, vm.disks.len()) {
        (None, 1) => None,
        (rg, _) => Some(rg.clone().unwrap_or_else(|| vm.name.clone())),
    }
}

/// The point `ctx.point` picks among `vm`'s points on this site.
fn choose(ctx: &Ctx, site: &Site, vm: &Vm, paths: &[PathBuf]) -> Result<Point, StepError> {
    let listed = match (group_of(vm), paths) {
        (None, [path]) => step::diskferry(&[os("points"), os(path), os("--state-dir"), os(&site.state_root)])?,
        (rg, _) => {
            let rg = rg.unwrap_or_else(|| vm.name.clone());
            let mut a = vec![os("points"), os("--group"), os(rg), os("--config"), os(&site.config)];
            a.extend(ctx.state_dir_args());
            step::diskferry(&a)?
        }
    };
    let points = listed["points"].as_array().cloned().unwrap_or_default();
    let best = points
        .iter()
        .filter(|p| p["discarded"] != Value::Bool(true))
        .filter(|p| {
            let c = p["consistency"].as_str().unwrap_or("fuzzy");
            let t = p["created_unix_ns"].as_i64().unwrap_or(i64::MAX);
            match ctx.point {
                PointChoice::Latest => c != "fuzzy",
                PointChoice::LatestApp => c == "app-consistent",
                PointChoice::NotAfter(ts) => c != "fuzzy" && i128::from(t) <= ts.as_nanosecond(),
            }
        })
        .max_by_key(|p| p["created_unix_ns"].as_i64().unwrap_or(i64::MIN));
    let p = best.ok_or_else(|| {
        StepError::new(
            ErrorCode::NoSuchPoint,
            format!("{} has no point that is {}", vm.name, ctx.point.describe()),
            "`diskferry points` (with --group for a VM of several disks) lists what the recovery site holds",
        )
    })?;
    Ok(Point {
        generation: p["generation"].as_str().unwrap_or_default().to_string(),
        created_unix_ns: p["created_unix_ns"].as_i64(),
        consistency: p["consistency"].as_str().unwrap_or_default().to_string(),
    })
}

fn unplanned(ctx: &Ctx, vm: &Vm, r: &mut VmResult) -> Result<(), StepError> {
    let site = ctx.site()?;
    let paths = paths(site, vm)?;
    let point = choose(ctx, site, vm, &paths)?;
    let mut a = vec![os("failover")];
    match (group_of(vm), vm.disks.as_slice()) {
        (None, [one]) => a.push(os(&one.target)),
        (rg, _) => a.extend([os("--group"), os(rg.unwrap_or_else(|| vm.name.clone()))]),
    }
    a.extend([os("--config"), os(&site.config), os("--point"), os(&point.generation)]);
    a.extend(ctx.state_dir_args());
    step::diskferry(&a)?;
    r.point = Some(point);
    r.disks = paths;
    Ok(())
}

/// Where test mode puts `vm`'s images: `TEST_DIR/VM/`.
fn test_dir_of(ctx: &Ctx, vm: &Vm) -> Result<PathBuf, StepError> {
    Ok(ctx.test_dir()?.join(&vm.name))
}

fn test(ctx: &Ctx, vm: &Vm, r: &mut VmResult) -> Result<(), StepError> {
    let site = ctx.site()?;
    let paths = paths(site, vm)?;
    let point = choose(ctx, site, vm, &paths)?;
    let dir = test_dir_of(ctx, vm)?;
    std::fs::create_dir_all(&dir).map_err(|e| {
        StepError::new(ErrorCode::Io, format!("creating {}: {e}", dir.display()), "check test_dir in the plan")
    })?;
    if let Some(old) = images_in(&dir).first() {
        return Err(StepError::new(
            ErrorCode::InvalidInput,
            format!("{} is there from an earlier test", old.display()),
            "run `diskferry plan cleanup PLAN` first",
        ));
    }
    let mut a = vec![os("test-failover")];
    match (group_of(vm), vm.disks.as_slice()) {
        (None, [one]) => a.extend([os(&one.target), os("--out"), os(dir.join(format!("{}.img", one.target)))]),
        (rg, _) => a.extend([os("--group"), os(rg.unwrap_or_else(|| vm.name.clone())), os("--out"), os(&dir)]),
    }
    a.extend([os("--point"), os(&point.generation), os("--config"), os(&site.config)]);
    a.extend(ctx.state_dir_args());
    let v = step::diskferry(&a)?;
    // The images the agent made: a group's are one per member it knows.
    r.disks = match v["members"].as_array() {
        Some(members) => members.iter().filter_map(|m| m["out"].as_str()).map(PathBuf::from).collect(),
        None => v["out"].as_str().map(PathBuf::from).into_iter().collect(),
    };
    r.point = Some(point);
    Ok(())
}

/// The `*.img` files in `dir`.
fn images_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "img")).collect();
    out.sort();
    out
}

/// What cleaning up one VM's test images did.
pub struct Cleaned {
    pub removed: Vec<PathBuf>,
    /// Files in its test directory that no target pins: not diskferry's
    /// test images, so not removed.
    pub left: Vec<PathBuf>,
}

/// Removes `vm`'s test images, unpinning their points. Only files a
/// target pins as a test image are removed: the agent finds the target
/// by the image alone (whether one disk's or a group member's).
pub fn cleanup(ctx: &Ctx, vm: &Vm) -> Result<Cleaned, StepError> {
    let site = ctx.site()?;
    let dir = test_dir_of(ctx, vm)?;
    let mut done = Cleaned { removed: Vec::new(), left: Vec::new() };
    for image in images_in(&dir) {
        let mut a = vec![os("test-failover"), os("--cleanup"), os(&image), os("--config"), os(&site.config)];
        a.extend(ctx.state_dir_args());
        match step::diskferry(&a) {
            Ok(_) => done.removed.push(image),
            Err(e) if e.code == ErrorCode::NotFound.as_str() => done.left.push(image),
            Err(e) => return Err(e),
        }
    }
    // Only if it is empty now.
    let _ = std::fs::remove_dir(&dir);
    Ok(done)
}
