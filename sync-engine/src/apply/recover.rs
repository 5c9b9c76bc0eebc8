//! Recovery: what opening a target does about an interrupted apply
//! (finish a committed one, set an uncommitted one aside or keep it for
//! resume), and the steps after a commit point that recovery repeats.

use std::collections::HashMap;
use std::sync::Arc;

use diskferry_protocol::{BlockHash, ErrorCode, Geometry};

use super::catalog::{write_catalog, Catalog, PointRecord, Role, Status, UndoRef, CATALOG};
use super::journal::{self, CommitRecord, Entry, JournalHeader, JournalKind};
use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::Manifest;
use crate::store::{DiskKind, OpenHow, Storage};

use super::target::*;

impl Target {
    pub(super) fn recover(&mut self) -> Result<()> {
        let jpath = self.journal_path();
        if self.vfs.metadata(&jpath).ctx(Place::State, "reading", &jpath)?.is_none() {
            return Ok(());
        }
        let storage = self.vfs.open(&jpath, OpenHow::Read).ctx(Place::State, "opening", &jpath)?;
        let mut scan = journal::scan(&storage, &jpath, &mut |_| Ok(()))?;
        drop(storage);
        if let Some(s) = scan.as_mut() {
            self.ungroup_uncommitted(s, &jpath)?;
        }
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

    /// A replication group member sealed before its group's commit point
    /// (no group record): its commit record is taken off the log, and the
    /// apply is what it was before the seal — interrupted before its
    /// commit point (kept for resume when resumable).
    fn ungroup_uncommitted(&mut self, scan: &mut journal::Scan, jpath: &std::path::Path) -> Result<()> {
        let Some(record) = scan.commit.filter(|r| r.grouped) else { return Ok(()) };
        let current = self.catalog.as_ref().and_then(|c| c.current()).map(|p| p.generation);
        if current == Some(record.generation)
            || super::group::is_committed(self.vfs.as_ref(), &self.state_root, record.generation)?
        {
            return Ok(());
        }
        let log = self.vfs.open(jpath, OpenHow::ReadWrite).ctx(Place::State, "opening", jpath)?;
        log.set_len(scan.valid_len).ctx(Place::State, "truncating", jpath)?;
        log.sync().ctx(Place::State, "syncing", jpath)?;
        scan.commit = None;
        Ok(())
    }

    /// Before an uncommitted (or unreadable) journal is set aside: if the
    /// target's stamp moved, prove its bytes are still the committed ones. A
    /// journal whose commit record was lost to damage after replay began
    /// would otherwise leave a mix behind under the old generation.
    pub(super) fn check_untouched(&mut self) -> Result<()> {
        let exists = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.is_some();
        // A target that is gone holds no mix to protect.
        if exists && matches!(self.trust()?, Trust::Unverified(_) | Trust::Diverged { .. }) {
            let report = self.check(&crate::progress::NoProgress)?;
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

    pub(super) fn discard_staged(&mut self, kind: JournalKind) -> Result<()> {
        if kind == JournalKind::Partial {
            let p = partial_path(&self.path);
            self.vfs.remove_file(&p).ctx(Place::Target, "removing", &p)?;
        }
        self.staged = None;
        self.remove_journal()
    }

    /// Block → hash of every block the staged journal updates (whole zeroed
    /// blocks included), the last entry winning.
    pub(super) fn staged_overlay(&self, g: &Geometry) -> Result<HashMap<u64, BlockHash>> {
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

    pub(super) fn remove_journal(&self) -> Result<()> {
        let p = self.journal_path();
        self.vfs.remove_file(&p).ctx(Place::State, "removing", &p)
    }

    /// Removes files no kept point or pending journal refers to.
    pub(super) fn collect_garbage(&self) -> Result<()> {
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
                // Freeing a delta's log or a pruned undo segment is not
                // waited for: it is on the commit's path.
                self.vfs.remove_later(&p).ctx(Place::State, "removing", &p)?;
            }
        }
        Ok(())
    }

    /// Everything after a commit record is durable: write in place (or
    /// rename the `.partial`), then record the new generation in the catalog.
    /// Idempotent, so recovery runs it again after a crash.
    /// `disk` is the target as the apply holds it open (a block device is
    /// opened exclusively, so it cannot be opened twice); recovery opens it.
    pub(super) fn finish_commit(
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
            JournalKind::Redo | JournalKind::Move => {
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
        if header.kind == JournalKind::Move {
            return self.finish_move(kind, header, record);
        }
        let chain_continues = header.kind == JournalKind::Redo
            && header.base.is_some()
            && self.catalog.as_ref().and_then(|c| c.current()).map(|p| p.generation) == header.base;
        let mut points = if chain_continues {
            let mut old = self.catalog.as_ref().map(|c| c.points.clone()).unwrap_or_default();
            if let Some(first) = old.first_mut() {
                first.undo = record.undo.map(|(checksum, data_bytes)| UndoRef {
                    checksum,
                    data_bytes,
                    applies_to: record.generation,
                });
                if first.undo.is_none() {
                    // Without an undo segment the previous point cannot be rebuilt.
                    old.clear();
                }
            }
            old
        } else {
            Vec::new()
        };
        points.insert(0, PointRecord::of(&manifest));
        self.write_new_catalog(kind, points, None)
    }

    /// The catalog after a committed move to a kept point: that point is
    /// the current one (role `live`), the old current one is restored from
    /// it by the move's undo segment, every other link stays. Nothing is
    /// pruned: until `commit` every kept point stays reachable.
    fn finish_move(&mut self, kind: DiskKind, header: &JournalHeader, record: &CommitRecord) -> Result<()> {
        let cpath = self.dir.join(CATALOG);
        let old = self.catalog.as_ref().map(|c| c.points.clone()).unwrap_or_default();
        let (Some(base), Some(current)) = (header.base, old.first().copied()) else {
            return Err(Error::corrupt(&cpath, "a move was committed for a target without points"));
        };
        if current.generation != base || !old.iter().any(|p| p.generation == record.generation) {
            return Err(Error::corrupt(&cpath, "it does not hold the points the committed move names"));
        }
        let Some((checksum, data_bytes)) = record.undo else {
            return Err(Error::corrupt(&self.journal_path(), "a committed move without undo data"));
        };
        let mut points = Vec::with_capacity(old.len());
        for mut p in old {
            if p.generation == record.generation {
                p.undo = None;
                points.insert(0, p);
                continue;
            }
            if p.generation == base {
                p.undo = Some(UndoRef { checksum, data_bytes, applies_to: record.generation });
            }
            points.push(p);
        }
        self.write_new_catalog(kind, points, Some(Role::Live))
    }

    /// Whether the target's bytes are those of `manifest`, as a typed error.
    pub(super) fn check_copy(&self, manifest: &Manifest) -> Result<()> {
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
        let disk =
            crate::disk::Disk::open_on(self.vfs.as_ref(), &self.path).ctx(Place::Target, "opening", &self.path)?;
        let (mismatched, _) = crate::manifest::compare::compare_with_manifest(
            &disk,
            &self.path,
            manifest,
            &crate::progress::NoProgress,
            true,
        )?;
        if mismatched > 0 {
            return Err(damaged());
        }
        Ok(())
    }

    pub(super) fn kind_of_target(&self) -> Result<DiskKind> {
        let meta = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
        meta.map(|m| m.kind)
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("{} disappeared", self.path.display())))
    }

    /// Replaces the catalog with `points` (the current one first), stamped
    /// now; `role` changes the role (a move), else it is kept. Pruned to the
    /// retention unless this is a move.
    pub(super) fn write_new_catalog(
        &mut self,
        kind: DiskKind,
        points: Vec<PointRecord>,
        role: Option<Role>,
    ) -> Result<()> {
        let stamp = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.map(|m| m.stamp);
        let mut c = Catalog {
            path: self.path.clone(),
            name: self.options.name.clone().or_else(|| self.catalog.as_ref().and_then(|c| c.name.clone())),
            kind,
            status: Status::Complete,
            stamp,
            role: role.unwrap_or_else(|| self.catalog.as_ref().map_or(Role::Replica, |c| c.role)),
            points,
            pins: self.catalog.as_ref().map(|c| c.pins.clone()).unwrap_or_default(),
        };
        if let (Some(r), None) = (self.options.retention, role) {
            c.prune(r, &self.options.keep_points);
        }
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        // The disk's bytes are this target's generation now, not what it
        // was last pushed as.
        crate::history::clear(self.vfs.as_ref(), &self.state_root, &self.path)?;
        self.collect_garbage()
    }

    /// Writes a committed journal's entries in place, sets the size and syncs.
    pub(super) fn replay(&self, header: &JournalHeader, disk: &dyn Storage) -> Result<()> {
        let jpath = self.journal_path();
        let storage = self.vfs.open(&jpath, OpenHow::Read).ctx(Place::State, "opening", &jpath)?;
        let bs = header.geometry.block_size.bytes();
        let path = &self.path;
        // Patches on the page grid go past the cache, several at a time
        // (`inflight.rs`); the rest is written through it, and the device
        // writes those while the replay goes on, so the sync below finds
        // little left (the span between kicks may hold other dirty pages of
        // the image: they are due anyway).
        let mut pacer = crate::seqio::FlushPacer::new(LOG_FLUSH_EVERY);
        let started = std::time::Instant::now();
        super::inflight::with_writers(
            disk,
            |direct| {
                journal::scan(&storage, &jpath, &mut |e| match e {
                    Entry::Patch { block, ranges, data, .. } => {
                        let mut at = 0usize;
                        for (off, len) in ranges {
                            let bytes = &data[at..at + len as usize];
                            let start = block * bs + off as u64;
                            if super::inflight::InFlight::fits(start, bytes) {
                                direct.write(start, bytes).ctx(Place::Target, "writing", path)?;
                            } else {
                                direct.drain().ctx(Place::Target, "writing", path)?;
                                disk.write_at(start, bytes).ctx(Place::Target, "writing", path)?;
                                pacer.wrote(disk, start, start + u64::from(len));
                            }
                            at += len as usize;
                        }
                        Ok(())
                    }
                    Entry::Zero { offset, len } => {
                        direct.drain().ctx(Place::Target, "writing", path)?;
                        disk.zero_range(offset, len).ctx(Place::Target, "zeroing", path)
                    }
                })
                .map(|_| ())
            },
            |e| Error::io(Place::Target, "writing", path, e),
        )?;
        if self.kind_of_target()? == DiskKind::File {
            disk.set_len(header.geometry.disk_bytes).ctx(Place::Target, "resizing", path)?;
        }
        let written_in = started.elapsed();
        disk.sync().ctx(Place::Target, "syncing", path)?;
        tracing::debug!(?written_in, synced_in = ?started.elapsed() - written_in, "commit: log replayed");
        Ok(())
    }
}
