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
