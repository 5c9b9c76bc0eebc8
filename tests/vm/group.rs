//! Cross-disk consistency on a real VM: a guest with two disks writes each
//! data file to the second disk and, once it is synced, its checksum line
//! to a manifest on the first. While it writes, the two disks are pushed as
//! one replication group with a reflink snapshot of both, the guest paused
//! over QMP for that moment; then the guest is killed (a power cut). The
//! recovery site fails the group over to its newest point, and the checker
//! finds every manifest line's file, whole, on the other disk, and at most
//! one data file the manifest does not list yet. The checker itself must
//! fail on a mix: the manifest disk of the last point with the data disk of
//! an earlier one.

use std::ffi::OsStr;
use std::time::Duration;

use crate::agents::{Agent, Identity, TargetSpec};
use crate::qemu::{check2, make_ext4, one_at_a_time, Vm};
use crate::util::{copy, run, run_settled, tempdir, Mount, MIB};

const GUEST_WAIT: Duration = Duration::from_secs(180);

#[test]
fn a_group_point_is_one_moment_of_both_disks() {
    let _one = one_at_a_time();
    let tmp = tempdir("vm-group");
    let dir = tmp.path();
    let fs = Mount::xfs_reflink("vm-group-fs", 700 * MIB);
    let (manifest, data) = (fs.dir.join("manifest.img"), fs.dir.join("data.img"));
    make_ext4(&manifest, 64, 0);
    make_ext4(&data, 256, 0);
    let source = Identity::init(dir, "source-state");
    let targets = [("man", dir.join("man.replica")), ("data", dir.join("data.replica"))];
    let specs: Vec<TargetSpec<'_>> =
        targets.iter().map(|(n, p)| TargetSpec { name: n, path: p.clone(), allowed: &["src"] }).collect();
    let agent = Agent::start(dir, &[("src", &source.fingerprint)], &specs, "");

    let mut vm = Vm::writer2(&manifest, &data, 900, 48);
    let push = |vm: &Vm| {
        let (m, d) = (format!("{}=man", manifest.display()), format!("{}=data", data.display()));
        let a = [
            "push-group",
            "--group",
            "vm",
            "--disk",
            &m,
            "--disk",
            &d,
            "--peer",
            &agent.addr.to_string(),
            "--peer-fingerprint",
            &agent.id.fingerprint,
            "--state-dir",
            source.state.to_str().unwrap(),
            "--snapshot",
            "reflink",
            "--pause-vm-qmp",
            vm.agent_qmp.to_str().unwrap(),
            "--json",
        ];
        let refs: Vec<&OsStr> = a.iter().map(OsStr::new).collect();
        let r = run(&refs).ok_json();
        assert_eq!(r["members"][0]["consistency"], "crash-consistent", "{r}");
        r
    };
    vm.wait_listed(3, GUEST_WAIT);
    push(&vm);
    // A copy of the data disk's replica at the first point, for the mix.
    copy(&targets[1].1, &dir.join("data.first"));
    for _ in 0..3 {
        let n = vm.listed();
        vm.wait_listed(n + 4, GUEST_WAIT);
        push(&vm);
    }
    let n = vm.listed();
    vm.wait_listed(n + 2, GUEST_WAIT);
    vm.power_cut();

    let config = agent.config.to_str().unwrap();
    let f = run_settled(&[
        OsStr::new("failover"),
        OsStr::new("--group"),
        OsStr::new("vm"),
        OsStr::new("--config"),
        OsStr::new(config),
        OsStr::new("--json"),
    ])
    .ok_json();
    assert_eq!(f["consistency"], "crash-consistent", "{f}");
    let v = check2(&targets[0].1, &targets[1].1);
    assert!(v.pass, "the group point: {}\n{}", v.line, v.console);
    assert!(v.listed() >= 10, "{}", v.line);
    eprintln!("group point: {}", v.line);

    // The checker fails a mix of points: the last manifest, the first data disk.
    let mixed = check2(&targets[0].1, &dir.join("data.first"));
    assert!(!mixed.pass && mixed.line.contains("missing="), "a mix passed: {}", mixed.line);
    assert!(!mixed.line.contains("missing=0 "), "{}", mixed.line);
}
