//! One VM's steps in each mode of a plan: the `diskferry` commands that
//! fail it over (or make its test images, or remove them), and its start
//! command.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use diskferry_protocol::ErrorCode;
use serde_json::{json, Value};

use super::run::{Ctx, Mode, PointChoice};
use super::step::{self, StepError};
use super::Vm;
use crate::units::{format_time, round_secs};

/// The recovery site: its serve config, state directory and targets.
pub struct Site {
    pub config: PathBuf,
    pub state_root: PathBuf,
    pub targets: BTreeMap<String, PathBuf>,
}

/// What became of one VM.
pub struct VmResult {
    pub name: String,
    pub seconds: f64,
    /// The point it was failed over to (or its test images show).
    pub point: Option<Point>,
    pub downtime: Option<f64>,
    /// Its disks on this site: live targets, or test images.
    pub disks: Vec<PathBuf>,
    pub error: Option<StepError>,
}

#[derive(Clone)]
pub struct Point {
    pub generation: String,
    pub created_unix_ns: Option<i64>,
    pub consistency: String,
}

impl VmResult {
    pub fn json(&self, mode: Mode) -> Value {
        let status = match (&self.error, mode) {
            (Some(_), _) => "failed",
            (None, Mode::Test) => "test-image",
            (None, _) => "failed-over",
        };
        let mut v = json!({
            "name": self.name,
            "status": status,
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

/// Fails `vm` over (or makes its test images), then runs its start command.
pub fn run(ctx: &Ctx, group: &str, vm: &Vm) -> VmResult {
    let start = Instant::now();
    let mut r =
        VmResult { name: vm.name.clone(), seconds: 0.0, point: None, downtime: None, disks: Vec::new(), error: None };
    let done = match ctx.mode {
        Mode::Planned => planned(ctx, vm, &mut r),
        Mode::Unplanned => unplanned(ctx, vm, &mut r),
        Mode::Test => test(ctx, vm, &mut r),
    };
    let start_cmd = match ctx.mode {
        Mode::Test => vm.test_start.as_ref(),
        _ => vm.start.as_ref(),
    };
    r.error = match (done, start_cmd) {
        (Err(e), _) => Some(e),
        (Ok(()), None) => None,
        (Ok(()), Some(cmd)) => {
            let disks: Vec<String> = r.disks.iter().map(|p| p.display().to_string()).collect();
            let mut env = ctx.env(Some(group));
            env.push(("DISKFERRY_VM", os(&vm.name)));
            env.push(("DISKFERRY_POINT", os(r.point.as_ref().map(|p| p.generation.clone()).unwrap_or_default())));
            env.push(("DISKFERRY_DISKS", os(disks.join("\n"))));
            step::hook("start", cmd, &env, ctx.plan.hook_timeout).err()
        }
    };
    r.seconds = start.elapsed().as_secs_f64();
    r
}

/// The disks as `failover-sync` takes them: `SRC --target T`, or the group.
fn disk_args(vm: &Vm) -> Vec<OsString> {
    match (&vm.replication_group, vm.disks.as_slice()) {
        (None, [one]) => vec![os(&one.source), os("--target"), os(&one.target)],
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
    a.extend(disk_args(vm));
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
    a.extend(ctx.state_dir_args());
    let v = step::diskferry(&a)?;
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

/// The point `ctx.point` picks among `vm`'s points on this site.
fn choose(ctx: &Ctx, site: &Site, vm: &Vm, paths: &[PathBuf]) -> Result<Point, StepError> {
    let config = os(&site.config);
    let listed = match (&vm.replication_group, paths) {
        (None, [path]) => step::diskferry(&[os("points"), os(path), os("--state-dir"), os(&site.state_root)])?,
        (rg, _) => {
            let rg = rg.clone().unwrap_or_else(|| vm.name.clone());
            let mut a = vec![os("points"), os("--group"), os(rg), os("--config"), config];
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
    match (&vm.replication_group, vm.disks.as_slice()) {
        (None, [one]) => a.push(os(&one.target)),
        (rg, _) => a.extend([os("--group"), os(rg.clone().unwrap_or_else(|| vm.name.clone()))]),
    }
    a.extend([os("--config"), os(&site.config), os("--point"), os(&point.generation)]);
    a.extend(ctx.state_dir_args());
    r.point = Some(point);
    step::diskferry(&a)?;
    r.disks = paths;
    Ok(())
}

/// Where test mode puts `vm`'s images: `TEST_DIR/VM/TARGET.img`.
fn test_images(ctx: &Ctx, vm: &Vm) -> Result<(PathBuf, Vec<PathBuf>), StepError> {
    let dir = ctx.test_dir()?.join(&vm.name);
    let images = vm.disks.iter().map(|d| dir.join(format!("{}.img", d.target))).collect();
    Ok((dir, images))
}

fn test(ctx: &Ctx, vm: &Vm, r: &mut VmResult) -> Result<(), StepError> {
    let site = ctx.site()?;
    let paths = paths(site, vm)?;
    let point = choose(ctx, site, vm, &paths)?;
    let (dir, images) = test_images(ctx, vm)?;
    std::fs::create_dir_all(&dir).map_err(|e| {
        StepError::new(ErrorCode::Io, format!("creating {}: {e}", dir.display()), "check test_dir in the plan")
    })?;
    if let Some(old) = images.iter().find(|i| i.exists()) {
        return Err(StepError::new(
            ErrorCode::InvalidInput,
            format!("{} is there from an earlier test", old.display()),
            "run `diskferry plan cleanup PLAN` first",
        ));
    }
    let mut a = vec![os("test-failover")];
    match (&vm.replication_group, vm.disks.as_slice(), images.as_slice()) {
        (None, [one], [image]) => a.extend([os(&one.target), os("--out"), os(image)]),
        (rg, _, _) => {
            a.extend([os("--group"), os(rg.clone().unwrap_or_else(|| vm.name.clone())), os("--out"), os(&dir)])
        }
    }
    a.extend([os("--point"), os(&point.generation), os("--config"), os(&site.config)]);
    a.extend(ctx.state_dir_args());
    r.point = Some(point);
    step::diskferry(&a)?;
    r.disks = images;
    Ok(())
}

/// Removes `vm`'s test images (unpinning their points); the images it
/// removed. A VM without images is left as it is.
pub fn cleanup(ctx: &Ctx, vm: &Vm) -> Result<Vec<PathBuf>, StepError> {
    let site = ctx.site()?;
    let (dir, images) = test_images(ctx, vm)?;
    let present: Vec<PathBuf> = images.iter().filter(|i| i.exists()).cloned().collect();
    if present.is_empty() {
        remove_empty(&dir);
        return Ok(Vec::new());
    }
    // One image at a time, by the image alone: the agent finds the
    // target that pins it, whether the image was one disk's or a group's.
    for image in &present {
        let mut a = vec![os("test-failover"), os("--cleanup"), os(image), os("--config"), os(&site.config)];
        a.extend(ctx.state_dir_args());
        match step::diskferry(&a) {
            Ok(_) => {}
            // Pinned by no target: a file left by a test that died before
            // it pinned; it is ours to remove.
            Err(e) if e.code == ErrorCode::NotFound.as_str() => match std::fs::remove_file(image) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StepError::new(
                        ErrorCode::Io,
                        format!("removing {}: {e}", image.display()),
                        "remove it by hand",
                    ))
                }
            },
            Err(e) => return Err(e),
        }
    }
    remove_empty(&dir);
    Ok(present)
}

fn remove_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}
