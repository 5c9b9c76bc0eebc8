//! `diskferry`: the binary is glue over the agent, protocol and sync-engine crates.
#![deny(unsafe_code)]

fn main() {
    keep_freed_memory();
    diskferry_agent::output::exit(diskferry_agent::run());
}

/// glibc hands freed memory back to the kernel as soon as a heap's top
/// grows past 128 KiB, and QUIC allocates a fresh ~64 KiB buffer for every
/// datagram it receives: a copy then faults its pages in again, packet
/// after packet (on a VM that returns freed pages to its host, that costs
/// more than the copy). The agent's memory is bounded by its budget, so
/// freed memory is kept for reuse instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters, and runs before any
    // other thread exists; a value it refuses leaves the default.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
