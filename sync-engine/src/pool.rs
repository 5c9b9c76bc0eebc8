//! The hashing thread pool: the engine is parallel inside (rayon), and its
//! callers choose how many threads it may use.

use std::io;

/// A rayon pool with `threads` workers (all cores when `None`); engine calls
/// made inside its `install` hash on it.
pub fn thread_pool(threads: Option<usize>) -> io::Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("df-hash-{i}"));
    if let Some(n) = threads {
        b = b.num_threads(n.max(1));
    }
    b.build().map_err(io::Error::other)
}
