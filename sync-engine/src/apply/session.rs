//! The apply of one session: how it writes (journal, `.partial`, device),
//! and staging verified blocks and zero ranges until the commit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Consistency, ErrorCode, Generation, Geometry, RegionHashes, SessionId};

use super::catalog::{write_catalog, Catalog, PointRecord, Role, Status};
use super::journal::{JournalHeader, JournalKind, JournalWriter};
use crate::aligned::BufferPool;
use crate::block::VerifiedBlock;
use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::ManifestWriter;
use crate::store::{CountingStorage, DiskKind, OpenHow, Storage};

use super::sink::*;
use super::target::*;

/// Idle aligned buffers a full copy keeps for reuse: about what is in
/// flight between verification and the writer (the receive window, at most
/// 16 MiB). With 8 MiB, blocks past it were freed and fresh ones zeroed:
/// 3.4 % of the target's CPU went to `memset`, 0.5 % with 16 MiB (perf).
const IDLE_BUFFERS: usize = 16 << 20;

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
    /// Bytes of current block content kept for the frames that patch them
    /// (`None`: [`super::sink::KeptBlocks::MAX_BYTES`]).
    pub kept_bytes: Option<u64>,
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

/// One session's staging into a target. Dropped without [`Apply::commit`],
/// the target keeps its committed generation.
#[derive(Debug)]
pub struct Apply<'t> {
    pub(super) target: &'t mut Target,
    pub(super) spec: BeginSpec,
    pub(super) disk: Arc<dyn Storage>,
    pub(super) disk_path: PathBuf,
    pub(super) old_len: u64,
    pub(super) journal: Option<JournalWriter>,
    pub(super) manifest: Option<ManifestWriter>,
    pub(super) manifest_path: PathBuf,
    pub(super) stats: ApplyStats,
    pub(super) writeback_from: u64,
    pub(super) written_since_kick: u64,
    pub(super) done: bool,
    pub(super) committed: bool,
    pub(super) overlay: Arc<HashMap<u64, BlockHash>>,
    /// Writer for Partial and Direct modes, shared with [`Apply::direct_sink`].
    pub(super) sink: Option<DirectSink>,
    /// What the commit's space reservation allocated, released if it fails.
    pub(super) reserved: Option<Reserved>,
    /// Bytes read from the target's own disk (journal mode).
    pub(super) disk_read: Arc<AtomicU64>,
    /// Current bytes of wanted blocks, kept for their patches.
    pub(super) kept: Arc<super::sink::KeptBlocks>,
}

impl Target {
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
        let disk_read = Arc::new(AtomicU64::new(0));
        let (disk, disk_path, journal) = match spec.mode {
            ApplyMode::Journal => {
                let disk = CountingStorage::wrap(self.open_for_write()?, disk_read.clone());
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
                    role: Role::Replica,
                    points: Vec::new(),
                    pins: Vec::new(),
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
            buffers: BufferPool::new(spec.geometry.block_size.bytes() as usize, IDLE_BUFFERS),
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
            disk_read,
            kept: Arc::new(KeptBlocks::new(spec.kept_bytes.unwrap_or(KeptBlocks::MAX_BYTES))),
            reserved: None,
        })
    }
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

    /// Bytes this apply read from the target's own disk so far (old
    /// content of changed blocks, undo data).
    pub fn disk_bytes_read(&self) -> u64 {
        self.disk_read.load(Ordering::Relaxed)
    }

    /// The counter behind [`Apply::disk_bytes_read`], still counting
    /// through the commit (its undo data is read from the disk).
    pub fn disk_read_counter(&self) -> Arc<AtomicU64> {
        self.disk_read.clone()
    }

    /// A reader of the blocks' current content for other threads.
    pub fn old_content(&self) -> OldContent {
        OldContent {
            disk: self.disk.clone(),
            path: self.disk_path.clone(),
            geometry: self.spec.geometry,
            old_len: self.old_len,
            overlay: self.overlay.clone(),
            kept: self.kept.clone(),
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

    pub(super) fn kick_writeback(&mut self, end: u64, written: u64) {
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

    /// The target being written.
    pub fn target(&self) -> &Target {
        self.target
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
    pub fn push_region(&mut self, region: u64, hashes: &RegionHashes) -> Result<()> {
        match &mut self.manifest {
            Some(m) => m.push_hashes(region, hashes),
            None => Err(Error::new(ErrorCode::Internal, "apply already committed")),
        }
    }
}

/// Space a reservation allocated that the target did not use before: holes
/// inside the file it filled, and blocks past its end.
#[derive(Debug, Default)]
pub(super) struct Reserved {
    pub(super) holes: Vec<(u64, u64)>,
    pub(super) past_end: bool,
}
