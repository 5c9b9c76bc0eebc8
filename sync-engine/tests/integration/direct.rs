//! A local full copy writes what it hashed in merged runs past the page
//! cache, and the bytes written are the bytes hashed.

use std::path::Path;
use std::sync::Arc;

use diskferry_protocol::message::SyncMode;
use diskferry_protocol::{ErrorCode, Generation, SessionId};
use diskferry_sync_engine::apply::partial_path;
use diskferry_sync_engine::local::{self, NoProgress, SyncJob, SyncOptions, SyncReport};
use diskferry_sync_engine::store::{RealFs, Vfs};
use diskferry_sync_engine::Result;
use diskferry_testkit::{DiskGen, Fault, FaultyFs};
use rand::Rng;

use super::util::{bs, four_threads};

const MIB: usize = 1 << 20;

/// `mib` MiB (at least 16) and a short last block: data, a zero block, a
/// zero page inside a block, and an 8 MiB hole from 8 MiB on.
fn source_bytes(mib: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; mib * MIB + 5000];
    DiskGen::new(mib as u64).rng().fill(&mut bytes[..]);
    bytes[3 * 65536..4 * 65536].fill(0);
    bytes[9 * 65536 + 4096..9 * 65536 + 8192].fill(0);
    bytes[8 * MIB..16 * MIB].fill(0);
    bytes
}

/// A full copy of `src` to `dst` in `dir` through `fs`, on four threads.
fn full_copy(fs: &FaultyFs, dir: &Path) -> Result<SyncReport> {
    copy(fs, dir, SyncMode::Full)
}

/// A sync of `src` to `dst` in `dir` through `fs` in `mode`.
fn copy(fs: &FaultyFs, dir: &Path, mode: SyncMode) -> Result<SyncReport> {
    copy_as(fs, dir, mode, Generation(7))
}

/// [`copy`] committing `generation`.
fn copy_as(fs: &FaultyFs, dir: &Path, mode: SyncMode, generation: Generation) -> Result<SyncReport> {
    let job = SyncJob {
        vfs: Arc::new(fs.clone()) as Arc<dyn Vfs>,
        state_root: dir.join("state"),
        source: dir.join("src.img"),
        target: dir.join("dst.img"),
        generation,
        session: SessionId(8),
        now_unix_ns: 1,
    };
    let opts = SyncOptions { mode, block_size: bs(65536), ..SyncOptions::default() };
    four_threads(|| local::sync(&job, &opts, &NoProgress))
}

#[test]
fn a_local_full_copy_writes_merged_runs_past_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.img");
    let bytes = source_bytes(40);
    std::fs::write(dir.path().join("src.img"), &bytes).unwrap();
    let fs = FaultyFs::unlimited(Arc::new(RealFs)).mapping_sources();
    full_copy(&fs, dir.path()).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), bytes, "the copy is byte-exact");

    let w = fs.writes(&partial_path(&dst));
    let data = (bytes.len() - 8 * MIB - 65536 - 4096) as u64;
    // Every data page written once; all but the short last block's asked
    // to bypass the cache (it is no whole number of sectors).
    assert_eq!(w.bypass_bytes + w.cached_bytes, data, "{w:?}");
    assert!(w.cached_bytes <= 65536, "written through the cache: {w:?}");
    // Runs of up to 4 MiB per hashing thread, split where the zero block,
    // the zero page and the hole are: a few dozen writes, not one a block.
    assert!(w.calls <= 40, "{} writes for {} MiB", w.calls, data >> 20);
}

/// A disk that fills up at any point of a mapped, direct full copy: a
/// clean error with its code, and the next sync converges (a delta where
/// the copy had committed before the fault).
#[test]
fn a_full_disk_under_the_direct_writes_fails_cleanly() {
    let bytes = source_bytes(16);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("src.img"), &bytes).unwrap();
    let counting = FaultyFs::unlimited(Arc::new(RealFs)).mapping_sources();
    full_copy(&counting, dir.path()).unwrap();
    let total = counting.ops();
    for n in 0..total {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("src.img"), &bytes).unwrap();
        let fs = FaultyFs::new(Arc::new(RealFs), n, Fault::Enospc).mapping_sources();
        let e = full_copy(&fs, dir.path()).expect_err("a full disk fails the copy");
        assert!(matches!(e.code, ErrorCode::TargetFull | ErrorCode::StateFull), "op {n} of {total}: {e}");
        copy(&FaultyFs::unlimited(Arc::new(RealFs)).mapping_sources(), dir.path(), SyncMode::Auto)
            .unwrap_or_else(|e| panic!("op {n} of {total}: the next sync: {e}"));
        assert_eq!(std::fs::read(dir.path().join("dst.img")).unwrap(), bytes, "op {n} of {total}");
    }
}

/// A delta's redo log (written once, read back once at its commit), the
/// undo segment that keeps the point before it (read only by a failover)
/// and the replay's writes go past the page cache, whole pages at a time;
/// the commit is byte-exact.
#[test]
fn a_deltas_redo_log_and_undo_segment_bypass_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let old = source_bytes(24);
    std::fs::write(&src, &old).unwrap();
    copy_as(&FaultyFs::unlimited(Arc::new(RealFs)), dir.path(), SyncMode::Full, Generation(7)).unwrap();
    // Rewrite 5 MiB in scattered blocks, some over the hole, and the short last block.
    let mut new = old.clone();
    let mut gen = DiskGen::new(99);
    let rng = gen.rng();
    for b in [1usize, 2, 17, 30, 31, 60, 100, 130, 131, 132, 200, 250, 300, 330, 360] {
        rng.fill(&mut new[b * 65536..(b + 1) * 65536]);
    }
    new[24 * MIB + 100] ^= 1;
    std::fs::write(&src, &new).unwrap();
    let fs = FaultyFs::unlimited(Arc::new(RealFs));
    copy_as(&fs, dir.path(), SyncMode::Delta, Generation(9)).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), new, "the delta is byte-exact");

    let tdir = dir.path().join("state/targets").join(diskferry_sync_engine::store::state_key(&dst));
    let undo = std::fs::read_dir(&tdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "undo"))
        .expect("an undo segment keeps generation 7");
    for (what, path, at_least) in [("redo log", tdir.join("redo.log"), 15 << 16), ("undo segment", undo, 10 << 16)] {
        let w = fs.writes(&path);
        assert!(w.bypass_bytes >= at_least, "{what}: {w:?}");
        // Only part pages (the header's, the last one) through the cache.
        assert!(w.cached_bytes <= 3 * 4096, "{what}: {w:?}");
    }
    // The replay: every patch on the page grid past the cache, several at
    // a time (`apply/inflight.rs`), whether it lands in a hole or in data.
    let replayed = fs.writes(&dst);
    assert_eq!(replayed.bypass_bytes, 15 * 65536 + 4096, "{replayed:?}");
    assert_eq!(replayed.cached_bytes, 0, "{replayed:?}");
    let read_back = fs.read_ahead(&tdir.join("redo.log"));
    assert!(read_back.bypass_bytes >= 15 << 16, "the replay reads the log past the cache: {read_back:?}");
    assert!(read_back.unadvised_bytes < 4096, "through it only the header and the commit record: {read_back:?}");
}
