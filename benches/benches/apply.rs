//! A whole local delta, `local::sync` on the real filesystem (`RealFs`, a
//! temporary directory): a 64 MiB source, a target that already holds the
//! previous version with its committed manifest in the state directory
//! (trusted: the target is not read), 1% of the source's 4 KiB pages given
//! new content before every iteration (untimed, `iter_batched`). Each
//! iteration hashes the source, plans, stages the changed blocks in the redo
//! log, commits (fsyncs), writes in place and keeps undo data. Throughput is
//! disk bytes.

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use diskferry_benches::{change_pages, rng, TempImage, MIB, PAGE};
use diskferry_protocol::{Generation, SessionId};
use diskferry_sync_engine::local::{sync, NoProgress, SyncJob, SyncMode, SyncOptions};
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::thread_pool;

const DISK_BYTES: usize = 64 * MIB;
const CHANGED_PAGES: usize = DISK_BYTES / PAGE / 100;

fn job(dir: &Path, source: &Path, n: u128) -> SyncJob {
    SyncJob {
        vfs: Arc::new(RealFs),
        state_root: dir.join("state"),
        source: source.to_path_buf(),
        target: dir.join("target.img"),
        generation: Generation(n),
        session: SessionId(n),
        now_unix_ns: 1_700_000_000_000_000_000 + n as i64,
    }
}

fn bench(c: &mut Criterion) {
    let image = TempImage::random(7, DISK_BYTES).expect("writing the temporary image");
    let dir = image.dir().to_path_buf();
    let source = image.path().to_path_buf();
    let pool = thread_pool(None).expect("thread pool");
    let full = SyncOptions { mode: SyncMode::Full, ..SyncOptions::default() };
    let delta = SyncOptions { mode: SyncMode::Delta, ..SyncOptions::default() };
    let mut n: u128 = 1;
    pool.install(|| sync(&job(&dir, &source, n), &full, &NoProgress)).expect("first full sync");
    let mut r = rng(8);

    // One checked round first: the delta trusts the manifest and leaves the target equal.
    n += 1;
    change_pages(&source, DISK_BYTES as u64, CHANGED_PAGES, &mut r).expect("changing pages");
    let report = pool.install(|| sync(&job(&dir, &source, n), &delta, &NoProgress)).expect("delta sync");
    assert_eq!(report.compare, "manifest", "the target's manifest must be trusted");
    eprintln!(
        "apply: {CHANGED_PAGES} of {} pages changed -> {} of {} blocks, {} bytes written, redo log {}, undo {}",
        DISK_BYTES / PAGE,
        report.blocks_changed,
        report.blocks_total,
        report.bytes_written,
        report.log_bytes,
        report.undo_bytes
    );
    let same = |what: &str| {
        let (s, t) = (std::fs::read(&source), std::fs::read(dir.join("target.img")));
        assert!(s.expect("reading source") == t.expect("reading target"), "target differs from source {what}");
    };
    same("after the checked delta");

    let mut g = c.benchmark_group("apply");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).throughput(Throughput::Bytes(DISK_BYTES as u64));
    g.bench_function("local-delta/64M/1pct-pages/trusted", |b| {
        b.iter_batched(
            || {
                n += 1;
                change_pages(&source, DISK_BYTES as u64, CHANGED_PAGES, &mut r).expect("changing pages");
                job(&dir, &source, n)
            },
            |j| pool.install(|| sync(&j, &delta, &NoProgress)).expect("delta sync"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
    same("after the benchmark");
}

criterion_group! {
    name = benches;
    config = diskferry_benches::quick();
    targets = bench
}
criterion_main!(benches);
