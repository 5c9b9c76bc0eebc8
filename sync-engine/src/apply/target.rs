//! A target disk and its state directory: lock, recovery, and the apply of
//! one session (stage, commit).

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{to_hex, BlockHash, Consistency, ErrorCode, Generation, Geometry, SessionId};

use super::catalog::{read_catalog, write_catalog, Catalog, PointRecord, Status, UndoRef, CATALOG};
use super::journal::{self, CommitRecord, Entry, JournalHeader, JournalKind, JournalWriter, Scan};
use super::undo::{UndoHeader, UndoWriter};
use crate::block::{VerifiedBlock, VerifiedSlice};
use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::{Manifest, ManifestMeta, ManifestWriter};
use crate::store::{DiskKind, FileId, OpenHow, Stamp, Storage, Vfs};

const JOURNAL: &str = "redo.log";
const LOCK: &str = "lock";
const MANIFEST_TMP: &str = "manifest.tmp";
/// Bytes written to a `.partial` file or a device between writeback kicks.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Options for opening a target.
#[derive(Clone, Debug, Default)]
pub struct TargetOptions {
    /// Consistent recovery points to keep (at least 1: the current
    /// generation); `None` keeps what the catalog holds (inspection commands).
    pub retention: Option<u32>,
    /// Logical name when served to peers.
    pub name: Option<String>,
    /// The file or device the path must still name when it is opened for
    /// writing (the agent pinned it); another one was swapped in and is
    /// refused with `E_TARGET_SWAPPED`. Updated by the target's own renames.
    pub expect_identity: Option<FileId>,
}

/// What opening a target had to do first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was interrupted.
    Clean,
    /// A committed apply was interrupted and has been finished (replayed).
    Finished(Generation),
    /// An uncommitted apply was interrupted and has been discarded.
    Discarded,
    /// An uncommitted, resumable session's staged blocks were kept.
    Staged {
        /// Staged entries.
        entries: u64,
    },
}

/// What [`Target::abort_staged`] discarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aborted {
    /// Staged entries (blocks, zero ranges) dropped.
    pub entries: u64,
    /// It was a full copy into `NAME.partial` (removed too).
    pub full_copy: bool,
    /// Bytes of the files removed (redo log, `.partial`).
    pub bytes: u64,
}

/// How far the committed manifest can be trusted to describe the target.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    /// diskferry has no state for this target.
    NoState,
    /// A full copy into a block device was interrupted.
    Incomplete,
    /// The stamp matches the commit: the manifest describes the bytes.
    Trusted(PointRecord),
    /// The stamp cannot tell (a block device after a reboot): the bytes must
    /// be hashed and compared with the manifest before it is relied on.
    Unverified(PointRecord),
    /// The target was written behind diskferry's back.
    Diverged {
        /// The committed point.
        point: PointRecord,
        /// What changed.
        why: String,
    },
}

/// A target and its locked state directory.
#[derive(Debug)]
pub struct Target {
    vfs: Arc<dyn Vfs>,
    path: PathBuf,
    dir: PathBuf,
    _lock: LockGuard,
    catalog: Option<Catalog>,
    staged: Option<Scan>,
    options: TargetOptions,
    recovery: Recovery,
}

struct LockGuard(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockGuard")
    }
}

/// The state subdirectory name for a target path: readable, and unique per path.
pub fn target_key(path: &Path) -> String {
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(40)
        .collect();
    let digest = blake3::hash(path.as_os_str().as_bytes());
    format!("{name}-{}", to_hex(&digest.as_bytes()[..8]))
}

/// The manifest file name of a generation.
pub fn manifest_file(g: Generation) -> String {
    format!("{g}.dfm")
}

fn undo_file(g: Generation) -> String {
    format!("{g}.undo")
}

/// `NAME.partial` beside a file target.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".partial");
    PathBuf::from(s)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Target {
    /// The state directory of `path` under `state_root`.
    pub fn state_dir(state_root: &Path, path: &Path) -> PathBuf {
        state_root.join("targets").join(target_key(path))
    }

    /// Locks the target's state and recovers from any interrupted apply:
    /// a committed one is finished, an uncommitted one discarded (or kept
    /// for resume when its session asked for that).
    ///
    /// `path` must be canonical: it keys the state.
    pub fn open(vfs: Arc<dyn Vfs>, state_root: &Path, path: &Path, options: TargetOptions) -> Result<Target> {
        // A directory or character device is refused before any state is made for it.
        vfs.metadata(path).ctx(Place::Target, "opening", path)?;
        let dir = Self::state_dir(state_root, path);
        vfs.create_dir_all(&dir).ctx(Place::State, "creating state directory", &dir)?;
        // The directory's own name must be durable before anything in it counts.
        for d in [state_root.to_path_buf(), state_root.join("targets")] {
            vfs.sync_dir(&d).ctx(Place::State, "syncing", &d)?;
        }
        let lock_path = dir.join(LOCK);
        let lock =
            match vfs.lock(&lock_path) {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(Error::new(
                    ErrorCode::Busy,
                    format!("another diskferry session is using {}", path.display()),
                )
                .hint(
                    "wait for it to finish: a local command that died releases the target at once, but a push whose \
                     source died holds it in the target agent until that agent's idle timeout passes \
                     (idle_timeout_secs, 20 s by default)",
                )),
                Err(e) => return Err(Error::io(Place::State, "locking", &lock_path, e)),
            };
        let catalog = read_catalog(vfs.as_ref(), &dir)?;
        if let Some(c) = &catalog {
            if c.path != path {
                return Err(Error::corrupt(&dir.join(CATALOG), format!("it belongs to {}", c.path.display())));
            }
        }
        let mut t = Target {
            vfs,
            path: path.to_path_buf(),
            dir,
            _lock: LockGuard(lock),
            catalog,
            staged: None,
            options,
            recovery: Recovery::Clean,
        };
        t.recover()?;
        t.collect_garbage()?;
        Ok(t)
    }

    /// What opening had to recover.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The target path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The filesystem.
    pub fn vfs(&self) -> &Arc<dyn Vfs> {
        &self.vfs
    }

    /// The catalog, if the target has state.
    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_ref()
    }

    /// The file or device the path is expected to name when written (see
    /// [`TargetOptions::expect_identity`]); after this target renamed a new
    /// copy into place, that copy.
    pub fn expected_identity(&self) -> Option<FileId> {
        self.options.expect_identity
    }

    /// Opens the target for writing, refusing a file or device other than
    /// the expected one.
    fn open_for_write(&self) -> Result<Arc<dyn Storage>> {
        let disk = self.vfs.open(&self.path, OpenHow::ReadWrite).ctx(Place::Target, "opening", &self.path)?;
        if let Some(want) = self.options.expect_identity {
            let got = disk.identity().ctx(Place::Target, "inspecting", &self.path)?;
            if got.is_some_and(|g| g != want) {
                return Err(swapped(&self.path));
            }
        }
        Ok(disk)
    }

    /// The staged entries of an interrupted resumable session.
    pub fn staged(&self) -> Option<&Scan> {
        self.staged.as_ref()
    }

    /// Opens and checks the manifest of a kept point.
    pub fn manifest_of(&self, point: &PointRecord) -> Result<Manifest> {
        let path = self.dir.join(manifest_file(point.generation));
        let m = Manifest::open(self.vfs.as_ref(), &path)?;
        if m.checksum() != point.manifest_checksum || m.header().generation != point.generation {
            return Err(Error::corrupt(&path, "it is not the manifest the catalog recorded"));
        }
        Ok(m)
    }

    /// Path of a kept point's undo segment.
    pub fn undo_path(&self, point: &PointRecord) -> PathBuf {
        self.dir.join(undo_file(point.generation))
    }

    /// Whether the committed manifest still describes the target's bytes,
    /// judged by the stamp taken at commit.
    pub fn trust(&self) -> Result<Trust> {
        let Some(c) = &self.catalog else { return Ok(Trust::NoState) };
        let Some(point) = c.current().copied() else { return Ok(Trust::Incomplete) };
        let meta = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
        let Some(meta) = meta else {
            return Ok(Trust::Diverged { point, why: "the target no longer exists".into() });
        };
        Ok(match (c.stamp, meta.stamp) {
            (Some(a), b) if a == b => Trust::Trusted(point),
            (Some(Stamp::Device { boot_id: a, .. }), Stamp::Device { boot_id: b, .. }) if a != b => {
                Trust::Unverified(point)
            }
            (Some(Stamp::Device { .. }), _) => {
                Trust::Diverged { point, why: "the block device was written since the last commit".into() }
            }
            (Some(Stamp::File { len, ino, .. }), Stamp::File { len: l2, ino: i2, .. }) => {
                if ino != i2 {
                    Trust::Diverged { point, why: "the file was replaced since the last commit".into() }
                } else if len != l2 {
                    Trust::Diverged {
                        point,
                        why: format!("its size changed from {len} to {l2} bytes since the last commit"),
                    }
                } else {
                    // Only its times changed: something touched it, maybe
                    // without changing a byte (an interrupted reservation does).
                    Trust::Unverified(point)
                }
            }
            _ => Trust::Unverified(point),
        })
    }

    /// [`Target::trust`], settling "cannot tell" by hashing the target: equal
    /// to the committed manifest makes it trusted (and restamped), anything
    /// else is a divergence.
    pub fn settle_trust(&mut self) -> Result<Trust> {
        match self.trust()? {
            Trust::Unverified(point) => {
                let report = crate::verify::check(self, &crate::local::NoProgress)?;
                if report.ok {
                    self.restamp()?;
                    Ok(Trust::Trusted(point))
                } else {
                    let why = match report.size_mismatch {
                        Some((want, have)) => format!("it holds {have} bytes, not the {want} committed"),
                        None => format!(
                            "{} blocks differ from the last commit (first: block {})",
                            report.mismatched_blocks,
                            report.first_mismatch.unwrap_or(0)
                        ),
                    };
                    Ok(Trust::Diverged { point, why })
                }
            }
            t => Ok(t),
        }
    }

    /// The recovery points an operator can list (consistent points of a
    /// complete catalog): what a new chain would drop.
    pub fn kept_points(&self) -> usize {
        self.catalog
            .as_ref()
            .filter(|c| c.status == Status::Complete)
            .map_or(0, |c| c.points.iter().filter(|p| p.consistency.is_recovery_point()).count())
    }

    /// Before a full copy replaces a target: refused unless `force` when the
    /// replica diskferry committed was changed since (a failed-over or test
    /// VM wrote it: `E_DIVERGED`), when its file vanished (`E_DIVERGED`: the
    /// copy would silently start a new chain), or when it holds recovery
    /// points the new chain would drop (`E_WOULD_DROP_POINTS`).
    pub fn check_full_overwrite(&mut self, force: bool) -> Result<()> {
        if force {
            return Ok(());
        }
        let exists = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.is_some();
        let kept = self.kept_points();
        if !exists {
            if self.catalog.as_ref().is_some_and(|c| c.current().is_some()) {
                return Err(self.diverged("the target no longer exists"));
            }
            return Ok(());
        }
        if let Trust::Diverged { why, .. } = self.settle_trust()? {
            return Err(self.diverged(&why));
        }
        if kept > 0 {
            return Err(Error::new(
                ErrorCode::WouldDropPoints,
                format!(
                    "a full copy replaces {} and would drop its {kept} recovery point{}",
                    self.path.display(),
                    if kept == 1 { "" } else { "s" }
                ),
            )
            .hint("push without --mode full (a delta keeps them), or add --force to drop them"));
        }
        Ok(())
    }

    /// `E_DIVERGED` for this target: what changed, and what `--force` would drop.
    pub fn diverged(&self, why: &str) -> Error {
        diverged_error(&self.path, why, self.kept_points())
    }

    /// Records the target's current stamp as the committed one. Only call
    /// after proving its bytes equal the committed manifest.
    pub fn restamp(&mut self) -> Result<()> {
        let Some(mut c) = self.catalog.clone() else { return Ok(()) };
        let meta = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
        c.stamp = meta.map(|m| m.stamp);
        if c.stamp != self.catalog.as_ref().and_then(|c| c.stamp) {
            write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
            self.catalog = Some(c);
        }
        Ok(())
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
    }

    fn recover(&mut self) -> Result<()> {
        let jpath = self.journal_path();
        if self.vfs.metadata(&jpath).ctx(Place::State, "reading", &jpath)?.is_none() {
            return Ok(());
        }
        let storage = self.vfs.open(&jpath, OpenHow::Read).ctx(Place::State, "opening", &jpath)?;
        let scan = journal::scan(&storage, &jpath, &mut |_| Ok(()))?;
        drop(storage);
        if !matches!(&scan, Some(s) if s.commit.is_some()) {
            self.check_untouched()?;
        }
        match scan {
            None => {
                // Torn at creation: whatever it was, nothing it staged counts.
                let p = partial_path(&self.path);
                self.vfs.remove_file(&p).ctx(Place::Target, "removing", &p)?;
                self.remove_journal()?;
                self.recovery = Recovery::Discarded;
            }
            Some(scan) => match scan.commit {
                Some(record) => {
                    let done = self.catalog.as_ref().and_then(|c| c.current()).map(|p| p.generation)
                        == Some(record.generation);
                    if !done {
                        self.finish_commit(&scan.header, &record, None)?;
                    }
                    self.remove_journal()?;
                    self.recovery = Recovery::Finished(record.generation);
                }
                None if scan.header.resumable => {
                    self.recovery = Recovery::Staged { entries: scan.entries };
                    self.staged = Some(scan);
                }
                None => {
                    self.discard_staged(scan.header.kind)?;
                    self.recovery = Recovery::Discarded;
                }
            },
        }
        Ok(())
    }

    /// Before an uncommitted (or unreadable) journal is set aside: if the
    /// target's stamp moved, prove its bytes are still the committed ones. A
    /// journal whose commit record was lost to damage after replay began
    /// would otherwise leave a mix behind under the old generation.
    fn check_untouched(&mut self) -> Result<()> {
        let exists = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.is_some();
        // A target that is gone holds no mix to protect.
        if exists && matches!(self.trust()?, Trust::Unverified(_) | Trust::Diverged { .. }) {
            let report = crate::verify::check(self, &crate::local::NoProgress)?;
            if !report.ok {
                return Err(Error::new(
                    ErrorCode::StateCorrupt,
                    format!(
                        "{} was partly updated by an apply whose redo log is damaged: it is not its last committed generation",
                        self.path.display()
                    ),
                )
                .hint("export a recovery point or resync with --force; nothing was changed"));
            }
            self.restamp()?;
        }
        Ok(())
    }

    fn discard_staged(&mut self, kind: JournalKind) -> Result<()> {
        if kind == JournalKind::Partial {
            let p = partial_path(&self.path);
            self.vfs.remove_file(&p).ctx(Place::Target, "removing", &p)?;
        }
        self.staged = None;
        self.remove_journal()
    }

    /// Block → hash of every block the staged journal updates (whole zeroed
    /// blocks included), the last entry winning.
    fn staged_overlay(&self, g: &Geometry) -> Result<HashMap<u64, BlockHash>> {
        let jpath = self.journal_path();
        let storage = self.vfs.open(&jpath, OpenHow::Read).ctx(Place::State, "opening", &jpath)?;
        let bs = g.block_size.bytes();
        let mut overlay = HashMap::new();
        journal::scan(&storage, &jpath, &mut |e| {
            match e {
                Entry::Patch { block, hash, .. } => {
                    overlay.insert(block, hash);
                }
                Entry::Zero { offset, len } => {
                    let first = offset.div_ceil(bs);
                    let end =
                        (offset + len) / bs + u64::from((offset + len) == g.disk_bytes && (offset + len) % bs != 0);
                    for b in first..end {
                        overlay.insert(b, BlockHash::ZERO);
                    }
                }
            }
            Ok(())
        })?;
        Ok(overlay)
    }

    /// Discards an interrupted session's staged data on purpose (the
    /// operator's `diskferry abort`); `None` if nothing was staged.
    pub fn abort_staged(&mut self) -> Result<Option<Aborted>> {
        let Some(scan) = &self.staged else { return Ok(None) };
        let full_copy = scan.header.kind == JournalKind::Partial;
        let entries = scan.entries;
        let mut bytes = 0;
        let mut files = vec![self.journal_path()];
        if full_copy {
            files.push(partial_path(&self.path));
        }
        for f in &files {
            bytes += self.vfs.metadata(f).ctx(Place::State, "reading", f)?.map_or(0, |m| m.len);
        }
        self.discard()?;
        Ok(Some(Aborted { entries, full_copy, bytes }))
    }

    /// Drops the staged blocks of an interrupted session.
    pub fn discard(&mut self) -> Result<()> {
        match self.staged.take() {
            Some(s) => self.discard_staged(s.header.kind),
            None => Ok(()),
        }
    }

    fn remove_journal(&self) -> Result<()> {
        let p = self.journal_path();
        self.vfs.remove_file(&p).ctx(Place::State, "removing", &p)
    }

    /// Removes files no kept point or pending journal refers to.
    fn collect_garbage(&self) -> Result<()> {
        let mut keep: Vec<String> = vec![CATALOG.into(), LOCK.into()];
        if self.staged.is_some() {
            keep.push(JOURNAL.into());
        }
        if let Some(c) = &self.catalog {
            for (i, p) in c.points.iter().enumerate() {
                keep.push(manifest_file(p.generation));
                if i > 0 && p.undo.is_some() {
                    keep.push(undo_file(p.generation));
                }
            }
        }
        for name in self.vfs.list_dir(&self.dir).ctx(Place::State, "listing", &self.dir)? {
            if !keep.contains(&name) {
                let p = self.dir.join(&name);
                self.vfs.remove_file(&p).ctx(Place::State, "removing", &p)?;
            }
        }
        Ok(())
    }

    /// Everything after a commit record is durable: write in place (or
    /// rename the `.partial`), then record the new generation in the catalog.
    /// Idempotent, so recovery runs it again after a crash.
    /// `disk` is the target as the apply holds it open (a block device is
    /// opened exclusively, so it cannot be opened twice); recovery opens it.
    fn finish_commit(
        &mut self,
        header: &JournalHeader,
        record: &CommitRecord,
        disk: Option<Arc<dyn Storage>>,
    ) -> Result<()> {
        let mpath = self.dir.join(manifest_file(record.generation));
        let manifest = Manifest::open(self.vfs.as_ref(), &mpath)?;
        if manifest.checksum() != record.manifest_checksum {
            return Err(Error::corrupt(&mpath, "it does not match the commit record"));
        }
        let kind = match header.kind {
            JournalKind::Redo => {
                let disk = match disk {
                    Some(d) => d,
                    None => self.open_for_write()?,
                };
                self.replay(header, disk.as_ref())?;
                self.kind_of_target()?
            }
            JournalKind::Partial => {
                let partial = partial_path(&self.path);
                if self.vfs.metadata(&partial).ctx(Place::Target, "reading", &partial)?.is_some() {
                    self.vfs.rename(&partial, &self.path).ctx(Place::Target, "renaming", &partial)?;
                    let parent = parent_dir(&self.path);
                    self.vfs.sync_dir(&parent).ctx(Place::Target, "syncing", &parent)?;
                    // The path now names the copy this target made.
                    let meta = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
                    self.options.expect_identity = meta.map(|m| m.identity);
                } else {
                    // Renamed already, so the target must be the new copy: prove it.
                    self.check_copy(&manifest)?;
                }
                DiskKind::File
            }
        };
        let chain_continues = header.kind == JournalKind::Redo
            && header.base.is_some()
            && self.catalog.as_ref().and_then(|c| c.current()).map(|p| p.generation) == header.base;
        let mut points = if chain_continues {
            let mut old = self.catalog.as_ref().map(|c| c.points.clone()).unwrap_or_default();
            if let Some(first) = old.first_mut() {
                first.undo = record.undo.map(|(checksum, data_bytes)| UndoRef { checksum, data_bytes });
                if first.undo.is_none() {
                    // Without an undo segment the previous point cannot be rebuilt.
                    old.clear();
                }
            }
            old
        } else {
            Vec::new()
        };
        let h = manifest.header();
        points.insert(
            0,
            PointRecord {
                generation: h.generation,
                parent: h.parent,
                consistency: h.consistency,
                created_unix_ns: h.created_unix_ns,
                geometry: h.geometry,
                manifest_checksum: manifest.checksum(),
                undo: None,
            },
        );
        self.write_new_catalog(kind, points)
    }

    /// Whether the target's bytes are those of `manifest`, as a typed error.
    fn check_copy(&self, manifest: &Manifest) -> Result<()> {
        let g = manifest.geometry();
        let meta = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
        let damaged = || {
            Error::new(
                ErrorCode::StateCorrupt,
                format!("{} is not the full copy its commit record names", self.path.display()),
            )
            .hint("resync with --mode full")
        };
        if meta.map(|m| m.len) != Some(g.disk_bytes) {
            return Err(damaged());
        }
        let disk = self.vfs.open_disk(&self.path).ctx(Place::Target, "opening", &self.path)?;
        let (mismatched, _) =
            crate::verify::compare_with_manifest(&disk, &self.path, manifest, &crate::local::NoProgress, true)?;
        if mismatched > 0 {
            return Err(damaged());
        }
        Ok(())
    }

    fn kind_of_target(&self) -> Result<DiskKind> {
        let meta = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
        meta.map(|m| m.kind)
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("{} disappeared", self.path.display())))
    }

    fn write_new_catalog(&mut self, kind: DiskKind, points: Vec<PointRecord>) -> Result<()> {
        let stamp = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.map(|m| m.stamp);
        let mut c = Catalog {
            path: self.path.clone(),
            name: self.options.name.clone().or_else(|| self.catalog.as_ref().and_then(|c| c.name.clone())),
            kind,
            status: Status::Complete,
            stamp,
            points,
        };
        if let Some(r) = self.options.retention {
            c.prune(r);
        }
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        self.collect_garbage()
    }

    /// Writes a committed journal's entries in place, sets the size and syncs.
    fn replay(&self, header: &JournalHeader, disk: &dyn Storage) -> Result<()> {
        let jpath = self.journal_path();
        let storage = self.vfs.open(&jpath, OpenHow::Read).ctx(Place::State, "opening", &jpath)?;
        let bs = header.geometry.block_size.bytes();
        let path = &self.path;
        journal::scan(&storage, &jpath, &mut |e| match e {
            Entry::Patch { block, ranges, data, .. } => {
                let mut at = 0usize;
                for (off, len) in ranges {
                    let bytes = &data[at..at + len as usize];
                    disk.write_at(block * bs + off as u64, bytes).ctx(Place::Target, "writing", path)?;
                    at += len as usize;
                }
                Ok(())
            }
            Entry::Zero { offset, len } => disk.zero_range(offset, len).ctx(Place::Target, "zeroing", path),
        })?;
        if self.kind_of_target()? == DiskKind::File {
            disk.set_len(header.geometry.disk_bytes).ctx(Place::Target, "resizing", path)?;
        }
        disk.sync().ctx(Place::Target, "syncing", path)
    }

    /// Starts applying a session.
    pub fn begin(&mut self, spec: BeginSpec) -> Result<Apply<'_>> {
        let current = self.catalog.as_ref().and_then(|c| c.current()).map(|p| p.generation);
        if spec.mode == ApplyMode::Journal && spec.base.is_some() && spec.base != current {
            return Err(Error::new(ErrorCode::Internal, "apply base is not the committed generation"));
        }
        let resume = self.staged.take().filter(|s| {
            let kind = match spec.mode {
                ApplyMode::Journal => JournalKind::Redo,
                ApplyMode::Partial => JournalKind::Partial,
                ApplyMode::Direct => return false,
            };
            s.header.kind == kind && s.header.base == spec.base && s.header.geometry == spec.geometry
        });
        if resume.is_none() {
            // Staged blocks of another shape cannot be reused, nor a `.partial` they wrote.
            let jpath = self.journal_path();
            self.vfs.remove_file(&jpath).ctx(Place::State, "removing", &jpath)?;
            let p = partial_path(&self.path);
            self.vfs.remove_file(&p).ctx(Place::Target, "removing", &p)?;
        }
        let vfs = self.vfs.clone();
        let header = JournalHeader {
            kind: if spec.mode == ApplyMode::Partial { JournalKind::Partial } else { JournalKind::Redo },
            resumable: spec.resumable,
            session: spec.session,
            base: spec.base,
            geometry: spec.geometry,
        };
        let jpath = self.journal_path();
        let (disk, disk_path, journal) = match spec.mode {
            ApplyMode::Journal => {
                let disk = self.open_for_write()?;
                let journal = match &resume {
                    Some(scan) => JournalWriter::resume(vfs.as_ref(), &jpath, scan)?,
                    None => JournalWriter::create(vfs.as_ref(), &jpath, header)?,
                };
                (disk, self.path.clone(), Some(journal))
            }
            ApplyMode::Partial => {
                let p = partial_path(&self.path);
                let how = if resume.is_some() { OpenHow::ReadWrite } else { OpenHow::CreateNew };
                let disk = vfs.open(&p, how).ctx(Place::Target, "creating", &p)?;
                let journal = match &resume {
                    Some(scan) => JournalWriter::resume(vfs.as_ref(), &jpath, scan)?,
                    None => JournalWriter::create(vfs.as_ref(), &jpath, header)?,
                };
                (disk, p, Some(journal))
            }
            ApplyMode::Direct => {
                let disk = self.open_for_write()?;
                let len = disk.len().ctx(Place::Target, "reading", &self.path)?;
                if len < spec.geometry.disk_bytes {
                    return Err(too_small(&self.path, len, spec.geometry.disk_bytes));
                }
                // The device loses its old content from the first write on:
                // mark it INCOMPLETE first, so nothing fails over to a mix.
                let c = Catalog {
                    path: self.path.clone(),
                    name: self.options.name.clone(),
                    kind: DiskKind::BlockDevice,
                    status: Status::Incomplete,
                    stamp: None,
                    points: Vec::new(),
                };
                write_catalog(vfs.as_ref(), &self.dir, &c)?;
                self.catalog = Some(c);
                self.collect_garbage()?;
                (disk, self.path.clone(), None)
            }
        };
        let old_len = disk.len().ctx(Place::Target, "reading", &disk_path)?;
        let overlay = match (&resume, spec.mode) {
            (Some(_), ApplyMode::Journal) => self.staged_overlay(&spec.geometry)?,
            _ => HashMap::new(),
        };
        let sink = (spec.mode != ApplyMode::Journal).then(|| DirectSink {
            disk: disk.clone(),
            path: disk_path.clone(),
            geometry: spec.geometry,
            sparse: spec.mode == ApplyMode::Partial && old_len == 0,
            writing: Arc::default(),
        });
        let mpath = self.dir.join(MANIFEST_TMP);
        let mut manifest = ManifestWriter::create(vfs, &mpath, spec.geometry)?;
        if let Some(entries) = spec.index_entries {
            manifest = manifest.with_index_spill(entries);
        }
        Ok(Apply {
            target: self,
            spec,
            disk,
            disk_path,
            old_len,
            journal,
            manifest: Some(manifest),
            manifest_path: mpath,
            stats: ApplyStats::default(),
            writeback_from: 0,
            written_since_kick: 0,
            done: false,
            committed: false,
            overlay: Arc::new(overlay),
            sink,
            reserved: None,
        })
    }
}

/// The one `E_DIVERGED` error: `path` was written behind diskferry's back
/// (`why`), and `--force` would drop `kept` recovery points.
pub fn diverged_error(path: &Path, why: &str, kept: usize) -> Error {
    let lost = match kept {
        0 => String::new(),
        1 => "; --force would drop its 1 recovery point".into(),
        n => format!("; --force would drop its {n} recovery points"),
    };
    Error::new(ErrorCode::Diverged, format!("target {} was changed behind diskferry's back: {why}{lost}", path.display()))
        .hint("if that change must be kept (a failed-over or test VM), stop here; otherwise run again with --force, which overwrites it after a full compare")
}

fn swapped(path: &Path) -> Error {
    Error::new(
        ErrorCode::TargetSwapped,
        format!("{} now names another file or device than the one the agent checked: nothing was written", path.display()),
    )
    .hint("find out who replaced it; if the new file is meant to be the target, restart the agent so it checks the path again")
}

fn too_small(path: &Path, have: u64, need: u64) -> Error {
    Error::new(ErrorCode::TargetTooSmall, format!("{} holds {have} bytes but the source has {need}", path.display()))
        .hint("use a block device at least as large as the source; the target was not touched")
}

/// Writes whole verified blocks of a full copy straight into their place.
#[derive(Debug, Clone)]
pub struct DirectSink {
    disk: Arc<dyn Storage>,
    path: PathBuf,
    geometry: Geometry,
    /// Writing into a new `.partial`: zero pages stay holes.
    sparse: bool,
    /// One writer at a time: the kernel serializes writes to a file anyway,
    /// and threads queued here sleep instead of spinning on its lock.
    writing: Arc<std::sync::Mutex<()>>,
}

impl DirectSink {
    /// Writes one block.
    pub fn write(&self, block: &VerifiedSlice<'_>) -> Result<()> {
        self.write_at(self.geometry.block_offset(block.index()), block.bytes())
    }

    /// Writes the patches of a verified update in place.
    pub fn write_verified(&self, block: &VerifiedBlock) -> Result<()> {
        let base = self.geometry.block_offset(block.index());
        for p in block.patches() {
            self.write_at(base + p.offset as u64, &p.data)?;
        }
        Ok(())
    }

    fn write_at(&self, off: u64, bytes: &[u8]) -> Result<()> {
        let _one_writer = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.sparse {
            return self.disk.write_at(off, bytes).ctx(Place::Target, "writing", &self.path);
        }
        // Only the runs of non-zero 4 KiB pages: a new file reads zeros
        // elsewhere, and unwritten pages cost no space.
        let page = diskferry_protocol::PAGE_SIZE as usize;
        let mut run: Option<usize> = None;
        for start in (0..bytes.len()).step_by(page).chain(std::iter::once(bytes.len())) {
            let zero = start == bytes.len() || crate::hash::is_zero(&bytes[start..(start + page).min(bytes.len())]);
            match (zero, run) {
                (false, None) => run = Some(start),
                (true, Some(from)) => {
                    self.disk.write_at(off + from as u64, &bytes[from..start]).ctx(
                        Place::Target,
                        "writing",
                        &self.path,
                    )?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The current content of a target's blocks, readable from any thread while
/// a session stages (the old generation for a journaled apply, the
/// `.partial` so far for a resumed full copy).
#[derive(Debug, Clone)]
pub struct OldContent {
    disk: Arc<dyn Storage>,
    path: PathBuf,
    geometry: Geometry,
    old_len: u64,
    overlay: Arc<HashMap<u64, BlockHash>>,
}

impl OldContent {
    /// The target (or `.partial`) these bytes come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of `block` (zeros past the end).
    pub fn read(&self, block: u64) -> Result<Vec<u8>> {
        let len = self.geometry.block_len(block);
        let off = self.geometry.block_offset(block);
        let mut buf = vec![0u8; len as usize];
        let have = self.old_len.saturating_sub(off).min(len as u64) as usize;
        if have > 0 {
            self.disk.read_at(off, &mut buf[..have]).ctx(Place::Target, "reading", &self.path)?;
        }
        Ok(buf)
    }

    /// Whether `block` was staged by an interrupted session: its content is
    /// then not what [`OldContent::read`] returns, so it must travel whole.
    pub fn is_staged(&self, block: u64) -> bool {
        self.overlay.contains_key(&block)
    }
}

/// How a session writes its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Stage into the redo log; write in place at commit (delta, and any
    /// update of an existing target).
    Journal,
    /// Write `NAME.partial`, rename over `NAME` at commit (full copy to a file).
    Partial,
    /// Write straight into a block device marked INCOMPLETE until commit
    /// (full copy to a device).
    Direct,
}

/// What a session will produce.
#[derive(Clone, Copy, Debug)]
pub struct BeginSpec {
    /// The session (a resumed push reuses staged blocks of the same shape).
    pub session: SessionId,
    /// Geometry after commit (the source's size and the block size).
    pub geometry: Geometry,
    /// How to write.
    pub mode: ApplyMode,
    /// The committed generation the updates apply to; `None` starts a new chain.
    pub base: Option<Generation>,
    /// Keep staged blocks if the session is interrupted.
    pub resumable: bool,
    /// Manifest index entries held in memory before a sorted run spills
    /// (`None`: the default, 16 MiB worth).
    pub index_entries: Option<usize>,
}

/// The identity of the generation being committed.
#[derive(Clone, Copy, Debug)]
pub struct CommitMeta {
    /// Its id.
    pub generation: Generation,
    /// Its consistency.
    pub consistency: Consistency,
    /// Commit time (ns since the epoch).
    pub created_unix_ns: i64,
}

/// Counts of an apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Block updates staged.
    pub blocks: u64,
    /// Content bytes staged (and written in place at commit).
    pub data_bytes: u64,
    /// Bytes turned into zeros.
    pub zero_bytes: u64,
}

/// The result of a commit.
#[derive(Clone, Copy, Debug)]
pub struct CommitReport {
    /// The new generation.
    pub generation: Generation,
    /// Root of its hash tree.
    pub root: BlockHash,
    /// Content bytes written into the target.
    pub bytes_written: u64,
    /// Bytes of redo log written.
    pub log_bytes: u64,
    /// Bytes of old content kept for the previous point.
    pub undo_bytes: u64,
}

/// One session's staging into a target. Dropped without [`Apply::commit`],
/// the target keeps its committed generation.
#[derive(Debug)]
pub struct Apply<'t> {
    target: &'t mut Target,
    spec: BeginSpec,
    disk: Arc<dyn Storage>,
    disk_path: PathBuf,
    old_len: u64,
    journal: Option<JournalWriter>,
    manifest: Option<ManifestWriter>,
    manifest_path: PathBuf,
    stats: ApplyStats,
    writeback_from: u64,
    written_since_kick: u64,
    done: bool,
    committed: bool,
    overlay: Arc<HashMap<u64, BlockHash>>,
    /// Writer for Partial and Direct modes, shared with [`Apply::direct_sink`].
    sink: Option<DirectSink>,
    /// What the commit's space reservation allocated, released if it fails.
    reserved: Option<Reserved>,
}

/// Space a reservation allocated that the target did not use before: holes
/// inside the file it filled, and blocks past its end.
#[derive(Debug, Default)]
struct Reserved {
    holes: Vec<(u64, u64)>,
    past_end: bool,
}

impl Apply<'_> {
    /// The geometry being written.
    pub fn geometry(&self) -> Geometry {
        self.spec.geometry
    }

    /// Counts so far.
    pub fn stats(&self) -> ApplyStats {
        self.stats
    }

    /// Blocks staged by the interrupted session this one resumed (block → hash).
    pub fn overlay(&self) -> &Arc<HashMap<u64, BlockHash>> {
        &self.overlay
    }

    /// A reader of the blocks' current content for other threads.
    pub fn old_content(&self) -> OldContent {
        OldContent {
            disk: self.disk.clone(),
            path: self.disk_path.clone(),
            geometry: self.spec.geometry,
            old_len: self.old_len,
            overlay: self.overlay.clone(),
        }
    }

    /// The current bytes of `block` (as committed; zeros past the end),
    /// `len` bytes long.
    pub fn read_old(&self, block: u64, len: u32) -> Result<Vec<u8>> {
        let off = self.spec.geometry.block_offset(block);
        let mut buf = vec![0u8; len as usize];
        let have = self.old_len.saturating_sub(off).min(len as u64) as usize;
        if have > 0 {
            self.disk.read_at(off, &mut buf[..have]).ctx(Place::Target, "reading", &self.disk_path)?;
        }
        Ok(buf)
    }

    /// Stages a verified block update.
    pub fn stage(&mut self, block: &VerifiedBlock) -> Result<()> {
        self.stats.blocks += 1;
        self.stats.data_bytes += block.payload_len();
        match &mut self.journal {
            Some(j) if self.spec.mode == ApplyMode::Journal => {
                let r = j.append_patch(block);
                r.map_err(|e| self.state_full(e))
            }
            _ => {
                // The same writer as the other threads' sinks: sparse into a
                // new `.partial`, one writer at a time.
                let Some(sink) = &self.sink else {
                    return Err(Error::new(ErrorCode::Internal, "direct apply without a sink"));
                };
                sink.write_verified(block)?;
                let end =
                    self.spec.geometry.block_offset(block.index()) + self.spec.geometry.block_len(block.index()) as u64;
                self.kick_writeback(end, block.payload_len());
                Ok(())
            }
        }
    }

    fn kick_writeback(&mut self, end: u64, written: u64) {
        self.written_since_kick += written;
        if self.written_since_kick >= WRITEBACK_EVERY && end > self.writeback_from {
            self.disk.start_writeback(self.writeback_from, end - self.writeback_from);
            self.writeback_from = end;
            self.written_since_kick = 0;
        }
    }

    /// A handle that writes verified whole blocks straight into the `.partial`
    /// file or device from many threads (full copies; `None` when journaled).
    pub fn direct_sink(&self) -> Option<DirectSink> {
        self.sink.clone()
    }

    /// Counts blocks a [`DirectSink`] wrote up to byte `end`, and starts
    /// their writeback so the commit's sync is short.
    pub fn account_direct(&mut self, blocks: u64, bytes: u64, end: u64) {
        self.stats.blocks += blocks;
        self.stats.data_bytes += bytes;
        self.kick_writeback(end, bytes);
    }

    /// Stages blocks `first..first+count` becoming zeros.
    pub fn stage_zero(&mut self, first: u64, count: u64) -> Result<()> {
        let g = self.spec.geometry;
        let off = g.block_offset(first);
        let end = g.block_offset(first + count).min(g.disk_bytes);
        if end <= off {
            return Ok(());
        }
        self.stats.zero_bytes += end - off;
        match &mut self.journal {
            Some(j) if self.spec.mode == ApplyMode::Journal => {
                let r = j.append_zero(off, end - off);
                r.map_err(|e| self.state_full(e))
            }
            // A fresh `.partial` reads zeros already, unless a resumed session wrote there.
            _ if off >= self.old_len && self.spec.mode == ApplyMode::Partial => Ok(()),
            _ => self.disk.zero_range(off, end - off).ctx(Place::Target, "zeroing", &self.disk_path),
        }
    }

    /// The committed point a commit of this apply would record again,
    /// unchanged: the chain continues from it, nothing is staged (by this
    /// session or a resumed one) and the geometry is the same. A commit of
    /// `consistency` adds nothing when that point is at least as consistent.
    pub fn unchanged_point(&self, consistency: Consistency) -> Option<PointRecord> {
        let current = self.target.catalog.as_ref()?.current().copied()?;
        let nothing_staged = self.spec.mode == ApplyMode::Journal
            && self.journal.as_ref().is_some_and(|j| j.entries() == 0)
            && self.spec.base == Some(current.generation)
            && current.geometry == self.spec.geometry;
        (nothing_staged && consistency.to_u8() <= current.consistency.to_u8()).then_some(current)
    }

    /// The generation the updates apply to (`None`: a new chain).
    pub fn base(&self) -> Option<Generation> {
        self.spec.base
    }

    /// Ends the session without a commit and without keeping anything staged.
    pub fn abandon(mut self) {
        self.spec.resumable = false;
    }

    /// Records the new generation's hashes for the next region (in order).
    pub fn push_region(&mut self, region: u64, hashes: &[BlockHash]) -> Result<()> {
        match &mut self.manifest {
            Some(m) => m.push_region(region, hashes),
            None => Err(Error::new(ErrorCode::Internal, "apply already committed")),
        }
    }

    /// Commits the new generation. Steps, in order (see `docs/design.md`):
    ///
    /// 1. finish the new manifest and sync it (fsync 1);
    /// 2. journal: sync the staged entries (fsync 2); reserve every range
    ///    the replay will write (fallocate), so a full filesystem fails here;
    ///    save the old content of those ranges to an undo segment and sync
    ///    it (fsync 3). Partial: size and sync the `.partial`, sync its
    ///    directory, sync the journal's header (fsyncs 2a–2c);
    /// 3. sync the state directory, making the names durable (fsync 4);
    /// 4. write and sync the commit record — the commit point (fsync 5);
    /// 5. write in place and sync the target (fsync 6), or rename the
    ///    `.partial` and sync its directory;
    /// 6. replace the catalog: temp file synced, renamed, directory synced
    ///    (fsyncs 7, 8); remove the journal.
    ///
    /// A block device written directly: 1, the state directory, the device,
    /// then 6 (the catalog replace is the commit point).
    pub fn commit(mut self, meta: CommitMeta) -> Result<CommitReport> {
        let result = self.commit_inner(meta).map_err(|e| if self.committed { e } else { self.state_full(e) });
        if result.is_err() {
            self.abort_after_failure();
        }
        self.done = true;
        result
    }

    fn commit_inner(&mut self, meta: CommitMeta) -> Result<CommitReport> {
        let vfs = self.target.vfs.clone();
        let dir = self.target.dir.clone();
        let Some(writer) = self.manifest.take() else {
            return Err(Error::new(ErrorCode::Internal, "apply already committed"));
        };
        let header = writer.finish(ManifestMeta {
            generation: meta.generation,
            parent: self.spec.base,
            consistency: meta.consistency,
            created_unix_ns: meta.created_unix_ns,
        })?;
        let mpath = dir.join(manifest_file(meta.generation));
        vfs.rename(&self.manifest_path, &mpath).ctx(Place::State, "renaming", &mpath)?;
        let manifest_checksum = Manifest::open(vfs.as_ref(), &mpath)?.checksum();

        if self.spec.mode == ApplyMode::Direct {
            vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir)?;
            self.disk.sync().ctx(Place::Target, "syncing", &self.disk_path)?;
            let manifest = Manifest::open(vfs.as_ref(), &mpath)?;
            let point = PointRecord {
                generation: meta.generation,
                parent: None,
                consistency: meta.consistency,
                created_unix_ns: meta.created_unix_ns,
                geometry: self.spec.geometry,
                manifest_checksum: manifest.checksum(),
                undo: None,
            };
            self.target.write_new_catalog(DiskKind::BlockDevice, vec![point])?;
            return Ok(CommitReport {
                generation: meta.generation,
                root: header.root,
                bytes_written: self.stats.data_bytes,
                log_bytes: 0,
                undo_bytes: 0,
            });
        }

        let Some(mut journal) = self.journal.take() else {
            return Err(Error::new(ErrorCode::Internal, "apply without a journal"));
        };
        let mut undo = None;
        match self.spec.mode {
            ApplyMode::Journal => {
                journal.sync_entries()?;
                // Reserving touches the target's times, not its bytes: after
                // a failure from here on, the next open proves the bytes
                // unchanged by hashing (`settle_trust`).
                let mut reserved = Reserved::default();
                let r = self.reserve(&journal, &mut reserved);
                self.reserved = Some(reserved);
                r?;
                if let Some(base) = self.spec.base {
                    undo = Some(self.save_undo(base, meta.generation)?);
                }
            }
            _ => {
                self.disk.set_len(self.spec.geometry.disk_bytes).ctx(Place::Target, "resizing", &self.disk_path)?;
                self.disk.sync().ctx(Place::Target, "syncing", &self.disk_path)?;
                // The `.partial` name must be durable before a commit record names it.
                let parent = parent_dir(&self.disk_path);
                vfs.sync_dir(&parent).ctx(Place::Target, "syncing", &parent)?;
                journal.sync_entries()?;
            }
        }
        vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir)?;
        let record = CommitRecord {
            generation: meta.generation,
            entries: journal.entries(),
            entries_digest: journal.entries_digest(),
            manifest_checksum,
            undo,
        };
        let log_bytes = journal.len();
        let jheader = *journal.header();
        journal.seal(&record)?;
        // Committed: from here on a failure is finished by recovery, not undone.
        self.done = true;
        self.committed = true;
        self.target.staged = None;
        self.target.finish_commit(&jheader, &record, Some(self.disk.clone()))?;
        self.target.remove_journal()?;
        Ok(CommitReport {
            generation: meta.generation,
            root: header.root,
            bytes_written: self.stats.data_bytes,
            log_bytes,
            undo_bytes: undo.map_or(0, |u| u.1),
        })
    }

    /// Allocates every range the replay will write, merging neighbours, and
    /// notes in `filled` what was not allocated before.
    fn reserve(&self, journal: &JournalWriter, filled: &mut Reserved) -> Result<()> {
        let jpath = self.target.journal_path();
        let bs = self.spec.geometry.block_size.bytes();
        let mut pending: Option<(u64, u64)> = None;
        let disk = self.disk.as_ref();
        let path = &self.disk_path;
        let old_len = self.old_len;
        let mut flush = |r: (u64, u64)| -> Result<()> {
            let inside = r.1.min(old_len);
            if r.0 < inside {
                let mut at = r.0;
                for (off, len) in disk.data_ranges(r.0, inside - r.0).ctx(Place::Target, "inspecting", path)? {
                    if off > at {
                        filled.holes.push((at, off - at));
                    }
                    at = at.max(off + len);
                }
                if at < inside {
                    filled.holes.push((at, inside - at));
                }
            }
            filled.past_end |= r.1 > old_len;
            disk.reserve(r.0, r.1 - r.0).ctx(Place::Target, "reserving space in", path)
        };
        journal::scan(&journal.storage(), &jpath, &mut |e| {
            if let Entry::Patch { block, ranges, .. } = e {
                for (off, len) in ranges {
                    let (s, end) = (block * bs + off as u64, block * bs + off as u64 + len as u64);
                    pending = match pending {
                        Some((ps, pe)) if s <= pe => Some((ps, pe.max(end))),
                        Some(r) => {
                            flush(r)?;
                            Some((s, end))
                        }
                        None => Some((s, end)),
                    };
                }
            }
            Ok(())
        })?;
        if let Some(r) = pending {
            flush(r)?;
        }
        Ok(())
    }

    /// Writes the undo segment restoring `base` from `newer` and syncs it.
    fn save_undo(&self, base: Generation, newer: Generation) -> Result<([u8; 32], u64)> {
        let vfs = self.target.vfs.clone();
        let upath = self.target.dir.join(undo_file(base));
        let old_disk_bytes =
            self.target.catalog.as_ref().and_then(|c| c.current()).map_or(self.old_len, |p| p.geometry.disk_bytes);
        let header = UndoHeader {
            block_size: self.spec.geometry.block_size,
            generation: base,
            newer,
            old_disk_bytes,
            new_disk_bytes: self.spec.geometry.disk_bytes,
        };
        let mut w = UndoWriter::create(vfs.as_ref(), &upath, self.disk.as_ref(), &header)?;
        let jpath = self.target.journal_path();
        let storage = vfs.open(&jpath, OpenHow::Read).ctx(Place::State, "opening", &jpath)?;
        let bs = self.spec.geometry.block_size.bytes();
        journal::scan(&storage, &jpath, &mut |e| match e {
            Entry::Patch { block, ranges, .. } => {
                for (off, len) in ranges {
                    w.save_overwrite(block * bs + off as u64, len as u64)?;
                }
                Ok(())
            }
            Entry::Zero { offset, len } => w.save_zeroing(offset, len),
        })?;
        if self.spec.geometry.disk_bytes < old_disk_bytes {
            w.save_zeroing(self.spec.geometry.disk_bytes, old_disk_bytes - self.spec.geometry.disk_bytes)?;
        }
        w.finish()
    }

    /// A state filesystem that ran out of space: the staged data cannot
    /// lead to a commit (the next push would fail the same way), so it is
    /// released instead of kept for resume, and the error says how much
    /// room a delta like this one needs.
    fn state_full(&mut self, e: Error) -> Error {
        if e.code != ErrorCode::StateFull {
            return e;
        }
        self.spec.resumable = false;
        let staged = self.journal.as_ref().map_or(0, |j| j.len());
        let mib = |b: u64| b.div_ceil(1 << 20);
        Error {
            message: format!(
                "{}: the state directory's filesystem filled up after {} MiB of this delta were staged; they were released",
                e.message,
                mib(staged)
            ),
            hint: Some(format!(
                "a delta needs about twice its size free there (redo log, then undo data): free more than {} MiB on the \
                 state directory's filesystem (or point --state-dir elsewhere), or push a smaller change, then push again",
                mib(2 * staged)
            )),
            ..e
        }
    }

    /// Gives back what a reservation allocated (after a failure before the commit point).
    fn release_reservation(&mut self) {
        let Some(r) = self.reserved.take() else { return };
        for (off, len) in r.holes {
            let _ = self.disk.zero_range(off, len);
        }
        if r.past_end {
            // Truncating to the current size frees blocks allocated past it.
            let _ = self.disk.set_len(self.old_len);
        }
    }

    /// After a failed commit: drop the journal unless resumable.
    fn abort_after_failure(&mut self) {
        if !self.committed {
            self.cleanup_uncommitted();
        }
    }

    fn cleanup_uncommitted(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.release_reservation();
        let vfs = self.target.vfs.clone();
        if let Some(mut j) = self.journal.take() {
            let _ = j.sync_entries();
        }
        let _ = vfs.remove_file(&self.manifest_path);
        if !self.spec.resumable {
            // A failed seal may still have left a durable commit record: the
            // journal goes (durably) first, the data it could name after.
            let removed = self.target.remove_journal().is_ok() && vfs.sync_dir(&self.target.dir).is_ok();
            if removed && self.spec.mode == ApplyMode::Partial {
                let _ = vfs.remove_file(&self.disk_path);
            }
        }
    }
}

impl Drop for Apply<'_> {
    fn drop(&mut self) {
        self.cleanup_uncommitted();
    }
}
