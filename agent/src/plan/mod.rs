//! Recovery plans (`diskferry plan`): ordered groups of VMs failed over
//! group after group, with hooks between them (`docs/plans.md`). This
//! module reads and checks the plan file; `run.rs` carries it out, one
//! `diskferry` command per step (`step.rs`), so every step is one an
//! operator could run by hand, with the same locks, codes and recovery.

mod ctx;
mod journal;
mod run;
mod step;
mod vm;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::Error;
use serde::Deserialize;

pub use ctx::{this_state_root, Mode, PointChoice, RunOptions};
pub use run::{cleanup, run, Outcome};
pub use step::ProgressFormat;

/// Hook timeout when the plan names none.
const DEFAULT_HOOK_TIMEOUT: u64 = 600;
/// VMs of a group handled at once when the plan names no number.
const DEFAULT_PARALLEL: usize = 4;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Option<String>,
    hook_timeout: Option<u64>,
    parallel: Option<usize>,
    recovery_config: Option<PathBuf>,
    test_dir: Option<PathBuf>,
    pre: Option<String>,
    post: Option<String>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    pre: Option<String>,
    post: Option<String>,
    #[serde(default)]
    vm: Vec<RawVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    peer: String,
    peer_fingerprint: String,
    quiesce: Option<String>,
    unquiesce: Option<String>,
    quiesce_timeout: Option<u64>,
    start: Option<String>,
    test_start: Option<String>,
    replication_group: Option<String>,
    format: Option<String>,
    disks: Vec<RawDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    source: PathBuf,
    target: String,
}

/// A checked recovery plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    /// The plan file (canonical), named in reports.
    pub file: PathBuf,
    pub hook_timeout: std::time::Duration,
    /// VMs of one group handled at once (each holds sessions on its peer).
    pub parallel: usize,
    /// The recovery site's serve config (unplanned and test modes, cleanup).
    pub recovery_config: Option<PathBuf>,
    /// Where test mode writes its images (default: under the recovery agent's state directory).
    pub test_dir: Option<PathBuf>,
    pub pre: Option<String>,
    pub post: Option<String>,
    pub groups: Vec<Group>,
}

/// One group of VMs: failed over together, after the groups before it.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub pre: Option<String>,
    pub post: Option<String>,
    pub vms: Vec<Vm>,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub peer: String,
    pub peer_fingerprint: String,
    pub quiesce: Option<String>,
    pub unquiesce: Option<String>,
    pub quiesce_timeout: Option<u64>,
    pub start: Option<String>,
    pub test_start: Option<String>,
    /// The replication group its disks are pushed and failed over as
    /// (a VM with several disks always has one: its name by default).
    pub replication_group: Option<String>,
    pub format: Option<String>,
    pub disks: Vec<Disk>,
}

#[derive(Debug, Clone)]
pub struct Disk {
    /// The disk on the primary.
    pub source: PathBuf,
    /// Its target name on the recovery site.
    pub target: String,
}

impl Plan {
    /// Reads and checks the plan file.
    pub fn load(path: &Path) -> Result<Plan, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let mut err = Error::io(diskferry_sync_engine::Place::Source, "reading plan", path, e);
            if err.code != ErrorCode::NotFound {
                err.code = ErrorCode::Config;
            }
            err
        })?;
        let file = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Self::parse(&text, &file)
    }

    /// Checks plan text (`file` names it in errors and gives the default name).
    pub fn parse(text: &str, file: &Path) -> Result<Plan, Error> {
        let bad = |key: &str, what: String| {
            Error::new(ErrorCode::Config, format!("plan {}: {key}: {what}", file.display()))
                .hint("fix the plan file (see docs/plans.md) and run it again")
        };
        let raw: RawPlan = toml::from_str(text).map_err(|e| bad("toml", e.message().to_string()))?;
        let name = match raw.name {
            Some(n) => n,
            None => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plan".into()),
        };
        TargetName::new(&name).map_err(|e| bad("name", format!("{name:?}: {e}")))?;
        if raw.group.is_empty() {
            return Err(bad("group", "a plan needs at least one [[group]]".into()));
        }
        let hook_timeout = raw.hook_timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT);
        if !(1..=86400).contains(&hook_timeout) {
            return Err(bad("hook_timeout", format!("{hook_timeout} is not 1..=86400 seconds")));
        }
        let parallel = raw.parallel.unwrap_or(DEFAULT_PARALLEL);
        if !(1..=64).contains(&parallel) {
            return Err(bad("parallel", format!("{parallel} is not 1..=64")));
        }
        // Relative paths are the plan file's neighbours, wherever it runs from.
        let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let at_plan = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let (mut group_names, mut vm_names, mut sources, mut targets) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut replication_groups = BTreeSet::new();
        let mut groups = Vec::new();
        for (gi, g) in raw.group.into_iter().enumerate() {
            let at = format!("group[{gi}] ({:?})", g.name);
            if !group_names.insert(g.name.clone()) {
                return Err(bad(&at, "two groups have this name".into()));
            }
            if g.vm.is_empty() {
                return Err(bad(&at, "a group needs at least one [[group.vm]]".into()));
            }
            let mut vms = Vec::new();
            for (vi, v) in g.vm.into_iter().enumerate() {
                let at = format!("{at}.vm[{vi}] ({:?})", v.name);
                if !vm_names.insert(v.name.clone()) {
                    return Err(bad(&at, "two VMs have this name".into()));
                }
                TargetName::new(&v.name).map_err(|e| bad(&at, format!("name: {e}")))?;
                let peer_fingerprint = crate::identity::normalize_fingerprint(&v.peer_fingerprint)
                    .ok_or_else(|| bad(&at, "peer_fingerprint must be 64 hex digits (`diskferry id`)".into()))?;
                if v.peer.trim().is_empty() {
                    return Err(bad(&at, "peer must be HOST:PORT".into()));
                }
                if v.disks.is_empty() {
                    return Err(bad(&at, "a VM needs at least one disk".into()));
                }
                if let Some(t) = v.quiesce_timeout.filter(|t| !(1..=86400).contains(t)) {
                    return Err(bad(&at, format!("quiesce_timeout {t} is not 1..=86400 seconds")));
                }
                if let Some(f) = &v.format {
                    crate::nbd::Format::from_str(f, true)
                        .map_err(|_| bad(&at, format!("format {f:?} is not raw, qcow2, vmdk, vhdx or vdi")))?;
                }
                for d in &v.disks {
                    TargetName::new(&d.target).map_err(|e| bad(&at, format!("disk target {:?}: {e}", d.target)))?;
                    if !sources.insert(at_plan(d.source.clone())) || !targets.insert(d.target.clone()) {
                        return Err(bad(&at, format!("{} or {} is in the plan twice", d.source.display(), d.target)));
                    }
                }
                let replication_group = match (&v.replication_group, v.disks.len()) {
                    (Some(rg), _) => Some(rg.clone()),
                    (None, 1) => None,
                    (None, _) => Some(v.name.clone()),
                };
                if let Some(rg) = &replication_group {
                    TargetName::new(rg).map_err(|e| bad(&at, format!("replication_group: {e}")))?;
                    if !replication_groups.insert(rg.clone()) {
                        return Err(bad(&at, format!("replication group {rg:?} is another VM's too")));
                    }
                }
                vms.push(Vm {
                    name: v.name,
                    peer: v.peer,
                    peer_fingerprint,
                    quiesce: v.quiesce,
                    unquiesce: v.unquiesce,
                    quiesce_timeout: v.quiesce_timeout,
                    start: v.start,
                    test_start: v.test_start,
                    replication_group,
                    format: v.format,
                    disks: v.disks.into_iter().map(|d| Disk { source: at_plan(d.source), target: d.target }).collect(),
                });
            }
            groups.push(Group { name: g.name, pre: g.pre, post: g.post, vms });
        }
        Ok(Plan {
            name,
            file: file.to_path_buf(),
            hook_timeout: std::time::Duration::from_secs(hook_timeout),
            parallel,
            recovery_config: raw.recovery_config.map(at_plan),
            test_dir: raw.test_dir.map(at_plan),
            pre: raw.pre,
            post: raw.post,
            groups,
        })
    }

    /// VMs a planned failover cannot stop: they have no quiesce command.
    pub fn without_quiesce(&self) -> Vec<&str> {
        self.groups.iter().flat_map(|g| &g.vms).filter(|v| v.quiesce.is_none()).map(|v| v.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn plan(text: &str) -> Result<Plan, Error> {
        Plan::parse(text, Path::new("/plans/erp.toml"))
    }

    #[test]
    fn reads_a_plan_and_gives_several_disks_a_replication_group() {
        let p = plan(&format!(
            r#"
            hook_timeout = 30
            [[group]]
            name = "db"
            [[group.vm]]
            name = "db1"
            peer = "127.0.0.1:7400"
            peer_fingerprint = "{FP}"
            quiesce = "true"
            disks = [{{ source = "/d/sys.img", target = "db1-sys" }}, {{ source = "/d/log.img", target = "db1-log" }}]
            [[group]]
            name = "app"
            [[group.vm]]
            name = "app1"
            peer = "127.0.0.1:7400"
            peer_fingerprint = "{FP}"
            disks = [{{ source = "/d/app.img", target = "app1" }}]
            "#
        ))
        .unwrap();
        assert_eq!(p.name, "erp");
        assert_eq!(p.hook_timeout.as_secs(), 30);
        assert_eq!(p.groups[0].vms[0].replication_group.as_deref(), Some("db1"));
        assert_eq!(p.groups[1].vms[0].replication_group, None);
        assert_eq!(p.without_quiesce(), vec!["app1"]);
    }

    #[test]
    fn the_documented_example_is_a_valid_plan() {
        let doc = include_str!("../../../docs/plans.md");
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let text = &doc[start..start + doc[start..].find("```").unwrap()];
        let p = plan(&text.replace("5f0c…", FP)).unwrap();
        assert_eq!(p.name, "erp");
        assert_eq!(p.groups.len(), 2);
        assert_eq!(p.groups[0].vms[0].disks.len(), 2);
        assert!(p.without_quiesce().is_empty());
    }

    #[test]
    fn refuses_mistakes_with_the_key_that_is_wrong() {
        let vm = |extra: &str, disks: &str| {
            format!(
                "[[group]]\nname = \"g\"\n[[group.vm]]\nname = \"v\"\npeer = \"h:1\"\npeer_fingerprint = \"{FP}\"\n{extra}\ndisks = [{disks}]\n"
            )
        };
        let one = r#"{ source = "/a", target = "a" }"#;
        for (text, want) in [
            (String::new(), "at least one [[group]]"),
            (vm("", ""), "at least one disk"),
            (vm("bogus = 1", one), "unknown field"),
            (vm("format = \"iso\"", one), "format"),
            (vm("", r#"{ source = "/a", target = "a" }, { source = "/a", target = "b" }"#), "twice"),
            (vm("", r#"{ source = "/a", target = "../x" }"#), "disk target"),
            (vm("", one).replace(FP, "abc"), "peer_fingerprint"),
            (format!("{}{}", vm("", one), vm("", r#"{ source = "/b", target = "b" }"#)), "two groups"),
        ] {
            let e = plan(&text).unwrap_err();
            assert_eq!(e.code, ErrorCode::Config, "{text}");
            assert!(e.message.contains(want), "{want:?} not in {:?}", e.message);
        }
    }
}
