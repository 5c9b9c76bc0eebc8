//! The engine's only `unsafe`: mapping a disk range read-only, and surviving
//! a source file that is truncated under the map.
//!
//! Reading a mapped page past the end of a truncated file raises SIGBUS,
//! which would kill the process. A `pread` path avoids that but costs about
//! a quarter more CPU per hashed byte here, so the maps stay and a SIGBUS
//! handler repairs such faults instead: if the faulting address lies in one
//! of our live maps, it maps a zero page over the faulting page and marks
//! the map; the read then continues with zeros, and the caller, which
//! checks the mark (and the file's size) after each batch, reports
//! `E_SOURCE_CHANGED` instead of using those bytes. Faults elsewhere go to
//! the handler that was installed before (Rust's stack-overflow handler, or
//! the default action). No crate does this: memmap2 leaves SIGBUS to the
//! caller.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use memmap2::{Mmap, MmapOptions};

/// Live maps at once: hashing batches plus maps still shared by frames in flight.
const SLOTS: usize = 1024;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), faulted: AtomicBool::new(false) };
static MAPS: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The SIGBUS action found before ours, and the page size.
static INSTALLED: OnceLock<Option<(libc::sigaction, usize)>> = OnceLock::new();

/// A read-only map of part of a file, registered with the SIGBUS handler
/// for as long as it lives.
pub(crate) struct GuardedMap {
    map: Mmap,
    slot: usize,
}

impl GuardedMap {
    /// Whether a page of this map vanished under it (the file was truncated):
    /// bytes read from it since are zeros, not the file's.
    #[cfg(test)]
    pub(crate) fn faulted(&self) -> bool {
        MAPS[self.slot].faulted.load(Ordering::Acquire)
    }

    /// A probe of whether a page of this map vanished under it, that
    /// outlives a move of the map into a shared owner.
    pub(crate) fn fault_flag(&self) -> FaultFlag {
        FaultFlag(self.slot)
    }
}

/// Reads a live map's fault mark (valid while the map lives).
#[derive(Clone, Copy)]
pub(crate) struct FaultFlag(usize);

impl FaultFlag {
    pub(crate) fn faulted(self) -> bool {
        MAPS[self.0].faulted.load(Ordering::Acquire)
    }
}

impl AsRef<[u8]> for GuardedMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // Unregistered before `map` is unmapped (fields drop after this).
        let s = &MAPS[self.slot];
        s.end.store(0, Ordering::Release);
        s.faulted.store(false, Ordering::Release);
        s.start.store(0, Ordering::Release);
    }
}

/// Maps `len` bytes of `file` from `offset`, read-only. Pages are not
/// populated up front: faults with the kernel's fault-around measured cheaper
/// than MAP_POPULATE for hashing a mapping once. Fails (and the caller reads
/// with `pread`) when the handler cannot be installed or every slot is taken.
pub(crate) fn map_range(file: &File, offset: u64, len: usize) -> io::Result<GuardedMap> {
    if INSTALLED.get_or_init(install).is_none() {
        return Err(io::Error::other("no SIGBUS handler"));
    }
    // SAFETY: the map is read-only and only ever read. It lives as long as
    // the hashing task, or as long as a sender still holds its bytes (shared
    // `Bytes` own it), never longer. Another process may still modify the
    // file while it is mapped: we then hash whichever bytes we see, which the
    // source stamp check turns into a `fuzzy` generation and the per-block
    // re-verification at staging catches. A truncation under the map is
    // repaired by the SIGBUS handler below and reported by the caller.
    let map = unsafe { MmapOptions::new().offset(offset).len(len).map(file)? };
    let start = map.as_ptr() as usize;
    for (slot, s) in MAPS.iter().enumerate() {
        if s.start.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            s.faulted.store(false, Ordering::Release);
            s.end.store(start + len, Ordering::Release);
            return Ok(GuardedMap { map, slot });
        }
    }
    Err(io::Error::other("too many live maps"))
}

fn install() -> Option<(libc::sigaction, usize)> {
    // SAFETY: sysconf and sigaction are called with valid arguments; the
    // handler only does async-signal-safe work (atomics and mmap).
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page <= 0 {
            return None;
        }
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigbus as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
            return None;
        }
        Some((old, page as usize))
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    // The zero page replaces exactly one page inside a live read-only map of
    // ours (the slot is cleared before the map is unmapped), so no other
    // memory changes. errno is saved and restored around the mmap.
    unsafe {
        let Some(Some((old, page))) = INSTALLED.get() else { return };
        let addr = (*info).si_addr() as usize;
        for s in &MAPS {
            let (start, end) = (s.start.load(Ordering::Acquire), s.end.load(Ordering::Acquire));
            if start <= addr && addr < end {
                let errno = *libc::__errno_location();
                let at = (addr & !(page - 1)) as *mut libc::c_void;
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
                let r = libc::mmap(at, *page, libc::PROT_READ, flags, -1, 0);
                *libc::__errno_location() = errno;
                if r != libc::MAP_FAILED {
                    s.faulted.store(true, Ordering::Release);
                    return;
                }
            }
        }
        // Not ours: what would have happened without this handler.
        if old.sa_flags & libc::SA_SIGINFO != 0 && old.sa_sigaction > libc::SIG_IGN {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(old.sa_sigaction);
            f(sig, info, ctx);
        } else if old.sa_sigaction > libc::SIG_IGN {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
            f(sig);
        } else {
            // Default action: restore it; the fault repeats and ends the process.
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_truncated_under_a_map_reads_zeros_and_is_marked() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0xabu8; 1 << 20]).unwrap();
        let map = map_range(&f, 0, 1 << 20).unwrap();
        assert_eq!(map.as_ref()[4096], 0xab);
        assert!(!map.faulted());
        f.set_len(8192).unwrap();
        // Without the handler this read would end the process with SIGBUS.
        let tail = map.as_ref()[(1 << 20) - 1];
        assert_eq!(tail, 0);
        assert!(map.faulted());
        assert_eq!(map.as_ref()[100], 0xab, "pages still in the file keep their bytes");
        drop(map);
        let again = map_range(&f, 0, 8192).unwrap();
        assert!(!again.faulted(), "a new map starts unmarked");
    }
}
