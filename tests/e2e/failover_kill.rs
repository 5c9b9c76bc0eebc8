//! `diskferry failover --point` killed with SIGKILL at random moments: the
//! disk is the old point or the chosen one once recovery ran — by `verify`,
//! or by `serve` restarted instead (as soon as it listens) — never a mix;
//! and the move can be run again to its end.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Instant;

use rand::Rng;

use crate::agents::{sum, Agent, Identity, TargetSpec};
use crate::util::*;

/// A target with five points (each version rewrote about a quarter of the
/// disk), and a pristine copy of it and its state to restore per trial.
struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    dst: PathBuf,
    state: PathBuf,
    fingerprint: String,
    /// generation → blake3 of the disk at that point; the last is current.
    points: BTreeMap<String, [u8; 32]>,
    current: String,
}

impl Setup {
    fn new(name: &str, size: u64) -> Setup {
        let mut rng = rng(name);
        let tmp = tempdir(name);
        let dir = tmp.path().to_path_buf();
        let id = Identity::init(&dir, "state");
        let (src, dst, state) = (dir.join("src.img"), dir.join("vm.img"), id.state.clone());
        make_disk(&src, size, 0.8, &mut rng);
        let mut points = BTreeMap::new();
        let mut current = String::new();
        for v in 0..5 {
            if v > 0 {
                scatter_writes(&src, 64, size / 256, &mut rng);
            }
            let r = df!("sync", &src, &dst, "--state-dir", &state, "--retention", "5", "--json").ok_json();
            current = r["generation"].as_str().unwrap().to_string();
            points.insert(current.clone(), sum(&dst));
        }
        let s = Setup { _dir: tmp, dir: dir.clone(), dst, state, fingerprint: id.fingerprint, points, current };
        copy(&s.dst, &dir.join("pristine.img"));
        copy_tree(&s.state, &dir.join("pristine-state"));
        s
    }

    /// Back to the pristine state; `verify` then proves the copied disk is
    /// its point and restamps it, so the failover that follows spends its
    /// time moving, not hashing.
    fn restore(&self) {
        copy(&self.dir.join("pristine.img"), &self.dst);
        let _ = std::fs::remove_dir_all(&self.state);
        copy_tree(&self.dir.join("pristine-state"), &self.state);
        df!("verify", &self.dst, "--state-dir", &self.state, "--json").ok();
    }

    fn failover_args<'a>(&'a self, point: &'a str) -> Vec<&'a OsStr> {
        vec![
            OsStr::new("failover"),
            self.dst.as_os_str(),
            OsStr::new("--point"),
            OsStr::new(point),
            OsStr::new("--state-dir"),
            self.state.as_os_str(),
            OsStr::new("--json"),
        ]
    }

    /// Recovers (by `verify`), then which point the disk is at, checked
    /// against the catalog; panics on a mix.
    fn settled_at(&self, point: &str, ctx: &str) -> String {
        let v = df!("verify", &self.dst, "--state-dir", &self.state, "--json").ok_json();
        let at = self.at(ctx);
        assert!(at == self.current || at == point, "{ctx}: at {at}, neither the old point nor {point}");
        assert_eq!(v["generation"].as_str(), Some(at.as_str()), "{ctx}: the catalog names another point");
        at
    }

    /// The kept point whose bytes the disk holds; panics on a mix.
    fn at(&self, ctx: &str) -> String {
        let have = sum(&self.dst);
        let at = self.points.iter().find(|(_, s)| **s == have).map(|(g, _)| g.clone());
        at.unwrap_or_else(|| panic!("{ctx}: the disk is no kept point: a mix"))
    }
}

fn kill_failover(name: &str, trials: usize, restart_serve_every: usize) {
    let mut rng = rng(name);
    let s = Setup::new(name, 32 * MIB);
    let older: Vec<String> = s.points.keys().filter(|g| **g != s.current).cloned().collect();
    // How long a whole move takes, to spread the kills over it.
    s.restore();
    let t0 = Instant::now();
    run(&s.failover_args(&older[0])).ok();
    let mut whole = t0.elapsed();
    let (mut moved, mut old) = (0, 0);
    // Kills that all land on one side only mean the machine's load changed
    // since `whole` was measured: a few more trials, with `whole` following
    // the reruns, before the test calls that a failure.
    let mut trial = 0;
    while trial < trials || ((moved == 0 || old == 0) && trial < 3 * trials) {
        trial += 1;
        s.restore();
        let point = older[rng.random_range(0..older.len())].clone();
        let ctx = format!("trial {trial}: failover to {point}");
        let mut child = KillOnDrop(spawn(&s.failover_args(&point)));
        std::thread::sleep(whole.mul_f64(rng.random_range(0.2..1.2)));
        let _ = child.0.kill();
        let _ = child.0.wait();
        let at = if restart_serve_every > 0 && trial % restart_serve_every == 0 {
            // Recovery by the agent at start, before it listens.
            let id = Identity { state: s.state.clone(), fingerprint: s.fingerprint.clone() };
            let spec = TargetSpec { name: "vm", path: s.dst.clone(), allowed: &["self"] };
            let agent = Agent::start_as(id, &s.dir, &[("self", &s.fingerprint)], &[spec], "");
            // Listening: recovery ran.
            let at = s.at(&format!("{ctx}, serve restarted"));
            drop(agent);
            assert_eq!(s.settled_at(&point, &ctx), at);
            at
        } else {
            s.settled_at(&point, &ctx)
        };
        if at == point {
            moved += 1;
        } else {
            old += 1;
        }
        // The move runs again to its end: a whole move when the kill left
        // the old point, which keeps `whole` current.
        let t0 = Instant::now();
        run(&s.failover_args(&point)).ok();
        if at != point {
            whole = (whole + t0.elapsed()) / 2;
        }
        assert_eq!(sum(&s.dst), s.points[&point], "{ctx}: the rerun did not reach the point");
    }
    eprintln!("{name}: {trial} kills over about {whole:?}: {moved} at the chosen point, {old} at the old one");
    // Kills spread over the whole move land on both sides of its commit point.
    assert!(moved > 0 && old > 0, "the kills all landed on one side: {moved} moved, {old} old");
}

#[test]
fn failover_killed_at_random_moments() {
    kill_failover("kill_failover", 20, 4);
}

#[test]
#[ignore = "stress: 100 killed failovers"]
fn failover_kill_stress() {
    kill_failover("kill_failover_stress", 100, 5);
}
