//! `compress::compress` at level 1 (push's default) on 64 KiB blocks:
//! log-like text (shrinks), and random data. On random data the engine
//! tries zstd once and then sends the next 32 blocks raw without trying, so
//! two figures: `random/amortized` is one call per block (what an
//! incompressible disk costs per block), `random/tried` is 33 calls per
//! iteration, exactly one of which runs zstd (the cost of one attempt).
//! Also `decompress` of the text block. Throughput is plain bytes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diskferry_benches::{random_bytes, text_bytes, KIB};
use diskferry_sync_engine::compress::{compress, decompress};

const LEVEL: i32 = 1;
const SKIP_CYCLE: usize = 33;

fn bench(c: &mut Criterion) {
    let text = text_bytes(64 * KIB);
    let random = random_bytes(6, 64 * KIB);
    let packed = compress(&text, LEVEL).expect("text compresses");
    assert!(compress(&random, LEVEL).is_none(), "random data must not compress");
    eprintln!("zstd level {LEVEL}: text block 65536 -> {} bytes", packed.len());
    // The miss above opened a skip window: leave it, so the text figure starts clean.
    for _ in 0..SKIP_CYCLE {
        compress(&text, LEVEL);
    }

    let mut g = c.benchmark_group("zstd/64K");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("compress/text", |b| b.iter(|| compress(black_box(&text), LEVEL)));
    g.bench_function("compress/random/amortized", |b| b.iter(|| compress(black_box(&random), LEVEL)));
    g.bench_function("compress/random/tried", |b| {
        b.iter(|| (0..SKIP_CYCLE).filter(|_| compress(black_box(&random), LEVEL).is_some()).count())
    });
    g.bench_function("decompress/text", |b| b.iter(|| decompress(black_box(&packed), text.len()).expect("decodes")));
    g.finish();
}

criterion_group! {
    name = benches;
    config = diskferry_benches::quick();
    targets = bench
}
criterion_main!(benches);
