//! Failover moves on a target's own points: promote (`failover`, to the
//! latest or a chosen recovery point), `commit`, `demote`, and the pins of
//! test-failover clones. A move to another point is one redo log: the undo
//! data from the current point to the chosen one, committed and replayed
//! like a delta (`docs/design.md` §4.1), so a crash leaves the old point or
//! the chosen one, never a mix; and the commit saves what it overwrites, so
//! the point it left stays reachable until `commit`.

use std::path::Path;

use diskferry_protocol::{ErrorCode, Generation, SessionId};

use super::catalog::{write_catalog, Catalog, Pin, PointRecord, Role, Status};
use super::commit::save_log_undo;
use super::journal::{CommitRecord, JournalHeader, JournalKind, JournalWriter};
use super::undo::{read_undo_entries, UndoEntry, UndoHeader};
use crate::error::{Error, IoContext, Place, Result};
use crate::store::Storage;

use super::target::*;

/// What a failover did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveReport {
    /// The point the target was at.
    pub from: Generation,
    /// The point it is at now.
    pub to: Generation,
    /// Whether its bytes changed (another point than the current one).
    pub moved: bool,
    /// Undo segments the move went through.
    pub segments: usize,
    /// Bytes of restored content written in place.
    pub bytes_restored: u64,
    /// Bytes saved so the point it left stays reachable.
    pub undo_bytes: u64,
}

/// What `commit` dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPointsReport {
    /// The point kept.
    pub kept: Generation,
    /// The points dropped (fuzzy links included).
    pub dropped: Vec<Generation>,
    /// Undo data freed.
    pub undo_bytes_freed: u64,
    /// Points kept because a test-failover clone pins them.
    pub pinned: Vec<Generation>,
}

impl Target {
    /// The target's role, if it has committed state.
    pub fn role(&self) -> Option<Role> {
        self.catalog.as_ref().filter(|c| c.status == Status::Complete).map(|c| c.role)
    }

    /// A complete catalog, or the error a move on this target gets.
    pub(super) fn complete_catalog(&self) -> Result<&Catalog> {
        match &self.catalog {
            None => Err(Error::new(ErrorCode::NoState, format!("diskferry has no state for {}", self.path.display()))
                .hint("pass the --state-dir (or --config) it is served with")),
            Some(c) if c.status == Status::Incomplete => Err(Error::new(
                ErrorCode::Incomplete,
                format!("{} is in the middle of a full copy and holds no recovery point", self.path.display()),
            )
            .hint("finish the full download first (push again)")),
            Some(c) if c.points.is_empty() => {
                Err(Error::corrupt(&self.dir.join("catalog"), "a complete catalog without points"))
            }
            Some(c) => Ok(c),
        }
    }

    /// Promotes the target (`failover`): brings it to `to` (the newest
    /// consistent point by default) in place and marks it `live`. To the
    /// current point nothing is read or written; to another one the cost
    /// follows the undo data between them, not the disk.
    pub fn failover(&mut self, to: Option<Generation>) -> Result<MoveReport> {
        // A push's staged blocks can never land on a live disk.
        self.discard()?;
        let c = self.complete_catalog()?;
        let current = c.points[0];
        let chosen = match to {
            Some(g) => *c.point(g).ok_or_else(|| {
                Error::new(ErrorCode::NoSuchPoint, format!("no point {g} is kept for {}", self.path.display()))
                    .hint("list them with `diskferry points`")
            })?,
            None => *c
                .points
                .iter()
                .filter(|p| p.consistency.is_recovery_point())
                .max_by_key(|p| (p.created_unix_ns, p.generation == current.generation))
                .ok_or_else(|| {
                    Error::new(
                        ErrorCode::NoSuchPoint,
                        format!("{} holds no consistent recovery point, only fuzzy copies", self.path.display()),
                    )
                    .hint("push from a snapshot or a stopped source first")
                })?,
        };
        if !chosen.consistency.is_recovery_point() {
            return Err(Error::new(
                ErrorCode::NoSuchPoint,
                format!("{} is a fuzzy copy of a running disk, not a recovery point", chosen.generation),
            )
            .hint("choose a crash- or app-consistent point from `diskferry points`"));
        }
        let role = c.role;
        if self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.is_none() {
            return Err(Error::new(ErrorCode::NotFound, format!("{} does not exist", self.path.display()))
                .hint("a failover needs the replica's disk: restore it, or push a full copy"));
        }
        match self.settle_trust()? {
            Trust::Trusted(_) => {}
            Trust::Diverged { why, .. } if role == Role::Live => {
                if chosen.generation == current.generation {
                    return Ok(MoveReport::stay(current.generation));
                }
                return Err(Error::new(
                    ErrorCode::WrittenSincePromote,
                    format!(
                        "{} was written since it was promoted to {} ({why}): moving it to {} would lose those writes",
                        self.path.display(),
                        current.generation,
                        chosen.generation
                    ),
                )
                .hint("the VM's writes replaced blocks of the promoted point; export the other point with `diskferry test-failover` instead"));
            }
            Trust::Diverged { why, .. } => return Err(self.diverged(&why)),
            _ => return Err(Error::new(ErrorCode::NoState, "no committed generation")),
        }
        if chosen.generation == current.generation {
            if role != Role::Live {
                self.set_role(Role::Live)?;
            }
            return Ok(MoveReport::stay(current.generation));
        }
        let path = self.complete_catalog()?.path_to(chosen.generation).ok_or_else(|| {
            Error::corrupt(&self.dir.join("catalog"), "a kept point's undo links do not reach the current one")
        })?;
        let disk = self.open_for_write()?;
        let header = JournalHeader {
            kind: JournalKind::Move,
            resumable: false,
            session: SessionId(chosen.generation.0),
            base: Some(current.generation),
            geometry: chosen.geometry,
        };
        let staged = self.stage_move(&header, &path, &current, &chosen, disk.as_ref());
        let (record, data_bytes) = match staged {
            Ok(r) => r,
            Err(e) => {
                // Nothing was written in place: the target stays where it was.
                let _ = self.remove_journal();
                let _ = self.vfs.remove_file(&self.dir.join(format!("{}.undo", current.generation)));
                return Err(e);
            }
        };
        self.finish_commit(&header, &record, Some(disk))?;
        self.remove_journal()?;
        Ok(MoveReport {
            from: current.generation,
            to: chosen.generation,
            moved: true,
            segments: path.len(),
            bytes_restored: data_bytes,
            undo_bytes: record.undo.map_or(0, |u| u.1),
        })
    }

    /// Everything of a move up to and including its commit point: the log
    /// of the chosen point's content, the reservation, the undo segment of
    /// the current point, the commit record.
    fn stage_move(
        &self,
        header: &JournalHeader,
        path: &[PointRecord],
        current: &PointRecord,
        chosen: &PointRecord,
        disk: &dyn Storage,
    ) -> Result<(CommitRecord, u64)> {
        let vfs = self.vfs.clone();
        let jpath = self.journal_path();
        let mut j = JournalWriter::create(vfs.as_ref(), &jpath, *header)?;
        let g = header.geometry;
        let bs = g.block_size.bytes();
        let end = g.disk_bytes;
        let mut size = current.geometry.disk_bytes;
        // Later segments override earlier ones, as replay writes in order;
        // each segment's change of size becomes a zero range, so bytes past
        // a smaller intermediate size do not survive a later growth.
        for p in path {
            let (upath, uh) = self.checked_undo(p)?;
            if uh.old_disk_bytes > size {
                // Growing back: the segment saved only the data of the tail
                // its commit cut, so the rest reads as zeros — which a
                // device (never cut) only does if it is zeroed.
                zero_within(&mut j, size, uh.old_disk_bytes - size, end)?;
            }
            read_undo_entries(vfs.as_ref(), &upath, &mut |e| match e {
                UndoEntry::Data { offset, bytes } => {
                    let mut at = offset;
                    let stop = (offset + bytes.len() as u64).min(end);
                    while at < stop {
                        let block = at / bs;
                        let n = ((block + 1) * bs).min(stop) - at;
                        let from = (at - offset) as usize;
                        j.append_range(block, (at - block * bs) as u32, &bytes[from..from + n as usize])?;
                        at += n;
                    }
                    Ok(())
                }
                UndoEntry::Zero { offset, len } => zero_within(&mut j, offset, len, end),
            })?;
            if uh.old_disk_bytes < size {
                zero_within(&mut j, uh.old_disk_bytes, size - uh.old_disk_bytes, end)?;
            }
            size = uh.old_disk_bytes;
        }
        j.sync_entries()?;
        self.reserve_log(disk, &j)?;
        let undo = save_log_undo(
            self,
            disk,
            &j,
            &UndoHeader {
                block_size: g.block_size,
                generation: current.generation,
                newer: chosen.generation,
                old_disk_bytes: current.geometry.disk_bytes,
                new_disk_bytes: end,
            },
        )?;
        vfs.sync_dir(&self.dir).ctx(Place::State, "syncing", &self.dir)?;
        let record = CommitRecord {
            generation: chosen.generation,
            entries: j.entries(),
            entries_digest: j.entries_digest(),
            manifest_checksum: chosen.manifest_checksum,
            undo: Some(undo),
            grouped: false,
        };
        let data_bytes = j.data_bytes();
        j.seal(&record)?;
        Ok((record, data_bytes))
    }

    /// Allocates every range the staged log writes, so a full filesystem
    /// fails the move before its commit point.
    fn reserve_log(&self, disk: &dyn Storage, journal: &JournalWriter) -> Result<()> {
        let path = &self.path;
        journal.visit_touched(&mut |t| match t.data {
            true => disk.reserve(t.offset, t.len).ctx(Place::Target, "reserving space in", path),
            false => Ok(()),
        })
    }

    /// Rewrites the catalog with another role, stamped now (the bytes are
    /// those of the current point: callers proved it).
    fn set_role(&mut self, role: Role) -> Result<()> {
        let Some(mut c) = self.catalog.clone() else { return Ok(()) };
        c.role = role;
        c.stamp = self.vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?.map(|m| m.stamp);
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        Ok(())
    }

    /// `commit`: keeps the current point (and the points test-failover
    /// clones pin), drops every other one and its undo data — after a
    /// failover the points it could still move to, after a push that
    /// discarded a disk's own changes the point that kept them.
    pub fn commit_point(&mut self) -> Result<CommitPointsReport> {
        let mut c = self.complete_catalog()?.clone();
        let kept = c.points[0].generation;
        c.pins.retain(|p| !p.is_discarded());
        let pinned: Vec<Generation> = c.pins.iter().map(|p| p.generation).collect();
        let mut wanted = pinned.clone();
        wanted.push(kept);
        let dropped = c.keep_only(&wanted);
        let undo_bytes_freed = dropped.iter().filter_map(|p| p.undo).map(|u| u.data_bytes).sum();
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        self.collect_garbage()?;
        Ok(CommitPointsReport {
            kept,
            dropped: dropped.iter().map(|p| p.generation).collect(),
            undo_bytes_freed,
            pinned,
        })
    }

    /// Records that `clone` (a test-failover image) holds point `g`: the
    /// point is kept whatever the retention until [`Target::unpin`].
    pub fn pin(&mut self, g: Generation, clone: &Path) -> Result<()> {
        let Some(mut c) = self.catalog.clone() else { return Ok(()) };
        if clone.as_os_str().is_empty() || c.pins.iter().any(|p| p.clone == clone) {
            return Err(Error::new(
                ErrorCode::InvalidInput,
                format!("{} is already a test-failover clone", clone.display()),
            ));
        }
        c.pins.push(Pin { generation: g, clone: clone.to_path_buf() });
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        Ok(())
    }

    /// Keeps point `g` — a receiving disk's own changes a push discarded —
    /// whatever the retention, until `commit`.
    pub fn pin_discarded(&mut self, g: Generation) -> Result<()> {
        let Some(mut c) = self.catalog.clone() else { return Ok(()) };
        if !c.pins.iter().any(|p| p.generation == g && p.is_discarded()) {
            c.pins.push(Pin { generation: g, clone: Default::default() });
            write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
            self.catalog = Some(c);
        }
        Ok(())
    }

    /// Forgets the clone at `clone`; returns the point it pinned.
    pub fn unpin(&mut self, clone: &Path) -> Result<Option<Generation>> {
        let Some(mut c) = self.catalog.clone() else { return Ok(None) };
        let Some(i) = c.pins.iter().position(|p| p.clone == clone) else { return Ok(None) };
        let pin = c.pins.remove(i);
        if let Some(r) = self.options.retention {
            c.prune(r, &self.options.keep_points);
        }
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        self.collect_garbage()?;
        Ok(Some(pin.generation))
    }

    /// The test-failover clones of this target.
    pub fn pins(&self) -> Vec<Pin> {
        self.catalog.as_ref().map(|c| c.pins.clone()).unwrap_or_default()
    }
}

impl MoveReport {
    fn stay(g: Generation) -> MoveReport {
        MoveReport { from: g, to: g, moved: false, segments: 0, bytes_restored: 0, undo_bytes: 0 }
    }
}

fn zero_within(j: &mut JournalWriter, offset: u64, len: u64, end: u64) -> Result<()> {
    let stop = (offset + len).min(end);
    if offset < stop {
        j.append_zero(offset, stop - offset)?;
    }
    Ok(())
}
