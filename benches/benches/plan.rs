//! `plan::plan_region` on one region of 1024 block hashes (64 MiB of disk at
//! 64 KiB blocks) where 1% of the blocks differ from the target's, about a
//! quarter of the disk is zeros, with no copy lookup and with a hash index
//! of the target's blocks. Throughput is disk bytes planned.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diskferry_benches::{rng, KIB};
use diskferry_protocol::BlockHash;
use diskferry_sync_engine::plan::plan_region;
use rand::{Rng, RngCore};

const BLOCKS: usize = 1024;

fn random_hash(r: &mut impl RngCore) -> BlockHash {
    let mut h = [0u8; 32];
    r.fill_bytes(&mut h);
    BlockHash(h)
}

fn bench(c: &mut Criterion) {
    let mut r = rng(3);
    let source: Vec<BlockHash> =
        (0..BLOCKS).map(|_| if r.random_bool(0.25) { BlockHash::ZERO } else { random_hash(&mut r) }).collect();
    let mut target: Vec<Option<BlockHash>> = source.iter().copied().map(Some).collect();
    let differing = rand::seq::index::sample(&mut r, BLOCKS, BLOCKS / 100);
    for i in differing.iter() {
        target[i] = Some(random_hash(&mut r));
    }
    let index: HashMap<BlockHash, u64> =
        target.iter().enumerate().filter_map(|(i, h)| h.filter(|h| !h.is_zero()).map(|h| (h, i as u64))).collect();
    let first = 5 * BLOCKS as u64;
    let plan = plan_region(first, &source, &target, &mut |_| None);
    assert_eq!(plan.stats.changed(), differing.len() as u64);

    let mut g = c.benchmark_group("plan_region");
    g.throughput(Throughput::Bytes((BLOCKS * 64 * KIB) as u64));
    g.bench_function("1024x64K/1pct/no-lookup", |b| {
        b.iter(|| plan_region(first, black_box(&source), black_box(&target), &mut |_| None))
    });
    g.bench_function("1024x64K/1pct/hash-index", |b| {
        b.iter(|| plan_region(first, black_box(&source), black_box(&target), &mut |h| index.get(h).copied()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = diskferry_benches::quick();
    targets = bench
}
criterion_main!(benches);
