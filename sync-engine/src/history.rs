//! A disk's own history as a source: what it was last pushed as, the chain
//! of generations before, and the disk's stamp when that push read it at
//! rest. Kept in the agent's one state directory, keyed by the disk's
//! canonical path (the disk named on the command line, not a snapshot of
//! it), so a disk that was a source yesterday and is a target today still
//! knows it (`docs/design.md` §3.6, §6.4):
//!
//! ```text
//! STATE/history/<target key of the disk path>/
//!   history        "DFHIST01" · u32 version 1 · u8 at-rest stamp kind · [3] 0 · [48] stamp ·
//!                  u16 len · disk path · u32 n · n × (u128 generation · [32] root), newest first ·
//!                  [32] blake3 of everything before
//!   <gen>.dfm      manifest of the newest generation
//!   sending-<pid>-<n>.tmp  manifest of a push under way (pushes of one disk to several targets may overlap)
//!   lock           held while a push records its generation
//! ```
//!
//! It decides what may overwrite the disk later (split brain), so it is
//! written durably: manifest synced and renamed, the history file replaced
//! atomically. It is dropped when the disk receives a commit: its bytes are
//! then a target's generation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Generation, Geometry, RegionHashes};

use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::{Manifest, ManifestMeta, ManifestWriter};
use crate::seqio::Fields;
use crate::store::{decode_stamp, encode_stamp, put_str, state_key, OpenHow, Stamp, Vfs};

const MAGIC: &[u8; 8] = b"DFHIST01";
const VERSION: u32 = 1;
const FILE: &str = "history";
const FILE_TMP: &str = "history.tmp";
const LOCK: &str = "lock";
/// Generations of the chain kept (and offered to a peer as lineage).
pub const MAX_CHAIN: usize = 256;

/// A disk's history as a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The disk's canonical path.
    pub path: PathBuf,
    /// The disk's stamp when the push of the newest generation read it,
    /// unchanged from start to end; `None` if it was written meanwhile or
    /// read from a snapshot.
    pub at_rest: Option<Stamp>,
    /// Generations and roots, newest first.
    pub chain: Vec<(Generation, BlockHash)>,
}

/// The history directory of `disk` under `state_root`.
pub fn history_dir(state_root: &Path, disk: &Path) -> PathBuf {
    state_root.join("history").join(state_key(disk))
}

impl History {
    /// The history of `disk`, if it has one. A damaged one is an error: it
    /// may be all that stops a push from overwriting the disk's own writes.
    pub fn load(vfs: &dyn Vfs, state_root: &Path, disk: &Path) -> Result<Option<History>> {
        let file = history_dir(state_root, disk).join(FILE);
        let Some(h) = read_file(vfs, &file)? else { return Ok(None) };
        if h.path != disk {
            return Err(Error::corrupt(&file, format!("it belongs to {}", h.path.display())));
        }
        Ok(Some(h))
    }

    /// The newest generation.
    pub fn last(&self) -> Option<Generation> {
        self.chain.first().map(|c| c.0)
    }

    /// The generation ids, newest first.
    pub fn lineage(&self) -> Vec<Generation> {
        self.chain.iter().map(|c| c.0).collect()
    }

    /// The manifest of the newest generation, checked against the chain.
    pub fn manifest(&self, vfs: Arc<dyn Vfs>, state_root: &Path) -> Result<Manifest> {
        let Some((g, root)) = self.chain.first().copied() else {
            return Err(Error::corrupt(&history_dir(state_root, &self.path), "an empty history"));
        };
        let path = history_dir(state_root, &self.path).join(format!("{g}.dfm"));
        let m = Manifest::open(vfs.as_ref(), &path)?;
        if m.header().generation != g || m.header().root != root {
            return Err(Error::corrupt(&path, "it is not the manifest its history names"));
        }
        Ok(m)
    }
}

/// A push's record in progress: the manifest of what is sent.
#[derive(Debug)]
pub struct HistoryWriter {
    dir: PathBuf,
    path: PathBuf,
    sending: PathBuf,
    lineage: Vec<Generation>,
    manifest: Option<ManifestWriter>,
    /// Removes `sending` if the push never commits.
    vfs: Arc<dyn Vfs>,
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        if !self.sending.as_os_str().is_empty() {
            let _ = self.vfs.remove_file(&self.sending);
        }
    }
}

impl HistoryWriter {
    /// Starts the record of a push of `disk` (geometry `g`) that continues `lineage`.
    pub fn create(
        vfs: Arc<dyn Vfs>,
        state_root: &Path,
        disk: &Path,
        g: Geometry,
        lineage: Vec<Generation>,
    ) -> Result<HistoryWriter> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = history_dir(state_root, disk);
        vfs.create_dir_all(&dir).ctx(Place::State, "creating", &dir)?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sending = dir.join(format!("sending-{}-{n}.tmp", std::process::id()));
        let manifest = ManifestWriter::create(vfs.clone(), &sending, g)?;
        Ok(HistoryWriter { dir, path: disk.to_path_buf(), lineage, sending, manifest: Some(manifest), vfs })
    }

    /// Records a region's block hashes (in region order).
    pub fn push_region(&mut self, region: u64, hashes: &RegionHashes) -> Result<()> {
        match &mut self.manifest {
            Some(m) => m.push_hashes(region, hashes),
            None => Err(Error::new(diskferry_protocol::ErrorCode::Internal, "history already committed")),
        }
    }

    /// Records the committed push as the disk's newest generation.
    pub fn commit(mut self, vfs: &dyn Vfs, meta: ManifestMeta, at_rest: Option<Stamp>) -> Result<()> {
        let meta = ManifestMeta { parent: self.lineage.first().copied(), ..meta };
        let Some(manifest) = self.manifest.take() else {
            return Err(Error::new(diskferry_protocol::ErrorCode::Internal, "history already committed"));
        };
        let header = manifest.finish_with(meta, true)?;
        let (dir, sending) = (self.dir.clone(), self.sending.clone());
        let (path, lineage) = (self.path.clone(), std::mem::take(&mut self.lineage));
        // Pushes of this disk to other targets may commit at the same moment.
        let lock_path = dir.join(LOCK);
        let _lock = loop {
            match vfs.lock(&lock_path) {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => return Err(Error::io(Place::State, "locking", &lock_path, e)),
            }
        };
        let name = format!("{}.dfm", meta.generation);
        let to = dir.join(&name);
        vfs.rename(&sending, &to).ctx(Place::State, "renaming", &to)?;
        self.sending = PathBuf::new();
        // Roots of generations this disk was pushed as before are known; a
        // generation it received (its chain as a target) is recorded with
        // a zero root.
        let before = read_file(vfs, &dir.join(FILE))?.map(|h| h.chain).unwrap_or_default();
        let root_of = |g: Generation| before.iter().find(|c| c.0 == g).map_or(BlockHash::ZERO, |c| c.1);
        let mut chain = vec![(meta.generation, header.root)];
        chain.extend(lineage.into_iter().filter(|g| *g != meta.generation).map(|g| (g, root_of(g))));
        chain.truncate(MAX_CHAIN);
        write(vfs, &dir, &History { path, at_rest, chain })?;
        for old in vfs.list_dir(&dir).ctx(Place::State, "listing", &dir)? {
            if (old.ends_with(".dfm") && old != name) || orphan(&old) {
                let p = dir.join(old);
                vfs.remove_file(&p).ctx(Place::State, "removing", &p)?;
            }
        }
        Ok(())
    }
}

/// A push's manifest left by a process that is gone (killed mid-push).
fn orphan(name: &str) -> bool {
    let Some(pid) = name.strip_prefix("sending-").and_then(|r| r.split('-').next()) else { return false };
    pid.parse::<u32>().is_ok_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
}

/// Forgets the history of `disk` (it received a commit: its bytes are a
/// target's generation now).
pub fn clear(vfs: &dyn Vfs, state_root: &Path, disk: &Path) -> Result<()> {
    let dir = history_dir(state_root, disk);
    let file = dir.join(FILE);
    if vfs.metadata(&file).ctx(Place::State, "reading", &file)?.is_none() {
        return Ok(());
    }
    vfs.remove_file(&file).ctx(Place::State, "removing", &file)?;
    vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir)?;
    // Pushes of the disk under way keep their own files.
    for name in vfs.list_dir(&dir).ctx(Place::State, "listing", &dir)? {
        if name.ends_with(".dfm") {
            let _ = vfs.remove_file(&dir.join(name));
        }
    }
    Ok(())
}

/// Copies a state file (a manifest) and syncs the copy.
pub(crate) fn copy_file(vfs: &dyn Vfs, from: &Path, to: &Path) -> Result<()> {
    let src = vfs.open(from, OpenHow::Read).ctx(Place::State, "opening", from)?;
    let dst = vfs.open(to, OpenHow::Truncate).ctx(Place::State, "creating", to)?;
    let len = src.len().ctx(Place::State, "reading", from)?;
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        src.read_at(at, &mut buf[..n]).ctx(Place::State, "reading", from)?;
        dst.write_at(at, &buf[..n]).ctx(Place::State, "writing", to)?;
        at += n as u64;
    }
    dst.sync().ctx(Place::State, "syncing", to)
}

fn read_file(vfs: &dyn Vfs, file: &Path) -> Result<Option<History>> {
    if vfs.metadata(file).ctx(Place::State, "reading", file)?.is_none() {
        return Ok(None);
    }
    let s = vfs.open(file, OpenHow::Read).ctx(Place::State, "opening", file)?;
    let len = s.len().ctx(Place::State, "reading", file)?;
    if len > 1 << 20 {
        return Err(Error::corrupt(file, "implausibly large"));
    }
    let mut b = vec![0u8; len as usize];
    s.read_at(0, &mut b).ctx(Place::State, "reading", file)?;
    decode(&b).map(Some).ok_or_else(|| Error::corrupt(file, "checksum or structure mismatch"))
}

fn write(vfs: &dyn Vfs, dir: &Path, h: &History) -> Result<()> {
    let tmp = dir.join(FILE_TMP);
    let file = dir.join(FILE);
    let s = vfs.open(&tmp, OpenHow::Truncate).ctx(Place::State, "creating", &tmp)?;
    s.write_at(0, &encode(h)).ctx(Place::State, "writing", &tmp)?;
    s.sync().ctx(Place::State, "syncing", &tmp)?;
    vfs.rename(&tmp, &file).ctx(Place::State, "replacing", &file)?;
    vfs.sync_dir(dir).ctx(Place::State, "syncing", dir)
}

fn encode(h: &History) -> Vec<u8> {
    let mut b = Vec::with_capacity(128 + h.chain.len() * 48);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    let (kind, stamp) = encode_stamp(h.at_rest);
    b.push(kind);
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&stamp);
    put_str(&mut b, &h.path.to_string_lossy());
    b.extend_from_slice(&(h.chain.len() as u32).to_le_bytes());
    for (g, root) in &h.chain {
        b.extend_from_slice(&g.0.to_le_bytes());
        b.extend_from_slice(root.as_bytes());
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

fn decode(b: &[u8]) -> Option<History> {
    if b.len() < 32 || blake3::hash(&b[..b.len() - 32]).as_bytes() != &b[b.len() - 32..] {
        return None;
    }
    let mut f = Fields::new(&b[..b.len() - 32]);
    if f.take(8)? != MAGIC || f.u32()? != VERSION {
        return None;
    }
    let kind = f.u8()?;
    f.take(3)?;
    let at_rest = decode_stamp(kind, f.take(48)?)?;
    let len = f.u16()? as usize;
    let path = PathBuf::from(String::from_utf8(f.take(len)?.to_vec()).ok()?);
    let n = f.u32()? as usize;
    if n > MAX_CHAIN {
        return None;
    }
    let mut chain = Vec::with_capacity(n);
    for _ in 0..n {
        chain.push((Generation(f.u128()?), BlockHash(f.array()?)));
    }
    (f.position() == b.len() - 32).then_some(History { path, at_rest, chain })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let h = History {
            path: "/vm/disk.img".into(),
            at_rest: Some(Stamp::File { len: 1, mtime_ns: 2, ctime_ns: 3, ino: 4 }),
            chain: vec![(Generation(3), BlockHash([7; 32])), (Generation(2), BlockHash::ZERO)],
        };
        let b = encode(&h);
        assert_eq!(decode(&b), Some(h));
        for i in [0, 9, 20, b.len() / 2, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&bad), None, "flip at {i}");
        }
        assert_eq!(decode(&b[..b.len() - 3]), None);
    }
}
