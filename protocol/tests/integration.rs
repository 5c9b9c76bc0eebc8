//! The protocol crate's integration tests, in one binary.

mod integration {
    mod codec;
    mod session;
}
