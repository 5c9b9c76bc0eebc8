//! I1 under power cuts (STYLE rule 9): for each scenario, count the sync
//! points of the sync, then for every k freeze durability at k, rebuild the
//! image a power cut leaves (several random survivals of the unsynced
//! writes, torn at 4 KiB; nothing unsynced; everything issued, as after a
//! kill -9), recover, and require the old or the new bytes exactly.

use std::collections::BTreeSet;
use std::sync::Arc;

use diskferry_protocol::Generation;
use diskferry_sync_engine::apply::Recovery;
use diskferry_testkit::{CrashFs, MemFs};

use super::scenarios::{self, check_recovered, fresh_sync_converges, Outcome, Scenario, NEW};
use super::util::*;

const SEEDS: u64 = 3;

/// Sync points of the scenario's sync, which must succeed when nothing fails.
fn count_sync_points(s: &Scenario) -> u64 {
    let fs = CrashFs::new(&s.base);
    sync(Arc::new(fs.clone()), NEW, &s.opts).unwrap_or_else(|e| panic!("{}: clean run: {e}", s.name));
    assert_eq!(read(fs.live(), DST).as_deref(), Some(&s.new[..]), "{}: clean run", s.name);
    fs.sync_points()
}

/// The images a power cut during sync point `k` can leave.
fn images(fs: &CrashFs, k: u64) -> Vec<(String, MemFs)> {
    let mut out: Vec<(String, MemFs)> =
        (0..SEEDS).map(|seed| (format!("seed {seed}"), fs.crash(k * 1000 + seed))).collect();
    out.push(("nothing unsynced kept".into(), fs.crash_durable()));
    out.push(("everything issued kept".into(), fs.crash_keep_all()));
    out
}

fn crash_at_every_sync_point(s: Scenario) {
    let count = count_sync_points(&s);
    assert!(count >= 3, "{}: only {count} sync points", s.name);
    let mut outcomes = BTreeSet::new();
    for k in 0..=count {
        let fs = CrashFs::new(&s.base);
        fs.freeze_at(k);
        let res = sync(Arc::new(fs.clone()), NEW, &s.opts);
        // The sync returned with all its syncs durable: a power cut now must not lose it.
        let returned_committed = res.is_ok() && !fs.is_frozen();
        for (how, image) in images(&fs, k) {
            let ctx = format!("{}: power cut at sync point {k} of {count} ({how})", s.name);
            let untouched = image.snapshot();
            let outcome = check_recovered(&s, &image, &ctx);
            if returned_committed {
                assert_eq!(outcome, Outcome::New, "{ctx}: the sync returned Ok, yet a power cut lost it");
            }
            fresh_sync_converges(&s, &untouched, &ctx);
            outcomes.insert(format!("{outcome:?}"));
        }
    }
    // The sweep crosses the commit point: both sides must have been seen.
    assert!(outcomes.contains("New"), "{}: never saw the new generation: {outcomes:?}", s.name);
    assert!(outcomes.len() >= 2, "{}: never saw the old state: {outcomes:?}", s.name);
}

#[test]
fn crash_delta_with_state() {
    crash_at_every_sync_point(scenarios::delta_with_state());
}

#[test]
fn crash_delta_stateless() {
    crash_at_every_sync_point(scenarios::delta_stateless());
}

#[test]
fn crash_full_new_file() {
    crash_at_every_sync_point(scenarios::full_new_file());
}

#[test]
fn crash_full_over_existing() {
    crash_at_every_sync_point(scenarios::full_over_existing());
}

#[test]
fn crash_source_grew() {
    crash_at_every_sync_point(scenarios::grew());
}

#[test]
fn crash_source_shrank() {
    crash_at_every_sync_point(scenarios::shrank());
}

#[test]
fn crash_zeroed_region() {
    crash_at_every_sync_point(scenarios::zeroed());
}

#[test]
fn crash_delta_onto_device() {
    crash_at_every_sync_point(scenarios::device_delta());
}

#[test]
fn crash_full_into_device() {
    crash_at_every_sync_point(scenarios::device_full());
}

/// Replay is idempotent: a power cut during recovery of a committed redo
/// log, at each of recovery's own sync points, still ends at the new bytes.
fn crash_during_recovery(s: Scenario) {
    let count = count_sync_points(&s);
    let mut replays = 0;
    for k in 0..=count {
        let fs = CrashFs::new(&s.base);
        fs.freeze_at(k);
        let _ = sync(Arc::new(fs.clone()), NEW, &s.opts);
        for (how, image) in images(&fs, k) {
            let ctx = format!("{}: power cut at sync point {k} ({how})", s.name);
            // Count recovery's sync points; skip images with nothing to replay.
            let probe = CrashFs::new(&image);
            let t = open_target(Arc::new(probe.clone()), s.opts.retention)
                .unwrap_or_else(|e| panic!("{ctx}: recovery: {e}"));
            if *t.recovery() != Recovery::Finished(Generation(NEW)) {
                continue;
            }
            drop(t);
            let rcount = probe.sync_points();
            replays += 1;
            for k2 in 0..=rcount {
                let rfs = CrashFs::new(&image);
                rfs.freeze_at(k2);
                let _ = open_target(Arc::new(rfs.clone()), s.opts.retention);
                for (how2, image2) in images(&rfs, k2) {
                    let ctx = format!("{ctx}, then at recovery's sync point {k2} of {rcount} ({how2})");
                    let outcome = check_recovered(&s, &image2, &ctx);
                    assert_eq!(outcome, Outcome::New, "{ctx}: a durable commit record was not finished");
                }
            }
        }
    }
    assert!(replays > 0, "{}: no crash image needed a replay", s.name);
}

#[test]
fn crash_during_replay_of_a_delta() {
    crash_during_recovery(scenarios::delta_with_state());
}

#[test]
fn crash_during_replay_of_a_shrink() {
    crash_during_recovery(scenarios::shrank());
}

#[test]
fn crash_during_replay_of_a_full_copy() {
    crash_during_recovery(scenarios::full_new_file());
}
