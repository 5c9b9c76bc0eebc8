//! Paths, jobs and checks shared by the tests.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use diskferry_protocol::{BlockSize, ErrorCode, Generation, SessionId};
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::local::{self, NoProgress, SyncJob, SyncOptions, SyncReport};
use diskferry_sync_engine::store::Vfs;
use diskferry_sync_engine::thread_pool;
use diskferry_sync_engine::verify;
use diskferry_sync_engine::Result;
use diskferry_testkit::{read_image, MemFs};

pub const STATE: &str = "/state";
pub const SRC: &str = "/disks/src.img";
pub const DST: &str = "/disks/dst.img";

pub fn p(s: &str) -> &Path {
    Path::new(s)
}

/// A filesystem with `/disks` and `/state`.
pub fn fresh_fs() -> MemFs {
    let fs = MemFs::new();
    fs.create_dir_all(p("/disks")).unwrap();
    fs.create_dir_all(p(STATE)).unwrap();
    fs
}

pub fn bs(bytes: u32) -> BlockSize {
    BlockSize::new(bytes).unwrap()
}

pub fn opts(block: u32, retention: u32) -> SyncOptions {
    SyncOptions { block_size: bs(block), retention, ..SyncOptions::default() }
}

/// A one-thread pool: runs are deterministic (same operations, same order).
pub fn one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| thread_pool(Some(1)).unwrap()).install(f)
}

/// A four-thread pool.
pub fn four_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| thread_pool(Some(4)).unwrap()).install(f)
}

pub fn job(vfs: Arc<dyn Vfs>, generation: u128) -> SyncJob {
    SyncJob {
        vfs,
        state_root: STATE.into(),
        source: SRC.into(),
        target: DST.into(),
        generation: Generation(generation),
        session: SessionId(generation + 1000),
        now_unix_ns: generation as i64 * 1_000_000_000,
    }
}

/// `SRC` → `DST` on one thread.
pub fn sync(vfs: Arc<dyn Vfs>, generation: u128, o: &SyncOptions) -> Result<SyncReport> {
    one_thread(|| local::sync(&job(vfs, generation), o, &NoProgress))
}

pub fn open_target(vfs: Arc<dyn Vfs>, retention: u32) -> Result<Target> {
    Target::open(
        vfs,
        p(STATE),
        p(DST),
        TargetOptions { retention: Some(retention), name: None, expect_identity: None, keep_points: Vec::new() },
    )
}

pub fn read(vfs: &dyn Vfs, path: &str) -> Option<Vec<u8>> {
    read_image(vfs, p(path)).unwrap()
}

/// Opens the target and checks its bytes against the committed manifest.
pub fn verify_ok(vfs: Arc<dyn Vfs>, ctx: &str) {
    let mut t = open_target(vfs, 3).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
    let r = one_thread(|| verify::verify(&mut t, &NoProgress)).unwrap_or_else(|e| panic!("{ctx}: verify: {e}"));
    assert!(r.ok, "{ctx}: verify found {} mismatched blocks, size {:?}", r.mismatched_blocks, r.size_mismatch);
}

pub fn code<T: std::fmt::Debug>(r: Result<T>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code,
    }
}

/// Short description of a byte image for assertion messages.
pub fn describe(b: Option<&[u8]>) -> String {
    match b {
        None => "missing".into(),
        Some(b) => format!("{} bytes, blake3 {}", b.len(), &blake3::hash(b).to_hex()[..12]),
    }
}
