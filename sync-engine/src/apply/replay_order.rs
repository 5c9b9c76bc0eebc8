//! The replay's ordering rules, each on a storage that makes the earlier
//! write slow: a later patch of the same pages, a later zero range, and a
//! later patch off the page grid must each win. (Found missing by review:
//! with a rule removed, every other test still passed.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskferry_protocol::{BlockSize, Geometry, SessionId};

use super::journal::{JournalHeader, JournalKind, JournalWriter};
use super::target::{Target, TargetOptions};
use crate::store::{RealFs, Storage, Vfs};

/// An in-memory disk whose writes of bytes starting with 1 take 100 ms.
#[derive(Debug)]
struct SlowOnes(Mutex<Vec<u8>>);

impl SlowOnes {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for SlowOnes {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.copy_from_slice(&self.bytes()[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        if buf.first() == Some(&1) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut v = self.bytes();
        let end = off as usize + buf.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.bytes().resize(len as usize, 0);
        Ok(())
    }
    fn zero_range(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.bytes()[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn reserve(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Replays a redo log that `fill` writes onto a disk of `disk_bytes` nines.
fn replay_log(disk_bytes: u64, block: u32, fill: impl FnOnce(&mut JournalWriter)) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dst.img");
    std::fs::write(&path, vec![9u8; disk_bytes as usize]).unwrap();
    let vfs: Arc<dyn Vfs> = Arc::new(RealFs);
    let options = TargetOptions { retention: Some(2), name: None, expect_identity: None, keep_points: Vec::new() };
    let t = Target::open(vfs.clone(), &dir.path().join("state"), &path, options).unwrap();
    let header = JournalHeader {
        kind: JournalKind::Redo,
        resumable: false,
        session: SessionId(1),
        base: None,
        geometry: Geometry::new(disk_bytes, BlockSize::new(block).unwrap()),
    };
    let mut w = JournalWriter::create(vfs.as_ref(), &t.journal_path(), header).unwrap();
    fill(&mut w);
    w.sync_entries().unwrap();
    drop(w);
    let disk = SlowOnes(Mutex::new(vec![9u8; disk_bytes as usize]));
    t.replay(&header, &disk).unwrap();
    let bytes = disk.bytes().clone();
    bytes
}

#[test]
fn a_later_patch_of_the_same_pages_wins_over_a_slow_earlier_one() {
    let got = replay_log(65536, 65536, |w| {
        w.append_range(0, 0, &[1u8; 8192]).unwrap();
        w.append_range(0, 4096, &[2u8; 4096]).unwrap();
    });
    assert_eq!(&got[..4096], &[1u8; 4096][..]);
    assert_eq!(&got[4096..8192], &[2u8; 4096][..], "the later patch lost");
    assert!(got[8192..].iter().all(|&b| b == 9));
}

#[test]
fn a_later_zero_range_wins_over_a_slow_earlier_patch() {
    let got = replay_log(65536, 65536, |w| {
        w.append_range(0, 0, &[1u8; 8192]).unwrap();
        w.append_zero(0, 65536).unwrap();
    });
    assert!(got.iter().all(|&b| b == 0), "zeroed before the earlier write landed");
}

#[test]
fn a_later_patch_off_the_page_grid_wins_over_a_slow_earlier_one() {
    // 10,000 bytes: the disk's last page is partial, so the second patch is off the grid.
    let got = replay_log(10000, 65536, |w| {
        w.append_range(0, 0, &[1u8; 8192]).unwrap();
        w.append_range(0, 0, &[2u8; 10000]).unwrap();
    });
    assert!(got.iter().all(|&b| b == 2), "the off-grid patch lost");
}
