//! I1 and I6 under injected I/O errors (STYLE rule 10): a store that fails
//! after N operations, for every N up to the operation count of the sync,
//! with EIO and ENOSPC; and transient single failures followed by a power cut.

use std::collections::BTreeMap;
use std::sync::Arc;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::points;
use diskferry_sync_engine::store::Vfs;
use diskferry_testkit::{CrashFs, Fault, FaultyFs};

use super::scenarios::{self, check_recovered, fresh_sync_converges, Outcome, Scenario, NEW, OLD};
use super::util::*;

/// Operations (Vfs and Storage calls) of the scenario's sync.
fn count_ops(s: &Scenario) -> u64 {
    let f = FaultyFs::unlimited(Arc::new(s.base.snapshot()));
    sync(Arc::new(f.clone()), NEW, &s.opts).unwrap_or_else(|e| panic!("{}: clean run: {e}", s.name));
    f.ops()
}

/// Fails every operation from the n-th on, for every n: the sync returns an
/// error (never a panic, never a false success), and recovery on the
/// underlying filesystem finds the old or the new generation.
fn fail_from_every_op(s: Scenario) {
    let total = count_ops(&s);
    for fault in [Fault::Eio, Fault::Enospc] {
        for n in 0..total {
            let mem = s.base.snapshot();
            let f = FaultyFs::new(Arc::new(mem.clone()), n, fault);
            let ctx = format!("{}: {fault:?} from operation {n} of {total}", s.name);
            if let Ok(r) = sync(Arc::new(f), NEW, &s.opts) {
                panic!("{ctx}: the sync reported success: {r:?}");
            }
            let untouched = mem.snapshot();
            check_recovered(&s, &mem, &ctx);
            fresh_sync_converges(&s, &untouched, &ctx);
        }
    }
}

#[test]
fn faults_delta_with_state() {
    fail_from_every_op(scenarios::delta_with_state());
}

#[test]
fn faults_delta_stateless() {
    fail_from_every_op(scenarios::delta_stateless());
}

#[test]
fn faults_full_new_file() {
    fail_from_every_op(scenarios::full_new_file());
}

#[test]
fn faults_source_grew_and_shrank() {
    fail_from_every_op(scenarios::grew());
    fail_from_every_op(scenarios::shrank());
}

#[test]
fn faults_zeroed_region() {
    fail_from_every_op(scenarios::zeroed());
}

#[test]
fn faults_block_devices() {
    fail_from_every_op(scenarios::device_delta());
    fail_from_every_op(scenarios::device_full());
}

/// I6: an injected EIO is reported as `E_IO`, an injected ENOSPC as
/// `E_TARGET_FULL` / `E_STATE_FULL` — never as damage or an internal error,
/// whose hints would send the operator the wrong way.
#[test]
fn fault_codes_name_the_cause() {
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in [scenarios::delta_with_state(), scenarios::full_new_file()] {
        let total = count_ops(&s);
        for (fault, allowed) in
            [(Fault::Eio, &[ErrorCode::Io][..]), (Fault::Enospc, &[ErrorCode::TargetFull, ErrorCode::StateFull][..])]
        {
            for n in 0..total {
                let f = FaultyFs::new(Arc::new(s.base.snapshot()), n, fault);
                let e = code_and_message(sync(Arc::new(f), NEW, &s.opts));
                if !allowed.contains(&e.0) {
                    wrong
                        .entry(format!("{}: {fault:?} reported as {}", s.name, e.0.as_str()))
                        .or_default()
                        .push(format!("op {n}: {}", e.1));
                }
            }
        }
    }
    let report: Vec<String> = wrong.iter().map(|(k, v)| format!("{k} ({} cases), e.g. {}", v.len(), v[0])).collect();
    assert!(report.is_empty(), "errors with the wrong code:\n{}", report.join("\n"));
}

fn code_and_message<T: std::fmt::Debug>(r: diskferry_sync_engine::Result<T>) -> (ErrorCode, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => (e.code, e.message),
    }
}

/// One operation fails (a transient error), then the power goes: whatever
/// the sync returned, the live state and the crash images are old or new;
/// a sync that returned Ok left its previous recovery point exportable.
fn transient_fault_then_power_cut(s: Scenario, fault: Fault) {
    let total = count_ops(&s);
    for n in 0..total {
        let fs = CrashFs::new(&s.base);
        let f = FaultyFs::fail_once(Arc::new(fs.clone()), n, fault);
        let res = sync(Arc::new(f), NEW, &s.opts);
        let ctx = format!("{}: transient {fault:?} at operation {n} of {total} (sync {})", s.name, ok_or_code(&res));
        let images = [("nothing unsynced kept", fs.crash_durable()), ("random survival", fs.crash(n))];
        let live = fs.live().clone();
        let outcome = check_recovered(&s, &live, &format!("{ctx}, no power cut"));
        if res.is_ok() {
            assert_eq!(outcome, Outcome::New, "{ctx}: Ok but the target is not new");
            export_old_point(&s, &live, &ctx);
        }
        for (how, image) in images {
            let ctx = format!("{ctx}, power cut ({how})");
            let untouched = image.snapshot();
            check_recovered(&s, &image, &ctx);
            fresh_sync_converges(&s, &untouched, &ctx);
        }
    }
}

fn ok_or_code<T>(r: &diskferry_sync_engine::Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    }
}

/// When the previous generation is still a kept point, its export is the old bytes.
fn export_old_point(s: &Scenario, fs: &diskferry_testkit::MemFs, ctx: &str) {
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let t = open_target(vfs.clone(), s.opts.retention).unwrap();
    if !points::list(&t).iter().any(|p| p.generation == Generation(OLD)) {
        return;
    }
    fs.create_dir_all(p("/exports")).unwrap();
    let out = p("/exports/old.img");
    vfs.remove_file(out).unwrap();
    points::export(&t, Generation(OLD), out)
        .unwrap_or_else(|e| panic!("{ctx}: the previous recovery point cannot be exported: [{}] {e}", e.code.as_str()));
    assert_eq!(read(fs, "/exports/old.img"), s.old, "{ctx}: exported previous point");
}

#[test]
fn transient_faults_delta_with_state() {
    transient_fault_then_power_cut(scenarios::delta_with_state(), Fault::Eio);
}

#[test]
fn transient_faults_full_copies() {
    transient_fault_then_power_cut(scenarios::full_new_file(), Fault::Eio);
    transient_fault_then_power_cut(scenarios::full_over_existing(), Fault::Enospc);
}

#[test]
fn transient_faults_resizes_and_zeroing() {
    transient_fault_then_power_cut(scenarios::shrank(), Fault::Enospc);
    transient_fault_then_power_cut(scenarios::grew(), Fault::Eio);
    transient_fault_then_power_cut(scenarios::zeroed(), Fault::Eio);
}

#[test]
fn transient_faults_block_device() {
    transient_fault_then_power_cut(scenarios::device_delta(), Fault::Eio);
}

/// A delta's redo log and undo segment start their writeback as they are
/// written (the commit's syncs then find them written), the replay writes
/// past the cache, and the hints change no byte of the outcome.
#[test]
fn a_deltas_log_undo_and_replay_start_their_writeback() {
    use diskferry_sync_engine::apply::Target;
    use diskferry_sync_engine::store::OpenHow;
    const MIB: usize = 1 << 20;
    let mem = fresh_fs();
    let mut bytes: Vec<u8> = (0..32 * MIB).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let src = mem.open(p(SRC), OpenHow::Truncate).unwrap();
    src.write_at(0, &bytes).unwrap();
    let o = opts(65536, 3);
    sync(Arc::new(mem.clone()), OLD, &o).unwrap();
    // 12 MiB rewritten: each file passes the 4 MiB kick interval 3 times.
    for b in &mut bytes[8 * MIB..20 * MIB] {
        *b = b.wrapping_add(1);
    }
    src.write_at(0, &bytes).unwrap();
    let f = FaultyFs::unlimited(Arc::new(mem.clone()));
    sync(Arc::new(f.clone()), NEW, &o).unwrap();
    assert_eq!(read(&mem, DST).as_deref(), Some(&bytes[..]));
    let dir = Target::state_dir(p(STATE), p(DST));
    let undo = mem.list_dir(&dir).unwrap().into_iter().find(|n| n.ends_with(".undo")).expect("an undo segment");
    for (what, path) in [("redo log", dir.join("redo.log")), ("undo segment", dir.join(undo))] {
        let hinted = f.flush_hinted(&path);
        assert!(hinted >= 8 * MIB as u64, "{what}: {hinted} bytes hinted for 12 MiB written");
    }
    // The replay's writes go past the cache: nothing to start.
    let replayed = f.writes(p(DST));
    assert_eq!(replayed.bypass_bytes, 12 * MIB as u64, "{replayed:?}");
}
