//! The target agent's memory budget bounds its memory however many sessions
//! run: sessions beyond it wait for memory, they never fail for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::agents::{pair, push_to};
use crate::util::{self, compare, make_disk, MIB};

/// Samples a process's anonymous resident memory until stopped; keeps the peak.
pub struct RssAnon {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssAnon {
    pub fn watch(pid: u32) -> RssAnon {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return };
                if let Some(kb) = status
                    .lines()
                    .find(|l| l.starts_with("RssAnon:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    p.fetch_max(kb * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssAnon { peak, stop, thread: Some(thread) }
    }

    pub fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn concurrent_full_pushes(budget_mib: u64, sessions: usize, size: u64) {
    let mut rng = util::rng("memory-budget");
    let p = pair(
        &format!("memory-{budget_mib}"),
        sessions,
        &format!("memory_budget_mib = {budget_mib}\nmax_sessions = {sessions}"),
    );
    let src = p.dir.join("src.img");
    make_disk(&src, size, 1.0, &mut rng);
    let watch = RssAnon::watch(p.agent.pid());
    let results: Vec<util::Out> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sessions)
            .map(|i| {
                let (src, source, agent) = (&src, &p.source, &p.agent);
                s.spawn(move || push_to(src, source, agent, &format!("t{i}"), &["--compress", "off"]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = watch.peak();
    for (i, out) in results.into_iter().enumerate() {
        out.ok();
        compare(&src, &p.dir.join(format!("t{i}.img"))).unwrap();
    }
    eprintln!("budget {budget_mib} MiB, {sessions} sessions: peak RssAnon {} MiB", peak / MIB);
    assert!(
        peak <= (budget_mib + 64) * MIB,
        "peak anonymous memory {} MiB over the {budget_mib} MiB budget plus 64 MiB",
        peak / MIB
    );
}

#[test]
fn sixteen_full_pushes_stay_inside_a_64_mib_budget() {
    concurrent_full_pushes(64, 16, 128 * MIB);
}

#[test]
fn sixteen_full_pushes_stay_inside_a_16_mib_budget() {
    concurrent_full_pushes(16, 16, 48 * MIB);
}
