//! Failures leave nothing behind that blocks the next move: no state for a
//! non-disk, no space a failed reservation allocated, no staged data that
//! can never commit; and `diskferry abort` discards staged data on purpose.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::{pair, push_to, spawn_push, Agent, Identity, TargetSpec};
use crate::util::*;

fn target_dirs(state: &Path) -> Vec<PathBuf> {
    match fs::read_dir(state.join("targets")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn failures_on_non_disks_leave_no_state() {
    let dir = tempdir("nondisk");
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    fs::write(&src, vec![3u8; 1 << 20]).unwrap();
    let adir = dir.path().join("a-directory");
    fs::create_dir(&adir).unwrap();
    for dst in [adir.clone(), PathBuf::from("/dev/null")] {
        df!("sync", src, dst, "--state-dir", state).expect_error("E_NOT_A_DISK", 3);
        df!("sync", src, dst, "--mode", "full", "--state-dir", state, "--json").expect_json_error("E_NOT_A_DISK", 3);
        assert_ne!(df!("verify", dst, "--state-dir", state).code, 0);
        assert_eq!(target_dirs(&state), Vec::<PathBuf>::new(), "{}: state left behind", dst.display());
    }

    // Over the network: a configured target that became a directory.
    let mut rng = rng("nondisk-net");
    let p = pair("nondisk-net", 2, "");
    let src = p.dir.join("src.img");
    make_disk(&src, 4 * MIB, 0.5, &mut rng);
    fs::create_dir(p.dir.join("t1.img")).unwrap();
    push_to(&src, &p.source, &p.agent, "t1", &[]).expect_json_error("E_NOT_A_DISK", 3);
    assert_eq!(target_dirs(&p.agent.id.state), Vec::<PathBuf>::new(), "state left behind");
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    assert_eq!(target_dirs(&p.agent.id.state).len(), 1);
}

#[test]
fn a_failed_reservation_gives_its_space_back() {
    let mut rng = rng("reservation");
    let dir = tempdir("reservation");
    let fs_ = Mount::ext4("reservation-fs", 64 * MIB);
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    let dst = fs_.dir.join("dst.img");
    make_disk(&src, 24 * MIB, 1.0, &mut rng);
    df!("sync", src, dst, "--state-dir", state).ok();
    // A growing delta: 24 MiB of new data past the replica's end.
    resize_with_data(&src, 48 * MIB, &mut rng);
    let ballast = fill_leaving(&fs_.dir, 8 * MIB);
    let (used, free) = (allocated(&dst), free_bytes(&fs_.dir));
    for _ in 0..2 {
        df!("sync", src, dst, "--state-dir", state).expect_error("E_TARGET_FULL", 6);
        // Data blocks come back; ext4 may keep an extent-index block (1 KiB
        // on this small filesystem), as the free-space check allows too.
        let kept = allocated(&dst).saturating_sub(used);
        assert!(kept <= 64 * KIB, "the failed reservation kept {kept} bytes in the replica");
        assert!(free_bytes(&fs_.dir) + 64 * KIB >= free, "the failed sync did not give its space back");
        assert_eq!(disk_len(&dst), 24 * MIB);
    }
    df!("verify", dst, "--state-dir", state).ok();
    fs::remove_file(&ballast).unwrap();
    df!("sync", src, dst, "--state-dir", state).ok();
    assert_same(&src, &dst);
}

#[test]
fn a_delta_that_fills_the_state_dir_is_released_and_a_smaller_one_works() {
    let mut rng = rng("statefull-net");
    let tmp = tempdir("statefull-net");
    let dir = tmp.path();
    let fs_ = Mount::ext4("statefull-net-fs", 64 * MIB);
    let source = Identity::init(dir, "source-state");
    let tgt = dir.join("t0.img");
    // The target agent's state directory (and config) on the small filesystem.
    let agent = Agent::start(
        &fs_.dir,
        &[("src", &source.fingerprint)],
        &[TargetSpec { name: "t0", path: tgt.clone(), allowed: &["src"] }],
        "",
    );
    let src = dir.join("src.img");
    let old = dir.join("old.img");
    make_disk(&src, 64 * MIB, 1.0, &mut rng);
    push_to(&src, &source, &agent, "t0", &[]).ok();
    copy(&src, &old);
    let ballast = fill_leaving(&fs_.dir, 12 * MIB);
    let free = free_bytes(&fs_.dir);
    // 16 MiB of changed pages: more than the 12 MiB free.
    change_data_pages(&src, 4096, &mut rng);
    for round in 0..2 {
        let v = push_to(&src, &source, &agent, "t0", &["--compress", "off"]).expect_json_error("E_STATE_FULL", 6);
        let text = format!("{} {}", v["message"], v["hint"]);
        assert!(text.contains("MiB"), "round {round}: the error says how much room is needed: {v}");
        assert_eq!(v["retryable"], Value::Bool(true), "{v}");
        assert_same(&tgt, &old);
        // The staged data that could never commit was released.
        let deadline = Instant::now() + Duration::from_secs(10);
        while free_bytes(&fs_.dir) + MIB < free && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(free_bytes(&fs_.dir) + MIB >= free, "round {round}: the state filesystem stays full");
    }
    // A smaller change fits (redo log and undo data).
    copy(&old, &src);
    change_data_pages(&src, 1024, &mut rng);
    push_to(&src, &source, &agent, "t0", &[]).ok();
    assert_same(&tgt, &src);
    agent.verify(&tgt).ok();
    fs::remove_file(ballast).unwrap();
}

#[test]
fn abort_discards_an_interrupted_push() {
    let mut rng = rng("abort");
    let p = pair("abort", 1, "idle_timeout_secs = 2");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 64 * MIB, 1.0, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    let old = p.dir.join("old.img");
    copy(&src, &old);
    change_data_pages(&src, 8192, &mut rng);
    let state = p.agent.id.state.clone();
    let redo = target_state_dir(&state).join("redo.log");
    let mut staged = false;
    for _attempt in 0..4 {
        // Kill the push once the agent is staging (its redo log holds data),
        // whatever the machine's speed.
        let mut child = spawn_push(&src, &p.source, &p.agent, "t0", &["--compress", "off"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !std::fs::metadata(&redo).is_ok_and(|m| m.len() > (1 << 20)) {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        // The agent may still apply what it got (a kill after the last
        // frame still commits): decide once its session has ended, after
        // its idle timeout. Staged data, not just the log's header.
        std::thread::sleep(Duration::from_millis(3000));
        if std::fs::metadata(&redo).is_ok_and(|m| m.len() > 4096) {
            staged = true;
            break;
        }
        if compare(&src, &tgt).is_ok() {
            // It finished before the kill: change more and try again.
            copy(&src, &old);
            change_data_pages(&src, 8192, &mut rng);
        }
    }
    assert!(staged, "no push was interrupted while staging");
    // The dead push holds the target in the agent until its idle timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    let v = loop {
        let out = df!("abort", "t0", "--config", p.agent.config, "--json");
        if out.error_code().as_deref() == Some("E_BUSY") && Instant::now() < deadline {
            // The hint says the truth: a dead push holds it until the idle timeout.
            assert!(out.stderr.contains("idle timeout"), "{out}");
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        break out.ok_json();
    };
    assert_eq!(v["discarded"], Value::Bool(true), "{v}");
    assert!(uint(&v, "entries") > 0 && uint(&v, "bytes") > 0, "{v}");
    assert!(!redo.exists(), "the redo log is gone");
    assert_same(&tgt, &old);
    let again = df!("abort", tgt, "--state-dir", state, "--json").ok_json();
    assert_eq!(again["discarded"], Value::Bool(false), "{again}");
    // The next push starts afresh and completes.
    let v = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(uint(&v, "resumed_blocks"), 0, "{v}");
    assert_same(&tgt, &src);
}
