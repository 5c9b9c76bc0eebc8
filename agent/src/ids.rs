//! The values the engine takes as arguments: fresh ids and the time.

use std::time::{SystemTime, UNIX_EPOCH};

use diskferry_protocol::{Generation, SessionId};

/// A fresh random generation id (never 0, which means "none" on disk).
pub fn new_generation() -> Generation {
    Generation(rand::random::<u128>() | 1)
}

/// A fresh random session id.
pub fn new_session() -> SessionId {
    SessionId(rand::random::<u128>() | 1)
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_unix_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}
