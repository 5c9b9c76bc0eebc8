//! Shared helpers for diskferry's criterion benches (`benches/benches/*.rs`;
//! what each measures is in `benches/README.md`): seeded data, disk images in
//! a temporary directory, an in-memory [`Storage`], page-level changes.
//!
//! ```
//! let a = diskferry_benches::random_bytes(7, 4096);
//! assert_eq!(a, diskferry_benches::random_bytes(7, 4096));
//! assert!(diskferry_sync_engine::compress::compress(&diskferry_benches::text_bytes(65536), 1).is_some());
//! ```
#![warn(missing_docs)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_sync_engine::store::{DiskKind, Storage};
use diskferry_sync_engine::Disk;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// One KiB.
pub const KIB: usize = 1 << 10;
/// One MiB.
pub const MIB: usize = 1 << 20;
/// The unit of a page-level change.
pub const PAGE: usize = 4 * KIB;

/// The settings every bench uses: short runs, no plots, so the whole set
/// finishes in about a minute and a half on two cores.
pub fn quick() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .sample_size(30)
        .nresamples(10_000)
        .without_plots()
}

/// A seeded generator, so every run benches the same bytes.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `len` incompressible bytes, the same for the same seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng(seed).fill_bytes(&mut v);
    v
}

/// `len` bytes of log-like text: zstd at level 1 shrinks it several times.
pub fn text_bytes(len: usize) -> Vec<u8> {
    let mut r = rng(99);
    let mut v = Vec::with_capacity(len + 128);
    let words = ["disk", "block", "sync", "ferry", "region", "commit", "write", "page", "hash", "target"];
    let mut n = 0u64;
    while v.len() < len {
        n += 1;
        let _ = write!(v, "2026-01-01T00:{:02}:{:02} host{} ", n % 60, r.random_range(0..60), r.random_range(0..8));
        for _ in 0..r.random_range(3..9) {
            v.extend_from_slice(words[r.random_range(0..words.len())].as_bytes());
            v.push(b' ');
        }
        let _ = writeln!(v, "id={}", r.random_range(0..100_000));
    }
    v.truncate(len);
    v
}

/// A disk image in its own temporary directory (removed on drop), with room
/// beside it for more images and a state directory.
pub struct TempImage {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl TempImage {
    /// Writes `bytes` to `disk.img` in a new temporary directory.
    pub fn with_bytes(bytes: &[u8]) -> io::Result<TempImage> {
        let dir = tempfile::Builder::new().prefix("diskferry-bench-").tempdir()?;
        let path = dir.path().join("disk.img");
        let mut f = File::create(&path)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(TempImage { dir, path })
    }

    /// `len` random bytes (seeded) written to a new temporary image.
    pub fn random(seed: u64, len: usize) -> io::Result<TempImage> {
        Self::with_bytes(&random_bytes(seed, len))
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A read-only disk held in memory: hashing through it measures the hashing
/// and the copy into the scratch buffer, without page faults of a map.
#[derive(Debug)]
pub struct MemStorage(pub Vec<u8>);

impl Storage for MemStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(off).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(read_only())
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn zero_range(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn reserve(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "MemStorage is read-only")
}

/// A [`Disk`] over bytes in memory (read with copies, no map).
pub fn mem_disk(bytes: Vec<u8>) -> Disk {
    let len = bytes.len() as u64;
    Disk::from_storage(Arc::new(MemStorage(bytes)), DiskKind::File, len)
}

/// Overwrites `count` distinct random 4 KiB pages of the file at `path`
/// (`len` bytes) with new random data; returns their offsets, sorted.
pub fn change_pages(path: &Path, len: u64, count: usize, r: &mut StdRng) -> io::Result<Vec<u64>> {
    let pages = len / PAGE as u64;
    let picked = rand::seq::index::sample(r, pages as usize, count.min(pages as usize));
    let mut offs: Vec<u64> = picked.into_iter().map(|p| p as u64 * PAGE as u64).collect();
    offs.sort_unstable();
    let f = OpenOptions::new().write(true).open(path)?;
    let mut page = vec![0u8; PAGE];
    for &off in &offs {
        r.fill_bytes(&mut page);
        f.write_all_at(&page, off)?;
    }
    Ok(offs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_and_refuses_past_end() {
        let s = MemStorage((0..=255u8).collect());
        let mut b = [0u8; 4];
        s.read_at(10, &mut b).unwrap();
        assert_eq!(b, [10, 11, 12, 13]);
        assert!(s.read_at(254, &mut b).is_err());
        assert!(s.write_at(0, &b).is_err());
    }

    #[test]
    fn change_pages_changes_distinct_pages() {
        let img = TempImage::random(1, 64 * PAGE).unwrap();
        let before = std::fs::read(img.path()).unwrap();
        let offs = change_pages(img.path(), before.len() as u64, 8, &mut rng(2)).unwrap();
        assert_eq!(offs.len(), 8);
        let after = std::fs::read(img.path()).unwrap();
        for p in 0..64 {
            let r = p * PAGE..(p + 1) * PAGE;
            assert_eq!(before[r.clone()] != after[r], offs.contains(&((p * PAGE) as u64)), "page {p}");
        }
    }
}
