//! I1 and I2 for the networked apply: pushes run in memory through the wire
//! format (`diskferry_testkit::pair`), with a resumable target, frames
//! verified before they are staged or written through the direct sink —
//! journal mode resuming blocks an interrupted push staged, a full copy
//! into a new file (`.partial`), a full copy into a block device (direct),
//! and a push taking over from one that died mid-stream. For every power
//! cut (every sync point, several survivals of the unsynced writes) and
//! every injected EIO/ENOSPC: recovery leaves exactly the old or the new
//! generation, and the next push completes.

use std::collections::BTreeSet;
use std::sync::Arc;

use diskferry_protocol::message::SyncMode;
use diskferry_protocol::Generation;
use diskferry_sync_engine::apply::Recovery;
use diskferry_sync_engine::store::Vfs;
use diskferry_testkit::pair::{push, spec, PushEnd, PushSpec};
use diskferry_testkit::{write_image, CrashFs, DiskGen, Fault, FaultyFs, MemFs};

use super::scenarios::{check_recovered, Outcome, Scenario, NEW, OLD};
use super::util::*;

/// The generation an interrupted push would have made (never committed).
const STOPPED: u128 = 5;
/// The generation of the push run after recovery.
const NEXT: u128 = 7;

struct NetScenario {
    s: Scenario,
    push: PushSpec,
}

fn push_spec(generation: u128, block: u32) -> PushSpec {
    let mut p = spec(p(STATE), p(SRC), p(DST), generation);
    p.block_size = bs(block);
    p
}

/// Runs a push that stops after `frames` staged frames; it must stop.
fn interrupt(fs: &MemFs, mut spec: PushSpec, frames: u64) {
    spec.stop_after = Some(frames);
    spec.generation = Generation(STOPPED);
    let end = one_thread(|| push(Arc::new(fs.clone()), &spec)).expect("the interrupted push");
    assert_eq!(end, PushEnd::Stopped, "the first push finished before it was interrupted");
    // What it staged is kept for the next push to resume.
    let t = open_target(Arc::new(fs.clone()), 3).expect("open after the interrupted push");
    assert!(matches!(t.recovery(), Recovery::Staged { .. }), "nothing kept to resume: {:?}", t.recovery());
    let partial = format!("{DST}.partial");
    assert!(
        t.staged().is_some_and(|s| s.entries > 0) || read(fs, &partial).is_some(),
        "the interrupted push staged nothing"
    );
}

/// A synced target (generation OLD), the source changed, and an earlier push
/// of the change interrupted after `frames` frames: its staged blocks are
/// resumed.
fn journal_resumed(name: &'static str, seed: u64, frames: u64) -> NetScenario {
    let mut g = DiskGen::new(seed);
    let v1 = g.disk(640_000);
    let mut v2 = v1.clone();
    g.scribble(&mut v2, 40, 20_000);
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &v1).unwrap();
    let o = opts(4096, 3);
    sync(Arc::new(fs.clone()), OLD, &o).expect("first sync");
    write_image(&fs, p(SRC), &v2).unwrap();
    let spec = push_spec(NEW, 4096);
    interrupt(&fs, spec.clone(), frames);
    let s = Scenario { name, base: fs, old: Some(v1), new: v2, old_gen: Some(Generation(OLD)), opts: o, direct: false };
    NetScenario { s, push: spec }
}

/// A full copy into a new file, resumed from an interrupted one when `frames` is set.
fn partial(frames: Option<u64>) -> NetScenario {
    let src = DiskGen::new(21).disk(700_000);
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &src).unwrap();
    let spec = push_spec(NEW, 16384);
    if let Some(n) = frames {
        interrupt(&fs, spec.clone(), n);
    }
    let name = if frames.is_some() { "resumed full copy into a new file" } else { "full copy into a new file" };
    let s = Scenario { name, base: fs, old: None, new: src, old_gen: None, opts: opts(16384, 3), direct: false };
    NetScenario { s, push: spec }
}

/// A full copy straight into a block device holding other bytes.
fn direct() -> NetScenario {
    let mut g = DiskGen::new(22);
    let src = g.disk(512 * 1024);
    let garbage = g.disk(512 * 1024);
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &src).unwrap();
    fs.add_block_device(p(DST), garbage.len() as u64).unwrap();
    write_image(&fs, p(DST), &garbage).unwrap();
    let mut spec = push_spec(NEW, 65536);
    spec.mode = SyncMode::Full;
    spec.force = true;
    let s = Scenario {
        name: "full copy into a block device",
        base: fs,
        old: Some(garbage),
        new: src,
        old_gen: None,
        opts: opts(65536, 3),
        direct: true,
    };
    NetScenario { s, push: spec }
}

fn run_push(vfs: Arc<dyn Vfs>, spec: &PushSpec) -> diskferry_sync_engine::Result<PushEnd> {
    one_thread(|| push(vfs, spec))
}

/// After recovery, the next push completes and leaves the new bytes.
fn next_push_converges(n: &NetScenario, image: &MemFs, ctx: &str) {
    let mut spec = n.push.clone();
    spec.generation = Generation(NEXT);
    let end = run_push(Arc::new(image.clone()), &spec)
        .unwrap_or_else(|e| panic!("{ctx}: the push after recovery failed: [{}] {e}", e.code.as_str()));
    assert!(matches!(end, PushEnd::Committed(_)), "{ctx}: {end:?}");
    assert_eq!(read(image, DST).as_deref(), Some(&n.s.new[..]), "{ctx}: the push after recovery");
    verify_ok(Arc::new(image.clone()), ctx);
}

fn crash_at_every_sync_point(n: NetScenario) {
    let name = n.s.name;
    let clean = CrashFs::new(&n.s.base);
    let end = run_push(Arc::new(clean.clone()), &n.push).unwrap_or_else(|e| panic!("{name}: clean push: {e}"));
    assert!(matches!(end, PushEnd::Committed(_)), "{name}: clean push: {end:?}");
    assert_eq!(read(clean.live(), DST).as_deref(), Some(&n.s.new[..]), "{name}: clean push");
    let count = clean.sync_points();
    assert!(count >= 3, "{name}: only {count} sync points");
    let mut outcomes = BTreeSet::new();
    for k in 0..=count {
        let fs = CrashFs::new(&n.s.base);
        fs.freeze_at(k);
        let res = run_push(Arc::new(fs.clone()), &n.push);
        let returned_committed = matches!(res, Ok(PushEnd::Committed(_))) && !fs.is_frozen();
        let mut images: Vec<(String, MemFs)> =
            (0..3).map(|seed| (format!("seed {seed}"), fs.crash(k * 1000 + seed))).collect();
        images.push(("nothing unsynced kept".into(), fs.crash_durable()));
        images.push(("everything issued kept".into(), fs.crash_keep_all()));
        for (how, image) in images {
            let ctx = format!("{name}: power cut at sync point {k} of {count} ({how})");
            let untouched = image.snapshot();
            let outcome = check_recovered(&n.s, &image, &ctx);
            if returned_committed {
                assert_eq!(outcome, Outcome::New, "{ctx}: the push returned committed, yet a power cut lost it");
            }
            next_push_converges(&n, &untouched, &ctx);
            outcomes.insert(format!("{outcome:?}"));
        }
    }
    assert!(outcomes.contains("New"), "{name}: never saw the new generation: {outcomes:?}");
    assert!(outcomes.len() >= 2, "{name}: never saw the old state: {outcomes:?}");
}

fn fail_from_every_op(n: NetScenario) {
    let name = n.s.name;
    let counter = FaultyFs::unlimited(Arc::new(n.s.base.snapshot()));
    run_push(Arc::new(counter.clone()), &n.push).unwrap_or_else(|e| panic!("{name}: clean push: {e}"));
    let total = counter.ops();
    for fault in [Fault::Eio, Fault::Enospc] {
        for k in 0..total {
            let mem = n.s.base.snapshot();
            let f = FaultyFs::new(Arc::new(mem.clone()), k, fault);
            let ctx = format!("{name}: {fault:?} from operation {k} of {total}");
            if let Ok(end) = run_push(Arc::new(f), &n.push) {
                panic!("{ctx}: the push reported success: {end:?}");
            }
            let untouched = mem.snapshot();
            check_recovered(&n.s, &mem, &ctx);
            next_push_converges(&n, &untouched, &ctx);
        }
    }
}

#[test]
fn net_crash_journal_resumed() {
    // Interrupted after a few frames, then resumed.
    crash_at_every_sync_point(journal_resumed("resumed delta through the redo log", 31, 7));
}

#[test]
fn net_crash_takeover_mid_stream() {
    // A push that died mid-stream, taken over by the next one.
    crash_at_every_sync_point(journal_resumed("takeover of a stale push mid-stream", 32, 23));
}

#[test]
fn net_crash_partial() {
    crash_at_every_sync_point(partial(None));
    crash_at_every_sync_point(partial(Some(9)));
}

#[test]
fn net_crash_direct() {
    crash_at_every_sync_point(direct());
}

#[test]
fn net_faults_journal_resumed() {
    fail_from_every_op(journal_resumed("resumed delta through the redo log", 33, 11));
}

#[test]
fn net_faults_partial_and_direct() {
    fail_from_every_op(partial(Some(5)));
    fail_from_every_op(direct());
}

/// The target asks its disk ahead for the current bytes of a region's
/// changed blocks (adjacent ones as one range) before it reads them for
/// their page hashes: on a cold target they then wait on the device
/// together, not one after the other.
#[test]
fn the_target_asks_ahead_for_the_blocks_it_reads() {
    let block = 4096usize;
    let v1: Vec<u8> = (0..64 * block).map(|i| (i * 7 % 251) as u8).collect();
    let mut v2 = v1.clone();
    for b in [3, 4, 10] {
        v2[b * block..(b + 1) * block].fill(0xa0 + b as u8);
    }
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &v1).unwrap();
    sync(Arc::new(fs.clone()), OLD, &opts(4096, 3)).expect("first sync");
    write_image(&fs, p(SRC), &v2).unwrap();
    let faulty = FaultyFs::unlimited(Arc::new(fs.clone()));
    let end = one_thread(|| push(Arc::new(faulty.clone()), &push_spec(NEW, 4096))).expect("the push");
    assert!(matches!(end, PushEnd::Committed(_)), "{end:?}");
    assert_eq!(read(&fs, DST).unwrap(), v2);
    let advised = faulty.read_ahead(p(DST)).advised;
    for range in [(3 * 4096, 2 * 4096), (10 * 4096, 4096)] {
        assert!(advised.contains(&range), "{range:?} was not asked for ahead: {advised:?}");
    }
}
