//! `failover-sync`: delta passes while a writer runs, the quiesce command
//! stops it, the last delta lands as a consistent point promoted in the
//! same session, the report has every pass and the downtime; a failure
//! after the quiesce says so and runs the unquiesce command; the way back
//! is a delta, with the old live side demoted.

use std::path::Path;

use rand::{Rng, RngCore};
use serde_json::Value;

use crate::agents::{points, Hosts};
use crate::util::*;

/// Rewrites random 64 KiB runs of `path` until the file `dir/stop` appears,
/// then says `dir/stopped` and stops (what a guest shutdown looks like).
fn writer(path: &Path, dir: &Path, seed: u64) -> std::thread::JoinHandle<u64> {
    let (path, dir) = (path.to_path_buf(), dir.to_path_buf());
    std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let runs = f.metadata().unwrap().len() / 65536;
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while !dir.join("stop").exists() {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, rng.random_range(0..runs) * 65536).unwrap();
            n += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        f.sync_all().unwrap();
        std::fs::write(dir.join("stopped"), b"").unwrap();
        n
    })
}

fn quiesce(dir: &Path) -> String {
    let d = dir.display();
    format!("touch {d}/stop; while [ ! -e {d}/stopped ]; do sleep 0.01; done")
}

#[test]
fn passes_converge_then_the_last_delta_is_promoted() {
    let mut rng = rng("failover_sync_promotes");
    let h = Hosts::start("fsync", 3);
    make_disk(&h.disk_a, 24 * MIB, 0.8, &mut rng);
    let dir = h.disk_a.parent().unwrap().to_path_buf();
    let w = writer(&h.disk_a, &dir, 1);
    let q = quiesce(&dir);
    let unq = format!("touch {}/unquiesced", dir.display());
    let r = h
        .failover_sync(
            true,
            &[
                "--quiesce-cmd",
                &q,
                "--unquiesce-cmd",
                &unq,
                "--promote",
                "--max-passes",
                "4",
                "--converge-bytes",
                "256K",
            ],
        )
        .ok_json();
    let writes = w.join().unwrap();
    assert!(writes > 0);
    let passes = r["passes"].as_array().unwrap();
    assert!(!passes.is_empty() && passes.len() <= 4, "{r}");
    for p in passes {
        for k in ["bytes_changed", "bytes_sent", "seconds"] {
            assert!(p[k].is_number(), "pass without {k}: {p}");
        }
    }
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    assert_eq!(r["promoted"], Value::Bool(true), "{r}");
    assert!(r["downtime_seconds"].as_f64().unwrap() > 0.0 && r["quiesce_seconds"].is_number(), "{r}");
    assert!(!dir.join("unquiesced").exists(), "the unquiesce command runs only after a failure");
    compare(&h.disk_a, &h.disk_b).unwrap();
    let gen = r["generation"].as_str().unwrap();
    let listed = h.b.points(&h.disk_b).ok_json();
    assert_eq!(listed["role"], "live", "{listed}");
    let ps = listed["points"].as_array().unwrap();
    assert!(ps.iter().all(|p| p["consistency"] != "fuzzy"), "phase-1 passes are never recovery points: {ps:?}");
    assert!(ps.iter().any(|p| p["generation"] == gen && p["current"] == Value::Bool(true)));
    // The old primary can no longer push there.
    h.push(true, &[]).expect_json_error("E_PROMOTED", 5);

    // And back: B runs the VM, then failover-sync to A; B (a live target
    // of its own agent) is demoted at the generation it shipped.
    scatter_writes(&h.disk_b, 30, 20_000, &mut rng);
    let back = h.failover_sync(false, &["--quiesce-cmd", "true", "--promote"]).ok_json();
    assert_eq!(back["mode"], "delta", "{back}");
    assert!(back["common_point"].is_string(), "{back}");
    assert_eq!(back["source_demoted"], back["generation"], "{back}");
    assert_eq!(h.b.points(&h.disk_b).ok_json()["role"], "replica");
    compare(&h.disk_a, &h.disk_b).unwrap();
    scatter_writes(&h.disk_a, 10, 10_000, &mut rng);
    let again = h.push(true, &[]).ok_json();
    assert_eq!(again["mode"], "delta", "the way back is a delta: {again}");
    assert!(uint(&again, "target_bytes_read") < 4 * MIB, "{again}");
}

#[test]
fn a_failure_after_the_quiesce_says_so_and_unquiesces() {
    let mut rng = rng("failover_sync_failure");
    let h = Hosts::start("fsync-fail", 3);
    make_disk(&h.disk_a, 8 * MIB, 0.8, &mut rng);
    let first = h.push(true, &[]).ok_json();
    let dir = h.disk_a.parent().unwrap().to_path_buf();
    let unq = format!("touch {}/unquiesced", dir.display());
    // The quiesce command fails: E_HOOK, unquiesce runs.
    let e = h.failover_sync(true, &["--quiesce-cmd", "exit 9", "--unquiesce-cmd", &unq]).expect_json_error("E_HOOK", 3);
    assert!(e["message"].as_str().unwrap().contains("quiesce"), "{e}");
    assert!(dir.join("unquiesced").exists());
    std::fs::remove_file(dir.join("unquiesced")).unwrap();
    // The target is promoted by someone else while the VM is quiesced: the
    // last delta is refused, and the error says the VM is quiesced.
    let steal = format!("{} failover vm --config {} --json >/dev/null", bin().display(), h.b.config.display());
    scatter_writes(&h.disk_a, 10, 10_000, &mut rng);
    let e =
        h.failover_sync(true, &["--quiesce-cmd", &steal, "--unquiesce-cmd", &unq]).expect_json_error("E_PROMOTED", 5);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("quiesced") && msg.contains("not committed"), "{msg}");
    assert!(msg.contains("unquiesce command ran"), "{msg}");
    assert!(dir.join("unquiesced").exists());
    // Only fuzzy phase-1 passes landed after the first push: its point is
    // the only recovery point (the one the intruder promoted).
    let listed = points(&h.b, &h.disk_b);
    assert_eq!(listed.len(), 1, "the last delta must not have landed: {listed:?}");
    assert_eq!(listed[0]["generation"], first["generation"]);
}
