//! A full copy's receive path on a real file, as the target agent runs it:
//! frames cut into network-sized pieces, decoded across them, each block
//! gathered into an aligned buffer and verified there, then written in
//! merged batches (with `O_DIRECT` where the filesystem has it). The bytes
//! written are the bytes verified; a frame damaged in any piece is refused
//! and writes nothing.

use std::sync::Arc;

use bytes::Bytes;
use diskferry_protocol::message::{Plan, SyncMode};
use diskferry_protocol::{BlockSize, FrameSplitter, Generation, Geometry, Message, SessionId, MAX_FRAME};
use diskferry_sync_engine::aligned::is_direct_aligned;
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::block::VerifiedBlock;
use diskferry_sync_engine::remote::{block_frame, verify_frame, FrameRejection};
use diskferry_sync_engine::session::{Request, TargetRequest, TargetSession};
use diskferry_sync_engine::store::{RealFs, Vfs};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// A disk of `len` bytes: random pages, every third page zero.
fn disk(len: usize, rng: &mut SmallRng) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for (i, page) in d.chunks_mut(4096).enumerate() {
        if i % 3 != 1 {
            rng.fill_bytes(page);
        }
    }
    d
}

/// `bytes` cut at random sizes, as QUIC chunks cut a stream.
fn pieces(bytes: Bytes, rng: &mut SmallRng) -> Vec<Bytes> {
    let mut b = bytes;
    let mut out = Vec::new();
    while !b.is_empty() {
        let n = rng.random_range(1..=70_000).min(b.len());
        out.push(b.split_to(n));
    }
    out
}

fn decode(parts: &[Bytes]) -> diskferry_protocol::message::BlockFrame {
    let mut s = FrameSplitter::new(MAX_FRAME);
    for p in parts {
        s.push(p.clone());
    }
    match s.next_frame().unwrap() {
        Some(Message::Block(f)) => f,
        other => panic!("not a block frame: {other:?}"),
    }
}

fn receive(block_size: u32, disk_len: usize, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let vfs: Arc<dyn Vfs> = Arc::new(RealFs);
    let target_path = dir.path().join("replica.img");
    let mut src = disk(disk_len, &mut rng);
    let g = Geometry::new(disk_len as u64, BlockSize::new(block_size).unwrap());
    // Every third block compresses: it travels as zstd and is decompressed
    // straight into the aligned buffer.
    let text = b"diskferry replicates virtual disks; ";
    for i in (2..g.block_count()).step_by(3) {
        let at = g.block_offset(i) as usize;
        for (k, b) in src[at..at + g.block_len(i) as usize].iter_mut().enumerate() {
            *b = text[k % text.len()];
        }
    }
    let mut zstd_blocks = 0;
    let mut target = Target::open(vfs, &dir.path().join("state"), &target_path, TargetOptions::default()).unwrap();
    let req = TargetRequest {
        request: Request {
            mode: SyncMode::Full,
            force: false,
            geometry: g,
            lineage: Vec::new(),
            discard_target_changes: false,
            discard_point: Generation(77),
            now_unix_ns: 0,
        },
        session: SessionId(1),
        resumable: true,
        window: 4,
        index_entries: None,
        kept_bytes: None,
    };
    let (session, accepted) = TargetSession::open(&mut target, &req).unwrap();
    assert_eq!(session.plan(), Plan::Full);
    let sink = accepted.sink.expect("a full copy writes through a sink");
    let what = |i: u64| format!("block {i} of {block_size} bytes, seed {seed}");

    let mut batch: Vec<VerifiedBlock> = Vec::new();
    for i in 0..g.block_count() {
        let range = g.block_offset(i) as usize..(g.block_offset(i) + g.block_len(i) as u64) as usize;
        let bytes = &src[range.clone()];
        let level = (i % 3 == 2).then_some(1);
        let frame = block_frame(i, bytes, &[], level);
        zstd_blocks += u32::from(frame.codec == diskferry_protocol::message::Codec::Zstd);
        let wire = Message::Block(frame).to_bytes();
        let parts = pieces(wire, &mut rng);

        // Damage one byte in one piece: refused, with and without gathering.
        let mut bad = parts.clone();
        let k = rng.random_range(0..bad.len());
        let mut damaged = bad[k].to_vec();
        let at = rng.random_range(0..damaged.len());
        damaged[at] ^= 1 << rng.random_range(0..8);
        bad[k] = damaged.into();
        let mut s = FrameSplitter::new(MAX_FRAME);
        for p in &bad {
            s.push(p.clone());
        }
        // A damaged header may make the bytes undecodable, or another
        // frame: only a block frame for this block reaches verification.
        if let Ok(Some(Message::Block(f))) = s.next_frame() {
            if f.index == i && f.block_len == g.block_len(i) {
                for gather in [None, Some(sink.buffers())] {
                    match verify_frame(&f, &accepted.old, &g, gather) {
                        Err(FrameRejection::Mismatch | FrameRejection::Invalid(_)) => {}
                        Ok(vb) => {
                            let got: Vec<u8> = vb.patches().iter().flat_map(|p| p.data.to_vec()).collect();
                            assert!(got == bytes, "{}: a damaged frame verified with other bytes", what(i));
                        }
                        Err(FrameRejection::Storage(e)) => panic!("{}: {e}", what(i)),
                    }
                }
            }
        }

        let frame = decode(&parts);
        let vb = match verify_frame(&frame, &accepted.old, &g, Some(sink.buffers())) {
            Ok(vb) => vb,
            Err(e) => panic!("{}: a good frame was refused: {e:?}", what(i)),
        };
        assert_eq!(vb.patches().len(), 1, "{}", what(i));
        let data = &vb.patches()[0].data;
        assert_eq!(&data[..], bytes, "{}: the gathered bytes differ from the sent ones", what(i));
        if data.len() % 4096 == 0 {
            assert!(is_direct_aligned(0, &[&data[..]]), "{}: not gathered into an aligned buffer", what(i));
        }
        batch.push(vb);
        // Batches of every size, in shuffled order.
        if rng.random_range(0..4) == 0 || i + 1 == g.block_count() {
            let n = batch.len();
            for j in (1..n).rev() {
                batch.swap(j, rng.random_range(0..=j));
            }
            sink.write_batch(&batch).unwrap();
            batch.clear();
        }
    }
    assert!(zstd_blocks > 0 || g.block_count() < 3, "seed {seed}: no block travelled compressed");
    // The commit sets the size: a trailing zero page is not written before.
    let mut partial = std::fs::read(dir.path().join("replica.img.partial")).unwrap();
    assert!(partial.len() <= disk_len, "seed {seed}: the .partial is longer than the disk");
    partial.resize(disk_len, 0);
    assert!(partial == src, "seed {seed}, {block_size}-byte blocks: the written bytes differ from the verified ones");
}

#[test]
fn full_copy_pieces_are_written_as_verified() {
    receive(65536, 9 * 65536 + 3 * 4096 + 100, 1);
    receive(4096, 40 * 4096 + 7, 2);
    receive(1 << 20, 3 * (1 << 20), 3);
    receive(65536, 4 * 65536, 4);
}
