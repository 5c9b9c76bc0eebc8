//! Recovery points: listing, exporting every kept point byte for byte, undo
//! space about the changed bytes, reflinked exports on XFS.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

/// One sync of the history: the source as it was, and what the sync said.
struct Synced {
    image: PathBuf,
    report: Value,
    /// Bytes of the previous generation this sync overwrote or cut off:
    /// at least the non-zero ones, at most all of them.
    changed: (u64, u64),
}

/// Bytes in non-zero 4 KiB pages of `path` from `off` to its end.
fn nonzero_tail(path: &Path, off: u64) -> u64 {
    let data = std::fs::read(path).unwrap();
    data[off as usize..].chunks(4096).filter(|c| c.iter().any(|&b| b != 0)).map(|c| c.len() as u64).sum()
}

fn points_of(dst: &Path, state: &Path) -> Vec<Value> {
    let p = df!("points", dst, "--state-dir", state, "--json").ok_json();
    p["points"].as_array().unwrap_or_else(|| panic!("no points array: {p}")).clone()
}

#[test]
fn every_kept_point_exports_byte_exact() {
    let mut rng = rng("every_kept_point_exports_byte_exact");
    let dir = tempdir("points");
    let (src, dst, state) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("state"));
    let size = 32 * MIB + 4321;
    make_disk(&src, size, 0.6, &mut rng);
    let mut history: Vec<Synced> = Vec::new();
    // (pages changed, size change) of each sync after the first.
    let steps: [(usize, i64); 4] = [(48, 0), (64, (MIB + 777) as i64), (32, -2 * MIB as i64), (40, 0)];
    for i in 0..=steps.len() {
        let mut changed = (0, 0);
        if i > 0 {
            let (pages, resize) = steps[i - 1];
            let pages = change_data_pages(&src, pages, &mut rng);
            changed = (pages, pages);
            let len = disk_len(&src);
            if resize != 0 {
                let new = (len as i64 + resize) as u64;
                if new < len {
                    changed.0 += nonzero_tail(&src, new);
                    changed.1 += len - new;
                }
                resize_with_data(&src, new, &mut rng);
            }
        }
        let report = df!("sync", src, dst, "--retention", "3", "--state-dir", state, "--json").ok_json();
        assert_same(&src, &dst);
        let image = dir.path().join(format!("source-{i}.img"));
        copy(&src, &image);
        history.push(Synced { image, report, changed });
    }

    // Three points kept, newest first.
    let points = points_of(&dst, &state);
    assert_eq!(points.len(), 3, "retention 3: {points:?}");
    let kept = &history[history.len() - 3..];
    for (p, h) in points.iter().zip(kept.iter().rev()) {
        assert_eq!(hex(p, "generation", 32), string(&h.report, "generation"), "{p}");
        assert_eq!(uint(p, "disk_bytes"), disk_len(&h.image), "{p}");
        assert_eq!(string(p, "consistency"), "crash-consistent", "{p}");
    }
    assert_eq!(points[0]["current"], Value::Bool(true));
    assert_eq!(points[1]["current"], Value::Bool(false));
    assert_eq!(uint(&points[0], "undo_bytes"), 0, "the current point needs no undo: {:?}", points[0]);

    // Undo space follows the changed bytes, not the disk size.
    for (k, p) in points.iter().enumerate().skip(1) {
        // Point k is rebuilt with the undo of the sync after it.
        let newer = &kept[kept.len() - k];
        let undo = uint(p, "undo_bytes");
        let lo = newer.changed.0 * 9 / 10;
        let hi = newer.changed.1 * 11 / 10 + 64 * KIB;
        assert!((lo..=hi).contains(&undo), "point {k}: undo {undo} bytes for {:?} changed bytes: {p}", newer.changed);
        assert_eq!(uint(&newer.report, "undo_bytes"), undo, "the sync reported another undo size: {}", newer.report);
        assert!(undo < size / 8);
    }

    // Every kept point exports to exactly the source of its sync; the target is untouched.
    for (p, h) in points.iter().zip(kept.iter().rev()) {
        let generation = string(p, "generation");
        let out = dir.path().join(format!("export-{generation}.img"));
        let e = df!("export", dst, "--point", generation, out, "--state-dir", state, "--json").ok_json();
        assert_eq!(uint(&e, "disk_bytes"), disk_len(&h.image), "{e}");
        assert!(e["reflinked"].is_boolean(), "{e}");
        assert_same(&out, &h.image);
    }
    assert_same(&dst, &src);
    df!("verify", dst, "--state-dir", state).ok();
    let again = points_of(&dst, &state);
    assert_eq!(again, points, "exporting changed the points");

    // Pruned points are gone; an existing output is not overwritten.
    for h in &history[..history.len() - 3] {
        let out = dir.path().join("pruned.img");
        df!("export", dst, "--point", string(&h.report, "generation"), out, "--state-dir", state)
            .expect_error("E_NO_SUCH_POINT", 3);
        assert!(!out.exists());
    }
    let taken = dir.path().join("taken.img");
    std::fs::write(&taken, b"keep me").unwrap();
    let out = df!("export", dst, "--point", string(&points[1], "generation"), taken, "--state-dir", state);
    assert_eq!(out.code, 3, "export over an existing file:\n{out}");
    assert!(out.error_code().is_some(), "{out}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
}

#[test]
fn export_on_xfs_is_a_reflink() {
    let mut rng = rng("export_on_xfs_is_a_reflink");
    let dir = tempdir("reflink");
    let xfs = Mount::xfs_reflink("xfs", 320 * MIB);
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    let dst = xfs.dir.join("dst.img");
    make_disk(&src, 24 * MIB, 0.7, &mut rng);
    let first = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    let old = dir.path().join("old.img");
    copy(&src, &old);
    change_data_pages(&src, 30, &mut rng);
    let second = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();

    for (report, image) in [(&second, &src), (&first, &old)] {
        let generation = string(report, "generation");
        let out = xfs.dir.join(format!("export-{generation}.img"));
        let e = df!("export", dst, "--point", generation, out, "--state-dir", state, "--json").ok_json();
        assert_eq!(e["reflinked"], Value::Bool(true), "export on XFS with reflink=1: {e}");
        assert_same(&out, image);
        // A copy on another filesystem is fine too, just not a reflink.
        let copy_out = dir.path().join(format!("copy-{generation}.img"));
        let e = df!("export", dst, "--point", generation, copy_out, "--state-dir", state, "--json").ok_json();
        assert_eq!(e["reflinked"], Value::Bool(false), "export across filesystems: {e}");
        assert_same(&copy_out, image);
    }
    // The clones are independent of the target.
    let out = xfs.dir.join(format!("export-{}.img", string(&second, "generation")));
    write_at(&out, 0, &[0xee; 4096]);
    assert_same(&dst, &src);
    df!("verify", dst, "--state-dir", state).ok();
}

/// A source written while it is read gives a `fuzzy` generation: the target
/// is updated, but that generation is never offered as a recovery point.
#[test]
fn fuzzy_generation_is_not_a_recovery_point() {
    let mut rng = rng("fuzzy_generation_is_not_a_recovery_point");
    let dir = tempdir("fuzzy");
    let (src, dst, state) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("state"));
    make_disk(&src, 64 * MIB, 0.9, &mut rng);
    let first = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&first, "consistency"), "crash-consistent");

    // A running VM: writes go on during the whole sync.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, src) = (stop.clone(), src.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let off = (n * 7919 * 4096) % (60 * MIB);
                std::os::unix::fs::FileExt::write_all_at(&f, &n.to_le_bytes().repeat(512), off).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let fuzzy = df!("sync", src, dst, "--state-dir", state, "--json");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let fuzzy = fuzzy.ok_json();
    assert_eq!(string(&fuzzy, "consistency"), "fuzzy", "a source written during the sync: {fuzzy}");
    let fuzzy_gen = string(&fuzzy, "generation");
    // The target holds what was read, and says so.
    let v = df!("verify", dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&v, "generation"), fuzzy_gen);
    let listed: Vec<String> = points_of(&dst, &state).iter().map(|p| string(p, "generation")).collect();
    assert!(!listed.contains(&fuzzy_gen), "a fuzzy generation is listed as a recovery point: {listed:?}");
    let out = dir.path().join("fuzzy.img");
    df!("export", dst, "--point", fuzzy_gen, out, "--state-dir", state).expect_error("E_NO_SUCH_POINT", 3);
    assert!(!out.exists());

    // Quiet again: crash-consistent, and app-consistent when the hook ran.
    let stable = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&stable, "consistency"), "crash-consistent", "{stable}");
    assert_same(&src, &dst);
    change_data_pages(&src, 5, &mut rng);
    let app = df!("sync", src, dst, "--app-consistent", "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&app, "consistency"), "app-consistent", "{app}");
    let points = points_of(&dst, &state);
    assert_eq!(string(&points[0], "generation"), string(&app, "generation"));
    assert_eq!(string(&points[0], "consistency"), "app-consistent");
    assert!(points.iter().all(|p| string(p, "generation") != fuzzy_gen));
}
