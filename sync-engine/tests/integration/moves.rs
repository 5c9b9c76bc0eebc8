//! Failover moves on a target's own points: a promote reaches every kept
//! point and back, byte-exact, whatever the sizes; a power cut at any sync
//! point of a move leaves the old point or the chosen one, never a mix; a
//! promoted disk written by its VM refuses to move; commit and pins.

use std::collections::BTreeMap;
use std::sync::Arc;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::apply::{Role, Target, TargetOptions};
use diskferry_sync_engine::points;
use diskferry_sync_engine::store::{OpenHow, Vfs};
use diskferry_testkit::{write_image, CrashFs, DiskGen, MemFs};

use super::points::next_version;
use super::util::*;

/// Syncs six versions (a shrink, a growth and a zeroed run among them)
/// with retention 6; returns the bytes of each generation.
fn six_points(fs: &MemFs, seed: u64) -> BTreeMap<u128, Vec<u8>> {
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let o = opts(4096, 6);
    let mut g = DiskGen::new(seed);
    let mut versions = BTreeMap::new();
    let mut cur = g.disk(700_000);
    for step in 0..6usize {
        if step > 0 {
            cur = next_version(&mut g, &cur, step);
        }
        write_image(fs, p(SRC), &cur).unwrap();
        sync(vfs.clone(), 100 + step as u128, &o).unwrap();
        versions.insert(100 + step as u128, cur.clone());
    }
    versions
}

/// Opens the target as the moves do: without pruning.
fn open(vfs: Arc<dyn Vfs>) -> Target {
    Target::open(vfs, p(STATE), p(DST), TargetOptions::default()).unwrap()
}

fn failover(vfs: Arc<dyn Vfs>, to: Option<u128>) -> diskferry_sync_engine::error::Result<()> {
    let mut t = Target::open(vfs, p(STATE), p(DST), TargetOptions::default())?;
    one_thread(|| t.failover(to.map(Generation))).map(|_| ())
}

#[test]
fn failover_reaches_every_kept_point_and_back() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let versions = six_points(&fs, 31);
    // To the latest point: nothing is written, the target becomes live.
    let mut t = open(vfs.clone());
    let r = t.failover(None).unwrap();
    assert_eq!((r.to, r.moved), (Generation(105), false));
    assert_eq!(t.role(), Some(Role::Live));
    drop(t);
    for to in [102u128, 104, 100, 105, 101, 103, 100, 100, 104] {
        let ctx = format!("move to {to}");
        let mut t = open(vfs.clone());
        let before = points::list(&t).len();
        let r = one_thread(|| t.failover(Some(Generation(to)))).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(r.to, Generation(to), "{ctx}");
        assert_eq!(read(&fs, DST).as_ref(), Some(&versions[&to]), "{ctx}: the disk is not that point");
        let list = points::list(&t);
        assert_eq!(list.len(), before, "{ctx}: a move keeps every point");
        assert!(list.iter().any(|p| p.current && p.generation == Generation(to)), "{ctx}: {list:?}");
        // Every other point still rebuilds exactly from here.
        for (g, want) in &versions {
            let out = format!("/disks/export-{to}-{g}.img");
            points::export(&t, Generation(*g), p(&out)).unwrap_or_else(|e| panic!("{ctx}: export {g}: {e}"));
            assert!(read(&fs, &out).as_ref() == Some(want), "{ctx}: export of {g} differs");
            vfs.remove_file(p(&out)).unwrap();
        }
        drop(t);
        verify_ok(vfs.clone(), &ctx);
    }
}

#[test]
fn a_promoted_disk_written_by_its_vm_refuses_to_move() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let versions = six_points(&fs, 32);
    failover(vfs.clone(), Some(103)).unwrap();
    // The VM writes one byte.
    let disk = vfs.open(p(DST), OpenHow::ReadWrite).unwrap();
    disk.write_at(5000, &[0xAB]).unwrap();
    drop(disk);
    let written = read(&fs, DST).unwrap();
    for to in [Some(101), Some(105), None] {
        let e = failover(vfs.clone(), to).unwrap_err();
        assert_eq!(e.code, ErrorCode::WrittenSincePromote, "to {to:?}: {e}");
        assert_eq!(read(&fs, DST).as_ref(), Some(&written), "to {to:?}: the VM's write was lost");
    }
    // Staying at the promoted point is no move.
    failover(vfs.clone(), Some(103)).unwrap();
    assert_eq!(read(&fs, DST).as_ref(), Some(&written));
    assert_ne!(&written, &versions[&103]);
}

#[test]
fn fuzzy_missing_and_incomplete_points_are_refused() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    six_points(&fs, 33);
    assert_eq!(failover(vfs.clone(), Some(999)).unwrap_err().code, ErrorCode::NoSuchPoint);
    let fs2 = fresh_fs();
    fs2.create_dir_all(p("/disks")).unwrap();
    write_image(&fs2, p(DST), &[1u8; 8192]).unwrap();
    assert_eq!(failover(Arc::new(fs2.clone()), None).unwrap_err().code, ErrorCode::NoState);
}

#[test]
fn commit_keeps_the_current_and_pinned_points() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let versions = six_points(&fs, 34);
    let mut t = open(vfs.clone());
    t.pin(Generation(101), p("/disks/test.img")).unwrap();
    one_thread(|| t.failover(Some(Generation(103)))).unwrap();
    let r = t.commit_point().unwrap();
    assert_eq!(r.kept, Generation(103));
    assert_eq!(r.pinned, vec![Generation(101)]);
    let kept: Vec<u128> = points::list(&t).iter().map(|p| p.generation.0).collect();
    assert!(kept.contains(&103) && kept.contains(&101) && !kept.contains(&105) && !kept.contains(&100), "{kept:?}");
    points::export(&t, Generation(101), p("/disks/e101.img")).unwrap();
    assert_eq!(read(&fs, "/disks/e101.img").as_ref(), Some(&versions[&101]));
    assert_eq!(t.unpin(p("/disks/test.img")).unwrap(), Some(Generation(101)));
    drop(t);
    let t = Target::open(vfs, p(STATE), p(DST), TargetOptions { retention: Some(1), ..Default::default() }).unwrap();
    let mut t = t;
    let r = t.commit_point().unwrap();
    assert_eq!(r.pinned, Vec::<Generation>::new());
    let kept: Vec<u128> = points::list(&t).iter().map(|p| p.generation.0).collect();
    assert_eq!(kept, vec![103]);
}

/// I1 for moves: a power cut at every sync point of a failover to an older
/// point leaves the old point or the chosen one after recovery, the
/// catalog naming it, and every kept point still exportable.
#[test]
fn power_cut_during_a_move_leaves_old_or_chosen() {
    let base = fresh_fs();
    let versions = six_points(&base, 35);
    let (from, to) = (105u128, 101u128);
    let clean = CrashFs::new(&base);
    failover(Arc::new(clean.clone()), Some(to)).unwrap();
    let count = clean.sync_points();
    assert!(count >= 4, "only {count} sync points");
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..=count {
        let fs = CrashFs::new(&base);
        fs.freeze_at(k);
        let res = failover(Arc::new(fs.clone()), Some(to));
        let returned = res.is_ok() && !fs.is_frozen();
        let mut images = vec![("durable only", fs.crash_durable()), ("all issued", fs.crash_keep_all())];
        images.extend((0..3).map(|s| ("random", fs.crash(k * 100 + s))));
        for (how, image) in images {
            let ctx = format!("power cut at sync point {k} of {count} ({how})");
            let ivfs: Arc<dyn Vfs> = Arc::new(image.clone());
            verify_ok(ivfs.clone(), &ctx);
            let bytes = read(&image, DST).unwrap();
            let t = open(ivfs.clone());
            let current = t.catalog().unwrap().points[0].generation.0;
            assert!(current == from || current == to, "{ctx}: at {current}");
            assert_eq!(bytes, versions[&current], "{ctx}: the disk is not the point its catalog names");
            if returned {
                assert_eq!(current, to, "{ctx}: the move returned, yet a power cut undid it");
            }
            for (g, want) in &versions {
                let out = format!("/disks/x{g}.img");
                points::export(&t, Generation(*g), p(&out)).unwrap_or_else(|e| panic!("{ctx}: export {g}: {e}"));
                assert!(read(&image, &out).as_ref() == Some(want), "{ctx}: export of {g} differs");
            }
            seen.insert(current);
        }
    }
    assert_eq!(seen.len(), 2, "the sweep must cross the commit point: {seen:?}");
}

/// `demote`: a promoted disk never written goes back as it was; one the VM
/// wrote is hashed once into a generation of its own history, which the
/// target's catalog names too (so `verify` passes) and a later push from
/// another lineage finds as a split brain.
#[test]
fn demote_keeps_or_hashes_what_the_disk_holds() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    six_points(&fs, 36);
    let mut t = open(vfs.clone());
    assert_eq!(
        t.demote(Generation(900), 9, &diskferry_sync_engine::NoProgress).unwrap_err().code,
        ErrorCode::InvalidInput
    );
    one_thread(|| t.failover(Some(Generation(103)))).unwrap();
    let d = one_thread(|| t.demote(Generation(900), 9, &diskferry_sync_engine::NoProgress)).unwrap();
    assert_eq!((d.generation, d.hashed), (Generation(103), false));
    assert_eq!(t.role(), Some(Role::Replica));
    one_thread(|| t.failover(None)).unwrap();
    let disk = vfs.open(p(DST), OpenHow::ReadWrite).unwrap();
    disk.write_at(1234, &[7; 100]).unwrap();
    drop(disk);
    let d = one_thread(|| t.demote(Generation(901), 10, &diskferry_sync_engine::NoProgress)).unwrap();
    assert_eq!((d.generation, d.hashed), (Generation(901), true));
    let list = points::list(&t);
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].current && list[0].generation == Generation(901));
    let h = diskferry_sync_engine::history::History::load(vfs.as_ref(), p(STATE), p(DST)).unwrap().unwrap();
    assert_eq!(h.last(), Some(Generation(901)));
    assert_eq!(h.lineage()[1], Generation(105), "its parent is the point it was promoted at");
    drop(t);
    verify_ok(vfs, "after demote");
}

/// On a block device (never cut to a size), a move that grows the disk back
/// must zero what the point had as zeros past the smaller size: a tail of
/// zeros, then a shrink, then a growth with data, then back down and up.
#[test]
fn moves_on_a_device_zero_a_regrown_tail() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    fs.add_block_device(p(DST), 1 << 20).unwrap();
    let o = opts(4096, 6);
    let mut g = DiskGen::new(37);
    let mut v0 = g.disk(700_000);
    v0[550_000..].fill(0);
    let v1 = v0[..550_000].to_vec();
    let mut v2 = v1.clone();
    v2.extend_from_slice(&g.disk(150_000));
    v2[600_000..600_100].fill(9);
    let versions = [(100u128, &v0), (101, &v1), (102, &v2)];
    for (generation, bytes) in versions {
        write_image(&fs, p(SRC), bytes).unwrap();
        sync(vfs.clone(), generation, &o).unwrap();
    }
    for to in [101u128, 100, 102, 100, 101, 102] {
        failover(vfs.clone(), Some(to)).unwrap_or_else(|e| panic!("to {to}: {e}"));
        let want = versions.iter().find(|v| v.0 == to).unwrap().1;
        let have = read(&fs, DST).unwrap();
        assert!(&have[..want.len()] == want.as_slice(), "to {to}: the device does not hold the point");
        verify_ok(vfs.clone(), &format!("to {to}"));
    }
}
