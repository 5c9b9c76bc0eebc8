//! Reading an image at rest straight from the files QEMU maps it to.
//!
//! Through `qemu-nbd` every byte is copied three times before it reaches
//! us (page cache → qemu-nbd's buffer → socket → our buffer), which held
//! hashing a qcow2 to a fifth of `qemu-img convert`'s speed on two cores.
//! Where QEMU maps a guest range 1:1 onto a file (plain data clusters: not
//! compressed, not encrypted — in the image, its backing files or an
//! external data file), a `pread` of that file gives the same bytes with one
//! copy. `qemu-img map` says where, and only for such ranges.
//!
//! This holds only while nothing rewrites the image: the map is taken after
//! diskferry's own `qemu-nbd` or `qemu-storage-daemon` has locked it (QEMU
//! then refuses every writer), and a sample of it is compared with NBD
//! reads before it is used; one difference and the whole image is read
//! through NBD.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::Rng;

use super::client::NbdClient;
use super::qemu_nbd::Format;

/// Beyond this many mapped ranges (a badly fragmented image), the map's
/// memory is not worth it: NBD serves the image.
const MAX_EXTENTS: usize = 1 << 20;
/// Files a map may point into (an image, its backing chain, a data file).
const MAX_FILES: usize = 16;
/// Random ranges compared with NBD before the map is trusted (plus one per
/// file, and both ends of half as many mapped ranges).
const SAMPLES: usize = 16;
const SAMPLE_BYTES: u64 = 4096;
/// Beyond this much output from `qemu-img map`, the map is not used (its
/// lines would cost more memory than the ranges are worth).
const MAX_MAP_OUTPUT: u64 = 64 << 20;
/// A read whose range crosses more unmapped gaps than this goes through NBD
/// whole: each gap would be a round trip of its own.
const MAX_GAPS: usize = 4;

/// A guest range stored as is at `host` in file `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    start: u64,
    len: u64,
    file: usize,
    host: u64,
}

/// Where an image's plain data lives, and the files that hold it.
#[derive(Debug)]
pub struct DirectMap {
    extents: Vec<Extent>,
    files: Vec<File>,
}

/// Whether `DISKFERRY_NBD_DIRECT=0` turned direct reads off (to measure or
/// rule out this path).
fn disabled() -> bool {
    std::env::var("DISKFERRY_NBD_DIRECT").is_ok_and(|v| v == "0")
}

impl DirectMap {
    /// The map of `image`, served by diskferry's own QEMU through
    /// `client`, or why it is not used (NBD then reads everything).
    pub fn load(image: &Path, format: Format, client: &NbdClient) -> Result<DirectMap, String> {
        if disabled() {
            return Err("DISKFERRY_NBD_DIRECT=0".into());
        }
        let size = client.export().size;
        let (extents, names) = match qemu_img(&["map"], image, format) {
            Ok(text) => parse(&text, size)?,
            // The human form gives up on an image with any compressed
            // cluster; the JSON form lists the image's own plain ones too.
            Err(why) if format == Format::Qcow2 => parse_own_json(image, size).map_err(|e| format!("{why}; {e}"))?,
            Err(why) => return Err(why),
        };
        let mut files = Vec::new();
        let mut lens = Vec::new();
        for name in &names {
            let mut f = File::open(name).map_err(|e| format!("{}: {e}", name.display()))?;
            // A file's end, block devices included: QEMU reads past it as
            // zeros, a pread would fail; such a range is left to NBD.
            lens.push(f.seek(SeekFrom::End(0)).map_err(|e| format!("{}: {e}", name.display()))?);
            files.push(f);
        }
        let extents =
            extents.into_iter().filter(|e| e.host.checked_add(e.len).is_some_and(|end| end <= lens[e.file])).collect();
        let map = DirectMap { extents, files };
        map.confirm(client)?;
        Ok(map)
    }

    /// Bytes the map serves from files.
    pub fn mapped_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Reads `buf.len()` bytes at `off`: mapped parts from their files, the
    /// rest (holes, compressed or encrypted clusters) through `nbd`.
    pub fn read_at(
        &self,
        off: u64,
        buf: &mut [u8],
        mut nbd: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        let mut i = self.extents.partition_point(|e| e.start + e.len <= pos);
        if self.gaps(i, off, end) > MAX_GAPS {
            return nbd(off, buf);
        }
        while pos < end {
            let at = (pos - off) as usize;
            match self.extents.get(i) {
                Some(e) if e.start <= pos => {
                    let upto = end.min(e.start + e.len);
                    let part = &mut buf[at..(upto - off) as usize];
                    self.files[e.file].read_exact_at(part, e.host + (pos - e.start)).map_err(|err| {
                        io::Error::new(err.kind(), format!("reading the image's data at {pos}: {err}"))
                    })?;
                    pos = upto;
                    i += 1;
                }
                next => {
                    let upto = next.map_or(end, |e| end.min(e.start));
                    nbd(pos, &mut buf[at..(upto - off) as usize])?;
                    pos = upto;
                }
            }
        }
        Ok(())
    }

    /// Asks the files to read the mapped parts of `[off, off+len)` ahead
    /// (a hint's scattered dirty runs on a cold image).
    pub fn will_need(&self, off: u64, len: u64) {
        let end = off.saturating_add(len);
        let i = self.extents.partition_point(|e| e.start + e.len <= off);
        for e in self.extents[i..].iter().take_while(|e| e.start < end) {
            let (from, to) = (off.max(e.start), end.min(e.start + e.len));
            if let Some(n) = std::num::NonZeroU64::new(to - from) {
                let _ = rustix::fs::fadvise(
                    &self.files[e.file],
                    e.host + (from - e.start),
                    Some(n),
                    rustix::fs::Advice::WillNeed,
                );
            }
        }
    }

    /// Unmapped stretches of `[off, end)`, whose first overlapping extent
    /// is at index `i` (counted up to one past [`MAX_GAPS`]).
    fn gaps(&self, i: usize, off: u64, end: u64) -> usize {
        let mut gaps = 0;
        let mut pos = off;
        for e in self.extents[i..].iter().take_while(|e| e.start < end) {
            if e.start > pos {
                gaps += 1;
                if gaps > MAX_GAPS {
                    break;
                }
            }
            pos = e.start + e.len;
        }
        gaps + usize::from(pos < end)
    }

    /// Compares random samples of the map (and at least one per file) with
    /// what NBD serves there.
    fn confirm(&self, client: &NbdClient) -> Result<(), String> {
        let mut rng = rand::rng();
        let mut picks = Vec::new();
        for file in 0..self.files.len() {
            let mine: Vec<&Extent> = self.extents.iter().filter(|e| e.file == file).collect();
            picks.extend(pick(&mine, 1, &mut rng));
        }
        let all: Vec<&Extent> = self.extents.iter().collect();
        picks.extend(pick(&all, SAMPLES, &mut rng));
        // A map off by some offset still matches inside a run of equal
        // bytes; at the ends of its ranges it reads what lies beyond.
        for _ in 0..SAMPLES / 2 {
            let Some(e) = all.get(rng.random_range(0..all.len().max(1))) else { break };
            let n = e.len.min(SAMPLE_BYTES);
            picks.push((e.start, n as usize));
            picks.push((e.start + e.len - n, n as usize));
        }
        for (at, len) in picks {
            let mut direct = vec![0u8; len];
            let mut served = vec![0u8; len];
            self.read_at(at, &mut direct, |_, _| Err(io::Error::other("a sample left the map")))
                .map_err(|e| e.to_string())?;
            client.read_at(at, &mut served).map_err(|e| e.to_string())?;
            if direct != served {
                // Not a normal turn down (as a compressed image is): the
                // map or the image is not what it seemed.
                let why = format!("qemu-img map's bytes at {at} differ from what NBD serves");
                tracing::warn!(%why, "reading the whole image through NBD");
                return Err(why);
            }
        }
        Ok(())
    }
}

/// What `qemu-img ARGS --format=F IMAGE` prints (at most
/// [`MAX_MAP_OUTPUT`] bytes), or why it failed.
fn qemu_img(args: &[&str], image: &Path, format: Format) -> Result<String, String> {
    let format = format!("--format={}", format.qemu_name());
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    // Shared: the server diskferry runs holds the image's lock (the
    // storage daemon a write lock, which keeps every other writer out).
    all.extend([OsStr::new("--force-share"), OsStr::new(&format), image.as_os_str()]);
    super::qemu_img::run(&all, MAX_MAP_OUTPUT).map_err(|e| e.to_string())
}

/// The plain clusters a qcow2 holds in its own file (depth 0), from
/// `qemu-img map --output=json`, which does not name files: only when the
/// image keeps no data in an external data file.
fn parse_own_json(image: &Path, size: u64) -> Result<(Vec<Extent>, Vec<PathBuf>), String> {
    let info = qemu_img(&["info", "--output=json"], image, Format::Qcow2)?;
    let info: serde_json::Value = serde_json::from_str(&info).map_err(|e| format!("qemu-img info: {e}"))?;
    if !info["format-specific"]["data"]["data-file"].is_null() {
        return Err("its data lies in an external data file".into());
    }
    let map = qemu_img(&["map", "--output=json"], image, Format::Qcow2)?;
    let mut extents = Vec::new();
    // One entry per line (`[{…},` … `{…}]`): parsed one at a time.
    for line in map.lines() {
        let entry = line.trim().trim_start_matches('[').trim_end_matches(',').trim_end_matches(']');
        if entry.is_empty() {
            continue;
        }
        let e: serde_json::Value = serde_json::from_str(entry).map_err(|e| format!("qemu-img map: {e}"))?;
        let own = e["depth"].as_u64() == Some(0) && e["data"] == true && e["zero"] == false;
        if let (true, Some(start), Some(len), Some(host)) =
            (own, e["start"].as_u64(), e["length"].as_u64(), e["offset"].as_u64())
        {
            extents.push(Extent { start, len, file: 0, host });
        }
    }
    Ok((checked(extents, size)?, vec![image.to_path_buf()]))
}

/// `n` random ranges of up to [`SAMPLE_BYTES`] in `extents`, weighted by length.
fn pick(extents: &[&Extent], n: usize, rng: &mut impl Rng) -> Vec<(u64, usize)> {
    let total: u64 = extents.iter().map(|e| e.len).sum();
    if total == 0 {
        return Vec::new();
    }
    (0..n)
        .map(|_| {
            let mut at = rng.random_range(0..total);
            let e = extents
                .iter()
                .find(|e| {
                    let inside = at < e.len;
                    if !inside {
                        at -= e.len;
                    }
                    inside
                })
                .expect("at < total lies in some extent");
            let start = e.start + at.min(e.len.saturating_sub(SAMPLE_BYTES));
            (start, (e.start + e.len - start).min(SAMPLE_BYTES) as usize)
        })
        .collect()
}

/// A number as `qemu-img map` prints it: `0x…` hex or plain decimal.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Splits off the first whitespace-separated word.
fn word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let cut = s.find(char::is_whitespace)?;
    Some((&s[..cut], &s[cut..]))
}

/// `qemu-img map`'s human output (`Offset Length Mapped-to File` per line,
/// only for ranges stored as is; its JSON form leaves the file out, which
/// an external data file makes essential): the extents, sorted and checked
/// to lie inside a disk of `size` bytes without overlapping, and the files
/// they name.
fn parse(text: &str, size: u64) -> Result<(Vec<Extent>, Vec<PathBuf>), String> {
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.starts_with("Offset") => {}
        _ => return Err("qemu-img map printed no header".into()),
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    let mut extents = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let bad = || format!("qemu-img map: cannot read {line:?}");
        let (start, rest) = word(line).ok_or_else(bad)?;
        let (len, rest) = word(rest).ok_or_else(bad)?;
        let (host, rest) = word(rest).ok_or_else(bad)?;
        let name = rest.trim_start();
        let (Some(start), Some(len), Some(host)) = (number(start), number(len), number(host)) else {
            return Err(bad());
        };
        if name.is_empty() {
            return Err(bad());
        }
        let next = names.len();
        let file = *names.entry(name.to_string()).or_insert(next);
        if file == next {
            if next == MAX_FILES {
                return Err(format!("data in more than {MAX_FILES} files"));
            }
            order.push(PathBuf::from(name));
        }
        extents.push(Extent { start, len, file, host });
    }
    Ok((checked(extents, size)?, order))
}

/// `extents` sorted, checked to lie inside a disk of `size` bytes and in
/// their files' address space without overlapping, empty ones left out.
fn checked(mut extents: Vec<Extent>, size: u64) -> Result<Vec<Extent>, String> {
    extents.retain(|e| e.len > 0);
    if extents.len() > MAX_EXTENTS {
        return Err(format!("more than {MAX_EXTENTS} mapped ranges"));
    }
    if let Some(e) = extents
        .iter()
        .find(|e| e.start.checked_add(e.len).is_none_or(|end| end > size) || e.host.checked_add(e.len).is_none())
    {
        return Err(format!("qemu-img map: {} bytes at {} do not fit the disk", e.len, e.start));
    }
    extents.sort_by_key(|e| e.start);
    if extents.windows(2).any(|w| w[0].start + w[0].len > w[1].start) {
        return Err("qemu-img map printed overlapping ranges".into());
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "Offset          Length          Mapped to       File
0               0x10000         0x50000         top.qcow2
0x400000        0x100000        0x400000        base image.raw
0x10000         0x1000          0x60000         top.qcow2
";

    #[test]
    fn the_human_map_is_read_with_its_files() {
        let (extents, files) = parse(MAP, 16 << 20).unwrap();
        assert_eq!(files, [PathBuf::from("top.qcow2"), PathBuf::from("base image.raw")]);
        assert_eq!(
            extents,
            [
                Extent { start: 0, len: 0x10000, file: 0, host: 0x50000 },
                Extent { start: 0x10000, len: 0x1000, file: 0, host: 0x60000 },
                Extent { start: 0x400000, len: 0x100000, file: 1, host: 0x400000 },
            ]
        );
    }

    #[test]
    fn a_map_that_does_not_fit_the_disk_is_refused() {
        assert!(parse(MAP, 4 << 20).is_err(), "past the end");
        assert!(parse("", 1 << 30).is_err(), "no header");
        assert!(parse("Offset Length\n0 0x10 zz f\n", 1 << 30).is_err(), "not a number");
        assert!(parse("Offset Length\n0 0x10 0x0\n", 1 << 30).is_err(), "no file");
        assert!(parse("Offset\n0 0x2000 0 a\n0x1000 0x1000 0 a\n", 1 << 30).is_err(), "overlap");
        assert!(parse("Offset\n0xffffffffffffffff 0x10 0 a\n", u64::MAX).is_err(), "overflow");
        assert_eq!(parse("Offset Length Mapped to File\n", 1 << 30).unwrap().0, []);
    }

    #[test]
    fn reads_take_mapped_parts_from_files_and_the_rest_from_nbd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let map = DirectMap {
            extents: vec![
                Extent { start: 100, len: 50, file: 0, host: 1000 },
                Extent { start: 150, len: 10, file: 0, host: 10 },
                Extent { start: 300, len: 20, file: 0, host: 4000 },
            ],
            files: vec![File::open(&path).unwrap()],
        };
        let mut buf = vec![0u8; 400];
        let mut served = Vec::new();
        map.read_at(0, &mut buf, |at, b| {
            served.push((at, b.len()));
            b.fill(0xee);
            Ok(())
        })
        .unwrap();
        assert_eq!(served, [(0, 100), (160, 140), (320, 80)]);
        assert_eq!(&buf[100..150], &content[1000..1050]);
        assert_eq!(&buf[150..160], &content[10..20]);
        assert_eq!(&buf[300..320], &content[4000..4020]);
        assert!(buf[..100].iter().chain(&buf[160..300]).chain(&buf[320..]).all(|&b| b == 0xee));
        // Starting inside an extent, ending inside another.
        let mut part = vec![0u8; 170];
        map.read_at(140, &mut part, |_, b| {
            b.fill(1);
            Ok(())
        })
        .unwrap();
        assert_eq!(&part[..10], &content[1040..1050]);
        assert_eq!(&part[160..], &content[4000..4010]);
        // A range broken by more gaps than MAX_GAPS goes through NBD whole.
        let comb = DirectMap {
            extents: (0..6).map(|k| Extent { start: k * 20, len: 10, file: 0, host: k * 10 }).collect(),
            files: vec![File::open(&path).unwrap()],
        };
        let mut served = Vec::new();
        comb.read_at(0, &mut [0u8; 120], |at, b| {
            served.push((at, b.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(served, [(0, 120)]);
        let mut few = vec![0u8; 40];
        comb.read_at(0, &mut few, |_, b| {
            b.fill(0xee);
            Ok(())
        })
        .unwrap();
        assert_eq!(&few[..10], &content[..10]);
        assert_eq!(&few[20..30], &content[10..20]);
        // A file shorter than its map: an error, never short data.
        let short = DirectMap { extents: vec![Extent { start: 0, len: 100, file: 0, host: 8150 }], ..map };
        assert!(short.read_at(0, &mut [0u8; 100], |_, _| Ok(())).is_err());
    }
}
