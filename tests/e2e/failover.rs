//! Failover moves between two hosts, each running `diskferry serve` and
//! pushing from the same state directory: A runs the VM and pushes its
//! disk to B; after a failover B pushes back. Every rule of which push is
//! allowed, end to end: live targets refuse pushes, an old primary that
//! kept writing is a split brain (with the counts), an unrelated disk is
//! refused, and a planned round trip is deltas only.

use std::ffi::OsStr;

use serde_json::Value;

use crate::agents::{points, sum, Hosts};
use crate::util::{self, compare, make_disk, scatter_writes, uint, write_at, MIB};

/// A planned round trip A→B→A→B→A by pushes, failovers and demotes, with
/// writes at every stage: every hop after the first is a delta, the
/// receiving side reads only about what it rewrites, and each disk ends
/// equal to the last writer's.
#[test]
fn planned_round_trip_is_deltas_only() {
    let mut rng = util::rng("planned_round_trip_is_deltas_only");
    let h = Hosts::start("fo-round", 3);
    let size = 40 * MIB + 4096 * 3;
    make_disk(&h.disk_a, size, 0.5, &mut rng);
    let first = h.push(true, &[]).ok_json();
    assert_eq!(first["mode"], "full");
    let mut from_a = true;
    for hop in 1..=4 {
        let ctx = format!("hop {hop}");
        let (writer, writer_disk, other, other_disk) =
            if from_a { (&h.a, &h.disk_a, &h.b, &h.disk_b) } else { (&h.b, &h.disk_b, &h.a, &h.disk_a) };
        // Planned failover to the other side: the last delta is shipped
        // while the VM is down, the replica is promoted, the old side demoted.
        h.mv(other, "failover", &[]).ok_json();
        if hop > 1 {
            let d = h.mv(writer, "demote", &[]).ok_json();
            assert_eq!(d["hashed"], Value::Bool(false), "{ctx}: the old primary was pushed at rest: {d}");
        }
        // The VM now runs on the other side and writes.
        let rewritten = scatter_writes(other_disk, 40, 64 * 1024, &mut rng);
        from_a = !from_a;
        let r = h.push(from_a, &[]).ok_json();
        assert_eq!(r["mode"], "delta", "{ctx}: {r}");
        assert!(r["common_point"].is_string(), "{ctx}: no common point: {r}");
        // The receiver reads only the blocks it rewrites: each once for the
        // pages it keeps, and the changed pages again for the undo data.
        let read = uint(&r, "target_bytes_read");
        let rewritten_blocks = uint(&r, "blocks_changed") * 64 * 1024;
        assert!(rewritten > 0 && rewritten_blocks > 0, "{ctx}: {r}");
        let bound = 2 * rewritten_blocks + size / 2000;
        assert!(read <= bound, "{ctx}: the receiver read {read} bytes of its disk (bound {bound}): {r}");
        compare(other_disk, writer_disk).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        writer.verify(writer_disk).ok();
    }
}

/// A live target refuses every push, `--force` included, and nothing is written.
#[test]
fn promoted_target_refuses_pushes() {
    let mut rng = util::rng("promoted_target_refuses_pushes");
    let h = Hosts::start("fo-promoted", 3);
    make_disk(&h.disk_a, 8 * MIB, 0.7, &mut rng);
    h.push(true, &[]).ok();
    let f = h.mv(&h.b, "failover", &[]).ok_json();
    assert_eq!(f["role"], "live");
    assert_eq!(f["moved"], Value::Bool(false), "to the latest point nothing is written: {f}");
    scatter_writes(&h.disk_a, 10, 5000, &mut rng);
    let before = sum(&h.disk_b);
    for extra in [&[][..], &["--force"][..], &["--mode", "full", "--force"][..]] {
        h.push(true, extra).expect_json_error("E_PROMOTED", 5);
        assert_eq!(sum(&h.disk_b), before, "{extra:?}: the live disk was written");
    }
    let listed = h.b.points(&h.disk_b).ok_json();
    assert_eq!(listed["role"], "live", "{listed}");
}

/// The old primary kept writing after its last push (an unplanned
/// failover): pushing back is a split brain, refused with the exact count
/// of what would be lost; `--discard-target-changes` proceeds and keeps the
/// old primary's state as an exportable point until `commit`.
#[test]
fn split_brain_is_refused_with_counts_then_kept_as_a_point() {
    let mut rng = util::rng("split_brain_is_refused_with_counts");
    let h = Hosts::start("fo-split", 3);
    make_disk(&h.disk_a, 16 * MIB, 0.8, &mut rng);
    h.push(true, &[]).ok();
    // A keeps writing: 5 distinct 64 KiB blocks, after the last push.
    for (i, block) in [3u64, 40, 41, 100, 255].iter().enumerate() {
        write_at(&h.disk_a, block * 65536 + 1000 * i as u64, &[0xA5; 700]);
    }
    let lost_state = h.disk_a.with_extension("lost");
    util::copy(&h.disk_a, &lost_state);
    // Unplanned failover to B; its VM writes.
    h.mv(&h.b, "failover", &[]).ok();
    scatter_writes(&h.disk_b, 20, 30_000, &mut rng);
    let e = h.push(false, &[]).expect_json_error("E_SPLIT_BRAIN", 5);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("5 blocks (327680 bytes)"), "counts: {msg}");
    assert_eq!(sum(&h.disk_a), sum(&lost_state), "a refused push wrote the old primary");
    let r = h.push(false, &["--discard-target-changes"]).ok_json();
    assert_eq!(uint(&r, "discarded_blocks"), 5, "{r}");
    let kept = r["discarded_point"].as_str().expect("a discarded point").to_string();
    compare(&h.disk_b, &h.disk_a).unwrap();
    let listed = points(&h.a, &h.disk_a);
    let p = listed.iter().find(|p| p["generation"] == kept.as_str()).unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(p["discarded"], Value::Bool(true));
    let out = h.disk_a.with_extension("export");
    df!("export", &h.disk_a, "--point", &kept, &out, "--state-dir", &h.a.id.state).ok();
    compare(&out, &lost_state).expect("the discarded state exports byte-exact");
    // More pushes keep it; commit drops it.
    scatter_writes(&h.disk_b, 5, 3000, &mut rng);
    h.push(false, &[]).ok();
    assert!(points(&h.a, &h.disk_a).iter().any(|p| p["generation"] == kept.as_str()));
    let c = h.mv(&h.a, "commit", &[]).ok_json();
    assert!(c["dropped"].as_array().unwrap().iter().any(|g| g == kept.as_str()), "{c}");
    assert!(!points(&h.a, &h.disk_a).iter().any(|p| p["generation"] == kept.as_str()));
}

/// A disk with a history of its own that shares nothing with the sender
/// is refused; `--force` compares by hashing and overwrites it.
#[test]
fn unrelated_disk_is_refused_unless_forced() {
    let mut rng = util::rng("unrelated_disk_is_refused_unless_forced");
    let h = Hosts::start("fo-unrelated", 3);
    make_disk(&h.disk_a, 8 * MIB, 0.7, &mut rng);
    h.push(true, &[]).ok();
    // Another disk on B, never replicated, pushed to A's disk.
    let other = h.disk_b.with_file_name("other.img");
    make_disk(&other, 8 * MIB, 0.7, &mut rng);
    let before = sum(&h.disk_a);
    h.push_file(&other, false, &[]).expect_json_error("E_UNRELATED", 5);
    h.push_file(&other, false, &["--discard-target-changes"]).expect_json_error("E_UNRELATED", 5);
    assert_eq!(sum(&h.disk_a), before, "a refused push wrote the disk");
    let r = h.push_file(&other, false, &["--force"]).ok_json();
    assert_eq!(r["mode"], "delta", "a forced push compares, never a blind copy: {r}");
    compare(&other, &h.disk_a).unwrap();
}

/// Test failover while pushes keep landing with retention 1: the test image
/// stays byte-exact, its point stays listed (pinned), writing the image
/// changes nothing else, and cleanup unpins it.
#[test]
fn test_failover_pins_its_point_while_pushes_land() {
    let mut rng = util::rng("test_failover_pins_its_point");
    let h = Hosts::start("fo-test", 1);
    make_disk(&h.disk_a, 12 * MIB, 0.7, &mut rng);
    let first = h.push(true, &[]).ok_json();
    let g1 = first["generation"].as_str().unwrap().to_string();
    let v1 = sum(&h.disk_a);
    let clone = h.disk_b.with_file_name("test.img");
    let args = ["--point", g1.as_str(), "--out", clone.to_str().unwrap()];
    let t = h.mv(&h.b, "test-failover", &args).ok_json();
    assert_eq!(t["pinned"], Value::Bool(true), "{t}");
    assert_eq!(sum(&clone), v1);
    for round in 0..3 {
        scatter_writes(&h.disk_a, 20, 20_000, &mut rng);
        h.push(true, &[]).ok();
        let listed = points(&h.b, &h.disk_b);
        let p = listed.iter().find(|p| p["generation"] == g1.as_str());
        assert!(p.is_some_and(|p| p["pinned"] == Value::Bool(true)), "round {round}: {listed:?}");
        // Retention 1 keeps the current point, the pinned one, and the points
        // between them its undo data goes through.
        assert_eq!(listed.len(), 2 + round, "round {round}: {listed:?}");
        assert_eq!(sum(&clone), v1, "round {round}: the test image changed");
    }
    // The test VM writes its image: the replica and its points do not move.
    let replica = sum(&h.disk_b);
    scatter_writes(&clone, 30, 10_000, &mut rng);
    assert_eq!(sum(&h.disk_b), replica);
    h.b.verify(&h.disk_b).ok();
    let out = h.disk_b.with_file_name("e1.img");
    df!("export", &h.disk_b, "--point", &g1, &out, "--state-dir", &h.b.id.state).ok();
    assert_eq!(sum(&out), v1, "the pinned point still rebuilds exactly");
    // Cleanup (found by the image's path alone) unpins: the next push prunes it.
    let c = util::run_settled(&[
        OsStr::new("test-failover"),
        OsStr::new("--cleanup"),
        clone.as_os_str(),
        OsStr::new("--config"),
        h.b.config.as_os_str(),
        OsStr::new("--json"),
    ])
    .ok_json();
    assert_eq!(c["unpinned"].as_str(), Some(g1.as_str()), "{c}");
    assert!(!clone.exists());
    scatter_writes(&h.disk_a, 5, 5_000, &mut rng);
    h.push(true, &[]).ok();
    assert!(!points(&h.b, &h.disk_b).iter().any(|p| p["generation"] == g1.as_str()));
}

/// After a failover the VM writes: moving to another point is refused (it
/// would lose those writes); `failover --point` before any write moves
/// back and forth.
#[test]
fn failover_point_moves_until_the_vm_writes() {
    let mut rng = util::rng("failover_point_moves_until_the_vm_writes");
    let h = Hosts::start("fo-point", 3);
    make_disk(&h.disk_a, 12 * MIB, 0.7, &mut rng);
    let mut gens = Vec::new();
    let mut sums = Vec::new();
    for _ in 0..3 {
        let r = h.push(true, &[]).ok_json();
        gens.push(r["generation"].as_str().unwrap().to_string());
        sums.push(sum(&h.disk_a));
        scatter_writes(&h.disk_a, 30, 30_000, &mut rng);
    }
    for i in [0usize, 2, 1, 0] {
        let f = h.mv(&h.b, "failover", &["--point", &gens[i]]).ok_json();
        assert_eq!(f["generation"].as_str(), Some(gens[i].as_str()));
        assert_eq!(sum(&h.disk_b), sums[i], "at point {i}");
        h.b.verify(&h.disk_b).ok();
    }
    write_at(&h.disk_b, 4096, b"the VM wrote this");
    let e = h.mv(&h.b, "failover", &["--point", &gens[2]]);
    e.expect_json_error("E_WRITTEN_SINCE_PROMOTE", 5);
    assert_ne!(sum(&h.disk_b), sums[2]);
    let fuzzy = h.mv(&h.b, "failover", &["--point", "0123456789abcdef0123456789abcdef"]);
    fuzzy.expect_json_error("E_NO_SUCH_POINT", 3);
}

/// Rules 1 and 2 end to end: a disk seeded offline (copied by hand, no
/// diskferry state) is compared, not copied, without a flag; an alternate
/// location (no disk at the path) gets a full download, even where the
/// old disk's history is left.
#[test]
fn offline_seed_is_compared_and_a_missing_disk_gets_everything() {
    let mut rng = util::rng("offline_seed_and_alternate_location");
    let h = Hosts::start("fo-seed", 3);
    make_disk(&h.disk_a, 16 * MIB, 0.7, &mut rng);
    util::copy(&h.disk_a, &h.disk_b);
    let r = h.push(true, &[]).ok_json();
    assert_eq!(r["mode"], "delta", "{r}");
    assert_eq!(uint(&r, "bytes_sent"), 0, "an exact seed sends nothing: {r}");
    compare(&h.disk_a, &h.disk_b).unwrap();
    // A fails; B takes over and writes; A's disk is lost: failback to an
    // empty place is a full download.
    h.mv(&h.b, "failover", &[]).ok();
    scatter_writes(&h.disk_b, 10, 10_000, &mut rng);
    std::fs::remove_file(&h.disk_a).unwrap();
    let r = h.push(false, &[]).ok_json();
    assert_eq!(r["mode"], "full", "{r}");
    assert!(r["common_point"].is_null(), "{r}");
    compare(&h.disk_b, &h.disk_a).unwrap();
    h.a.verify(&h.disk_a).ok();
}

/// A move waits while a session holds the target: `--wait 0` fails at once
/// with `E_BUSY`, a longer wait succeeds once the session is gone.
#[test]
fn moves_wait_for_a_session_then_give_up() {
    let mut rng = util::rng("moves_wait_for_a_session");
    let p = crate::agents::pair("fo-wait", 1, "");
    let src = p.dir.join("src.img");
    make_disk(&src, 8 * MIB, 0.9, &mut rng);
    crate::agents::push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    // What a session holds: the target's lock (flock), here for 3 s.
    let targets = p.agent.id.state.join("targets");
    let dir = std::fs::read_dir(&targets).unwrap().flatten().next().unwrap().path();
    let mut holder = util::KillOnDrop(
        std::process::Command::new("flock").arg(dir.join("lock")).args(["sleep", "3"]).spawn().unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mv = |wait: &str| {
        util::run(&[
            OsStr::new("failover"),
            OsStr::new("t0"),
            OsStr::new("--config"),
            p.agent.config.as_os_str(),
            OsStr::new("--wait"),
            OsStr::new(wait),
            OsStr::new("--json"),
        ])
    };
    mv("0").expect_json_error("E_BUSY", 3);
    let start = std::time::Instant::now();
    let ok = mv("30").ok_json();
    assert_eq!(ok["role"], "live", "{ok}");
    assert!(start.elapsed() > std::time::Duration::from_secs(1), "it waited for the holder");
    let _ = holder.0.wait();
}
