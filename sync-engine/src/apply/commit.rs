//! The commit protocol of one apply: everything before the commit point
//! (`prepare`), the commit point (`seal`), and the steps after it that
//! recovery repeats (`finish`). See `docs/design.md` §4.

use diskferry_protocol::{BlockHash, Consistency, ErrorCode, Generation};

use super::catalog::PointRecord;
use super::journal::{CommitRecord, JournalHeader, JournalWriter};
use super::undo::{UndoHeader, UndoWriter};
use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::{Manifest, ManifestMeta};
use crate::store::{DiskKind, Storage};

use super::session::*;
use super::target::*;

/// The identity of the generation being committed.
#[derive(Clone, Copy, Debug)]
pub struct CommitMeta {
    /// Its id.
    pub generation: Generation,
    /// Its consistency.
    pub consistency: Consistency,
    /// Commit time (ns since the epoch).
    pub created_unix_ns: i64,
    /// A member of a replication group's commit (`apply/group.rs`).
    pub grouped: bool,
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

/// An apply whose every step before the commit point is durable
/// ([`Apply::prepare`]); [`Prepared::seal`] makes it the committed one.
#[derive(Debug)]
pub struct Prepared<'t> {
    apply: Apply<'t>,
    meta: CommitMeta,
    step: PreparedStep,
}

#[derive(Debug)]
struct PreparedStep {
    root: BlockHash,
    manifest_checksum: [u8; 32],
    /// Journal and partial modes: the log and the record that seals it.
    journal: Option<(JournalWriter, CommitRecord)>,
}

/// An apply past its commit point ([`Prepared::seal`]): the new generation
/// is the target's, whatever happens next; [`Sealed::finish`] (or recovery
/// after a crash) writes it in place.
#[derive(Debug)]
pub struct Sealed<'t> {
    apply: Apply<'t>,
    meta: CommitMeta,
    root: BlockHash,
    finish: Option<(JournalHeader, CommitRecord)>,
    log_bytes: u64,
}

impl<'t> Prepared<'t> {
    /// The commit point (F5): the commit record is written and synced
    /// (journal and partial modes). A block device written directly has no
    /// log: its catalog replace (F7, F8) is the commit point.
    pub fn seal(self) -> Result<Sealed<'t>> {
        let Prepared { mut apply, meta, step } = self;
        match step.journal {
            Some((journal, record)) => {
                let log_bytes = journal.len();
                let jheader = *journal.header();
                // A failed seal may still have left a durable record: dropping
                // `apply` keeps or removes the log as for any failure before
                // the commit point, and the next open decides.
                journal.seal(&record)?;
                // Committed: from here on a failure is finished by recovery, not undone.
                apply.done = true;
                apply.committed = true;
                apply.target.staged = None;
                Ok(Sealed { apply, meta, root: step.root, finish: Some((jheader, record)), log_bytes })
            }
            None => {
                let point = PointRecord {
                    generation: meta.generation,
                    parent: None,
                    consistency: meta.consistency,
                    created_unix_ns: meta.created_unix_ns,
                    geometry: apply.spec.geometry,
                    manifest_checksum: step.manifest_checksum,
                    root: step.root,
                    undo: None,
                };
                apply.target.write_new_catalog(DiskKind::BlockDevice, vec![point], None)?;
                apply.done = true;
                apply.committed = true;
                Ok(Sealed { apply, meta, root: step.root, finish: None, log_bytes: 0 })
            }
        }
    }

    /// The generation this apply commits.
    pub fn generation(&self) -> Generation {
        self.meta.generation
    }

    /// A block device written directly: no log, its seal is its catalog
    /// (and it held no recovery point while it was written).
    pub fn is_direct(&self) -> bool {
        self.step.journal.is_none()
    }

    /// The target's path.
    pub fn target_path(&self) -> &std::path::Path {
        self.apply.target.path()
    }
}

impl Sealed<'_> {
    /// The steps after the commit point (F6–F8): write the log in place (or
    /// rename the `.partial`), sync the target, replace the catalog, remove
    /// the log. Idempotent: recovery runs the same code after a crash.
    pub fn finish(mut self) -> Result<CommitReport> {
        let mut undo_bytes = 0;
        if let Some((jheader, record)) = self.finish.take() {
            undo_bytes = record.undo.map_or(0, |u| u.1);
            let disk = self.apply.disk.clone();
            self.apply.target.finish_commit(&jheader, &record, Some(disk))?;
            self.apply.target.remove_journal()?;
        }
        Ok(CommitReport {
            generation: self.meta.generation,
            root: self.root,
            bytes_written: self.apply.stats.data_bytes,
            log_bytes: self.log_bytes,
            undo_bytes,
        })
    }
}

impl<'t> Apply<'t> {
    /// Commits the new generation: [`Apply::prepare`], [`Prepared::seal`],
    /// [`Sealed::finish`] in a row.
    pub fn commit(self, meta: CommitMeta) -> Result<CommitReport> {
        self.prepare(meta)?.seal()?.finish()
    }

    /// Everything before the commit point, each step durable; the target's
    /// bytes are untouched. Steps (fsyncs numbered as in `docs/design.md` §4):
    ///
    /// 1. finish the new manifest, sync it and rename it into place (F1);
    /// 2. journal: sync the staged entries (F2, on its own thread) while
    ///    every range the replay will write is reserved (fallocate), so a
    ///    full filesystem fails here, and the old content of those ranges
    ///    is saved to an undo segment and synced (F3). Partial: size and sync the `.partial`, sync its
    ///    directory, sync the journal's header. Direct: sync the device;
    /// 3. sync the state directory, making the names durable (F4).
    ///
    /// Dropped without [`Prepared::seal`], the target keeps its committed
    /// generation (the staged data is kept for resume when resumable). A
    /// replication group prepares every member before it seals any.
    pub fn prepare(mut self, meta: CommitMeta) -> Result<Prepared<'t>> {
        match self.prepare_inner(meta) {
            Ok(step) => Ok(Prepared { apply: self, meta, step }),
            Err(e) => {
                let e = self.state_full(e);
                // Dropping `self` releases what the failed steps took.
                Err(e)
            }
        }
    }

    fn prepare_inner(&mut self, meta: CommitMeta) -> Result<PreparedStep> {
        let vfs = self.target.vfs.clone();
        let dir = self.target.dir.clone();
        let Some(writer) = self.manifest.take() else {
            return Err(Error::new(ErrorCode::Internal, "apply already committed"));
        };
        let manifest_meta = ManifestMeta {
            generation: meta.generation,
            parent: self.spec.base,
            consistency: meta.consistency,
            created_unix_ns: meta.created_unix_ns,
        };
        let mpath = dir.join(manifest_file(meta.generation));
        let tmp = self.manifest_path.clone();
        let finish_manifest = || -> Result<(BlockHash, [u8; 32])> {
            let header = writer.finish(manifest_meta)?;
            vfs.rename(&tmp, &mpath).ctx(Place::State, "renaming", &mpath)?;
            Ok((header.root, Manifest::open(vfs.as_ref(), &mpath)?.checksum()))
        };

        if self.spec.mode == ApplyMode::Direct {
            let (root, manifest_checksum) = finish_manifest()?;
            vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir)?;
            self.disk.sync().ctx(Place::Target, "syncing", &self.disk_path)?;
            return Ok(PreparedStep { root, manifest_checksum, journal: None });
        }

        let Some(mut journal) = self.journal.take() else {
            return Err(Error::new(ErrorCode::Internal, "apply without a journal"));
        };
        // F1 (the manifest's sync) runs beside the log's steps: each must be
        // durable before F4, in any order, and none counts before the commit
        // record names it.
        // Taken by the thread, or here when no thread could be started.
        let job = std::sync::Mutex::new(Some(finish_manifest));
        let run = || match job.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(finish) => finish(),
            None => Err(Error::new(ErrorCode::Internal, "the manifest was finished twice")),
        };
        let started = std::time::Instant::now();
        let (manifest, logged) = std::thread::scope(|s| {
            let finishing = std::thread::Builder::new().name("df-manifest".into()).spawn_scoped(s, || {
                let finished = run();
                tracing::debug!(in_ = ?started.elapsed(), "commit: manifest finished");
                finished
            });
            let logged = self.prepare_log(meta, &mut journal);
            let manifest = match finishing {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|_| Err(Error::new(ErrorCode::Internal, "finishing the manifest panicked"))),
                // Without a thread to spare, it runs here, after the log's steps.
                Err(_) => run(),
            };
            (manifest, logged)
        });
        let ((root, manifest_checksum), undo) = match (manifest, logged) {
            (Ok(m), Ok(u)) => (m, u),
            // A full state filesystem wins over another failure: `prepare`
            // releases the staged data with a hint (`state_full`) only then.
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => {
                self.journal = Some(journal);
                return Err(e);
            }
            (Err(m), Err(l)) => {
                self.journal = Some(journal);
                return Err(if m.code == ErrorCode::StateFull { m } else { l });
            }
        };
        if let Err(e) = vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir) {
            self.journal = Some(journal);
            return Err(e);
        }
        tracing::debug!(in_ = ?started.elapsed(), "commit: prepared");
        let record = CommitRecord {
            generation: meta.generation,
            entries: journal.entries(),
            entries_digest: journal.entries_digest(),
            manifest_checksum,
            undo,
            grouped: meta.grouped,
        };
        Ok(PreparedStep { root, manifest_checksum, journal: Some((journal, record)) })
    }

    /// The log's steps before the commit point (F2, F3 and the
    /// reservation for a delta; the `.partial`'s size and syncs for a full
    /// copy). Returns the undo segment's checksum and data bytes, if one
    /// was written.
    fn prepare_log(&mut self, meta: CommitMeta, journal: &mut JournalWriter) -> Result<Option<([u8; 32], u64)>> {
        if self.spec.mode != ApplyMode::Journal {
            let vfs = self.target.vfs.clone();
            self.disk.set_len(self.spec.geometry.disk_bytes).and_then(|_| self.disk.sync()).ctx(
                Place::Target,
                "syncing",
                &self.disk_path,
            )?;
            // The `.partial` name must be durable before a commit record names it.
            let parent = parent_dir(&self.disk_path);
            vfs.sync_dir(&parent).ctx(Place::Target, "syncing", &parent)?;
            journal.sync_entries()?;
            return Ok(None);
        }
        journal.flush_entries()?;
        // F2 runs beside the reservation and the undo segment (F3),
        // which only read the flushed log: both must be durable
        // before F4, in either order, and neither counts until the
        // commit record names them. The log's sync then costs no
        // time of its own (a hinted delta's commit is on the
        // downtime path of a failover).
        let log = journal.storage();
        let journal = &*journal;
        let (synced, reserved, saved) = std::thread::scope(|s| {
            // Without a thread to spare, the sync runs first, inline.
            let syncing = std::thread::Builder::new()
                .name("df-log-sync".into())
                .spawn_scoped(s, || log.sync())
                .map_err(|_| log.sync());
            // Reserving touches the target's times, not its bytes:
            // after a failure from here on, the next open proves the
            // bytes unchanged by hashing (`settle_trust`).
            let mut reserved = Reserved::default();
            let started = std::time::Instant::now();
            let saved = self.reserve(journal, &mut reserved).and_then(|()| {
                let reserved_in = started.elapsed();
                let saved = match self.spec.base {
                    Some(base) => self.save_undo(journal, base, meta.generation).map(Some),
                    None => Ok(None),
                };
                tracing::debug!(?reserved_in, undo_saved_in = ?started.elapsed() - reserved_in, "commit: space reserved, undo saved");
                saved
            });
            let synced = match syncing {
                Ok(thread) => thread.join().unwrap_or_else(|_| Err(std::io::Error::other("the sync panicked"))),
                Err(inline) => inline,
            };
            (synced, reserved, saved)
        });
        self.reserved = Some(reserved);
        let synced = synced.ctx(Place::State, "syncing redo log", &self.target.journal_path());
        // When both fail, the undo segment's error says more (a full
        // state filesystem is released with a hint: `state_full`).
        saved.and_then(|u| synced.map(|()| u))
    }

    /// Allocates every range the replay will write, merging neighbours, and
    /// notes in `filled` what was not allocated before.
    fn reserve(&self, journal: &JournalWriter, filled: &mut Reserved) -> Result<()> {
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
        journal.visit_touched(&mut |t| {
            if t.data {
                let (s, end) = (t.offset, t.offset + t.len);
                pending = match pending {
                    Some((ps, pe)) if s <= pe => Some((ps, pe.max(end))),
                    Some(r) => {
                        flush(r)?;
                        Some((s, end))
                    }
                    None => Some((s, end)),
                };
            }
            Ok(())
        })?;
        if let Some(r) = pending {
            flush(r)?;
        }
        Ok(())
    }

    /// Writes the undo segment restoring `base` from `newer` and syncs it.
    fn save_undo(&self, journal: &JournalWriter, base: Generation, newer: Generation) -> Result<([u8; 32], u64)> {
        let old_disk_bytes =
            self.target.catalog.as_ref().and_then(|c| c.current()).map_or(self.old_len, |p| p.geometry.disk_bytes);
        let header = UndoHeader {
            block_size: self.spec.geometry.block_size,
            generation: base,
            newer,
            old_disk_bytes,
            new_disk_bytes: self.spec.geometry.disk_bytes,
        };
        save_log_undo(self.target, self.disk.as_ref(), journal, &header)
    }

    /// A state filesystem that ran out of space: the staged data cannot
    /// lead to a commit (the next push would fail the same way), so it is
    /// released instead of kept for resume, and the error says how much
    /// room a delta like this one needs.
    pub(super) fn state_full(&mut self, e: Error) -> Error {
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

    pub(super) fn cleanup_uncommitted(&mut self) {
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

/// Writes `<header.generation>.undo`: the target's current content of every
/// range the staged redo log writes or zeroes (and of a tail a shrink
/// cuts), then syncs it. Returns its checksum and data bytes.
pub(super) fn save_log_undo(
    target: &Target,
    disk: &dyn Storage,
    journal: &JournalWriter,
    header: &UndoHeader,
) -> Result<([u8; 32], u64)> {
    let vfs = target.vfs.clone();
    let upath = target.dir.join(undo_file(header.generation));
    let mut w = UndoWriter::create(vfs.as_ref(), &upath, disk, header)?;
    // The log's ranges are of the new geometry, as is the segment's block size.
    journal.visit_touched(&mut |t| match t.data {
        true => w.save_overwrite(t.offset, t.len),
        false => w.save_zeroing(t.offset, t.len),
    })?;
    if header.new_disk_bytes < header.old_disk_bytes {
        w.save_zeroing(header.new_disk_bytes, header.old_disk_bytes - header.new_disk_bytes)?;
    }
    w.finish()
}
