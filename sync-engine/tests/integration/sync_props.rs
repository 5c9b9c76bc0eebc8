//! Property: for a random source and a random target (missing; a stale copy
//! diskferry never saw, with random unaligned writes and maybe another
//! size; or a synced copy whose source then changed), a sync makes the
//! target equal to the source byte for byte, the result verifies, and a
//! second sync finds nothing to change.

use std::sync::Arc;

use diskferry_sync_engine::local::{self, NoProgress, SyncOptions};
use diskferry_sync_engine::store::Vfs;
use diskferry_testkit::{write_image, DiskGen};
use proptest::prelude::*;
use rand::Rng as _;

use super::util::*;

#[derive(Clone, Copy, Debug)]
enum TargetKind {
    Missing,
    StaleCopy,
    Synced,
}

fn target_kind() -> impl Strategy<Value = TargetKind> {
    prop_oneof![Just(TargetKind::Missing), Just(TargetKind::StaleCopy), Just(TargetKind::Synced)]
}

fn run(vfs: Arc<dyn Vfs>, generation: u128, o: &SyncOptions, threads: usize) -> local::SyncReport {
    let f = || local::sync(&job(vfs, generation), o, &NoProgress);
    let r = if threads == 1 { one_thread(f) } else { four_threads(f) };
    r.unwrap_or_else(|e| panic!("sync {generation}: [{}] {e}", e.code.as_str()))
}

fn check(seed: u64, kind: TargetKind, block: u32, len: u64, threads: usize) {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let mut g = DiskGen::new(seed);
    let o = opts(block, 2);
    let older = g.disk(len);
    let source = match kind {
        TargetKind::Missing => older.clone(),
        TargetKind::StaleCopy => {
            let mut stale = older.clone();
            let writes = g.rng().random_range(0..20);
            g.scribble(&mut stale, writes, 50_000);
            if g.rng().random_bool(0.4) {
                g.resize(&mut stale, 200_000);
            }
            write_image(&fs, p(DST), &stale).unwrap();
            older.clone()
        }
        TargetKind::Synced => {
            write_image(&fs, p(SRC), &older).unwrap();
            run(vfs.clone(), 1, &o, threads);
            g.evolve(&older)
        }
    };
    write_image(&fs, p(SRC), &source).unwrap();
    let first = run(vfs.clone(), 2, &o, threads);
    assert!(read(&fs, DST) == Some(source.clone()), "target differs from source after the sync: {first:?}");
    verify_ok(vfs.clone(), "after the first sync");
    let second = run(vfs.clone(), 3, &o, threads);
    assert_eq!(second.blocks_changed, 0, "second sync changed blocks: {second:?}");
    assert_eq!(second.bytes_written, 0, "second sync wrote bytes: {second:?}");
    assert_eq!(second.compare, "manifest", "second sync did not trust its manifest: {second:?}");
    assert!(read(&fs, DST) == Some(source), "target changed by the second sync");
    verify_ok(vfs, "after the second sync");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sync_makes_target_equal_source(
        seed in any::<u64>(),
        kind in target_kind(),
        block in prop_oneof![Just(4096u32), Just(16384), Just(65536), Just(1 << 20)],
        len in prop_oneof![0u64..5000, 0u64..1_500_000],
        threads in prop_oneof![Just(1usize), Just(4)],
    ) {
        check(seed, kind, block, len, threads);
    }
}

/// The same property on fixed inputs that hit the edges (empty disks, a
/// single byte, growth from and shrink to zero).
#[test]
fn sync_edges() {
    for (seed, kind, len) in [
        (1, TargetKind::Missing, 0),
        (2, TargetKind::StaleCopy, 0),
        (3, TargetKind::Synced, 1),
        (4, TargetKind::Synced, 0),
    ] {
        for block in [4096, 1 << 20] {
            check(seed, kind, block, len, 1);
        }
    }
}
