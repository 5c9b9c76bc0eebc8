//! A target disk and its state directory: the lock, the catalog, and how far
//! the committed manifest can be trusted. Recovery is in `recover.rs`, the
//! apply of one session in `session.rs` and `commit.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_protocol::{ErrorCode, Generation};

use super::catalog::{read_catalog, write_catalog, Catalog, PointRecord, Status, CATALOG};
use super::journal::Scan;
use super::undo::{check_undo, UndoHeader};
use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::Manifest;
use crate::store::{FileId, OpenHow, Stamp, Storage, Vfs};

pub(super) const JOURNAL: &str = "redo.log";
pub(super) const LOCK: &str = "lock";
pub(super) const MANIFEST_TMP: &str = "manifest.tmp";
/// Bytes written to a `.partial` file or a device between writeback kicks.
pub(super) const WRITEBACK_EVERY: u64 = 64 << 20;
/// A redo log or undo segment starts writeback every this many bytes: the
/// device is idle while a delta is received, and the commit's syncs then
/// find the log written (measured on a 1 % delta of 4 GiB: the log's sync
/// and the undo segment's shared the device at the commit).
pub(super) const LOG_FLUSH_EVERY: u64 = 4 << 20;

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
    /// Points retention keeps besides its count: a replication group's
    /// newest points, so that a member pushed alone too keeps the group
    /// points its other members keep (the agent knows the group).
    pub keep_points: Vec<Generation>,
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
    pub(super) vfs: Arc<dyn Vfs>,
    pub(super) path: PathBuf,
    pub(super) state_root: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) _lock: LockGuard,
    pub(super) catalog: Option<Catalog>,
    pub(super) staged: Option<Scan>,
    pub(super) options: TargetOptions,
    pub(super) recovery: Recovery,
}

pub(super) struct LockGuard(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockGuard")
    }
}

/// The state subdirectory name for a target path: readable, and unique per path.
pub fn target_key(path: &Path) -> String {
    crate::store::state_key(path)
}

/// The manifest file name of a generation.
pub fn manifest_file(g: Generation) -> String {
    format!("{g}.dfm")
}

pub(super) fn undo_file(g: Generation) -> String {
    format!("{g}.undo")
}

/// `NAME.partial` beside a file target.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".partial");
    PathBuf::from(s)
}

pub(super) fn parent_dir(path: &Path) -> PathBuf {
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
            state_root: state_root.to_path_buf(),
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

    /// The agent's state directory (where every target's and disk's state lives).
    pub fn state_root(&self) -> &Path {
        &self.state_root
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
    pub(super) fn open_for_write(&self) -> Result<Arc<dyn Storage>> {
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
        let root_known = point.root != diskferry_protocol::BlockHash::ZERO;
        if m.checksum() != point.manifest_checksum
            || m.header().generation != point.generation
            || (root_known && m.header().root != point.root)
        {
            return Err(Error::corrupt(&path, "it is not the manifest the catalog recorded"));
        }
        Ok(m)
    }

    /// Path of a kept point's undo segment.
    pub fn undo_path(&self, point: &PointRecord) -> PathBuf {
        self.dir.join(undo_file(point.generation))
    }

    /// A kept point's undo segment, checked whole against the catalog: its
    /// checksum, the point it restores and the one it applies to.
    pub fn checked_undo(&self, point: &PointRecord) -> Result<(PathBuf, UndoHeader)> {
        let path = self.undo_path(point);
        let (header, checksum, _) = check_undo(self.vfs.as_ref(), &path)?;
        let ok = point.undo.is_some_and(|u| {
            u.checksum == checksum && header.generation == point.generation && header.newer == u.applies_to
        });
        if !ok {
            return Err(Error::corrupt(&path, "it is not the undo segment the catalog recorded"));
        }
        Ok((path, header))
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
                let report = self.check(&crate::progress::NoProgress)?;
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

    /// Makes the generation of manifest `m` (copied into the state
    /// directory if it lies elsewhere) the target's only point: a replica
    /// whose bytes are that generation's, stamped with `meta`. Older points
    /// go (they restored bytes the disk no longer holds); test-failover
    /// pins stay so their images can still be cleaned up. Callers proved
    /// the bytes.
    pub(crate) fn reset_to(&mut self, m: &Manifest, meta: &crate::store::Meta) -> Result<()> {
        let to = self.dir.join(manifest_file(m.header().generation));
        if m.path() != to {
            crate::history::copy_file(self.vfs.as_ref(), m.path(), &to)?;
        }
        let point = PointRecord::of(&Manifest::open(self.vfs.as_ref(), &to)?);
        let old = self.catalog.take();
        let c = super::Catalog {
            path: self.path.clone(),
            name: self.options.name.clone().or_else(|| old.as_ref().and_then(|c| c.name.clone())),
            kind: meta.kind,
            status: Status::Complete,
            stamp: Some(meta.stamp),
            role: super::Role::Replica,
            points: vec![point],
            pins: old.map(|c| c.pins.into_iter().filter(|p| !p.is_discarded()).collect()).unwrap_or_default(),
        };
        self.vfs.sync_dir(&self.dir).ctx(Place::State, "syncing", &self.dir)?;
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        self.collect_garbage()
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

    pub(super) fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
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

pub(super) fn swapped(path: &Path) -> Error {
    Error::new(
        ErrorCode::TargetSwapped,
        format!("{} now names another file or device than the one the agent checked: nothing was written", path.display()),
    )
    .hint("find out who replaced it; if the new file is meant to be the target, restart the agent so it checks the path again")
}

pub(super) fn too_small(path: &Path, have: u64, need: u64) -> Error {
    Error::new(ErrorCode::TargetTooSmall, format!("{} holds {have} bytes but the source has {need}", path.display()))
        .hint("use a block device at least as large as the source; the target was not touched")
}
