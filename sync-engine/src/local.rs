//! A whole disk-to-disk sync with no network: hash, compare, stage, commit,
//! region by region.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use diskferry_protocol::{BlockHash, BlockSize, Consistency, ErrorCode, Generation, Geometry, SessionId};
use rayon::prelude::*;

use crate::apply::{
    diverged_error, ApplyMode, BeginSpec, CommitMeta, PointRecord, Recovery, Target, TargetOptions, Trust,
};
use crate::block::VerifiedBlock;
use crate::disk::Disk;
use crate::error::{Error, IoContext, Place, Result};
use crate::hash::{hash_and_compare, hash_block, hash_blocks, hash_blocks_visit};
use crate::manifest::{BlockCursor, Manifest};
use crate::plan::{plan_full, plan_region, Op, PlanStats};
use crate::store::{DiskKind, Meta, Vfs};
use crate::view::manifest_view;

/// Which sync to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Delta when the target exists, full otherwise.
    Auto,
    /// Compare and send only what changed (the target must exist).
    Delta,
    /// Copy every non-zero block without comparing.
    Full,
}

/// Sync options.
#[derive(Clone, Copy, Debug)]
pub struct SyncOptions {
    /// Delta, full or auto.
    pub mode: Mode,
    /// Block size.
    pub block_size: BlockSize,
    /// Sync a diverged target anyway (full compare, its changes overwritten).
    pub force: bool,
    /// Consistent recovery points to keep.
    pub retention: u32,
    /// Label a stable read `app-consistent` (a quiesce hook ran) instead of `crash-consistent`.
    pub app_consistent: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            mode: Mode::Auto,
            block_size: BlockSize::DEFAULT,
            force: false,
            retention: 2,
            app_consistent: false,
        }
    }
}

/// What a sync runs on: paths, and the values the engine does not make itself.
#[derive(Debug, Clone)]
pub struct SyncJob {
    /// The filesystem.
    pub vfs: Arc<dyn Vfs>,
    /// Root of the state directory.
    pub state_root: PathBuf,
    /// Source disk.
    pub source: PathBuf,
    /// Target disk (canonical path: it keys the state).
    pub target: PathBuf,
    /// Id of the generation to commit.
    pub generation: Generation,
    /// Session id (staged blocks of an interrupted session are not reused locally).
    pub session: SessionId,
    /// Commit time, ns since the epoch.
    pub now_unix_ns: i64,
}

/// Progress callbacks (called from the syncing thread).
pub trait Progress: Sync {
    /// A phase starts, covering `total` bytes.
    fn phase(&self, name: &'static str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &'static str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// What a sync did.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// `delta` or `full`.
    pub mode: &'static str,
    /// How the target side was known: `manifest`, `full-compare` or `none`.
    pub compare: &'static str,
    /// Source size.
    pub disk_bytes: u64,
    /// Blocks in the disk.
    pub blocks_total: u64,
    /// Blocks whose content changed (sent, copied or zeroed).
    pub blocks_changed: u64,
    /// Content bytes written into the target in place.
    pub bytes_written: u64,
    /// Redo log bytes.
    pub log_bytes: u64,
    /// Old content kept for the previous recovery point.
    pub undo_bytes: u64,
    /// The committed generation.
    pub generation: Generation,
    /// Its consistency.
    pub consistency: Consistency,
    /// Root of its hash tree.
    pub root: BlockHash,
    /// What opening the target recovered first.
    pub recovery: Recovery,
    /// Recovery points dropped by starting a new chain (`--force`).
    pub points_dropped: u32,
    /// The target already held exactly this content: no new generation,
    /// `generation` is its existing point.
    pub unchanged: bool,
}

fn source_meta(vfs: &dyn Vfs, path: &Path) -> Result<Meta> {
    vfs.metadata(path).ctx(Place::Source, "reading", path)?.ok_or_else(|| {
        Error::new(ErrorCode::NotFound, format!("source {} does not exist", path.display())).hint("check the path")
    })
}

/// Runs one local sync on the current rayon pool.
pub fn sync(job: &SyncJob, opts: &SyncOptions, progress: &dyn Progress) -> Result<SyncReport> {
    let vfs = job.vfs.as_ref();
    let before = source_meta(vfs, &job.source)?;
    let same = vfs
        .metadata(&job.target)
        .ctx(Place::Target, "reading", &job.target)?
        .is_some_and(|t| t.identity == before.identity);
    if job.source == job.target || same {
        return Err(Error::new(ErrorCode::InvalidInput, "source and target are the same file or device")
            .hint("give a different target path"));
    }
    let source = vfs.open_disk(&job.source).ctx(Place::Source, "opening", &job.source)?;
    let geometry = Geometry::new(source.len(), opts.block_size);
    let mut target = Target::open(
        job.vfs.clone(),
        &job.state_root,
        &job.target,
        TargetOptions { retention: Some(opts.retention), name: None, expect_identity: None },
    )?;
    // Local sessions do not resume: staged blocks are cheaper to redo than to trust.
    target.discard()?;
    let dst_meta = vfs.metadata(&job.target).ctx(Place::Target, "reading", &job.target)?;
    let full = match (opts.mode, &dst_meta) {
        (Mode::Full, _) | (Mode::Auto, None) => true,
        (Mode::Delta, None) => {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("target {} does not exist; a delta needs one", job.target.display()),
            )
            .hint("use --mode full (or auto) to create it"))
        }
        _ => false,
    };
    if let Some(m) = &dst_meta {
        if m.kind == DiskKind::BlockDevice && m.len < geometry.disk_bytes {
            return Err(Error::new(
                ErrorCode::TargetTooSmall,
                format!(
                    "target {} holds {} bytes but the source has {}",
                    job.target.display(),
                    m.len,
                    geometry.disk_bytes
                ),
            )
            .hint("use a block device at least as large as the source; the target was not touched"));
        }
    }
    if full {
        target.check_full_overwrite(opts.force)?;
    }
    let recovery = target.recovery().clone();
    // Counted before a full copy into a device marks it INCOMPLETE.
    let kept_before = target.kept_points();
    let mut run = Run { source: &source, geometry, progress, changed_while_read: false, stats: PlanStats::default() };
    let (report, compare) = if full {
        let is_device = dst_meta.is_some_and(|m| m.kind == DiskKind::BlockDevice);
        (run.full(&mut target, job, is_device)?, "none")
    } else {
        run.delta(&mut target, job, opts)?
    };
    let after = source_meta(vfs, &job.source)?;
    let stable = !run.changed_while_read && before.stamp == after.stamp;
    let consistency = match (stable, opts.app_consistent) {
        (false, _) => Consistency::Fuzzy,
        (true, true) => Consistency::App,
        (true, false) => Consistency::Crash,
    };
    let points_dropped = if report.base().is_none() { kept_before as u32 } else { 0 };
    if let Some(point) = report.unchanged_point(consistency) {
        // The target holds exactly this already: no new point.
        report.abandon();
        let root = target.manifest_of(&point)?.header().root;
        return Ok(SyncReport {
            mode: "delta",
            compare,
            disk_bytes: geometry.disk_bytes,
            blocks_total: geometry.block_count(),
            blocks_changed: 0,
            bytes_written: 0,
            log_bytes: 0,
            undo_bytes: 0,
            generation: point.generation,
            consistency: point.consistency,
            root,
            recovery,
            points_dropped: 0,
            unchanged: true,
        });
    }
    let commit =
        report.commit(CommitMeta { generation: job.generation, consistency, created_unix_ns: job.now_unix_ns })?;
    Ok(SyncReport {
        mode: if full { "full" } else { "delta" },
        compare,
        disk_bytes: geometry.disk_bytes,
        blocks_total: geometry.block_count(),
        blocks_changed: run.stats.changed(),
        bytes_written: commit.bytes_written,
        log_bytes: commit.log_bytes,
        undo_bytes: commit.undo_bytes,
        generation: commit.generation,
        consistency,
        root: commit.root,
        recovery,
        points_dropped,
        unchanged: false,
    })
}

struct Run<'a> {
    source: &'a Disk,
    geometry: Geometry,
    progress: &'a dyn Progress,
    changed_while_read: bool,
    stats: PlanStats,
}

/// Where the target side's hashes come from during a delta.
enum View<'m> {
    /// The committed manifest, trusted; `old` is its geometry.
    Manifest { cursor: BlockCursor, old: Geometry, manifest: &'m Manifest, device: bool },
    /// Compare with the target's bytes.
    Hash { disk: Disk },
}

impl Run<'_> {
    fn full<'t>(&mut self, target: &'t mut Target, job: &SyncJob, is_device: bool) -> Result<crate::apply::Apply<'t>> {
        let g = self.geometry;
        let mut apply = target.begin(BeginSpec {
            session: job.session,
            geometry: g,
            mode: if is_device { ApplyMode::Direct } else { ApplyMode::Partial },
            base: None,
            resumable: false,
            index_entries: None,
        })?;
        let Some(sink) = apply.direct_sink() else {
            return Err(Error::new(ErrorCode::Internal, "full copy without a direct sink"));
        };
        self.progress.phase("copying", g.disk_bytes);
        let sink_error = std::sync::Mutex::new(None);
        for region in 0..g.region_count() {
            let range = g.region_range(region);
            let written = AtomicU64::new(0);
            let blocks = AtomicU64::new(0);
            let visit = |b: crate::block::VerifiedSlice<'_>| -> std::io::Result<()> {
                if let Err(e) = sink.write(&b) {
                    let msg = e.to_string();
                    if let Ok(mut slot) = sink_error.lock() {
                        slot.get_or_insert(e);
                    }
                    return Err(std::io::Error::other(msg));
                }
                written.fetch_add(b.bytes().len() as u64, Ordering::Relaxed);
                blocks.fetch_add(1, Ordering::Relaxed);
                Ok(())
            };
            let hashes = match hash_blocks_visit(self.source, &g, range.clone(), Some(&visit)) {
                Ok(h) => h,
                Err(e) => {
                    if let Some(err) = sink_error.lock().ok().and_then(|mut s| s.take()) {
                        return Err(err);
                    }
                    return Err(Error::io(Place::Source, "reading", &job.source, e));
                }
            };
            let mut plan = plan_full(range.start, &hashes);
            for op in &plan.ops {
                if let Op::Zero { first, count } = *op {
                    apply.stage_zero(first, count)?;
                }
            }
            if !is_device {
                // A new file is all holes already: zero runs change nothing there.
                plan.stats.zero = 0;
            }
            self.stats.add(&plan.stats);
            let end = g.block_offset(range.end).min(g.disk_bytes);
            apply.account_direct(blocks.load(Ordering::Relaxed), written.load(Ordering::Relaxed), end);
            apply.push_region(region, &hashes)?;
            self.progress.advance(end - g.block_offset(range.start));
        }
        Ok(apply)
    }

    fn delta<'t>(
        &mut self,
        target: &'t mut Target,
        job: &SyncJob,
        opts: &SyncOptions,
    ) -> Result<(crate::apply::Apply<'t>, &'static str)> {
        let vfs = job.vfs.clone();
        let g = self.geometry;
        let trust = target.settle_trust()?;
        let (base_point, manifest): (Option<PointRecord>, Option<Manifest>) = match trust {
            Trust::Trusted(p) => {
                let m = target.manifest_of(&p)?;
                if p.geometry.block_size == g.block_size {
                    (Some(p), Some(m))
                } else {
                    (Some(p), None)
                }
            }
            Trust::Diverged { why, .. } if !opts.force => return Err(target.diverged(&why)),
            // No state, interrupted full copy, or forced: compare with the bytes.
            _ => (None, None),
        };
        let device = vfs.metadata(&job.target).ctx(Place::Target, "reading", &job.target)?.map(|m| m.kind)
            == Some(DiskKind::BlockDevice);
        let mut view = match &manifest {
            Some(m) => View::Manifest { cursor: m.cursor(), old: m.geometry(), manifest: m, device },
            None => View::Hash { disk: vfs.open_disk(&job.target).ctx(Place::Target, "opening", &job.target)? },
        };
        let compare = if manifest.is_some() { "manifest" } else { "full-compare" };
        let mut apply = target.begin(BeginSpec {
            session: job.session,
            geometry: g,
            mode: ApplyMode::Journal,
            base: base_point.map(|p| p.generation),
            resumable: false,
            index_entries: None,
        })?;
        self.progress.phase("comparing", g.disk_bytes);
        for region in 0..g.region_count() {
            let range = g.region_range(region);
            let (src, tgt) = match &mut view {
                View::Manifest { cursor, old, device, .. } => {
                    let tgt = manifest_view(cursor, old, &g, range.clone(), *device)?;
                    (hash_blocks(self.source, &g, range.clone()), tgt)
                }
                View::Hash { disk } => {
                    // Locally the target's bytes are at hand: comparing them
                    // with the source's is cheaper than hashing them.
                    let pairs = hash_and_compare(self.source, disk, &g, range.clone())
                        .map_err(|e| Error::io(Place::Source, "reading", &job.source, e))?;
                    let (s, t): (Vec<BlockHash>, Vec<Option<BlockHash>>) =
                        pairs.into_iter().map(|(h, equal)| (h, equal.then_some(h))).unzip();
                    (Ok(s), t)
                }
            };
            let mut src = src.ctx(Place::Source, "reading", &job.source)?;
            let mut local: HashMap<BlockHash, u64> = HashMap::new();
            for (i, t) in tgt.iter().enumerate() {
                if let Some(t) = t.filter(|t| !t.is_zero()) {
                    local.entry(t).or_insert(range.start + i as u64);
                }
            }
            let manifest_ref = match &view {
                View::Manifest { manifest, .. } => Some(*manifest),
                View::Hash { .. } => None,
            };
            let mut lookup = |h: &BlockHash| -> Option<u64> {
                if let Some(b) = local.get(h) {
                    return Some(*b);
                }
                manifest_ref.and_then(|m| m.lookup(h).ok().flatten())
            };
            let plan = plan_region(range.start, &src, &tgt, &mut lookup);
            self.stats.add(&plan.stats);
            let trusted = matches!(view, View::Manifest { .. });
            // Read and diff the changed blocks in parallel, stage them in order.
            let updates: Vec<Result<Option<VerifiedBlock>>> = plan
                .ops
                .par_iter()
                .filter(|op| !matches!(op, Op::Zero { .. }))
                .map(|op| self.build_update(&apply, op, &src, &tgt, range.start, trusted, job))
                .collect();
            for op in &plan.ops {
                if let Op::Zero { first, count } = *op {
                    apply.stage_zero(first, count)?;
                }
            }
            for u in updates {
                if let Some(vb) = u? {
                    let i = (vb.index() - range.start) as usize;
                    if vb.hash() != src[i] {
                        // The source changed between hashing and reading: record what was staged.
                        self.changed_while_read = true;
                        src[i] = vb.hash();
                    }
                    if !vb.patches().is_empty() {
                        apply.stage(&vb)?;
                    }
                }
            }
            apply.push_region(region, &src)?;
            self.progress.advance(g.block_offset(range.end).min(g.disk_bytes) - g.block_offset(range.start));
        }
        Ok((apply, compare))
    }

    #[allow(clippy::too_many_arguments)]
    fn build_update(
        &self,
        apply: &crate::apply::Apply<'_>,
        op: &Op,
        src: &[BlockHash],
        tgt: &[Option<BlockHash>],
        first: u64,
        trusted: bool,
        job: &SyncJob,
    ) -> Result<Option<VerifiedBlock>> {
        let g = &self.geometry;
        let block = match *op {
            Op::Send { block } | Op::Copy { block, .. } => block,
            Op::Zero { .. } => return Ok(None),
        };
        let len = g.block_len(block);
        let i = (block - first) as usize;
        let old = apply.read_old(block, len)?;
        if trusted {
            // The manifest claims this content; check it before overwriting,
            // so a change made behind our back is never silently destroyed.
            if let Some(expected) = tgt.get(i).copied().flatten() {
                if hash_block(&old) != expected {
                    return Err(diverged_error(&job.target, &format!("block {block} differs from the last commit"), 0));
                }
            }
        }
        if let Op::Copy { from, .. } = *op {
            let bytes = apply.read_old(from, len)?;
            if hash_block(&bytes) == src[i] {
                return Ok(Some(VerifiedBlock::from_local(block, &bytes, Some(&old))));
            }
        }
        let mut new = vec![0u8; len as usize];
        self.source.read_at(g.block_offset(block), &mut new).ctx(Place::Source, "reading", &job.source)?;
        Ok(Some(VerifiedBlock::from_local(block, &new, Some(&old))))
    }
}
