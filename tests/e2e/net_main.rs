#![allow(clippy::unwrap_used, clippy::expect_used)]
#[macro_use]
mod util;
mod net;
