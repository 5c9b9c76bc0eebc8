//! A hint on a disk that runs while it is read: a spot-check mismatch in a
//! block the source wrote since the hint was cut (its `LiveWrites`) is that
//! write, read with the dirty blocks; anywhere else it is a lie, and the
//! disk is read in full.

use std::path::Path;
use std::sync::Arc;

use diskferry_protocol::{BlockSize, Consistency, Generation};
use diskferry_sync_engine::changes::{ChangeHint, ChangeSource, LiveWrites, SpotCheck};
use diskferry_sync_engine::hash::hash_block;
use diskferry_sync_engine::session::{Link, SourceSession};
use diskferry_sync_engine::store::{RealFs, Vfs};

const BLOCK: u64 = 65536;
const BLOCKS: u64 = 64;

fn write_block(disk: &Path, index: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&vec![byte; BLOCK as usize], index * BLOCK).unwrap();
}

fn open(disk: &Path, root: &Path) -> SourceSession {
    let vfs: Arc<dyn Vfs> = Arc::new(RealFs);
    SourceSession::open(vfs, disk, BlockSize::new(BLOCK as u32).unwrap(), Some(root)).unwrap()
}

/// Every clean block is sampled: the test does not depend on a seed.
fn everything() -> SpotCheck {
    SpotCheck { fraction: 1.0, ..SpotCheck::with_seed(7) }
}

fn hint(since: Generation, live: Option<Vec<(u64, u64)>>) -> ChangeHint {
    ChangeHint {
        since,
        source: ChangeSource::DirtyBitmap,
        ranges: vec![(3 * BLOCK + 100, 10)],
        live: live.map(|l| LiveWrites(Arc::new(move || Ok(l.clone())))),
    }
}

#[test]
fn writes_during_the_pass_are_read_and_lies_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, root) = (dir.path().join("disk.img"), dir.path().join("state"));
    let bytes: Vec<u8> = (0..BLOCKS * BLOCK).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let g1 = Generation(0x11);
    let first = open(&disk, &root);
    first.set_link(Link { level: None, pages: false }).unwrap();
    for r in 0..first.geometry().region_count() {
        first.hash_region(r, None).unwrap();
    }
    first.commit_history(g1, first.consistency(false).unwrap(), 1).unwrap();
    assert_eq!(first.consistency(false).unwrap(), Consistency::Crash);

    // Block 3 changed as hinted; block 40 was written after the hint was cut.
    write_block(&disk, 3, 0xa3);
    write_block(&disk, 40, 0xb4);

    let liar = open(&disk, &root);
    liar.offer_hint(hint(g1, None), everything());
    liar.start_hint(Some(g1), false).unwrap();
    let o = liar.hint_outcome();
    assert_eq!(o.source, ChangeSource::FullScan, "{o:?}");
    assert!(o.note.as_deref().is_some_and(|n| n.contains("block 40")), "{o:?}");

    let elsewhere = open(&disk, &root);
    elsewhere.offer_hint(hint(g1, Some(vec![(10 * BLOCK, BLOCK)])), everything());
    elsewhere.start_hint(Some(g1), false).unwrap();
    assert_eq!(elsewhere.hint_outcome().source, ChangeSource::FullScan, "a write elsewhere excuses nothing");

    let live = open(&disk, &root);
    live.offer_hint(hint(g1, Some(vec![(40 * BLOCK + 5, 1)])), everything());
    live.start_hint(Some(g1), false).unwrap();
    let o = live.hint_outcome();
    assert_eq!((o.source, o.dirty_blocks), (ChangeSource::DirtyBitmap, 2), "{o:?}");
    // Both changed blocks come out with their new hashes, read from the
    // disk; the rest from the record (one region: 4 MiB).
    let before_hashing = live.bytes_read();
    let hashes = live.hash_region(0, None).unwrap().blocks;
    assert_eq!(hashes.get(3).unwrap(), hash_block(&vec![0xa3; BLOCK as usize]));
    assert_eq!(hashes.get(40).unwrap(), hash_block(&vec![0xb4; BLOCK as usize]));
    assert_eq!(live.bytes_read() - before_hashing, 2 * BLOCK, "only the two dirty blocks were read");
}

/// `disk` read whole and recorded as `generation` through a [`FaultyFs`]
/// (it notes the read-ahead asked of each file); the filesystem, and how
/// to open the next session of the disk through it.
fn recorded_through_faulty_fs(
    disk: &Path,
    root: &Path,
    generation: Generation,
) -> (diskferry_testkit::FaultyFs, impl Fn() -> SourceSession) {
    let fs = diskferry_testkit::FaultyFs::unlimited(Arc::new(RealFs));
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let (disk, root) = (disk.to_path_buf(), root.to_path_buf());
    let open =
        move || SourceSession::open(vfs.clone(), &disk, BlockSize::new(BLOCK as u32).unwrap(), Some(&root)).unwrap();
    let first = open();
    first.set_link(Link { level: None, pages: false }).unwrap();
    for r in 0..first.geometry().region_count() {
        first.hash_region(r, None).unwrap();
    }
    first.commit_history(generation, first.consistency(false).unwrap(), 1).unwrap();
    (fs, open)
}

/// A hinted read asks the disk for its scattered blocks before it reads
/// them, the spot check's sample and each region's dirty runs alike: in a
/// fresh reflink snapshot or on a cold disk they then wait on the device
/// together, not one after the other.
#[test]
fn a_hinted_read_asks_for_its_blocks_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, root) = (dir.path().join("disk.img"), dir.path().join("state"));
    let bytes: Vec<u8> = (0..BLOCKS * BLOCK).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let g1 = Generation(0x21);
    let (fs, open) = recorded_through_faulty_fs(&disk, &root, g1);
    for b in [5, 6, 50] {
        write_block(&disk, b, 0xc0 + b as u8);
    }
    let dirty = vec![(5 * BLOCK + 7, 2 * BLOCK - 9), (50 * BLOCK, BLOCK)];
    let hinted = open();
    let hint = ChangeHint { since: g1, source: ChangeSource::Ranges, ranges: dirty.clone(), live: None };
    hinted.offer_hint(hint, SpotCheck { fraction: 0.1, min_blocks: 4, ..SpotCheck::with_seed(3) });
    let before = fs.read_ahead(&disk);
    hinted.start_hint(Some(g1), false).unwrap();
    let spot = fs.read_ahead(&disk);
    assert_eq!(hinted.hint_outcome().source, ChangeSource::Ranges, "{:?}", hinted.hint_outcome());
    assert!(spot.advised.len() > before.advised.len(), "the sample was not asked for ahead: {spot:?}");
    assert_eq!(spot.unadvised_bytes, before.unadvised_bytes, "the spot check read blocks it did not ask for ahead");
    let hashes = hinted.hash_region(0, None).unwrap().blocks;
    let after = fs.read_ahead(&disk);
    for (at, len) in [(5 * BLOCK, 2 * BLOCK), (50 * BLOCK, BLOCK)] {
        assert!(after.advised.contains(&(at, len)), "the dirty run at {at} was not asked for ahead: {after:?}");
    }
    assert_eq!(after.unadvised_bytes, before.unadvised_bytes, "the dirty runs were read without asking ahead");
    assert_eq!(hashes.get(50).unwrap(), hash_block(&vec![0xc0 + 50; BLOCK as usize]));
}

/// The spot check reads a sampled block in a hole as zeros without asking
/// the device for it: on a large sparse disk most of the sample lands in
/// holes, and advising each would be thousands of calls for nothing.
#[test]
fn the_spot_check_asks_ahead_only_for_blocks_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, root) = (dir.path().join("disk.img"), dir.path().join("state"));
    // Data in blocks 0..4 and 40..44, holes everywhere else.
    std::fs::File::create(&disk).unwrap().set_len(BLOCKS * BLOCK).unwrap();
    let data: Vec<u64> = (0..4).chain(40..44).collect();
    for &b in &data {
        write_block(&disk, b, 0x30 + b as u8);
    }
    let g1 = Generation(0x22);
    let (fs, open) = recorded_through_faulty_fs(&disk, &root, g1);
    let hinted = open();
    let hint = ChangeHint { since: g1, source: ChangeSource::Ranges, ranges: vec![(BLOCK, 10)], live: None };
    hinted.offer_hint(hint, everything());
    let before = fs.read_ahead(&disk).advised.len();
    hinted.start_hint(Some(g1), false).unwrap();
    assert_eq!(hinted.hint_outcome().source, ChangeSource::Ranges, "{:?}", hinted.hint_outcome());
    let advised = fs.read_ahead(&disk).advised.split_off(before);
    // Every clean block with data was sampled and asked for; nothing in a hole.
    let expected: Vec<(u64, u64)> = data.iter().filter(|&&b| b != 1).map(|&b| (b * BLOCK, BLOCK)).collect();
    assert_eq!(advised, expected);
}
