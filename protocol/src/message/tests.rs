//! Round trips, golden bytes and refusals of the message codec.

use super::*;

/// One frame off `buf`, through the one splitter.
fn decode_frame(buf: &mut BytesMut, max: u32) -> DecodeResult<Option<Message>> {
    let mut s = crate::frame::FrameSplitter::new(max);
    s.push(buf.split().freeze());
    s.next_frame()
}

pub(crate) fn samples() -> Vec<Message> {
    let h = BlockHash([0xab; 32]);
    vec![
        Message::Hello { min_version: 1, max_version: 1, capabilities: CAP_ZSTD | CAP_PAGES },
        Message::Welcome { version: 1, capabilities: 3, max_frame: MAX_FRAME },
        Message::Open(Open {
            session: SessionId(7),
            target: TargetName::new("vm1-disk0").unwrap(),
            disk_bytes: 1 << 32,
            block_size: BlockSize::DEFAULT,
            mode: SyncMode::Auto,
            force: true,
            discard_target_changes: false,
            lineage: vec![Generation(9), Generation(3)],
            promote: false,
            group: None,
        }),
        Message::Open(Open {
            session: SessionId(8),
            target: TargetName::new("vm1-disk1").unwrap(),
            disk_bytes: 1 << 20,
            block_size: BlockSize::DEFAULT,
            mode: SyncMode::Delta,
            force: false,
            discard_target_changes: true,
            lineage: Vec::new(),
            promote: false,
            group: Some(GroupTag { name: TargetName::new("app").unwrap(), push: 77, members: 3 }),
        }),
        Message::Accept(Accept { plan: Plan::CompareManifest, target_generation: None, staged_blocks: 3, window: 16 }),
        Message::Region { region: 2, hash: h },
        Message::NeedChunks { region: 2 },
        Message::Chunks { region: 2, hashes: vec![h, BlockHash::ZERO] },
        Message::NeedBlocks { region: 2, chunks: vec![0, 5] },
        Message::BlockHashes { region: 2, chunk: 5, hashes: vec![h] },
        Message::Want {
            region: 2,
            blocks: vec![WantBlock { index: 9, page_hashes: vec![1, 2] }, WantBlock { index: 10, page_hashes: vec![] }],
        },
        Message::RegionEnd { region: 3, hash: h, items: 12 },
        Message::RegionDone { region: 3, bytes_staged: 4096 },
        Message::Finish { consistency: Consistency::Crash },
        Message::Committed(Committed {
            generation: Generation(5),
            root: h,
            blocks_changed: 1,
            bytes_written: 4096,
            points_dropped: 2,
            unchanged: false,
            common_point: Some(Generation(4)),
            discarded_blocks: 17,
            discarded_point: Some(Generation(99)),
            target_bytes_read: 1 << 20,
            promoted: false,
        }),
        Message::Committed(Committed {
            generation: Generation(6),
            root: h,
            blocks_changed: 0,
            bytes_written: 0,
            points_dropped: 0,
            unchanged: true,
            common_point: None,
            discarded_blocks: 0,
            discarded_point: None,
            target_bytes_read: 0,
            promoted: false,
        }),
        Message::Error { code: ErrorCode::Diverged, message: "changed ünder us".into() },
        Message::Block(BlockFrame {
            index: 9,
            hash: h,
            block_len: 65536,
            codec: Codec::Raw,
            patches: vec![(0, 3), (4096, 2)],
            payload: Bytes::from_static(b"abcde").into(),
        }),
        Message::Zero { first: 1, count: 100 },
        Message::Nack { index: 4 },
    ]
}

#[test]
fn round_trip_every_message() {
    for m in samples() {
        let mut buf = BytesMut::from(&m.to_bytes()[..]);
        let back = decode_frame(&mut buf, MAX_FRAME).unwrap().unwrap();
        assert_eq!(back, m);
        assert!(buf.is_empty());
    }
}

#[test]
fn borrowed_block_encoding_matches() {
    for m in samples() {
        if let Message::Block(f) = &m {
            let b = encode_block(f.index, &f.hash, f.block_len, f.codec, &f.patches, &f.payload.to_bytes());
            assert_eq!(b, m.to_bytes());
            let head = encode_block_head(f.index, &f.hash, f.block_len, f.codec, &f.patches, f.payload.len());
            assert_eq!([&head[..], &f.payload.to_bytes()[..]].concat(), m.to_bytes());
        }
    }
}

#[test]
fn incomplete_is_not_an_error() {
    let bytes = samples()[2].to_bytes();
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode_frame(&mut buf, MAX_FRAME), Ok(None), "cut at {cut}");
    }
}

#[test]
fn golden_vectors() {
    // Frozen: a change here breaks compatibility with released agents.
    assert_eq!(Message::NeedChunks { region: 258 }.to_bytes().as_ref(), &[9, 0, 0, 0, 0x06, 2, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        Message::Hello { min_version: 1, max_version: 1, capabilities: 3 }.to_bytes().as_ref(),
        &[9, 0, 0, 0, 0x01, 1, 0, 1, 0, 3, 0, 0, 0]
    );
    assert_eq!(
        Message::Error { code: ErrorCode::Diverged, message: "x".into() }.to_bytes().as_ref(),
        &[6, 0, 0, 0, 0x0f, 20, 0, 1, 0, b'x']
    );
    assert_eq!(
        Message::Zero { first: 1, count: 2 }.to_bytes().as_ref(),
        &[17, 0, 0, 0, 0x11, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn bad_frames_are_errors() {
    let mut huge = BytesMut::from(&(MAX_FRAME + 1).to_le_bytes()[..]);
    assert!(matches!(decode_frame(&mut huge, MAX_FRAME), Err(DecodeError::TooLarge(_))));
    let mut unknown = BytesMut::from(&[1u8, 0, 0, 0, 0x77][..]);
    assert_eq!(decode_frame(&mut unknown, MAX_FRAME), Err(DecodeError::UnknownType(0x77)));
    let mut trailing = BytesMut::from(&[10u8, 0, 0, 0, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 9][..]);
    assert_eq!(decode_frame(&mut trailing, MAX_FRAME), Err(DecodeError::Trailing(1)));
    let mut path = BytesMut::new();
    Message::Open(Open {
        session: SessionId(1),
        target: TargetName::new("ok").unwrap(),
        disk_bytes: 1,
        block_size: BlockSize::DEFAULT,
        mode: SyncMode::Full,
        force: false,
        discard_target_changes: false,
        lineage: Vec::new(),
        promote: false,
        group: None,
    })
    .encode(&mut path);
    // Rewrite the name "ok" to "..": a path component never decodes.
    let at = 4 + 1 + 16 + 2;
    path[at] = b'.';
    path[at + 1] = b'.';
    assert_eq!(decode_frame(&mut path, MAX_FRAME), Err(DecodeError::Invalid("target name")));
    // Overlapping patches.
    let mut f = BytesMut::from(
        &Message::Block(BlockFrame {
            index: 0,
            hash: BlockHash::ZERO,
            block_len: 8192,
            codec: Codec::Raw,
            patches: vec![(0, 4096), (100, 1)],
            payload: vec![0u8; 4097].into(),
        })
        .to_bytes()[..],
    );
    assert_eq!(decode_frame(&mut f, MAX_FRAME), Err(DecodeError::Invalid("patch range")));
}
