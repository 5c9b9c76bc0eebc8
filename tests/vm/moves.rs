//! The four moves of "sync before failover", each proven by booting the
//! replica in the checker guest: a planned failover with `failover-sync`,
//! the failback to the original host, an unplanned failover after a power
//! cut, and a test failover while pushes go on.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::{points, sum, Hosts};
use crate::qemu::{assert_passes, journal_bytes, listed_files, make_ext4, one_at_a_time, Vm};
use crate::util::{compare, tempdir, uint, Mount, MIB};

const DISK_MIB: u64 = 256;
const KEEP: u32 = 64;
const GUEST_WAIT: Duration = Duration::from_secs(180);

/// Lets the guest list `more` files beyond what it listed so far.
fn more_files(vm: &mut Vm, more: usize) {
    let n = vm.listed();
    vm.wait_listed(n + more, GUEST_WAIT);
}

/// The quiesce command of a planned failover: it asks the harness to power
/// the guest down over QMP (what `virsh shutdown` does) and returns once
/// QEMU has exited. Returns the command and the thread doing the power-down,
/// which yields the guest and how many files it had listed when asked.
fn qmp_quiesce(vm: Vm, dir: &Path) -> (String, std::thread::JoinHandle<(Vm, usize)>) {
    let (ask, done) = (dir.join("quiesce-asked"), dir.join("quiesce-done"));
    let cmd = format!("touch {}; while [ ! -e {} ]; do sleep 0.02; done", ask.display(), done.display());
    let thread = std::thread::spawn(move || {
        let mut vm = vm;
        let deadline = Instant::now() + Duration::from_secs(600);
        while !ask.exists() {
            assert!(Instant::now() < deadline, "the quiesce command never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        let listed = vm.listed();
        vm.powerdown(Duration::from_secs(120));
        std::fs::write(&done, b"").unwrap();
        (vm, listed)
    });
    (cmd, thread)
}

/// Block size of a push report (the disk's bytes over its block count).
fn block_bytes(r: &Value) -> u64 {
    uint(r, "disk_bytes").div_ceil(uint(r, "blocks_total"))
}

/// Move 1, planned failover: the guest writes on A while `failover-sync
/// --promote` runs its passes; the quiesce command powers it down; the
/// promoted replica on B boots and passes the checker.
#[test]
fn planned_failover_sync_boots_on_b() {
    let _one = one_at_a_time();
    let h = Hosts::start("vm-planned", 3);
    // Mostly full, so that phase 1's first pass (a full copy) takes a while.
    make_ext4(&h.disk_a, DISK_MIB, 160);
    let mut vm = Vm::writer(&h.disk_a, 900, KEEP);
    vm.wait_listed(3, GUEST_WAIT);
    let listed_before = vm.listed();
    let (quiesce, stopper) = qmp_quiesce(vm, h.disk_a.parent().unwrap());
    let r = h
        .failover_sync(true, &["--quiesce-cmd", &quiesce, "--promote", "--max-passes", "4", "--converge-bytes", "256K"])
        .ok_json();
    let (vm, listed_at_quiesce) = stopper.join().unwrap();
    let passes = r["passes"].as_array().unwrap();
    assert!(
        listed_at_quiesce > listed_before,
        "the guest wrote during phase 1 ({listed_before} files before, {listed_at_quiesce} at the quiesce): {r}"
    );
    assert!(uint(&passes[0], "bytes_changed") > 160 * MIB, "the first pass copies the disk: {r}");
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    assert_eq!(r["promoted"], Value::Bool(true), "{r}");
    let downtime = r["downtime_seconds"].as_f64().unwrap();
    eprintln!(
        "planned failover: passes {passes:?}, quiesce {} s, downtime {downtime} s, final delta {} blocks",
        r["quiesce_seconds"], r["blocks_changed"]
    );
    assert!(downtime > 0.0 && r["quiesce_seconds"].as_f64().unwrap() > 0.0, "{r}");
    let files = vm.files_written();
    assert!(files > 0, "{}", vm.console());
    compare(&h.disk_a, &h.disk_b).unwrap();
    assert_eq!(h.b.points(&h.disk_b).ok_json()["role"], "live");
    let v = assert_passes(&h.disk_b, "the promoted replica");
    assert_eq!(v.listed(), listed_files(&h.disk_a).len() as u64, "{}", v.line);
    // The old primary can no longer push over the VM that now runs on B.
    h.push(true, &[]).expect_json_error("E_PROMOTED", 5);
}

/// Move 2, failback to the original host after the VM ran on B: the reverse
/// push is a delta about the size of what the guest wrote on B, and A's
/// disk boots.
#[test]
fn failback_to_the_original_host_is_a_delta() {
    let _one = one_at_a_time();
    let h = Hosts::start("vm-failback", 3);
    make_ext4(&h.disk_a, DISK_MIB, 0);
    let mut vm = Vm::writer(&h.disk_a, 3, KEEP);
    vm.wait_exit(Duration::from_secs(180));
    let first = h.push(true, &[]).ok_json();
    assert_eq!(first["consistency"], "crash-consistent", "the stopped disk is read at rest: {first}");
    h.mv(&h.b, "failover", &[]).ok_json();

    // The VM runs on B and writes; it keeps numbering from the manifest.
    let mut vm = Vm::writer(&h.disk_b, 4, KEEP);
    vm.wait_exit(Duration::from_secs(180));
    let written = vm.files_written() * MIB;
    assert!(written > 0, "{}", vm.console());

    let r = h.push(false, &[]).ok_json();
    assert_eq!(r["mode"], "delta", "{r}");
    assert!(r["common_point"].is_string(), "{r}");
    let changed = uint(&r, "blocks_changed") * block_bytes(&r);
    // Every new 1 MiB file is random data; beyond them only metadata
    // changed: the journal, bitmaps, inodes, the directory, the manifest.
    let slack = journal_bytes(&h.disk_b) + 16 * MIB;
    eprintln!(
        "failback: the guest wrote {} MiB on B; the delta changed {} MiB, sent {} MiB (journal {} MiB)",
        written / MIB,
        changed / MIB,
        uint(&r, "bytes_sent") / MIB,
        journal_bytes(&h.disk_b) / MIB
    );
    assert!(changed >= written && changed <= written + slack, "changed {changed}, guest wrote {written}: {r}");
    assert!(uint(&r, "bytes_sent") <= changed, "{r}");
    compare(&h.disk_a, &h.disk_b).unwrap();

    // A takes the VM back; B becomes a replica again.
    h.mv(&h.a, "failover", &[]).ok_json();
    h.mv(&h.b, "demote", &[]).ok_json();
    let v = assert_passes(&h.disk_a, "the original disk after failback");
    let (on_a, on_b) = (listed_files(&h.disk_a), listed_files(&h.disk_b));
    assert_eq!(on_a.last(), on_b.last(), "the last file written on B is on A");
    assert_eq!(v.listed(), on_a.len() as u64);
}

/// A push of A's disk through a reflink snapshot; returns its report.
fn snapshot_push(h: &Hosts) -> Value {
    let r = h.push(true, &["--snapshot", "reflink"]).ok_json();
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    r
}

/// Move 3, unplanned failover: pushes through reflink snapshots while the guest
/// writes, then a power cut; B fails over to the latest point, which boots
/// (journal replay). Pushing back over A's later writes is a split brain
/// until `--discard-target-changes`, and A's discarded state stays
/// exportable, and bootable, until `commit`.
#[test]
fn unplanned_failover_after_a_power_cut() {
    let _one = one_at_a_time();
    let xfs = Mount::xfs_reflink("vm-unplanned-fs", 640 * MIB);
    let h = Hosts::start_with("vm-unplanned", 3, Some(xfs.dir.join("vm.img")));
    make_ext4(&h.disk_a, DISK_MIB, 0);
    let mut vm = Vm::writer(&h.disk_a, 900, KEEP);
    let mut last = Value::Null;
    for _ in 0..3 {
        more_files(&mut vm, 3);
        last = snapshot_push(&h);
    }
    // The guest goes on writing after the last point, then loses power.
    more_files(&mut vm, 3);
    vm.power_cut();
    assert!(!vm.console().contains("VMP unmounted"), "a power cut, not a shutdown");
    assert_ne!(sum(&h.disk_a), sum(&h.disk_b), "A wrote after its last point");
    let lost = tempdir("vm-unplanned-lost");
    let lost = lost.path().join("a-at-power-cut.img");
    crate::util::copy(&h.disk_a, &lost);

    let f = h.mv(&h.b, "failover", &[]).ok_json();
    assert_eq!(f["generation"], last["generation"], "the latest point: {f}");
    assert_passes(&h.disk_b, "the latest crash-consistent point");

    // The VM runs on B for a while.
    let mut vb = Vm::writer(&h.disk_b, 3, KEEP);
    vb.wait_exit(Duration::from_secs(180));

    let before = sum(&h.disk_a);
    let e = h.push(false, &[]).expect_json_error("E_SPLIT_BRAIN", 5);
    assert!(e["message"].as_str().unwrap().contains("blocks"), "{e}");
    assert_eq!(sum(&h.disk_a), before, "a refused push wrote the old primary");
    let r = h.push(false, &["--discard-target-changes"]).ok_json();
    assert!(uint(&r, "discarded_blocks") > 0, "{r}");
    let kept = r["discarded_point"].as_str().expect("a discarded point").to_string();
    compare(&h.disk_a, &h.disk_b).unwrap();
    assert_passes(&h.disk_a, "A after the reverse push");

    // A's own last writes can still be looked at, until commit.
    let out = lost.with_file_name("discarded.img");
    df!("export", &h.disk_a, "--point", &kept, &out, "--state-dir", &h.a.id.state).ok();
    compare(&out, &lost).expect("the discarded state exports byte-exact");
    assert_passes(&out, "A's discarded state (a power-cut image)");
    let c = h.mv(&h.a, "commit", &[]).ok_json();
    assert!(c["dropped"].as_array().unwrap().iter().any(|g| g == kept.as_str()), "{c}");
    assert!(!points(&h.a, &h.disk_a).iter().any(|p| p["generation"] == kept.as_str()));
    let again = lost.with_file_name("after-commit.img");
    let gone = df!("export", &h.disk_a, "--point", &kept, &again, "--state-dir", &h.a.id.state);
    assert_ne!(gone.code, 0, "the discarded state is gone after commit: {gone:?}");
}

/// Move 4, test failover: a clone of a recovery point boots in the checker
/// while pushes from the running guest go on landing on the replica.
#[test]
fn test_failover_boots_while_pushes_continue() {
    let _one = one_at_a_time();
    let xfs = Mount::xfs_reflink("vm-testfo-fs", 640 * MIB);
    let h = Hosts::start_with("vm-testfo", 3, Some(xfs.dir.join("vm.img")));
    make_ext4(&h.disk_a, DISK_MIB, 0);
    let mut vm = Vm::writer(&h.disk_a, 900, KEEP);
    more_files(&mut vm, 3);
    snapshot_push(&h);
    more_files(&mut vm, 3);
    let point = snapshot_push(&h)["generation"].as_str().unwrap().to_string();
    let clone = h.disk_b.with_file_name("test-failover.img");
    let t = h.mv(&h.b, "test-failover", &["--point", &point, "--out", clone.to_str().unwrap()]).ok_json();
    assert_eq!(t["generation"], point.as_str(), "{t}");
    let clone_sum = sum(&clone);

    let stop = AtomicBool::new(false);
    let pushed = std::thread::scope(|s| {
        let pusher = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                snapshot_push(&h);
                n += 1;
            }
            n
        });
        // Stops the pusher even when the check panics (the scope joins it).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let guard = StopOnDrop(&stop);
        assert_passes(&clone, "the test failover image");
        drop(guard);
        pusher.join().unwrap()
    });
    assert!(pushed >= 1, "no push landed while the test failover image was checked");
    assert_eq!(sum(&clone), clone_sum, "pushes changed the test failover image");
    assert!(points(&h.b, &h.disk_b).iter().any(|p| p["generation"] == point.as_str()), "its point stays pinned");
    df!("test-failover", "--cleanup", &clone, "--config", &h.b.config, "--json").ok();
    assert!(!clone.exists());

    // The replica the pushes kept updating boots too.
    vm.powerdown(Duration::from_secs(120));
    h.push(true, &[]).ok_json();
    compare(&h.disk_a, &h.disk_b).unwrap();
    assert_passes(&h.disk_b, "the replica after the pushes");
}

/// The long run, by hand: every move twice in a row
/// (`cargo test -p diskferry-agent --test vm -- --ignored twice`).
#[test]
#[ignore = "about 3 minutes; run by hand"]
fn every_move_twice() {
    for _ in 0..2 {
        planned_failover_sync_boots_on_b();
        failback_to_the_original_host_is_a_delta();
        unplanned_failover_after_a_power_cut();
        test_failover_boots_while_pushes_continue();
        crate::checker::checker_fails_on_a_corrupted_replica();
    }
}
