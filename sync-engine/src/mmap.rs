//! The engine's only `unsafe`: mapping a disk range read-only.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions};

/// Maps `len` bytes of `file` from `offset`, read-only. Pages are not
/// populated up front: faults with the kernel's fault-around measured cheaper
/// than MAP_POPULATE for hashing a mapping once.
pub(crate) fn map_range(file: &File, offset: u64, len: usize) -> io::Result<Mmap> {
    // SAFETY: the map is read-only and only ever read. It lives as long as
    // the hashing task, or as long as a sender still holds its bytes (shared
    // `Bytes` own it), never longer. Another process may still modify the
    // file while it is mapped: we then hash whichever bytes we see, which the
    // source stamp check turns into a `fuzzy` generation and the per-block
    // re-verification at staging catches. Truncating a source file while it
    // is read would raise SIGBUS; disk images are not truncated in use, and
    // block devices cannot be.
    unsafe { MmapOptions::new().offset(offset).len(len).map(file) }
}
