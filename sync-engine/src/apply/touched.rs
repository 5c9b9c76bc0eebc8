//! Where a redo log's entries write, kept in memory beside the log while it
//! stays small: a commit reserves the target's space and saves the old
//! content of those ranges (the undo segment), and with the list it does
//! not read the log twice for that (every read of the log also hashes its
//! bytes: for a 41 MiB delta, about a tenth of its commit).

use super::journal::Entry;

/// A byte range of the target an entry writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touched {
    /// Byte offset in the target.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// New bytes (a block's patch), or zeros.
    pub data: bool,
}

/// Ranges kept per log at most (24 B each, 6 MiB); a larger log's are found
/// by scanning it. Small in tests, so that both ways are exercised.
const LIST_MAX: usize = 1 << 18;
#[cfg(not(test))]
const TOUCHED_MAX: usize = LIST_MAX;
#[cfg(test)]
const TOUCHED_MAX: usize = 64;

/// The most memory a log's list holds (a session's memory budget counts it).
pub const TOUCHED_LIST_BYTES: u64 = (LIST_MAX * std::mem::size_of::<Touched>()) as u64;

/// The ranges a log's entries write, in log order, while they fit.
#[derive(Clone, Debug)]
pub struct TouchedList(Option<Vec<Touched>>);

impl Default for TouchedList {
    fn default() -> Self {
        TouchedList(Some(Vec::new()))
    }
}

impl TouchedList {
    /// Notes the ranges `entry` writes (blocks of `block_bytes`).
    pub fn note(&mut self, entry: &Entry<'_>, block_bytes: u64) {
        each(entry, block_bytes, &mut |t| self.push(t));
    }

    /// Notes one range.
    pub fn push(&mut self, t: Touched) {
        if let Some(list) = &mut self.0 {
            if list.len() >= TOUCHED_MAX {
                // Too many to keep: the log is scanned instead.
                self.0 = None;
            } else {
                list.push(t);
            }
        }
    }

    /// The ranges, unless there were too many to keep.
    pub fn get(&self) -> Option<&[Touched]> {
        self.0.as_deref()
    }
}

/// Calls `out` for each range `entry` writes.
pub fn each(entry: &Entry<'_>, block_bytes: u64, out: &mut dyn FnMut(Touched)) {
    match entry {
        Entry::Patch { block, ranges, .. } => {
            for &(off, len) in ranges {
                out(Touched { offset: block * block_bytes + u64::from(off), len: u64::from(len), data: true });
            }
        }
        Entry::Zero { offset, len } => out(Touched { offset: *offset, len: *len, data: false }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::journal::{scan, JournalHeader, JournalKind, JournalWriter};
    use crate::store::{RealFs, Vfs};
    use diskferry_protocol::{BlockSize, Geometry, SessionId};

    /// Writes `n` entries (data ranges and zero ranges by turns) and
    /// returns what they touch.
    fn write(j: &mut JournalWriter, from: u64, n: u64) -> Vec<Touched> {
        let mut want = Vec::new();
        for i in from..from + n {
            if i % 3 == 2 {
                j.append_zero(i * 65536 + 100, 5000).unwrap();
                want.push(Touched { offset: i * 65536 + 100, len: 5000, data: false });
            } else {
                let data = vec![i as u8 | 1; 4096 + i as usize];
                j.append_range(i, 512, &data).unwrap();
                want.push(Touched { offset: i * 65536 + 512, len: data.len() as u64, data: true });
            }
        }
        want
    }

    fn visited(j: &JournalWriter) -> Vec<Touched> {
        let mut got = Vec::new();
        j.visit_touched(&mut |t| {
            got.push(t);
            Ok(())
        })
        .unwrap();
        got
    }

    #[test]
    fn the_list_and_the_scan_name_the_same_ranges_also_after_a_resume() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = RealFs;
        let header = JournalHeader {
            kind: JournalKind::Redo,
            resumable: true,
            session: SessionId(7),
            base: None,
            geometry: Geometry::new(64 << 20, BlockSize::DEFAULT),
        };
        for n in [10, TOUCHED_MAX as u64 + 30] {
            let path = dir.path().join(format!("redo.{n}"));
            let mut j = JournalWriter::create(&vfs, &path, header).unwrap();
            let mut want = write(&mut j, 0, n);
            j.flush_entries().unwrap();
            assert_eq!(j.touched.get().is_some(), n <= TOUCHED_MAX as u64);
            assert_eq!(visited(&j), want, "{n} entries");
            // An interrupted session's log, resumed: the scan's list goes on.
            drop(j);
            let storage = vfs.open(&path, crate::store::OpenHow::Read).unwrap();
            let s = scan(&storage, &path, &mut |_| Ok(())).unwrap().unwrap();
            let mut j = JournalWriter::resume(&vfs, &path, &s).unwrap();
            want.extend(write(&mut j, n, 3));
            j.flush_entries().unwrap();
            assert_eq!(visited(&j), want, "{n} entries, resumed");
        }
    }

    #[test]
    fn a_list_past_its_bound_is_dropped_not_cut() {
        let mut l = TouchedList::default();
        for i in 0..TOUCHED_MAX as u64 {
            l.push(Touched { offset: i, len: 1, data: true });
        }
        assert_eq!(l.get().map(<[_]>::len), Some(TOUCHED_MAX));
        l.push(Touched { offset: 0, len: 1, data: false });
        assert!(l.get().is_none(), "a partial list would lose ranges");
        l.push(Touched { offset: 0, len: 1, data: false });
        assert!(l.get().is_none());
    }
}
