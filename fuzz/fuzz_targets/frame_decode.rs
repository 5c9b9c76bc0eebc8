//! Arbitrary bytes, cut into arbitrary chunks, through the frame splitter
//! the agent reads every stream with: it may refuse them, never panic,
//! never ask for bytes past the frame at hand, and whatever it accepts must
//! re-encode to the same frame.
#![no_main]

use bytes::Bytes;
use diskferry_protocol::{FrameSplitter, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, as the network would.
    let Some((&step, rest)) = data.split_first() else { return };
    let step = step as usize % 64 + 1;
    let mut s = FrameSplitter::new(MAX_FRAME);
    for chunk in rest.chunks(step) {
        let wanted = match s.wanted() {
            Ok(w) => w,
            Err(_) => return,
        };
        assert!(wanted > 0 || s.buffered() >= 4, "a whole frame is buffered only once its prefix is");
        s.push(Bytes::copy_from_slice(chunk));
        loop {
            match s.next_frame() {
                Ok(Some(m)) => {
                    let again = m.to_bytes();
                    let mut t = FrameSplitter::new(MAX_FRAME);
                    t.push(again);
                    assert_eq!(t.next_frame().ok().flatten(), Some(m));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
