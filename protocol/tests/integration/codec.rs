//! Property tests of the codec: every message survives encode/decode, and
//! arbitrary bytes never panic the decoder.

use bytes::{Bytes, BytesMut};
use diskferry_protocol::message::{Accept, BlockFrame, Codec, Committed, GroupTag, Open, Plan, SyncMode, WantBlock};
use diskferry_protocol::{
    BlockHash, BlockSize, Consistency, ErrorCode, FrameSplitter, Generation, Message, SessionId, TargetName, MAX_FRAME,
};
use proptest::prelude::*;

fn hash() -> impl Strategy<Value = BlockHash> {
    any::<[u8; 32]>().prop_map(BlockHash)
}

fn generation() -> impl Strategy<Value = Generation> {
    (1u128..).prop_map(Generation)
}

fn name() -> impl Strategy<Value = TargetName> {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}".prop_filter_map("valid name", |s| TargetName::new(&s).ok())
}

fn block_frame() -> impl Strategy<Value = BlockFrame> {
    (any::<u64>(), hash(), 1u32..=16, prop::bool::ANY, prop::collection::vec(any::<u8>(), 0..64)).prop_map(
        |(index, hash, pages, zstd, payload)| {
            // Patches: every other page of the block, in order.
            let patches: Vec<(u32, u32)> = (0..pages).step_by(2).map(|p| (p * 4096, 4096)).collect();
            let plain: u32 = patches.iter().map(|p| p.1).sum();
            let payload = if zstd { Bytes::from(payload) } else { Bytes::from(vec![7u8; plain as usize]) };
            BlockFrame {
                index,
                hash,
                block_len: pages * 4096,
                codec: if zstd { Codec::Zstd } else { Codec::Raw },
                patches,
                payload: payload.into(),
            }
        },
    )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u32>()).prop_map(|(a, b, c)| Message::Hello {
            min_version: a,
            max_version: b,
            capabilities: c
        }),
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| Message::Welcome {
            version: a,
            capabilities: b,
            max_frame: c
        }),
        (
            any::<u128>(),
            name(),
            any::<u64>(),
            12u32..=22,
            0u8..3,
            (any::<bool>(), any::<bool>(), any::<bool>()),
            prop::collection::vec(generation(), 0..20),
            prop::option::of((name(), any::<u128>(), 1u16..=64))
        )
            .prop_map(
                |(s, target, disk_bytes, shift, mode, (force, discard_target_changes, promote), lineage, group)| {
                    Message::Open(Open {
                        session: SessionId(s),
                        target,
                        disk_bytes,
                        block_size: BlockSize::new(1 << shift).unwrap(),
                        mode: [SyncMode::Auto, SyncMode::Delta, SyncMode::Full][mode as usize],
                        force,
                        discard_target_changes,
                        lineage,
                        promote,
                        group: group.map(|(name, push, members)| GroupTag { name, push, members }),
                    })
                }
            ),
        (0u8..3, prop::option::of(generation()), any::<u64>(), any::<u32>()).prop_map(|(p, g, s, w)| Message::Accept(
            Accept {
                plan: [Plan::Full, Plan::CompareManifest, Plan::CompareHash][p as usize],
                target_generation: g,
                staged_blocks: s,
                window: w,
            }
        )),
        (any::<u64>(), hash()).prop_map(|(region, hash)| Message::Region { region, hash }),
        any::<u64>().prop_map(|region| Message::NeedChunks { region }),
        (any::<u64>(), prop::collection::vec(hash(), 0..40))
            .prop_map(|(region, hashes)| Message::Chunks { region, hashes }),
        (any::<u64>(), prop::collection::vec(any::<u32>(), 0..40))
            .prop_map(|(region, chunks)| Message::NeedBlocks { region, chunks }),
        (any::<u64>(), any::<u32>(), prop::collection::vec(hash(), 0..33))
            .prop_map(|(region, chunk, hashes)| Message::BlockHashes { region, chunk, hashes }),
        (any::<u64>(), prop::collection::vec((any::<u64>(), prop::collection::vec(any::<u64>(), 0..17)), 0..20))
            .prop_map(|(region, bs)| Message::Want {
                region,
                blocks: bs.into_iter().map(|(index, page_hashes)| WantBlock { index, page_hashes }).collect(),
            }),
        (any::<u64>(), hash(), any::<u32>()).prop_map(|(region, hash, items)| Message::RegionEnd {
            region,
            hash,
            items
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(region, bytes_staged)| Message::RegionDone { region, bytes_staged }),
        (0u8..3).prop_map(|c| Message::Finish { consistency: Consistency::from_u8(c).unwrap() }),
        (
            (generation(), hash(), any::<u64>(), any::<u64>(), any::<u32>(), (any::<bool>(), any::<bool>())),
            (prop::option::of(generation()), any::<u64>(), prop::option::of(generation()), any::<u64>())
        )
            .prop_map(
                |(
                    (generation, root, c, w, points_dropped, (unchanged, promoted)),
                    (common_point, discarded_blocks, discarded_point, target_bytes_read),
                )| Message::Committed(Committed {
                    generation,
                    root,
                    blocks_changed: c,
                    bytes_written: w,
                    points_dropped,
                    unchanged,
                    common_point,
                    discarded_blocks,
                    discarded_point,
                    target_bytes_read,
                    promoted,
                })
            ),
        (0usize..ErrorCode::ALL.len(), ".{0,80}")
            .prop_map(|(i, message)| Message::Error { code: ErrorCode::ALL[i], message }),
        block_frame().prop_map(Message::Block),
        (any::<u64>(), any::<u64>()).prop_map(|(first, count)| Message::Zero { first, count }),
        any::<u64>().prop_map(|index| Message::Nack { index }),
    ]
}

/// Every frame the splitter yields from `chunks`, and how it stopped.
fn split(chunks: &[&[u8]]) -> (Vec<Message>, Result<(), diskferry_protocol::DecodeError>) {
    let mut s = FrameSplitter::new(MAX_FRAME);
    let mut out = Vec::new();
    for c in chunks {
        s.push(bytes::Bytes::copy_from_slice(c));
        loop {
            match s.next_frame() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, Ok(()))
}

proptest! {
    #[test]
    fn decode_of_encode_is_identity(m in message()) {
        let bytes = m.to_bytes();
        let (out, end) = split(&[&bytes]);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(out, vec![m]);
    }

    #[test]
    fn frames_split_anywhere_reassemble(ms in prop::collection::vec(message(), 1..6), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        let mut all = BytesMut::new();
        for m in &ms {
            m.encode(&mut all);
        }
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(all.len() + 1)).collect();
        at.push(0);
        at.push(all.len());
        at.sort();
        let chunks: Vec<&[u8]> = at.windows(2).map(|w| &all[w[0]..w[1]]).collect();
        let (out, end) = split(&chunks);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(out, ms);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), step in 1usize..64) {
        let chunks: Vec<&[u8]> = bytes.chunks(step).collect();
        let _ = split(&chunks);
    }

    #[test]
    fn corrupted_frames_never_panic(m in message(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut bytes = m.to_bytes().to_vec();
        for (i, v) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= v | 1;
        }
        let _ = split(&[&bytes]);
    }
}
