//! Recovery points: several syncs with retention 3; every kept point
//! exports to the exact bytes the source had at that sync, pruned points
//! are gone, and the undo data kept per sync follows the changed bytes, not
//! the disk size.

use std::collections::BTreeMap;
use std::sync::Arc;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::points;
use diskferry_sync_engine::store::Vfs;
use diskferry_testkit::{write_image, DiskGen};

use super::util::*;

const PAGE: usize = 4096;

/// Bounds on the old content a sync from `old` to `new` must keep: the
/// changed non-zero parts of 4 KiB pages (split at the new size; each lies
/// in a range the commit overwrites or zeroes, so it is saved) ≤ undo bytes
/// ≤ the changed blocks plus the cut tail.
fn undo_bounds(old: &[u8], new: &[u8], block: usize) -> (u64, u64) {
    let new_at = |s: usize, e: usize| -> Vec<u8> { (s..e).map(|i| new.get(i).copied().unwrap_or(0)).collect() };
    let changed = |unit: usize, need_data: bool| -> u64 {
        let mut cuts: Vec<usize> = (0..old.len()).step_by(unit).collect();
        if new.len() < old.len() {
            cuts.push(new.len());
            cuts.sort_unstable();
            cuts.dedup();
        }
        cuts.iter()
            .enumerate()
            .map(|(i, &s)| {
                let e = cuts.get(i + 1).copied().unwrap_or(old.len()).min(s + unit);
                let o = &old[s..e];
                let differs = o != new_at(s, e).as_slice();
                if differs && (!need_data || o.iter().any(|&b| b != 0)) {
                    (e - s) as u64
                } else {
                    0
                }
            })
            .sum()
    };
    let tail = old.len().saturating_sub(new.len()) as u64;
    (changed(PAGE, true), changed(block, false) + tail)
}

/// The next version: small unaligned writes, and a shrink, a growth and a
/// zeroed run at fixed steps.
pub(super) fn next_version(g: &mut DiskGen, cur: &[u8], step: usize) -> Vec<u8> {
    let mut v = cur.to_vec();
    g.scribble(&mut v, 6, 12_000);
    match step {
        3 => v.truncate(v.len() - 150_001),
        4 => {
            let tail = g.disk(200_003);
            v.extend_from_slice(&tail);
        }
        5 => v[200_000..260_000].fill(0),
        _ => {}
    }
    v
}

#[test]
fn kept_points_export_exactly_and_undo_follows_changes() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    fs.create_dir_all(p("/exports")).unwrap();
    let block = 4096;
    let o = opts(block as u32, 3);
    let mut g = DiskGen::new(21);
    let mut versions: BTreeMap<u128, Vec<u8>> = BTreeMap::new();
    let mut undo_of: BTreeMap<u128, u64> = BTreeMap::new();
    let mut cur = g.disk(900_000);
    for step in 0..8usize {
        let generation = 100 + step as u128;
        if step > 0 {
            cur = next_version(&mut g, &cur, step);
        }
        write_image(&fs, p(SRC), &cur).unwrap();
        let r = sync(vfs.clone(), generation, &o).unwrap();
        assert_eq!(read(&fs, DST).as_ref(), Some(&cur), "step {step}");
        if let Some((prev_gen, prev)) = versions.last_key_value() {
            let (low, high) = undo_bounds(prev, &cur, block);
            assert!(
                low <= r.undo_bytes && r.undo_bytes <= high,
                "step {step}: undo {} bytes, expected {low}..={high}",
                r.undo_bytes
            );
            assert!(high < cur.len() as u64 / 2, "step {step}: the change is not small ({high} bytes)");
            undo_of.insert(*prev_gen, r.undo_bytes);
        }
        versions.insert(generation, cur.clone());

        let t = open_target(vfs.clone(), 3).unwrap();
        let list = points::list(&t);
        let want: Vec<u128> = versions.keys().rev().take(3).copied().collect();
        let got: Vec<u128> = list.iter().map(|p| p.generation.0).collect();
        assert_eq!(got, want, "step {step}: kept points");
        assert!(list[0].current && list.iter().skip(1).all(|p| !p.current));
        for point in &list {
            let ctx = format!("step {step}: point {}", point.generation.0);
            assert_eq!(point.disk_bytes, versions[&point.generation.0].len() as u64, "{ctx}");
            assert_eq!(point.undo_bytes, undo_of.get(&point.generation.0).copied().unwrap_or(0), "{ctx}");
            let out = format!("/exports/{}.img", point.generation.0);
            let report = points::export(&t, point.generation, p(&out)).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(report.disk_bytes, versions[&point.generation.0].len() as u64, "{ctx}");
            assert!(read(&fs, &out).as_ref() == Some(&versions[&point.generation.0]), "{ctx}: exported bytes differ");
            vfs.remove_file(p(&out)).unwrap();
        }
        for pruned in versions.keys().rev().skip(3) {
            let e = points::export(&t, Generation(*pruned), p("/exports/pruned.img")).unwrap_err();
            assert_eq!(e.code, ErrorCode::NoSuchPoint, "step {step}: pruned point {pruned}");
        }
        // Pruned points leave nothing behind in the state directory.
        let files = fs.list_dir(t.dir()).unwrap();
        assert!(files.len() <= 2 + 3 + 2, "step {step}: state files {files:?}");
        // Exports only read the target.
        assert_eq!(read(&fs, DST).as_ref(), Some(&cur));
    }
    verify_ok(vfs, "after all syncs");
}

/// A damaged undo segment makes its point refuse to export (never a wrong image).
#[test]
fn damaged_undo_segment_is_refused() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let mut g = DiskGen::new(22);
    let v1 = g.disk(300_000);
    let mut v2 = v1.clone();
    g.scribble(&mut v2, 5, 10_000);
    let o = opts(4096, 3);
    write_image(&fs, p(SRC), &v1).unwrap();
    sync(vfs.clone(), 1, &o).unwrap();
    write_image(&fs, p(SRC), &v2).unwrap();
    let r = sync(vfs.clone(), 2, &o).unwrap();
    assert!(r.undo_bytes > 0);
    let t = open_target(vfs.clone(), 3).unwrap();
    let point = t.catalog().unwrap().points[1];
    let upath = t.undo_path(&point);
    let good = diskferry_testkit::read_image(&fs, &upath).unwrap().unwrap();
    for off in [0, 10, 64, 100, good.len() / 2, good.len() - 40, good.len() - 1] {
        let mut bad = good.clone();
        bad[off] ^= 0x10;
        write_image(&fs, &upath, &bad).unwrap();
        let out = format!("/disks/export-{off}.img");
        let e = points::export(&t, Generation(1), p(&out)).unwrap_err();
        assert_eq!(e.code, ErrorCode::StateCorrupt, "flip at {off}: {e}");
        assert_eq!(read(&fs, &out), None, "flip at {off}: a partial export was left");
    }
    write_image(&fs, &upath, &good).unwrap();
    points::export(&t, Generation(1), p("/disks/export.img")).unwrap();
    assert_eq!(read(&fs, "/disks/export.img"), Some(v1));
}
