//! Progress callbacks from the engine's long operations (hash, sync,
//! verify), for a bar or a log.

/// Progress callbacks (called from the syncing thread).
pub trait Progress: Sync {
    /// A phase starts, covering `total` bytes.
    fn phase(&self, name: &'static str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &'static str, _: u64) {}
    fn advance(&self, _: u64) {}
}
