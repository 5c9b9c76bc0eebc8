//! The wire codec: `Message::encode` / `Message::decode` of a Block frame
//! carrying a whole raw 64 KiB block and of a BlockHashes frame (one chunk:
//! 32 block hashes), and `FrameSplitter` splitting frames off a receive
//! buffer (one frame, and a 4 MiB buffer of 64 Block frames, whole and cut
//! into datagram-sized pieces as QUIC hands them over: the payloads keep
//! their pieces, nothing is joined). Throughput is frame bytes.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use diskferry_benches::{random_bytes, KIB};
use diskferry_protocol::message::{BlockFrame, Codec};
use diskferry_protocol::types::CHUNK_BLOCKS;
use diskferry_protocol::{BlockHash, FrameSplitter, Message, MAX_FRAME};
use diskferry_sync_engine::hash::hash_block;

fn block_frame() -> Message {
    let payload = random_bytes(4, 64 * KIB);
    Message::Block(BlockFrame {
        index: 123_456,
        hash: hash_block(&payload),
        block_len: (64 * KIB) as u32,
        codec: Codec::Raw,
        patches: vec![(0, (64 * KIB) as u32)],
        payload: Bytes::from(payload).into(),
    })
}

fn block_hashes_frame() -> Message {
    let bytes = random_bytes(5, 32 * CHUNK_BLOCKS as usize);
    let hashes = bytes.chunks_exact(32).map(|c| BlockHash(c.try_into().expect("32 bytes"))).collect();
    Message::BlockHashes { region: 17, chunk: 9, hashes }
}

fn bench_message(c: &mut Criterion, name: &str, msg: &Message) {
    let frame = msg.to_bytes();
    let body = frame.slice(4..);
    assert_eq!(&Message::decode(&mut body.clone()).expect("decodes"), msg);
    let mut g = c.benchmark_group(format!("codec/{name}"));
    g.throughput(Throughput::Bytes(frame.len() as u64));
    let mut out = BytesMut::with_capacity(frame.len() * 2);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(msg).encode(&mut out);
            out.len()
        })
    });
    g.bench_function("decode", |b| b.iter(|| Message::decode(&mut black_box(&body).clone()).expect("decodes")));
    g.bench_function("split", |b| {
        b.iter_batched(
            || FrameSplitter::new(MAX_FRAME),
            |mut s| {
                s.push(frame.clone());
                s.next_frame().expect("decodes").expect("a whole frame")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let block = block_frame();
    bench_message(c, "block-64K", &block);
    bench_message(c, "block-hashes-32", &block_hashes_frame());

    // A receive buffer holding 64 Block frames, split frame by frame.
    const FRAMES: usize = 64;
    let one = block.to_bytes();
    let mut stream = BytesMut::with_capacity(one.len() * FRAMES);
    for _ in 0..FRAMES {
        stream.extend_from_slice(&one);
    }
    let mut g = c.benchmark_group("codec/stream-64x-block-64K");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    let stream = stream.freeze();
    g.bench_function("split", |b| {
        b.iter_batched(
            || FrameSplitter::new(MAX_FRAME),
            |mut s| {
                s.push(stream.clone());
                let mut n = 0;
                while let Some(m) = s.next_frame().expect("decodes") {
                    black_box(m);
                    n += 1;
                }
                assert_eq!(n, FRAMES);
            },
            BatchSize::LargeInput,
        )
    });
    // The same stream in the pieces a 65000-byte datagram path delivers.
    let pieces: Vec<Bytes> = stream.chunks(64_937).map(|c| stream.slice_ref(c)).collect();
    g.bench_function("split-pieces", |b| {
        b.iter_batched(
            || FrameSplitter::new(MAX_FRAME),
            |mut s| {
                let mut n = 0;
                for p in &pieces {
                    s.push(p.clone());
                    while let Some(m) = s.next_frame().expect("decodes") {
                        black_box(m);
                        n += 1;
                    }
                }
                assert_eq!(n, FRAMES);
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = diskferry_benches::quick();
    targets = bench
}
criterion_main!(benches);
