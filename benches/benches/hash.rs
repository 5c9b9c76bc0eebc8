//! `hash::hash_blocks` over a 256 MiB image of random data (hot page cache,
//! memory-mapped as `diskferry hash` reads it) and over the same bytes in
//! memory, by block size and by threads (one, all cores).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use diskferry_benches::{mem_disk, random_bytes, TempImage, KIB, MIB};
use diskferry_protocol::{BlockSize, Geometry};
use diskferry_sync_engine::hash::hash_blocks;
use diskferry_sync_engine::thread_pool;
use diskferry_sync_engine::Disk;

const DISK_BYTES: usize = 256 * MIB;

fn label(bytes: usize) -> String {
    if bytes >= MIB {
        format!("{}M", bytes / MIB)
    } else {
        format!("{}K", bytes / KIB)
    }
}

fn hash_all(disk: &Disk, g: &Geometry) -> usize {
    hash_blocks(disk, g, 0..g.block_count()).expect("hashing").len()
}

fn bench(c: &mut Criterion) {
    let bytes = random_bytes(1, DISK_BYTES);
    let image = TempImage::with_bytes(&bytes).expect("writing the temporary image");
    let file_disk = Disk::open(image.path()).expect("opening the temporary image");
    let memory_disk = mem_disk(bytes);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1];
    if all > 1 {
        threads.push(all);
    }
    let pools: Vec<(usize, _)> = threads.iter().map(|&n| (n, thread_pool(Some(n)).expect("thread pool"))).collect();

    let mut g = c.benchmark_group("hash_blocks");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).throughput(Throughput::Bytes(DISK_BYTES as u64));
    for block in [4 * KIB, 64 * KIB, MIB] {
        let geometry = Geometry::new(DISK_BYTES as u64, BlockSize::new(block as u32).expect("block size"));
        for (n, pool) in &pools {
            g.bench_with_input(BenchmarkId::new(format!("file/{}", label(block)), format!("{n}t")), n, |b, _| {
                b.iter(|| pool.install(|| hash_all(&file_disk, &geometry)))
            });
        }
    }
    let geometry = Geometry::new(DISK_BYTES as u64, BlockSize::DEFAULT);
    for (n, pool) in &pools {
        g.bench_with_input(BenchmarkId::new("memory/64K", format!("{n}t")), n, |b, _| {
            b.iter(|| pool.install(|| hash_all(&memory_disk, &geometry)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = diskferry_benches::quick();
    targets = bench
}
criterion_main!(benches);
