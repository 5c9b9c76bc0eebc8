//! Damaged state is never used silently: a flipped or cut catalog, manifest
//! or committed redo log is `E_STATE_CORRUPT`; an uncommitted redo log that
//! is damaged is discarded cleanly, and the target keeps its old bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::apply::journal::{self, COMMIT_LEN, HEADER_LEN};
use diskferry_sync_engine::apply::{manifest_file, Recovery, Target};
use diskferry_sync_engine::local::NoProgress;
use diskferry_sync_engine::store::{OpenHow, Vfs};
use diskferry_sync_engine::{points, verify};
use diskferry_testkit::{read_image, write_image, CrashFs, FaultyFs, MemFs};

use super::scenarios::{self, check_recovered, Outcome, Scenario, NEW, OLD};
use super::util::*;

fn state_dir() -> PathBuf {
    Target::state_dir(p(STATE), p(DST))
}

fn journal_path() -> PathBuf {
    state_dir().join("redo.log")
}

/// Replaces a file's content.
fn put(fs: &MemFs, path: &Path, bytes: &[u8]) {
    let f = fs.open(path, OpenHow::Truncate).unwrap();
    f.write_at(0, bytes).unwrap();
    f.sync().unwrap();
}

fn flipped(bytes: &[u8], off: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[off] ^= 0x08;
    b
}

/// The scenario's target after two syncs (so the catalog holds two points).
fn synced_twice() -> (MemFs, Vec<u8>) {
    let s = scenarios::delta_with_state();
    let fs = s.base.snapshot();
    sync(Arc::new(fs.clone()), NEW, &s.opts).unwrap();
    (fs, s.new)
}

#[test]
fn damaged_catalog_is_refused() {
    let (fs, bytes) = synced_twice();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let cpath = state_dir().join("catalog");
    let good = read_image(&fs, &cpath).unwrap().unwrap();
    let mut damaged: Vec<(String, Vec<u8>)> =
        (0..good.len()).map(|off| (format!("bit flip at {off}"), flipped(&good, off))).collect();
    for len in [0, 1, 12, good.len() / 2, good.len() - 32, good.len() - 1] {
        damaged.push((format!("cut to {len} bytes"), good[..len].to_vec()));
    }
    for (i, (what, bad)) in damaged.iter().enumerate() {
        put(&fs, &cpath, bad);
        let e = open_target(vfs.clone(), 3).expect_err(what);
        assert_eq!(e.code, ErrorCode::StateCorrupt, "{what}: {e}");
        if i % 16 == 0 {
            assert_eq!(code(sync(vfs.clone(), 50 + i as u128, &opts(4096, 3))), ErrorCode::StateCorrupt, "{what}");
        }
        assert_eq!(read(&fs, DST).as_ref(), Some(&bytes), "{what}: the target was touched");
    }
    put(&fs, &cpath, &good);
    verify_ok(vfs, "restored catalog");
}

#[test]
fn damaged_manifest_is_refused() {
    let (fs, bytes) = synced_twice();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let mpath = state_dir().join(manifest_file(Generation(NEW)));
    let good = read_image(&fs, &mpath).unwrap().unwrap();
    let n = good.len();
    let mut damaged: Vec<(String, Vec<u8>)> = [0, 1, n / 3, n / 2, n - 193, n - 100, n - 1]
        .iter()
        .map(|&o| (format!("flip at {o}"), flipped(&good, o)))
        .collect();
    for len in [0, n / 2, n - 1] {
        damaged.push((format!("cut to {len}"), good[..len].to_vec()));
    }
    for (i, (what, bad)) in damaged.iter().enumerate() {
        put(&fs, &mpath, bad);
        // A delta would trust the manifest: it must refuse it.
        let e = sync(vfs.clone(), 60 + i as u128, &opts(4096, 3)).expect_err(what);
        assert_eq!(e.code, ErrorCode::StateCorrupt, "{what}: sync: {e}");
        let mut t = open_target(vfs.clone(), 3).unwrap();
        let e = one_thread(|| verify::verify(&mut t, &NoProgress)).expect_err(what);
        assert_eq!(e.code, ErrorCode::StateCorrupt, "{what}: verify: {e}");
        let e = points::export(&t, Generation(NEW), p("/disks/out.img")).expect_err(what);
        assert_eq!(e.code, ErrorCode::StateCorrupt, "{what}: export: {e}");
        assert_eq!(read(&fs, "/disks/out.img"), None, "{what}: export left a file");
        drop(t);
        assert_eq!(read(&fs, DST).as_ref(), Some(&bytes), "{what}: the target was touched");
    }
    put(&fs, &mpath, &good);
    verify_ok(vfs, "restored manifest");
}

/// Crash images of the scenario's delta with its redo log staged but not
/// committed, and with the commit record durable and the target not yet
/// written (power cuts keeping nothing unsynced).
fn journal_images(s: &Scenario) -> (MemFs, MemFs) {
    let (mut uncommitted, mut committed) = (None, None);
    for k in 0.. {
        let fs = CrashFs::new(&s.base);
        fs.freeze_at(k);
        sync(Arc::new(fs.clone()), NEW, &s.opts).unwrap();
        if !fs.is_frozen() {
            break;
        }
        let image = fs.crash_durable();
        let Some(storage) = image.open(&journal_path(), OpenHow::Read).ok() else { continue };
        let scan = journal::scan(&storage, &journal_path(), &mut |_| Ok(())).unwrap();
        let is_committed = match scan {
            Some(scan) if scan.commit.is_some() => true,
            Some(scan) if scan.entries > 0 => false,
            _ => continue,
        };
        if is_committed {
            // The first power cut after the commit point, before replay wrote anything durable.
            if committed.is_none() {
                assert!(read(&image, DST) == s.old, "target written before the commit point");
                committed = Some(image);
            }
        } else {
            assert!(read(&image, DST) == s.old, "target written without a commit record");
            uncommitted = Some(image);
        }
    }
    (uncommitted.expect("an image with an uncommitted redo log"), committed.expect("an image with a committed one"))
}

/// An uncommitted redo log, damaged anywhere, is discarded and the target
/// keeps its committed generation.
#[test]
fn damaged_uncommitted_redo_log_is_discarded() {
    let s = scenarios::delta_with_state();
    let (image, _) = journal_images(&s);
    let good = read_image(&image, &journal_path()).unwrap().unwrap();
    let n = good.len();
    let mut damaged: Vec<(String, Vec<u8>)> = [0, 20, HEADER_LEN as usize + 3, n / 2, n - 40, n - 1]
        .iter()
        .map(|&o| (format!("flip at {o}"), flipped(&good, o)))
        .collect();
    for len in [0, 50, HEADER_LEN as usize, HEADER_LEN as usize + 1, n / 2, n - 1] {
        damaged.push((format!("cut to {len}"), good[..len].to_vec()));
    }
    for (what, bad) in damaged {
        let fs = image.snapshot();
        put(&fs, &journal_path(), &bad);
        let t = open_target(Arc::new(fs.clone()), 3).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(*t.recovery(), Recovery::Discarded, "{what}");
        drop(t);
        assert_eq!(read(&fs, &journal_path().to_string_lossy()), None, "{what}: log kept");
        assert_eq!(check_recovered(&s, &fs, &what), Outcome::Old, "{what}");
    }
}

/// A committed redo log whose entries are damaged is refused, every time it
/// is opened, and the target is left as it was.
#[test]
fn damaged_committed_redo_log_is_refused() {
    let s = scenarios::delta_with_state();
    let (_, image) = journal_images(&s);
    let good = read_image(&image, &journal_path()).unwrap().unwrap();
    let n = good.len();
    let entries_end = n - COMMIT_LEN as usize;
    for off in [HEADER_LEN as usize, HEADER_LEN as usize + 45, n / 2, entries_end - 33, entries_end - 1] {
        let fs = image.snapshot();
        put(&fs, &journal_path(), &flipped(&good, off));
        for attempt in 0..2 {
            let e = open_target(Arc::new(fs.clone()), 3).expect_err("a damaged committed log");
            assert_eq!(e.code, ErrorCode::StateCorrupt, "flip at {off}, attempt {attempt}: {e}");
        }
        assert!(read(&fs, DST) == s.old, "flip at {off}: the target was touched");
    }
}

/// Damage that hides the commit record (header flipped, record flipped,
/// log cut short): with the target untouched, discarding is the old state.
/// But once replay has started writing the target, discarding would leave
/// a mix of old and new blocks under the old generation's name: that must
/// be refused (or finished), never silently accepted.
#[test]
fn damaged_commit_record_never_leaves_a_mix() {
    let s = scenarios::delta_with_state();
    let (_, image) = journal_images(&s);
    let good = read_image(&image, &journal_path()).unwrap().unwrap();
    let n = good.len();
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("header flipped", flipped(&good, 40)),
        ("commit record flipped", flipped(&good, n - 100)),
        ("cut before the commit record", good[..n - COMMIT_LEN as usize].to_vec()),
        ("cut inside the entries", good[..n / 2].to_vec()),
    ];
    let old = s.old.clone().unwrap();
    let block = s.opts.block_size.get() as usize;
    let half = old.len() / 2 / block * block;
    let mix: Vec<u8> = s.new[..half].iter().chain(&old[half..]).copied().collect();
    assert!(mix != old && mix != s.new, "the scenario must change both halves");
    let mut mixes = Vec::new();
    for (what, bad) in &damages {
        for replay_started in [false, true] {
            let fs = image.snapshot();
            put(&fs, &journal_path(), bad);
            if replay_started {
                // Replay writes entries in block order: the first half is done.
                write_image(&fs, p(DST), &mix).unwrap();
            }
            let ctx = format!("{what}, replay started: {replay_started}");
            match open_target(Arc::new(fs.clone()), 3) {
                Err(e) => assert_eq!(e.code, ErrorCode::StateCorrupt, "{ctx}: {e}"),
                Ok(t) => {
                    let recovery = t.recovery().clone();
                    drop(t);
                    let bytes = read(&fs, DST);
                    if bytes == s.old || bytes.as_deref() == Some(&s.new[..]) {
                        check_recovered(&s, &fs, &ctx);
                    } else {
                        mixes.push(format!("{ctx}: recovery {recovery:?} accepted a mix of old and new"));
                    }
                }
            }
        }
    }
    assert!(mixes.is_empty(), "{}", mixes.join("\n"));
}

/// Reading a redo log must not mistake an I/O error for its end: a scan
/// that hits one fails, or (if the error did not matter) finds everything.
/// A scan that silently stops early makes the commit save too little undo
/// data and reserve too little space.
#[test]
fn redo_log_scan_does_not_swallow_io_errors() {
    let s = scenarios::delta_with_state();
    let (uncommitted, committed) = journal_images(&s);
    for (what, image) in [("uncommitted", uncommitted), ("committed", committed)] {
        let path = journal_path();
        let clean = journal::scan(&image.open(&path, OpenHow::Read).unwrap(), &path, &mut |_| Ok(())).unwrap().unwrap();
        let counter = FaultyFs::unlimited(Arc::new(image.clone()));
        journal::scan(&counter.open(&path, OpenHow::Read).unwrap(), &path, &mut |_| Ok(())).unwrap();
        let ops = counter.ops();
        for n in 1..ops {
            let f = FaultyFs::fail_once(Arc::new(image.clone()), n, diskferry_testkit::Fault::Eio);
            let storage = f.open(&path, OpenHow::Read).unwrap();
            match journal::scan(&storage, &path, &mut |_| Ok(())) {
                Err(_) => {}
                Ok(Some(scan)) => assert!(
                    scan.entries == clean.entries && scan.valid_len == clean.valid_len && scan.commit == clean.commit,
                    "{what} log, EIO at operation {n} of {ops}: the scan ended early ({} of {} entries) instead of failing",
                    scan.entries,
                    clean.entries
                ),
                Ok(None) => panic!("{what} log, EIO at operation {n}: the scan saw no log instead of failing"),
            }
        }
    }
}

/// The committed generation before the scenario's sync stays exportable
/// after a discard (nothing committed is lost).
#[test]
fn discard_keeps_the_previous_points() {
    let s = scenarios::delta_with_state();
    let (image, _) = journal_images(&s);
    let t = open_target(Arc::new(image.clone()), 3).unwrap();
    assert_eq!(*t.recovery(), Recovery::Discarded);
    let current = t.catalog().and_then(|c| c.current()).map(|p| p.generation);
    assert_eq!(current, Some(Generation(OLD)));
    points::export(&t, Generation(OLD), p("/disks/old.img")).unwrap();
    assert_eq!(read(&image, "/disks/old.img"), s.old);
}
