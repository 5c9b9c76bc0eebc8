//! Recovery plans (`diskferry plan`): three groups of VMs — one VM with two
//! disks (a replication group), the others with one — replicated from a
//! primary to a recovery agent. A planned failover stops at a failing hook
//! with the groups before it live and the ones after it untouched; an
//! unplanned one goes on and reports every failure; `latest`, `latest-app`
//! and a time pick the right points; test images leave nothing behind
//! after `plan cleanup`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::agents::{push_to, Agent, Identity, TargetSpec};
use crate::util::*;

/// VM name → its disks as (source on the primary, target name).
const VMS: &[(&str, &str, &[&str])] = &[
    ("db", "db1", &["db1-sys", "db1-log"]),
    ("app", "app1", &["app1"]),
    ("app", "app2", &["app2"]),
    ("web", "web1", &["web1"]),
];

struct Site {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    primary: Identity,
    agent: Agent,
}

impl Site {
    fn new(name: &str) -> Site {
        let mut rng = rng(name);
        let tmp = tempdir(name);
        let dir = tmp.path().to_path_buf();
        let primary = Identity::init(&dir, "primary-state");
        let targets: Vec<String> = VMS.iter().flat_map(|(_, _, d)| d.iter().map(|s| s.to_string())).collect();
        let specs: Vec<TargetSpec<'_>> = targets
            .iter()
            .map(|t| TargetSpec { name: t, path: dir.join(format!("{t}.replica")), allowed: &["primary"] })
            .collect();
        let agent = Agent::start(&dir, &[("primary", &primary.fingerprint)], &specs, "");
        for t in &targets {
            make_disk(&dir.join(format!("{t}.img")), 4 * MIB + 4096 * (t.len() as u64), 0.6, &mut rng);
        }
        Site { _tmp: tmp, dir, primary, agent }
    }

    fn source(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.img"))
    }

    fn replica(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.replica"))
    }

    /// Pushes every VM once (the two-disk one as its replication group),
    /// with `extra` push options.
    fn push_all(&self, extra: &[&str]) {
        for (_, vm, disks) in VMS {
            if disks.len() == 1 {
                push_to(&self.source(disks[0]), &self.primary, &self.agent, disks[0], extra).ok();
                continue;
            }
            let mut a = vec![
                "push-group".to_string(),
                "--group".into(),
                vm.to_string(),
                "--peer".into(),
                self.agent.addr.to_string(),
                "--peer-fingerprint".into(),
                self.agent.id.fingerprint.clone(),
                "--state-dir".into(),
                self.primary.state.display().to_string(),
                "--json".into(),
            ];
            for d in *disks {
                a.extend(["--disk".into(), format!("{}={d}", self.source(d).display())]);
            }
            a.extend(extra.iter().map(|s| s.to_string()));
            let refs: Vec<&std::ffi::OsStr> = a.iter().map(std::ffi::OsStr::new).collect();
            run(&refs).ok();
        }
    }

    /// The plan file: `hooks` adds lines to a group's table (by group name).
    fn plan(&self, hooks: &[(&str, &str)], start: &str) -> PathBuf {
        let mut text = format!(
            "name = \"erp\"\nhook_timeout = 20\nrecovery_config = \"{}\"\ntest_dir = \"{}\"\n",
            self.agent.config.display(),
            self.dir.join("tests").display()
        );
        for g in ["db", "app", "web"] {
            text += &format!("[[group]]\nname = \"{g}\"\n");
            for (group, line) in hooks {
                if *group == g {
                    text += &format!("{line}\n");
                }
            }
            for (_, vm, disks) in VMS.iter().filter(|(group, _, _)| *group == g) {
                let list: Vec<String> = disks
                    .iter()
                    .map(|d| format!("{{ source = \"{}\", target = \"{d}\" }}", self.source(d).display()))
                    .collect();
                let started = self.dir.join(format!("started-{vm}"));
                text += &format!(
                    "[[group.vm]]\nname = \"{vm}\"\npeer = \"{}\"\npeer_fingerprint = \"{}\"\nquiesce = \"true\"\n\
                     start = \"{start}echo ran >> {}.count; echo \\\"$DISKFERRY_MODE $DISKFERRY_POINT\\\" > {}; echo \\\"$DISKFERRY_DISKS\\\" >> {}\"\n\
                     test_start = \"echo \\\"$DISKFERRY_DISKS\\\" > {}.test\"\ndisks = [{}]\n",
                    self.agent.addr,
                    self.agent.id.fingerprint,
                    started.display(),
                    started.display(),
                    started.display(),
                    started.display(),
                    list.join(", ")
                );
            }
        }
        let path = self.dir.join("erp.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `points --json` of one replica: its role and points.
    fn points(&self, target: &str) -> Value {
        self.agent.points(&self.replica(target)).ok_json()
    }

    fn plan_run(&self, plan: &Path, extra: &[&str]) -> Out {
        let mut a: Vec<&std::ffi::OsStr> = vec!["plan".as_ref(), "run".as_ref(), plan.as_os_str()];
        a.extend(extra.iter().map(std::ffi::OsStr::new));
        // The primary's state directory on the primary; the recovery
        // site's comes from its config.
        if extra.contains(&"--planned") {
            a.extend(["--state-dir".as_ref(), self.primary.state.as_os_str()]);
        }
        a.push("--json".as_ref());
        run(&a)
    }
}

fn vm_of<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["vms"].as_array().unwrap())
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no VM {name} in {summary}"))
}

fn group_status(summary: &Value, name: &str) -> String {
    let g = summary["groups"].as_array().unwrap().iter().find(|g| g["name"] == name).unwrap();
    string(g, "status")
}

#[test]
fn planned_failover_stops_at_a_failing_hook() {
    let s = Site::new("plan-planned");
    s.push_all(&[]);
    let before: Vec<Value> = ["app1", "app2", "web1"].iter().map(|t| s.points(t)).collect();
    let plan = s.plan(&[("app", "pre = \"echo app pre >&2; exit 4\"")], "");
    // The recovery site's config is not needed on the primary: the
    // planned run never reads it (the primary's state dir stands in).
    let out = s.plan_run(&plan, &["--planned", "--progress", "json"]);
    let v = out.expect_json_error("E_HOOK", 3);
    assert!(string(&v, "message").contains("stopped at group app"), "{v}");
    assert_eq!(v["stopped_at"], "group app", "{v}");
    assert_eq!(group_status(&v, "db"), "done");
    assert_eq!(group_status(&v, "app"), "failed");
    assert_eq!(group_status(&v, "web"), "untouched");
    // The group before it is live, both disks at one consistent point,
    // with the primary's bytes; its start command ran with that point.
    let db = vm_of(&v, "db1");
    let point = string(db, "point");
    assert_eq!(db["status"], "failed-over", "{db}");
    assert_ne!(db["consistency"], "fuzzy", "{db}");
    for d in ["db1-sys", "db1-log"] {
        let p = s.points(d);
        assert_eq!(p["role"], "live", "{d}: {p}");
        let current: Vec<&Value> = p["points"].as_array().unwrap().iter().filter(|x| x["current"] == true).collect();
        assert_eq!(current[0]["generation"], point.as_str(), "{d} at the plan's point: {p}");
        assert_same(&s.source(d), &s.replica(d));
    }
    let started = std::fs::read_to_string(s.dir.join("started-db1")).unwrap();
    assert!(started.starts_with(&format!("planned {point}")), "{started}");
    // The groups after it are untouched: same points, still replicas, no start.
    for (t, was) in ["app1", "app2", "web1"].iter().zip(&before) {
        let now = s.points(t);
        assert_eq!(now["points"], was["points"], "{t} untouched");
        assert_ne!(now["role"], "live", "{t}: {now}");
        assert!(!s.dir.join(format!("started-{t}")).exists());
    }
    // Every step was told as it happened, one JSON object per stderr line.
    let events: Vec<Value> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for want in ["plan_start", "group_start", "vm_start", "vm_done", "hook", "group_done", "group_skipped", "plan_done"]
    {
        assert!(names.contains(&want), "no {want} event in {names:?}");
    }
    // Fixed and run again: it goes on where it stopped; db1 is neither
    // synced nor started twice. Its hook writes on stderr: the progress
    // stays JSON lines.
    let plan = s.plan(&[("app", "pre = \"echo app pre >&2\"")], "");
    let out = s.plan_run(&plan, &["--planned", "--progress", "json"]);
    let v = out.json();
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(vm_of(&v, "db1")["status"], "done-earlier", "{v}");
    for vm in ["app1", "app2", "web1"] {
        assert_eq!(vm_of(&v, vm)["status"], "failed-over", "{v}");
        assert_eq!(s.points(vm)["role"], "live", "{vm}");
        assert_same(&s.source(vm), &s.replica(vm));
    }
    assert_eq!(std::fs::read_to_string(s.dir.join("started-db1.count")).unwrap(), "ran\n");
    for l in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
        let e: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        if e["event"] == "hook" && e["group"] == "app" {
            assert!(e["output"].as_str().unwrap().contains("app pre"), "{e}");
        }
    }
    // Done: the next run starts over, and finds the targets live.
    s.plan_run(&plan, &["--planned"]).expect_json_error("E_PROMOTED", 5);
}

#[test]
fn unplanned_failover_goes_on_and_reports_every_failure() {
    let s = Site::new("plan-unplanned");
    s.push_all(&[]);
    // Three failures: a group's post hook, a start command, and a VM whose
    // point cannot be found (its disk never reached the recovery site).
    let plan = s.plan(&[("db", "post = \"exit 5\"")], "[ \\\"$DISKFERRY_VM\\\" = app1 ] && exit 7; ");
    let cfg = std::fs::read_to_string(&s.agent.config).unwrap();
    let broken = s.dir.join("broken.toml");
    std::fs::write(&broken, cfg.replace("name = \"web1\"", "name = \"web1-elsewhere\"")).unwrap();
    let out = s.plan_run(&plan, &["--unplanned", "--config", broken.to_str().unwrap()]);
    let v = out.expect_json_error("E_HOOK", 3);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "every failure reported: {v}");
    assert_eq!(group_status(&v, "db"), "errors");
    assert_eq!(vm_of(&v, "app1")["code"], "E_HOOK");
    assert_eq!(vm_of(&v, "web1")["code"], "E_UNKNOWN_TARGET", "{v}");
    // Everything else went on: db1 and app2 are live at the newest point,
    // app1 too (only its start command failed).
    for t in ["db1-sys", "db1-log", "app1", "app2"] {
        assert_eq!(s.points(t)["role"], "live", "{t}");
        assert_same(&s.source(t), &s.replica(t));
    }
    assert_eq!(vm_of(&v, "app2")["status"], "failed-over");
    assert_eq!(vm_of(&v, "app1")["status"], "start-failed");
    let live = v["failed_over"].as_array().unwrap();
    assert_eq!(live.len(), 3, "db1, app1 and app2 run on this site: {v}");
    // The human table names every VM and error; a rerun skips the VMs
    // failed over and started before (never a VM started twice).
    let human = run(&[
        "plan".as_ref(),
        "run".as_ref(),
        plan.as_os_str(),
        "--unplanned".as_ref(),
        "--config".as_ref(),
        broken.as_os_str(),
    ]);
    assert_ne!(human.code, 0);
    for vm in ["db1", "app1", "app2", "web1"] {
        assert!(human.stdout.contains(vm), "{human}");
    }
    assert!(human.stdout.contains("done-earlier"), "{human}");
    // Fixed: the start of app1 and the failover of web1 are what is left.
    let plan = s.plan(&[], "");
    let v = s.plan_run(&plan, &["--unplanned"]).ok_json();
    for (vm, status) in
        [("db1", "done-earlier"), ("app2", "done-earlier"), ("app1", "failed-over"), ("web1", "failed-over")]
    {
        assert_eq!(vm_of(&v, vm)["status"], status, "{vm}: {v}");
    }
    for vm in ["db1", "app1", "app2", "web1"] {
        let count = std::fs::read_to_string(s.dir.join(format!("started-{vm}.count"))).unwrap();
        assert_eq!(count, "ran\n", "{vm} started once");
    }
    assert_same(&s.source("web1"), &s.replica("web1"));
}

/// Copies each source disk to `NAME.at-TAG`, to compare images with later.
fn keep_sources(s: &Site, tag: &str) {
    for (_, _, disks) in VMS {
        for d in *disks {
            std::fs::copy(s.source(d), s.dir.join(format!("{d}.at-{tag}"))).unwrap();
        }
    }
}

fn change_sources(s: &Site, seed: u64) {
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
    for (_, _, disks) in VMS {
        for d in *disks {
            scatter_writes(&s.source(d), 20, 64 * KIB, &mut rng);
        }
    }
}

#[test]
fn points_by_consistency_and_time_and_test_images_leave_nothing_behind() {
    let s = Site::new("plan-points");
    let snap_cmd =
        "cp --sparse=always \"$DISKFERRY_SOURCE\" \"$DISKFERRY_SOURCE.snap\" && echo \"$DISKFERRY_SOURCE.snap\"";
    let app =
        ["--snapshot", "cmd", "--snapshot-cmd", snap_cmd, "--snapshot-cleanup-cmd", "rm -f", "--pre-snapshot", "true"];
    // Point A: app-consistent on every disk.
    s.push_all(&app);
    keep_sources(&s, "a");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let between = jiff::Timestamp::now().to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Point B: crash-consistent (read at rest, no hook).
    change_sources(&s, 1);
    s.push_all(&[]);
    keep_sources(&s, "b");
    let plan = s.plan(&[], "");
    let test_dir = s.dir.join("tests");
    for (point, tag) in [("latest", "b"), ("latest-app", "a"), (between.as_str(), "a")] {
        let v = s.plan_run(&plan, &["--test", "--point", point]).ok_json();
        for (_, vm, disks) in VMS {
            let r = vm_of(&v, vm);
            assert_eq!(r["status"], "test-image", "{r}");
            let want = if tag == "a" { "app-consistent" } else { "crash-consistent" };
            assert_eq!(r["consistency"], want, "{point}: {r}");
            for d in *disks {
                let image = test_dir.join(vm).join(format!("{d}.img"));
                assert_same(&s.dir.join(format!("{d}.at-{tag}")), &image);
            }
            let told = std::fs::read_to_string(s.dir.join(format!("started-{vm}.test"))).unwrap();
            assert!(told.contains(&format!("{}.img", disks[0])), "test_start saw the images: {told}");
        }
        // A second test before cleanup is refused, VM by VM, and says why.
        let again = s.plan_run(&plan, &["--test", "--point", point]);
        again.expect_json_error("E_INVALID_INPUT", 3);
        // A file in the test directory that is no test image is left alone.
        let stray = test_dir.join("app1").join("notes.img");
        std::fs::write(&stray, b"mine").unwrap();
        let cleaned = df!("plan", "cleanup", plan, "--json").ok_json();
        assert_eq!(cleaned["removed"].as_array().unwrap().len(), 5, "{cleaned}");
        assert_eq!(cleaned["left"].as_array().unwrap().len(), 1, "{cleaned}");
        assert_eq!(std::fs::read(&stray).unwrap(), b"mine");
        std::fs::remove_file(&stray).unwrap();
        std::fs::remove_dir(stray.parent().unwrap()).unwrap();
        std::fs::remove_dir(&test_dir).unwrap();
        assert!(!test_dir.exists(), "cleanup leaves no test image or directory behind");
        for (_, _, disks) in VMS {
            for d in *disks {
                let p = s.points(d);
                assert!(p["points"].as_array().unwrap().iter().all(|x| x["pinned"] == false), "{d}: {p}");
            }
        }
    }
    // A time before every point has none to give.
    let none = s.plan_run(&plan, &["--test", "--point", "2000-01-01T00:00:00Z"]);
    none.expect_json_error("E_NO_SUCH_POINT", 3);
    df!("plan", "cleanup", plan).ok();
    // The unplanned failover to the newest app-consistent point.
    let v = s.plan_run(&plan, &["--unplanned", "--point", "latest-app"]).ok_json();
    for (_, vm, disks) in VMS {
        assert_eq!(vm_of(&v, vm)["consistency"], "app-consistent");
        for d in *disks {
            assert_eq!(s.points(d)["role"], "live");
            assert_same(&s.dir.join(format!("{d}.at-a")), &s.replica(d));
        }
    }
}

#[test]
fn a_bad_plan_is_refused_before_anything_runs() {
    let s = Site::new("plan-bad");
    let plan = s.plan(&[], "");
    let text = std::fs::read_to_string(&plan).unwrap();
    let bad = s.dir.join("bad.toml");
    std::fs::write(&bad, text.replace("target = \"app2\"", "target = \"app1\"")).unwrap();
    s.plan_run(&bad, &["--planned"]).expect_json_error("E_CONFIG", 3);
    std::fs::write(&bad, text.replacen("quiesce = \"true\"\n", "", 1)).unwrap();
    let v = s.plan_run(&bad, &["--planned"]).expect_json_error("E_CONFIG", 3);
    assert!(string(&v, "message").contains("db1"), "{v}");
    s.plan_run(&s.dir.join("missing.toml"), &["--unplanned"]).expect_json_error("E_NOT_FOUND", 3);
    df!("plan", "run", plan, "--planned", "--point", "latest").expect_error("E_USAGE", 2);
    // Nothing was pushed.
    assert!(!s.replica("db1-sys").exists() || std::fs::metadata(s.replica("db1-sys")).unwrap().len() == 0);
}

#[test]
fn a_child_left_running_by_a_quiesce_command_does_not_hold_the_plan() {
    let s = Site::new("plan-background");
    let plan = s.plan(&[], "");
    let text = std::fs::read_to_string(&plan).unwrap();
    // It keeps the failover-sync's stderr open for 60 s.
    std::fs::write(&plan, text.replacen("quiesce = \"true\"", "quiesce = \"sleep 60 >/dev/null &\"", 1)).unwrap();
    let out = s.plan_run(&plan, &["--planned"]);
    let v = out.json();
    assert_eq!(out.code, 0, "{out}");
    assert!(out.seconds < 40.0, "the plan waited for the background child: {out}");
    assert_eq!(vm_of(&v, "db1")["status"], "failed-over", "{v}");
}
