//! A source that changes while it is pushed: written, it commits a fuzzy
//! point (never listed as a recovery point); shrunk or replaced, it fails
//! with `E_SOURCE_CHANGED` and leaves the target at its last commit; never
//! a crash.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::agents::{pair, push_to, spawn_push, sum};
use crate::util::{self, make_disk, MIB};

/// Writes random 4 KiB pages into `path` until dropped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(path: &Path, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let f = OpenOptions::new().write(true).open(path).unwrap();
        let size = f.metadata().unwrap().len();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut page = vec![0u8; 4096];
            let mut writes = 0;
            while !s.load(Ordering::Relaxed) {
                rng.fill_bytes(&mut page);
                let off = rng.random_range(0..size / 4096) * 4096;
                f.write_all_at(&page, off).unwrap();
                writes += 1;
                if writes % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            writes
        });
        Writer { stop, thread: Some(thread) }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_source_written_during_a_push_commits_a_fuzzy_point() {
    let mut rng = util::rng("source-written");
    let p = pair("source-written", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 64 * MIB, 0.9, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    for round in 0..6 {
        // Full copies and deltas, with and without compression.
        let extra: &[&str] = match round % 3 {
            0 => &["--mode", "full", "--force"],
            1 => &["--mode", "full", "--force", "--compress", "off"],
            _ => &[],
        };
        let writer = Writer::start(&src, rng.random());
        let out = push_to(&src, &p.source, &p.agent, "t0", extra);
        let writes = writer.stop();
        let v = out.ok_json();
        if writes > 0 {
            assert_eq!(v["consistency"], "fuzzy", "round {round}: a source written while read is fuzzy: {v}");
        }
        // The manifest describes the bytes the target holds.
        p.agent.verify(&tgt).ok();
        let points = p.agent.points(&tgt).ok_json();
        let listed: Vec<String> =
            points["points"].as_array().unwrap().iter().map(|pt| pt["generation"].as_str().unwrap().into()).collect();
        assert!(!listed.contains(&v["generation"].as_str().unwrap().to_string()), "a fuzzy point is never listed");
    }
    // A quiet source then gives a consistent point equal to it.
    let v = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(v["consistency"], "crash-consistent");
    util::compare(&src, &tgt).unwrap();
}

#[test]
fn a_source_truncated_during_a_push_fails_with_a_code_not_a_signal() {
    let mut rng = util::rng("source-truncated");
    let p = pair("source-truncated", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    let size = 256 * MIB;
    let mut hits = 0;
    let mut committed: Option<[u8; 32]> = None;
    for (round, delay_ms) in [30u64, 80, 150, 250, 400, 40, 120].into_iter().enumerate() {
        make_disk(&src, size, 0.9, &mut rng);
        let extra: &[&str] = if round % 2 == 0 { &["--mode", "full", "--force"] } else { &[] };
        let child = spawn_push(&src, &p.source, &p.agent, "t0", extra);
        std::thread::sleep(Duration::from_millis(delay_ms));
        util::truncate(&src, MIB);
        let out = child.wait_with_output().unwrap();
        let code = out.status.code();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(code.is_some(), "round {round}: killed by a signal ({:?}):\n{stderr}", out.status);
        if code == Some(0) {
            // Finished before the cut: the target is that complete copy.
            committed = Some(sum(&tgt));
            p.agent.verify(&tgt).ok();
            continue;
        }
        hits += 1;
        assert_eq!(code, Some(3), "round {round}: E_SOURCE_CHANGED exits 3:\n{stderr}");
        assert!(stderr.contains("error[E_SOURCE_CHANGED]"), "round {round}:\n{stderr}");
        // The target keeps its last commit.
        if let Some(before) = committed {
            assert_eq!(sum(&tgt), before, "round {round}: the target changed");
            p.agent.verify(&tgt).ok();
        }
    }
    assert!(hits >= 2, "only {hits} truncations landed during a push");
}
