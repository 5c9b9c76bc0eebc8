//! The protocol crate's integration tests, in one binary.
#![allow(clippy::unwrap_used)]

mod integration {
    mod codec;
    mod faults;
    mod session;
    mod toy;
    mod views;
    mod window;
}
