//! A hostile NBD server: arbitrary bytes, in arbitrary chunks, through the
//! handshake and the reply decoder. Either may refuse them; neither may
//! panic, and a refused handshake never reports an export.
#![no_main]

use diskferry_protocol::nbd::{Handshake, ReplyDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else { return };
    let step = step as usize % 64 + 1;
    // The handshake first: the same bytes as a whole session would send.
    let mut h = Handshake::new("disk", &["base:allocation", "qemu:dirty-bitmap:b"]);
    let mut failed = false;
    for chunk in rest.chunks(step) {
        if h.feed(chunk).is_err() {
            failed = true;
            break;
        }
        while h.poll_transmit().is_some() {}
    }
    if failed {
        assert!(h.finish().is_none());
    }
    // Then the same bytes as transmission-phase replies.
    let mut d = ReplyDecoder::new(&[]);
    for chunk in rest.chunks(step) {
        d.feed(chunk);
        loop {
            match d.next_reply() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
