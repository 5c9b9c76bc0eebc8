//! The target agent's memory budget bounds its memory however many sessions
//! run: sessions beyond it wait for memory, they never fail for it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::agents::{pair, push_to, push_within, Pair};
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

/// `src` pushed to targets `t0..t{sessions}` at once; what each push
/// printed, and the target agent's peak anonymous memory meanwhile.
fn push_all_at_once(p: &Pair, src: &Path, sessions: usize) -> (Vec<util::Out>, u64) {
    let watch = RssAnon::watch(p.agent.pid());
    let results: Vec<util::Out> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sessions)
            .map(|i| {
                let (source, agent) = (&p.source, &p.agent);
                s.spawn(move || push_to(src, source, agent, &format!("t{i}"), &["--compress", "off"]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (results, watch.peak())
}

/// The peak stays within the budget plus 64 MiB (the binary, the runtime,
/// thread stacks: what the budget does not count).
fn assert_within_budget(peak: u64, budget_mib: u64, what: &str) {
    eprintln!("budget {budget_mib} MiB, {what}: peak RssAnon {} MiB", peak / MIB);
    assert!(
        peak <= (budget_mib + 64) * MIB,
        "{what}: peak anonymous memory {} MiB over the {budget_mib} MiB budget plus 64 MiB",
        peak / MIB
    );
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
    let (results, peak) = push_all_at_once(&p, &src, sessions);
    for (i, out) in results.into_iter().enumerate() {
        out.ok();
        compare(&src, &p.dir.join(format!("t{i}.img"))).unwrap();
    }
    assert_within_budget(peak, budget_mib, &format!("{sessions} sessions"));
}

#[test]
fn sixteen_full_pushes_stay_inside_a_64_mib_budget() {
    concurrent_full_pushes(64, 16, 128 * MIB);
}

#[test]
fn sixteen_full_pushes_stay_inside_a_16_mib_budget() {
    concurrent_full_pushes(16, 16, 48 * MIB);
}

/// A data stream that waits for memory holds its unread bytes in the
/// connection's window, so another stream's frame can only finish if it
/// never waits for that one: each stream has one frame's memory of its own.
/// Blocks whose frames cannot all fit are refused, naming the budget that
/// would hold them; at that budget they run. (2 and 4 MiB blocks at a
/// 16 MiB budget used to stall for good after a few blocks.)
#[test]
fn large_blocks_run_at_the_budget_they_need_and_are_refused_below_it() {
    let limit = Duration::from_secs(180);
    let mut rng = util::rng("memory-large-blocks");
    let small = pair("memory-large-16", 3, "memory_budget_mib = 16");
    let src = small.dir.join("src.img");
    make_disk(&src, 48 * MIB, 0.8, &mut rng);
    // 1 MiB blocks fit the smallest budget, fully and as deltas.
    for _ in 0..2 {
        push_within(&src, &small.source, &small.agent, "t0", &["--block-size", "1M"], limit).ok();
        compare(&src, &small.dir.join("t0.img")).unwrap();
        util::change_data_pages(&src, 64, &mut rng);
    }
    // Refused while a push of the same target runs, which goes on (a
    // refusal takes no target from anyone), and for a new target, which is
    // not created.
    let running = crate::agents::spawn_push(
        &src,
        &small.source,
        &small.agent,
        "t0",
        &["--block-size", "1M", "--mode", "full", "--force", "--bwlimit", "16M"],
    );
    std::thread::sleep(Duration::from_millis(700));
    let mut needed = Vec::new();
    for (target, bs) in [("t0", "2M"), ("t1", "4M")] {
        let out = push_within(&src, &small.source, &small.agent, target, &["--block-size", bs], limit);
        out.expect_error("E_MEMORY_BUDGET", 4);
        if target != "t0" {
            assert!(!small.dir.join(format!("{target}.img")).exists(), "a refused session touched its target");
        }
        let mib: u64 = out
            .stderr
            .split("memory_budget_mib = ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the refusal names no budget:\n{out}"));
        eprintln!("{bs} blocks: {}", out.stderr.trim());
        needed.push((bs, mib));
    }
    assert!(needed[0].1 > 16 && needed[1].1 > needed[0].1, "{needed:?}");
    let running = running.wait_with_output().unwrap();
    assert!(running.status.success(), "the running push failed: {}", String::from_utf8_lossy(&running.stderr));
    compare(&src, &small.dir.join("t0.img")).unwrap();
    // At exactly the budget named, the session runs, full and delta, with
    // half-compressible data so zstd frames (the dearest) come too.
    for (bs, mib) in needed {
        let p = pair(&format!("memory-large-{mib}"), 1, &format!("memory_budget_mib = {mib}"));
        let src = p.dir.join("src.img");
        make_disk(&src, 40 * MIB, 0.8, &mut rng);
        let mut half = vec![0u8; 4 * MIB as usize];
        for (i, b) in half.iter_mut().enumerate() {
            *b = if i % 2 == 0 { (i / 4096) as u8 } else { 0x5a };
        }
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::File::options().write(true).open(&src).unwrap(),
            &half,
            8 * MIB,
        )
        .unwrap();
        for _ in 0..2 {
            push_within(&src, &p.source, &p.agent, "t0", &["--block-size", bs], limit).ok();
            compare(&src, &p.dir.join("t0.img")).unwrap();
            util::change_data_pages(&src, 64, &mut rng);
        }
    }
}

/// Deltas are bounded by the budget too: a target keeps the current bytes
/// of each block it asked for (the patch frame applies over them) and reads
/// them again for its undo segment, so many sessions whose every block
/// changed by one page must still fit the budget.
#[test]
fn eight_deltas_of_every_block_stay_inside_a_16_mib_budget() {
    use rand::RngCore;
    use std::os::unix::fs::FileExt;
    let (budget_mib, sessions, size) = (16u64, 8usize, 48 * MIB);
    let mut rng = util::rng("memory-deltas");
    let p = pair("memory-deltas", sessions, &format!("memory_budget_mib = {budget_mib}\nmax_sessions = {sessions}"));
    let src = p.dir.join("src.img");
    make_disk(&src, size, 1.0, &mut rng);
    for i in 0..sessions {
        push_to(&src, &p.source, &p.agent, &format!("t{i}"), &["--compress", "off"]).ok();
    }
    // One 4 KiB page of every 64 KiB block rewritten.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let mut page = vec![0u8; 4096];
    for block in 0..size / (64 * 1024) {
        rng.fill_bytes(&mut page);
        f.write_all_at(&page, block * 64 * 1024 + (block % 16) * 4096).unwrap();
    }
    drop(f);
    let (results, peak) = push_all_at_once(&p, &src, sessions);
    for (i, out) in results.into_iter().enumerate() {
        let report = out.ok_json();
        assert_eq!(util::string(&report, "plan"), "CompareManifest", "t{i}: {report}");
        compare(&src, &p.dir.join(format!("t{i}.img"))).unwrap();
    }
    assert_within_budget(peak, budget_mib, &format!("{sessions} delta sessions"));
}

/// The source side of a full download: frames read from an image (no map
/// to share: each frame owns its bytes) wait for a slow network in a queue
/// bounded in bytes, not in frames. With 4 MiB blocks it held 64 frames a
/// data stream, half a GiB, before.
#[test]
fn a_slow_full_push_of_large_blocks_queues_megabytes_on_the_source() {
    crate::nbd::need_qemu();
    let p = pair("memory-source-queue", 1, "");
    let (raw, img) = (p.dir.join("random.raw"), p.dir.join("vm.qcow2"));
    util::random_disk(&raw, 160 * MIB, &mut util::rng("memory-source-queue"));
    crate::nbd::sh("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), img.to_str().unwrap()]);
    let args = ["--format", "qcow2", "--block-size", "4M", "--mode", "full", "--compress", "off", "--bwlimit", "32M"];
    let push = crate::agents::spawn_push(&img, &p.source, &p.agent, "t0", &args);
    let watch = RssAnon::watch(push.id());
    let out = push.wait_with_output().unwrap();
    let peak = watch.peak();
    assert!(out.status.success(), "the push failed: {}", String::from_utf8_lossy(&out.stderr));
    compare(&raw, &p.dir.join("t0.img")).unwrap();
    eprintln!("source peak RssAnon {} MiB", peak / MIB);
    assert!(peak <= 128 * MIB, "the source held {} MiB of anonymous memory", peak / MIB);
}
