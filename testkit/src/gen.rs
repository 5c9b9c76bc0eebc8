//! Seeded disk generators and helpers to put images on a [`Vfs`] or a real
//! (sparse) file.

use std::io;
use std::path::Path;

use diskferry_sync_engine::hash::is_zero;
use diskferry_sync_engine::store::{DiskKind, OpenHow, Vfs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Page size used to decide what is written and what is left as a hole.
const PAGE: usize = 4096;

/// Makes disk images and changes to them, all determined by a seed.
///
/// ```
/// use diskferry_testkit::DiskGen;
/// let a = DiskGen::new(7).disk(100_000);
/// assert_eq!(a, DiskGen::new(7).disk(100_000));
/// let b = DiskGen::new(8).evolve(&a);
/// assert_ne!(a, b);
/// ```
#[derive(Debug, Clone)]
pub struct DiskGen {
    rng: StdRng,
}

impl DiskGen {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> DiskGen {
        DiskGen { rng: StdRng::seed_from_u64(seed) }
    }

    /// The random source, for choices a test makes itself.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// A disk of `len` bytes made of runs of random data, zeros (holes once
    /// written with [`write_image`]), a repeated byte, and copies of earlier
    /// content (so a delta finds blocks it can copy locally). Runs start at
    /// unaligned offsets.
    pub fn disk(&mut self, len: u64) -> Vec<u8> {
        let len = len as usize;
        let mut v = vec![0u8; len];
        let mut pos = 0;
        while pos < len {
            let n = self.rng.random_range(1..=(len - pos).min(200_000));
            match self.rng.random_range(0..10) {
                0..=3 => self.rng.fill(&mut v[pos..pos + n]),
                4..=6 => {}
                7 => v[pos..pos + n].fill(self.rng.random_range(1..=255)),
                _ if pos > 0 => {
                    let from = self.rng.random_range(0..pos);
                    let n = n.min(pos - from);
                    v.copy_within(from..from + n, pos);
                    pos += n;
                    continue;
                }
                _ => self.rng.fill(&mut v[pos..pos + n]),
            }
            pos += n;
        }
        v
    }

    /// `count` writes of 1..=`max_len` bytes at random unaligned offsets
    /// inside `img`: random bytes, zeros, or a copy of another part of it.
    pub fn scribble(&mut self, img: &mut [u8], count: usize, max_len: usize) {
        if img.is_empty() {
            return;
        }
        for _ in 0..count {
            let off = self.rng.random_range(0..img.len());
            let n = self.rng.random_range(1..=max_len.max(1)).min(img.len() - off);
            match self.rng.random_range(0..6) {
                0 => img[off..off + n].fill(0),
                1 => {
                    let from = self.rng.random_range(0..=img.len() - n);
                    img.copy_within(from..from + n, off);
                }
                _ => self.rng.fill(&mut img[off..off + n]),
            }
        }
    }

    /// Zeros one random run of up to `max_len` bytes.
    pub fn zero_run(&mut self, img: &mut [u8], max_len: usize) {
        if img.is_empty() {
            return;
        }
        let off = self.rng.random_range(0..img.len());
        let n = self.rng.random_range(1..=max_len.max(1)).min(img.len() - off);
        img[off..off + n].fill(0);
    }

    /// Grows (with random data or zeros) or shrinks `img` by up to `max_delta` bytes.
    pub fn resize(&mut self, img: &mut Vec<u8>, max_delta: usize) {
        let delta = self.rng.random_range(1..=max_delta.max(1));
        if self.rng.random_bool(0.5) || img.is_empty() {
            let old = img.len();
            img.resize(old + delta, 0);
            if self.rng.random_bool(0.7) {
                let from = old + self.rng.random_range(0..delta);
                self.rng.fill(&mut img[from..]);
            }
        } else {
            img.truncate(img.len().saturating_sub(delta));
        }
    }

    /// A later version of `img`: a few scribbles, sometimes a zeroed run,
    /// sometimes a size change.
    pub fn evolve(&mut self, img: &[u8]) -> Vec<u8> {
        let mut v = img.to_vec();
        let writes = self.rng.random_range(1..=12);
        self.scribble(&mut v, writes, 40_000);
        if self.rng.random_bool(0.3) {
            self.zero_run(&mut v, 300_000);
        }
        if self.rng.random_bool(0.3) {
            self.resize(&mut v, 300_000);
        }
        if v == img {
            // Always change something.
            v.push(1);
        }
        v
    }
}

/// The `(offset, len)` runs of 4 KiB pages of `bytes` that hold data.
fn data_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        if is_zero(page) {
            continue;
        }
        let off = i * PAGE;
        match runs.last_mut() {
            Some((o, l)) if *o + *l == off => *l += page.len(),
            _ => runs.push((off, page.len())),
        }
    }
    runs
}

/// Writes `bytes` as the whole content of `path` and syncs it: a file is
/// replaced and left sparse (zero pages are holes); a block device is
/// overwritten from offset 0.
pub fn write_image(vfs: &dyn Vfs, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let device = vfs.metadata(path)?.is_some_and(|m| m.kind == DiskKind::BlockDevice);
    if device {
        let dev = vfs.open(path, OpenHow::ReadWrite)?;
        dev.write_at(0, bytes)?;
        return dev.sync();
    }
    let f = vfs.open(path, OpenHow::Truncate)?;
    f.set_len(bytes.len() as u64)?;
    for (off, len) in data_runs(bytes) {
        f.write_at(off as u64, &bytes[off..off + len])?;
    }
    f.sync()
}

/// The whole content of `path`, or `None` if nothing is there.
pub fn read_image(vfs: &dyn Vfs, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let Some(meta) = vfs.metadata(path)? else { return Ok(None) };
    let f = vfs.open(path, OpenHow::Read)?;
    let mut buf = vec![0u8; meta.len as usize];
    f.read_at(0, &mut buf)?;
    Ok(Some(buf))
}

/// Writes `bytes` to a real file at `path` (created or truncated), leaving
/// zero pages as holes.
pub fn write_sparse_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(bytes.len() as u64)?;
    for (off, len) in data_runs(bytes) {
        f.write_all_at(&bytes[off..off + len], off as u64)?;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFs;

    #[test]
    fn images_are_sparse_and_round_trip() {
        let fs = MemFs::new();
        let mut g = DiskGen::new(1);
        let img = g.disk(1 << 20);
        assert!(img.iter().any(|&b| b != 0));
        assert!(img.chunks(PAGE).any(is_zero), "zero runs expected");
        write_image(&fs, Path::new("/a"), &img).unwrap();
        assert_eq!(read_image(&fs, Path::new("/a")).unwrap().unwrap(), img);
        let f = fs.open(Path::new("/a"), OpenHow::Read).unwrap();
        let data: u64 = f.data_ranges(0, 1 << 20).unwrap().iter().map(|r| r.1).sum();
        assert!(data < 1 << 20);
        assert_eq!(read_image(&fs, Path::new("/b")).unwrap(), None);
    }

    #[test]
    fn changes_are_deterministic() {
        let base = DiskGen::new(3).disk(500_000);
        let a = DiskGen::new(4).evolve(&base);
        assert_eq!(a, DiskGen::new(4).evolve(&base));
        let mut sizes = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let mut v = base.clone();
            DiskGen::new(seed).resize(&mut v, 1000);
            sizes.insert(v.len().cmp(&base.len()));
        }
        assert_eq!(sizes.len(), 2, "grows and shrinks");
    }
}
