//! `diskferry sync` killed with SIGKILL at random moments across all its
//! phases (hashing, staging, commit, in-place writes). After each kill,
//! recovery leaves the target at exactly the old or the new source, `verify`
//! passes, and the next sync succeeds and gives the new bytes.

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::Rng;

use crate::util::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetKind {
    File,
    Device,
}

/// Where each kill landed, as recovery told it.
#[derive(Debug, Default)]
struct Tally {
    iterations: usize,
    /// The sync finished before the signal.
    finished_before_kill: usize,
    /// Recovery finished a committed apply (the kill hit commit / in-place writes).
    commit_phase: usize,
    /// Recovery discarded staged blocks (the kill hit hashing and staging).
    staging: usize,
    /// Of those, kills after the new manifest was in place: reserving
    /// space and writing the undo segment, just before the commit record.
    before_commit_record: usize,
    /// Nothing to recover, target at the old bytes (hashing, or before staging).
    early: usize,
    /// Nothing to recover, target at the new bytes (after the commit was done).
    late: usize,
}

struct Setup {
    _dir: tempfile::TempDir,
    src: PathBuf,
    old: PathBuf,
    dst: PathBuf,
    state: PathBuf,
    kind: TargetKind,
    _device: Option<Loop>,
    /// Bounds for the source's size as it changes.
    min: u64,
    max: u64,
}

impl Setup {
    fn new(name: &str, kind: TargetKind, size: u64, rng: &mut SmallRng) -> Setup {
        let dir = tempdir(name);
        let src = dir.path().join("src.img");
        let old = dir.path().join("old.img");
        let state = dir.path().join("state");
        make_disk(&src, size, 0.75, rng);
        let (dst, device) = match kind {
            TargetKind::File => (dir.path().join("dst.img"), None),
            TargetKind::Device => {
                let dev = Loop::new(&dir.path().join("device.img"), size + size / 4);
                (dev.dev.clone(), Some(dev))
            }
        };
        let max = match kind {
            TargetKind::File => size + size / 4,
            TargetKind::Device => size + size / 8,
        };
        Setup { _dir: dir, src, old, dst, state, kind, _device: device, min: size - size / 4, max }
    }

    fn sync_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a OsStr> {
        let mut a: Vec<&OsStr> = vec![
            "sync".as_ref(),
            self.src.as_ref(),
            self.dst.as_ref(),
            "--state-dir".as_ref(),
            self.state.as_ref(),
            "--json".as_ref(),
        ];
        a.extend(extra.iter().map(|e| OsStr::new(*e)));
        a
    }

    /// Whether the target holds exactly the bytes of `disk`.
    fn holds(&self, disk: &Path) -> Result<(), String> {
        match self.kind {
            TargetKind::File => compare(&self.dst, disk),
            TargetKind::Device => compare_prefix(&self.dst, disk, disk_len(disk)),
        }
    }

    #[track_caller]
    fn assert_holds(&self, disk: &Path, context: &str) {
        if let Err(e) = self.holds(disk) {
            panic!("{context}: {e}");
        }
    }

    fn partial(&self) -> PathBuf {
        let mut p = self.dst.as_os_str().to_os_string();
        p.push(".partial");
        PathBuf::from(p)
    }
}

/// A heavy change so that every phase takes measurable time: random
/// unaligned writes over about a quarter of the blocks, sometimes a size
/// change or punched holes.
fn heavy_change(s: &Setup, rng: &mut SmallRng) -> String {
    let size = disk_len(&s.src);
    let mut what = String::new();
    match rng.random_range(0..10) {
        0 if size + MIB < s.max => {
            let new = rng.random_range(size + 1..s.max);
            resize_with_data(&s.src, new, rng);
            what = format!("grow {size} -> {new}, ");
        }
        1 if size > s.min + MIB => {
            let new = rng.random_range(s.min..size);
            resize_with_data(&s.src, new, rng);
            what = format!("shrink {size} -> {new}, ");
        }
        2 => {
            for _ in 0..4 {
                let len = rng.random_range(1..4 * MIB).min(size / 8);
                let off = rng.random_range(0..size - len);
                punch_hole(&s.src, off, len);
            }
            what = "holes, ".into();
        }
        _ => {}
    }
    let size = disk_len(&s.src);
    let count = (size / (256 * KIB)) as usize;
    let bytes = scatter_writes(&s.src, count, 192 * KIB, rng);
    what.push_str(&format!("{count} writes, {bytes} bytes"));
    what
}

/// Runs `iterations` killed syncs on one target; returns what was hit.
fn kill_loop(name: &str, kind: TargetKind, size: u64, iterations: usize) -> Tally {
    let mut rng = rng(name);
    let s = Setup::new(name, kind, size, &mut rng);
    let first = run(&s.sync_args(&[])).ok_json();
    s.assert_holds(&s.src, "first sync");
    eprintln!("{name}: first sync {first}");

    // Calibrate: how long does an unkilled sync of such a change take? The
    // estimate follows the machine's load: every sync that ran to the end
    // with the whole change to do adds an observation.
    let mut observed: Vec<f64> = Vec::new();
    for _ in 0..2 {
        heavy_change(&s, &mut rng);
        let out = run(&s.sync_args(&[])).ok();
        s.assert_holds(&s.src, "calibration sync");
        observed.push(out.seconds);
    }
    let estimate = |observed: &[f64]| {
        let mut recent: Vec<f64> = observed.iter().rev().take(5).copied().collect();
        recent.sort_by(f64::total_cmp);
        recent[recent.len() / 2]
    };
    eprintln!("{name}: an unkilled sync takes {:.3} s", estimate(&observed));

    let mut tally = Tally::default();
    let mut block_size = "64K";
    for i in 0..iterations {
        copy(&s.src, &s.old);
        let change = heavy_change(&s, &mut rng);
        if rng.random_bool(0.1) {
            block_size = ["16K", "64K", "256K"][rng.random_range(0..3)];
        }
        let full = kind == TargetKind::File && rng.random_bool(0.15);
        let first_manifests: Vec<std::ffi::OsString> =
            std::fs::read_dir(target_state_dir(&s.state)).unwrap().map(|e| e.unwrap().file_name()).collect();
        let mut extra = vec!["--block-size", block_size];
        if full {
            extra.extend(["--mode", "full", "--force"]);
        }
        // Every third kill aims at the end, where the commit is; so do all
        // kills in the last third if none hit the commit yet.
        let longest = estimate(&observed);
        let late = i % 3 == 1 || (tally.commit_phase == 0 && i >= iterations * 2 / 3);
        let delay =
            if late { rng.random_range(longest * 0.6..longest * 1.05) } else { rng.random_range(0.0..longest * 1.05) };
        let what = format!(
            "{name} #{i}: {change}, --block-size {block_size}, full {full}, kill after {delay:.3} s of ~{longest:.3}"
        );

        let start = Instant::now();
        let mut child = spawn(&s.sync_args(&extra));
        std::thread::sleep(Duration::from_secs_f64(delay));
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let ran = start.elapsed().as_secs_f64();
        let killed = out.status.signal() == Some(9);
        if !killed {
            assert!(
                out.status.success(),
                "{what}: the sync failed by itself:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            tally.finished_before_kill += 1;
            observed.push(ran);
        }
        // What the kill left, before anything recovers it.
        let tdir = target_state_dir(&s.state);
        let journal = tdir.join("redo.log").exists();
        let partial = s.partial().exists();
        let new_manifest = std::fs::read_dir(&tdir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".dfm") && !first_manifests.contains(&e.file_name()));
        let left = format!("redo.log {journal}, .partial {partial}, new manifest {new_manifest}");

        // Recover: mostly by `verify`, sometimes by `points` (which opens
        // the target too) so that the next sync runs on a target `verify`
        // did not restamp.
        let by_verify = i % 3 != 2;
        let rec = if by_verify {
            df!("verify", s.dst, "--state-dir", s.state)
        } else {
            df!("points", s.dst, "--state-dir", s.state)
        };
        assert_eq!(rec.code, 0, "{what}: recovery after the kill failed (left: {left}):\n{rec}");
        let at_old = s.holds(&s.old);
        let at_new = s.holds(&s.src);
        // `verify` says what it recovered; after `points`, judge by the journal.
        let finished = rec.stderr.contains("recovered: finished") || (!by_verify && journal && at_new.is_ok());
        let discarded = rec.stderr.contains("recovered: discarded") || (!by_verify && journal && at_old.is_ok());
        let phase = match (finished, discarded, at_old.is_ok(), at_new.is_ok()) {
            (true, _, _, _) => {
                tally.commit_phase += 1;
                "commit"
            }
            (_, true, _, _) => {
                tally.staging += 1;
                if new_manifest {
                    tally.before_commit_record += 1;
                    "staging (reserve/undo, before the commit record)"
                } else {
                    "staging"
                }
            }
            (_, _, true, _) => {
                tally.early += 1;
                "early"
            }
            _ => {
                tally.late += 1;
                "late"
            }
        };
        eprintln!("{what}: killed {killed} after {ran:.3} s, left {left}, phase {phase}");
        assert!(
            at_old.is_ok() || at_new.is_ok(),
            "{what}: after recovery ({phase}) the target is neither the old nor the new source:\n  old: {}\n  new: {}\n{rec}",
            at_old.unwrap_err(),
            at_new.unwrap_err()
        );
        if finished {
            s.assert_holds(&s.src, &format!("{what}: recovery finished the commit but"));
        }

        // The next sync succeeds and gives the new bytes.
        let next = run(&s.sync_args(&["--block-size", block_size]));
        let how = if by_verify { "verify" } else { "points" };
        assert_eq!(
            next.code, 0,
            "{what}: the sync after the kill ({phase}; {left}; recovered by {how}) failed:\n{next}"
        );
        s.assert_holds(&s.src, &format!("{what}: the sync after the kill"));
        if at_old.is_ok() && at_new.is_err() {
            // That sync did the whole change.
            observed.push(next.seconds);
        }
        df!("verify", s.dst, "--state-dir", s.state).ok();
        assert!(!s.partial().exists(), "{what}: {} left behind", s.partial().display());
        tally.iterations += 1;
    }
    eprintln!("{name}: {tally:?}");
    tally
}

#[test]
fn kill_sync_file_target() {
    let t = kill_loop("kill_file", TargetKind::File, 128 * MIB, 24);
    assert!(t.commit_phase > 0, "no kill landed in the commit phase: {t:?}");
    assert!(t.staging + t.early > 0, "no kill landed before the commit: {t:?}");
}

#[test]
fn kill_sync_block_device_target() {
    let t = kill_loop("kill_device", TargetKind::Device, 96 * MIB, 10);
    assert!(t.iterations == 10);
}

/// 100 killed syncs; run with
/// `cargo test -p diskferry-agent --test e2e -- --ignored kill_stress`.
#[test]
#[ignore = "stress: about 100 killed syncs"]
fn kill_stress() {
    let files = kill_loop("kill_stress_file", TargetKind::File, 192 * MIB, 70);
    let devices = kill_loop("kill_stress_device", TargetKind::Device, 128 * MIB, 30);
    assert!(files.commit_phase + devices.commit_phase >= 5, "too few kills in the commit phase: {files:?} {devices:?}");
}

/// A sync killed after its new manifest is in place but before its commit
/// record (flushing the log, reserving space in the target, writing the
/// undo segment) changed no byte of the target: the next sync, run straight
/// after the kill with no `verify` in between, must succeed, not call the
/// target diverged.
#[test]
fn sync_killed_just_before_its_commit_record_is_not_diverged() {
    let name = "kill_before_commit_record";
    let mut rng = rng(name);
    let s = Setup::new(name, TargetKind::File, 96 * MIB, &mut rng);
    run(&s.sync_args(&[])).ok();
    heavy_change(&s, &mut rng);
    let mut t = run(&s.sync_args(&[])).ok().seconds;
    let mut hits = 0;
    for attempt in 0..60 {
        if hits >= 6 {
            break;
        }
        copy(&s.src, &s.old);
        let change = heavy_change(&s, &mut rng);
        let before: Vec<std::ffi::OsString> =
            std::fs::read_dir(target_state_dir(&s.state)).unwrap().map(|e| e.unwrap().file_name()).collect();
        let delay = rng.random_range(t * 0.4..t);
        let mut child = spawn(&s.sync_args(&[]));
        std::thread::sleep(Duration::from_secs_f64(delay));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let tdir = target_state_dir(&s.state);
        let journal = tdir.join("redo.log").exists();
        let new_manifest = std::fs::read_dir(&tdir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".dfm") && !before.contains(&e.file_name()));
        let window = status.signal() == Some(9) && journal && new_manifest;
        let what = format!("#{attempt}: {change}, kill after {delay:.3} s of ~{t:.3}");
        let next = run(&s.sync_args(&[]));
        let recovered = next.stderr.lines().find(|l| l.starts_with("recovered")).unwrap_or("").to_string();
        eprintln!("{name} {what}: window {window}, next sync exit {} {recovered}", next.code);
        assert_eq!(
            next.code, 0,
            "{what}: killed after the new manifest was in place, before the commit finished (redo.log left); \
             the next sync failed:\n{next}"
        );
        s.assert_holds(&s.src, &format!("{what}: the sync after the kill"));
        df!("verify", s.dst, "--state-dir", s.state).ok();
        if window {
            hits += 1;
        } else if !journal {
            t = t.max(next.seconds);
        }
    }
    assert!(hits > 0, "no kill landed between the manifest and the commit record");
}

/// A full copy writes `NAME.partial` and renames it over `NAME` at commit.
/// Killed midway, into a new file or over an existing one: the target is
/// absent or the old one, recovery and the next sync (a delta, for an
/// existing target) leave no `.partial` behind.
#[test]
fn killed_full_copy_leaves_no_partial_file() {
    let name = "kill_full_copy";
    let mut rng = rng(name);
    let s = Setup::new(name, TargetKind::File, 128 * MIB, &mut rng);
    let t = run(&s.sync_args(&["--mode", "full", "--force"])).ok().seconds;
    let (mut new_hits, mut existing_hits) = (0, 0);
    for attempt in 0..40 {
        if new_hits >= 2 && existing_hits >= 2 {
            break;
        }
        let new_target = attempt % 2 == 0;
        if new_target {
            let _ = std::fs::remove_file(&s.dst);
            let _ = std::fs::remove_dir_all(&s.state);
        }
        copy(&s.src, &s.old);
        scatter_writes(&s.src, 50, 64 * KIB, &mut rng);
        let delay = rng.random_range(t * 0.1..t * 0.7);
        let what = format!(
            "#{attempt}: full copy into {} target, kill after {delay:.3} s of ~{t:.3}",
            if new_target { "a new" } else { "an existing" }
        );
        let mut child = spawn(&s.sync_args(&["--mode", "full", "--force"]));
        std::thread::sleep(Duration::from_secs_f64(delay));
        child.kill().unwrap();
        let killed = child.wait().unwrap().signal() == Some(9);
        let partial = s.partial().exists();
        eprintln!("{name} {what}: killed {killed}, .partial {partial}");
        if new_target {
            // Nothing committed: no target yet (or, after the rename, the new one).
            if s.dst.exists() {
                s.assert_holds(&s.src, &what);
            } else if killed && partial {
                new_hits += 1;
            }
        } else {
            df!("verify", s.dst, "--state-dir", s.state).ok();
            if s.holds(&s.old).is_ok() && killed && partial {
                existing_hits += 1;
            } else {
                s.assert_holds(&s.src, &what);
            }
        }
        let next = run(&s.sync_args(&[])).ok_json();
        s.assert_holds(&s.src, &format!("{what}: the sync after the kill"));
        df!("verify", s.dst, "--state-dir", s.state).ok();
        assert!(
            !s.partial().exists(),
            "{what}: {} (from the killed full copy) is still there after recovery and a {} sync",
            s.partial().display(),
            string(&next, "mode")
        );
    }
    assert!(new_hits > 0 && existing_hits > 0, "kills did not land during the copies: {new_hits} {existing_hits}");
}
