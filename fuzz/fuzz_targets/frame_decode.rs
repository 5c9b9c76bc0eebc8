//! Arbitrary bytes into the frame decoder: it may refuse them, never panic,
//! and whatever it accepts must re-encode to the same frame.
#![no_main]

use bytes::BytesMut;
use diskferry_protocol::{decode_frame, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(m)) = decode_frame(&mut buf, MAX_FRAME) {
        let again = m.to_bytes();
        let mut b = BytesMut::from(&again[..]);
        assert_eq!(decode_frame(&mut b, MAX_FRAME).ok().flatten(), Some(m));
    }
});
