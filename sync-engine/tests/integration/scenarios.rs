//! Sync scenarios for the crash and fault tests, and the old-or-new check
//! every interrupted one must pass.

use std::sync::Arc;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::apply::{Status, Target};
use diskferry_sync_engine::local::NoProgress;
use diskferry_sync_engine::local::{SyncMode, SyncOptions};
use diskferry_sync_engine::store::Vfs;
use diskferry_sync_engine::verify;
use diskferry_testkit::{write_image, DiskGen, MemFs};

use super::util::*;

/// The generation committed before the scenario's sync (if any).
pub const OLD: u128 = 1;
/// The generation the scenario's sync commits.
pub const NEW: u128 = 2;
/// The generation of the sync run after recovery.
pub const FRESH: u128 = 3;

/// One sync to interrupt: the state before, and what the target holds
/// before and after.
pub struct Scenario {
    pub name: &'static str,
    /// Everything before the sync (all of it durable).
    pub base: MemFs,
    /// The target's bytes before (`None`: it does not exist).
    pub old: Option<Vec<u8>>,
    /// The source's bytes: the target's after.
    pub new: Vec<u8>,
    /// The generation committed before, if the target has state.
    pub old_gen: Option<Generation>,
    pub opts: SyncOptions,
    /// A full copy into a block device: INCOMPLETE is an allowed outcome.
    pub direct: bool,
}

fn state_scenario(name: &'static str, seed: u64, v1: Vec<u8>, v2: Vec<u8>, block: u32, device: bool) -> Scenario {
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &v1).unwrap();
    if device {
        fs.add_block_device(p(DST), v1.len() as u64).unwrap();
    }
    let o = opts(block, 3);
    sync(Arc::new(fs.clone()), OLD, &o).unwrap_or_else(|e| panic!("{name} (seed {seed}): first sync: {e}"));
    assert_eq!(read(&fs, DST).as_deref(), Some(&v1[..]), "{name}: first sync");
    write_image(&fs, p(SRC), &v2).unwrap();
    Scenario { name, base: fs, old: Some(v1), new: v2, old_gen: Some(Generation(OLD)), opts: o, direct: false }
}

/// A later version of `v` of the same size.
fn same_size_change(g: &mut DiskGen, v: &[u8]) -> Vec<u8> {
    let mut w = v.to_vec();
    g.scribble(&mut w, 10, 30_000);
    if w == v {
        w[0] ^= 1;
    }
    w
}

/// A delta onto a synced target, through the redo log.
pub fn delta_with_state() -> Scenario {
    let mut g = DiskGen::new(11);
    let v1 = g.disk(600_000);
    let v2 = same_size_change(&mut g, &v1);
    state_scenario("delta onto a synced target", 11, v1, v2, 4096, false)
}

/// A delta onto an existing target diskferry has no state for (full compare).
pub fn delta_stateless() -> Scenario {
    let mut g = DiskGen::new(12);
    let stale = g.disk(500_000);
    let src = g.evolve(&stale);
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &src).unwrap();
    write_image(&fs, p(DST), &stale).unwrap();
    Scenario {
        name: "delta onto a stateless target",
        base: fs,
        old: Some(stale),
        new: src,
        old_gen: None,
        opts: opts(16384, 3),
        direct: false,
    }
}

/// A full copy to a new file: `.partial`, then rename.
pub fn full_new_file() -> Scenario {
    let src = DiskGen::new(13).disk(700_000);
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &src).unwrap();
    Scenario {
        name: "full copy to a new file",
        base: fs,
        old: None,
        new: src,
        old_gen: None,
        opts: opts(65536, 3),
        direct: false,
    }
}

/// A full copy (`--mode full`) over a target that has state.
pub fn full_over_existing() -> Scenario {
    let mut g = DiskGen::new(14);
    let v1 = g.disk(400_000);
    let v2 = g.evolve(&v1);
    let mut s = state_scenario("full copy over a synced target", 14, v1, v2, 4096, false);
    s.opts.mode = SyncMode::Full;
    // It drops the kept point: the operator says so.
    s.opts.force = true;
    s
}

/// The source grew.
pub fn grew() -> Scenario {
    let mut g = DiskGen::new(15);
    let v1 = g.disk(300_000);
    let mut v2 = same_size_change(&mut g, &v1);
    let tail = g.disk(350_001);
    v2.extend_from_slice(&tail);
    state_scenario("source grew", 15, v1, v2, 4096, false)
}

/// The source shrank.
pub fn shrank() -> Scenario {
    let mut g = DiskGen::new(16);
    let v1 = g.disk(650_000);
    let mut v2 = same_size_change(&mut g, &v1);
    v2.truncate(410_123);
    state_scenario("source shrank", 16, v1, v2, 65536, false)
}

/// A large region of the source was zeroed.
pub fn zeroed() -> Scenario {
    let mut g = DiskGen::new(17);
    let mut v1 = g.disk(600_000);
    // Make sure the region to zero holds data.
    for (i, b) in v1[100_000..400_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let mut v2 = v1.clone();
    v2[97_000..402_345].fill(0);
    state_scenario("zeroed region", 17, v1, v2, 4096, false)
}

/// A delta onto a synced block device.
pub fn device_delta() -> Scenario {
    let mut g = DiskGen::new(18);
    let v1 = g.disk(512 * 1024);
    let v2 = same_size_change(&mut g, &v1);
    state_scenario("delta onto a block device", 18, v1, v2, 16384, true)
}

/// A full copy straight into a block device (INCOMPLETE until commit).
pub fn device_full() -> Scenario {
    let mut g = DiskGen::new(19);
    let src = g.disk(512 * 1024);
    let garbage = g.disk(512 * 1024);
    let fs = fresh_fs();
    write_image(&fs, p(SRC), &src).unwrap();
    fs.add_block_device(p(DST), garbage.len() as u64).unwrap();
    write_image(&fs, p(DST), &garbage).unwrap();
    let mut o = opts(65536, 3);
    o.mode = SyncMode::Full;
    // A rerun after a commit landed copies over a kept point.
    o.force = true;
    Scenario {
        name: "full copy into a block device",
        base: fs,
        old: Some(garbage),
        new: src,
        old_gen: None,
        opts: o,
        direct: true,
    }
}

/// What recovery left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Old,
    New,
    /// A direct full copy that did not commit: no recovery point.
    Incomplete,
}

/// Recovers `image` (opening the target), then checks I1 and I2: the target
/// holds exactly the old or the new bytes; the catalog's committed
/// generation names those bytes; a committed generation verifies; a state
/// that existed before is not lost.
pub fn check_recovered(s: &Scenario, image: &MemFs, ctx: &str) -> Outcome {
    let vfs: Arc<dyn Vfs> = Arc::new(image.clone());
    let state_before = image.list_dir(&Target::state_dir(p(STATE), p(DST))).unwrap();
    let mut t = open_target(vfs.clone(), s.opts.retention)
        .unwrap_or_else(|e| panic!("{ctx}: recovery failed: [{}] {e}", e.code.as_str()));
    let bytes = read(image, DST);
    let is_old = bytes == s.old;
    let is_new = bytes.as_deref() == Some(&s.new[..]);
    let what = format!(
        "{ctx}: recovery {:?}; target {} (old {}, new {}); state dir before recovery {:?}",
        t.recovery(),
        describe(bytes.as_deref()),
        describe(s.old.as_deref()),
        describe(Some(&s.new)),
        state_before,
    );
    let status = t.catalog().map(|c| (c.status, c.current().map(|p| p.generation)));
    let outcome = match status {
        Some((Status::Incomplete, _)) => {
            assert!(s.direct, "{what}: catalog INCOMPLETE outside a direct full copy");
            let e = one_thread(|| verify::verify(&mut t, &NoProgress)).expect_err("verify of an INCOMPLETE target");
            assert_eq!(e.code, ErrorCode::Incomplete, "{what}");
            Outcome::Incomplete
        }
        Some((Status::Complete, Some(g))) => {
            let outcome = if g == Generation(NEW) {
                assert!(is_new, "{what}: the catalog commits the new generation but the bytes are not the new ones");
                Outcome::New
            } else {
                assert_eq!(Some(g), s.old_gen, "{what}: unexpected committed generation");
                assert!(is_old, "{what}: the catalog keeps the old generation but the bytes are not the old ones");
                Outcome::Old
            };
            let r = one_thread(|| verify::verify(&mut t, &NoProgress))
                .unwrap_or_else(|e| panic!("{what}: verify: [{}] {e}", e.code.as_str()));
            assert!(r.ok, "{what}: committed generation does not verify: {r:?}");
            outcome
        }
        Some((Status::Complete, None)) => panic!("{what}: complete catalog without points"),
        None => {
            assert!(s.old_gen.is_none(), "{what}: the catalog of a committed target was lost");
            assert!(is_old || is_new, "{what}: no state, and the target is a mix of old and new");
            if is_old {
                Outcome::Old
            } else {
                Outcome::New
            }
        }
    };
    if outcome != Outcome::Incomplete {
        assert!(is_old || is_new, "{what}: a mix of old and new");
    }
    outcome
}

/// A sync on the state a failure left (its recovery included; no `verify`
/// first, which would refresh the stamp) succeeds and yields the new bytes,
/// which verify.
pub fn fresh_sync_converges(s: &Scenario, image: &MemFs, ctx: &str) {
    let vfs: Arc<dyn Vfs> = Arc::new(image.clone());
    let r = sync(vfs.clone(), FRESH, &s.opts)
        .unwrap_or_else(|e| panic!("{ctx}: sync after recovery failed: [{}] {e}", e.code.as_str()));
    assert_eq!(read(image, DST).as_deref(), Some(&s.new[..]), "{ctx}: sync after recovery: {r:?}");
    verify_ok(vfs, ctx);
}
