//! The target side of a session, for local and network syncs alike: decide
//! (the one table in `decide.rs`), begin the apply, resolve what differs
//! (zero ranges and local copies here, the rest wanted from the source),
//! stage verified blocks, record the new manifest region by region, commit.
//!
//! A driver feeds it from [`diskferry_protocol::session::ReceiverSession`]'s
//! events: `Open` → [`TargetSession::open`], `Resolve` →
//! [`TargetSession::resolve`], verified blocks → [`TargetSession::stage`],
//! `RegionComplete` → [`TargetSession::region`], `Commit` →
//! [`TargetSession::commit`]. It is synchronous and owns the target (its
//! lock) for as long as it lives.

use diskferry_protocol::message::{Accept, Committed, Plan, WantBlock};
use diskferry_protocol::session::Differing;
use diskferry_protocol::{BlockHash, Consistency, ErrorCode, Generation, Geometry, RegionHashes, SessionId};

use super::decide::{decide, Request};
use crate::apply::{Apply, ApplyMode, BeginSpec, CommitMeta, CommitReport, DirectSink, OldContent, Target};
use crate::block::VerifiedBlock;
use crate::error::{Error, Result};
use crate::hash::hash_block;
use crate::manifest::Manifest;
use crate::plan::{plan_differing, Op};
use crate::remote::page_hashes;
use crate::tree::region_nodes;
use crate::view::ViewProducer;

/// What a target is asked to do, beyond the comparison itself.
#[derive(Clone, Debug)]
pub struct TargetRequest {
    /// The source's request.
    pub request: Request,
    /// The session.
    pub session: SessionId,
    /// Keep staged blocks for a rerun if the session is interrupted
    /// (network sessions; a local sync redoes instead).
    pub resumable: bool,
    /// Regions the source may have in flight (`Accept.window`).
    pub window: u32,
    /// Manifest index entries held in memory before spilling (`None`: default).
    pub index_entries: Option<usize>,
    /// Bytes of current block content kept for their patches (`None`: default).
    pub kept_bytes: Option<u64>,
}

/// What the driver needs once the session is accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The answer to send.
    pub accept: Accept,
    /// The session's geometry.
    pub geometry: Geometry,
    /// The target's region views (compare plans), for a producer thread.
    pub view: Option<ViewProducer>,
    /// The target's current blocks, readable from verifier threads.
    pub old: OldContent,
    /// Full copies: writes verified blocks in place from any thread.
    pub sink: Option<DirectSink>,
}

/// What a commit produced.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The answer to send (`unchanged`: no new generation was needed).
    pub committed: Committed,
    /// The commit's counts (`None` when unchanged).
    pub report: Option<CommitReport>,
}

/// The target side of one session.
#[derive(Debug)]
pub struct TargetSession<'t> {
    apply: Apply<'t>,
    plan: Plan,
    mode: ApplyMode,
    trusted: Option<Manifest>,
    old: OldContent,
    blocks_changed: u64,
    points_dropped: u32,
    lineage: super::lineage::Verdict,
}

impl<'t> TargetSession<'t> {
    /// Decides the session on an opened target and begins its apply.
    pub fn open(target: &'t mut Target, req: &TargetRequest) -> Result<(TargetSession<'t>, Accepted)> {
        let g = req.request.geometry;
        let decision = decide(target, &req.request)?;
        let current = target.catalog().and_then(|c| c.current()).map(|p| p.generation);
        let staged = target.staged().map_or(0, |s| s.entries);
        let apply = target.begin(BeginSpec {
            session: req.session,
            geometry: g,
            mode: decision.mode,
            base: decision.base,
            resumable: req.resumable,
            index_entries: req.index_entries,
            kept_bytes: req.kept_bytes,
        })?;
        let overlay = (**apply.overlay()).clone();
        let view = decision.view.map(|v| ViewProducer::new(v, g, overlay));
        let old = apply.old_content();
        let accepted = Accepted {
            accept: Accept {
                plan: decision.plan,
                target_generation: current,
                staged_blocks: staged,
                window: req.window,
            },
            geometry: g,
            view,
            old: old.clone(),
            sink: apply.direct_sink(),
        };
        let session = TargetSession {
            apply,
            plan: decision.plan,
            mode: decision.mode,
            trusted: decision.trusted,
            old,
            blocks_changed: 0,
            points_dropped: decision.points_dropped,
            lineage: decision.lineage,
        };
        Ok((session, accepted))
    }

    /// The plan the session runs.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// Stages what the target can do itself for blocks that differ — zero
    /// ranges, and copies of content it holds elsewhere (with a trusted
    /// manifest) — and returns the blocks to fetch, with the page hashes of
    /// their current content. With a trusted manifest, the current bytes of
    /// every block about to change are checked against it first, so a
    /// change made behind diskferry's back is never silently overwritten.
    pub fn resolve(&mut self, blocks: &[Differing]) -> Result<Vec<WantBlock>> {
        let list: Vec<(u64, BlockHash, Option<BlockHash>)> =
            blocks.iter().map(|d| (d.index, d.source, d.target)).collect();
        let manifest = self.trusted.as_ref();
        let mut lookup_error = None;
        let mut lookup = |h: &BlockHash| match manifest.map(|m| m.lookup(h)) {
            Some(Ok(found)) => found,
            Some(Err(e)) => {
                lookup_error.get_or_insert(e);
                None
            }
            None => None,
        };
        let plan = plan_differing(&list, &mut lookup);
        if let Some(e) = lookup_error {
            return Err(e);
        }
        let reads: Vec<u64> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Copy { block, .. } | Op::Send { block } => Some(*block),
                Op::Zero { .. } => None,
            })
            .collect();
        self.old.will_need(&reads);
        let mut wants = Vec::new();
        for op in plan.ops {
            match op {
                Op::Zero { first, count } => self.apply.stage_zero(first, count)?,
                Op::Copy { block, from } => {
                    let current = self.checked_current(block, blocks)?;
                    let bytes = self.old.read_disk(from)?;
                    let source = list.iter().find(|b| b.0 == block).map(|b| b.1);
                    if bytes.len() == current.len() && !self.old.is_staged(from) && Some(hash_block(&bytes)) == source {
                        let base = (!self.old.is_staged(block)).then_some(current.as_slice());
                        self.apply.stage(&VerifiedBlock::from_local(block, &bytes, base))?;
                    } else {
                        wants.push(self.want(block, current));
                    }
                }
                Op::Send { block } => {
                    let current = self.checked_current(block, blocks)?;
                    wants.push(self.want(block, current));
                }
            }
        }
        self.blocks_changed += (blocks.len() - wants.len()) as u64;
        Ok(wants)
    }

    /// The block's current bytes, checked against the trusted manifest.
    fn checked_current(&self, block: u64, blocks: &[Differing]) -> Result<Vec<u8>> {
        let current = self.old.read_disk(block)?;
        if self.trusted.is_some() && !self.old.is_staged(block) {
            if let Some(expected) = blocks.iter().find(|d| d.index == block).and_then(|d| d.target) {
                if hash_block(&current) != expected {
                    return Err(crate::apply::diverged_error(
                        self.old.path(),
                        &format!("block {block} differs from the last commit"),
                        0,
                    ));
                }
            }
        }
        Ok(current)
    }

    /// A block to fetch: only the pages that differ from `current`, unless an
    /// interrupted session staged it (its content is then not `current`).
    /// The current bytes are kept for the frame that patches them.
    fn want(&self, block: u64, current: Vec<u8>) -> WantBlock {
        if self.old.is_staged(block) {
            return WantBlock { index: block, page_hashes: Vec::new() };
        }
        let page_hashes = page_hashes(&current);
        self.old.keep(block, current);
        WantBlock { index: block, page_hashes }
    }

    /// Stages a verified block (journal), or counts one a sink wrote.
    pub fn stage(&mut self, block: &VerifiedBlock) -> Result<()> {
        self.apply.stage(block)?;
        self.blocks_changed += 1;
        Ok(())
    }

    /// Stages blocks `first..first+count` becoming zeros.
    pub fn stage_zero(&mut self, first: u64, count: u64) -> Result<()> {
        self.apply.stage_zero(first, count)?;
        // Zeros in a new file change nothing: it is all holes already.
        if !(self.plan == Plan::Full && self.mode == ApplyMode::Partial) {
            self.blocks_changed += count;
        }
        Ok(())
    }

    /// Counts blocks a [`DirectSink`] wrote, up to byte `end`.
    pub fn account_direct(&mut self, blocks: u64, bytes: u64, end: u64) {
        self.blocks_changed += blocks;
        self.apply.account_direct(blocks, bytes, end);
    }

    /// Records a completed region's hashes (in region order). A full copy's
    /// region must hash to what the source announced (`expected`).
    pub fn region(&mut self, region: u64, hashes: &RegionHashes, expected: Option<BlockHash>) -> Result<()> {
        if expected.is_some_and(|e| region_nodes(hashes).1 != e) {
            return Err(Error::new(
                ErrorCode::Protocol,
                format!("region {region} does not hash to what the source announced"),
            ));
        }
        self.apply.push_region(region, hashes)
    }

    /// Commits the new generation (prepare → seal → finish), or, when the
    /// target already holds exactly this content at a point at least as
    /// consistent, ends without one and names that point (`unchanged`).
    pub fn commit(self, consistency: Consistency, generation: Generation, now_unix_ns: i64) -> Result<Outcome> {
        let v = &self.lineage;
        if let Some(point) = self.apply.unchanged_point(consistency) {
            let root = self.apply.target().manifest_of(&point)?.header().root;
            let target_bytes_read = v.bytes_read + self.apply.disk_bytes_read();
            self.apply.abandon();
            let (common_point, discarded_blocks, discarded_point) = (v.common, v.discarded_blocks, v.discarded_point);
            return Ok(Outcome {
                committed: Committed {
                    generation: point.generation,
                    root,
                    blocks_changed: 0,
                    bytes_written: 0,
                    points_dropped: 0,
                    unchanged: true,
                    common_point,
                    discarded_blocks,
                    discarded_point,
                    target_bytes_read,
                    promoted: false,
                },
                report: None,
            });
        }
        let (blocks_changed, points_dropped) = (self.blocks_changed, self.points_dropped);
        let read_before = v.bytes_read;
        let read = self.apply.disk_read_counter();
        let report =
            self.apply.commit(CommitMeta { generation, consistency, created_unix_ns: now_unix_ns, grouped: false })?;
        let (common_point, discarded_blocks, discarded_point) = (v.common, v.discarded_blocks, v.discarded_point);
        Ok(Outcome {
            committed: Committed {
                generation: report.generation,
                root: report.root,
                blocks_changed,
                bytes_written: report.bytes_written,
                points_dropped,
                unchanged: false,
                common_point,
                discarded_blocks,
                discarded_point,
                target_bytes_read: read_before + read.load(std::sync::atomic::Ordering::Relaxed),
                promoted: false,
            },
            report: Some(report),
        })
    }
}

/// A session prepared as a member of a replication group's commit
/// ([`TargetSession::prepare_member`]), awaiting [`commit_group`].
#[derive(Debug)]
pub struct Member<'t> {
    prepared: crate::apply::Prepared<'t>,
    committed: Committed,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<'t> TargetSession<'t> {
    /// Every step before this member's commit point, its commit record
    /// marked as a group's: it stands only once the group's record does.
    /// A member always commits a new generation (the group's id), even when
    /// its content did not change: every member carries each group point.
    pub fn prepare_member(
        self,
        consistency: Consistency,
        generation: Generation,
        now_unix_ns: i64,
    ) -> Result<Member<'t>> {
        let v = &self.lineage;
        let committed = Committed {
            generation,
            root: BlockHash::ZERO,
            blocks_changed: self.blocks_changed,
            bytes_written: 0,
            points_dropped: self.points_dropped,
            unchanged: false,
            common_point: v.common,
            discarded_blocks: v.discarded_blocks,
            discarded_point: v.discarded_point,
            target_bytes_read: v.bytes_read,
            promoted: false,
        };
        let read = self.apply.disk_read_counter();
        let meta = CommitMeta { generation, consistency, created_unix_ns: now_unix_ns, grouped: true };
        Ok(Member { prepared: self.apply.prepare(meta)?, committed, read })
    }
}

/// A member past [`Member::seal`]: waiting for the group record.
#[derive(Debug)]
pub struct SealedMember<'t> {
    /// A block device written directly is sealed after the group record.
    state: std::result::Result<crate::apply::Sealed<'t>, crate::apply::Prepared<'t>>,
    committed: Committed,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<'t> Member<'t> {
    /// The member's commit record, marked grouped (a block device written
    /// directly waits for [`SealedMember::finish`]). When members seal on
    /// threads of their own, the group record
    /// ([`crate::apply::group::write_record`]) follows every member's seal.
    pub fn seal(self) -> Result<SealedMember<'t>> {
        let state = if self.prepared.is_direct() { Err(self.prepared) } else { Ok(self.prepared.seal()?) };
        Ok(SealedMember { state, committed: self.committed, read: self.read })
    }
}

impl SealedMember<'_> {
    /// After the group record: the member's new point, in place.
    pub fn finish(self) -> Result<Outcome> {
        let sealed = match self.state {
            Ok(s) => s,
            Err(direct) => direct.seal()?,
        };
        let report = sealed.finish()?;
        let mut c = self.committed;
        c.root = report.root;
        c.bytes_written = report.bytes_written;
        c.target_bytes_read += self.read.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Outcome { committed: c, report: Some(report) })
    }
}

/// Commits the prepared `members` as one point of group `name` (see
/// [`crate::apply::group`]); the outcomes come in the members' order.
pub fn commit_group(
    vfs: &dyn crate::store::Vfs,
    state_root: &std::path::Path,
    name: &str,
    members: Vec<Member<'_>>,
) -> Result<Vec<Outcome>> {
    let mut answers = Vec::with_capacity(members.len());
    let mut prepared = Vec::with_capacity(members.len());
    for m in members {
        answers.push((m.committed, m.read));
        prepared.push(m.prepared);
    }
    let reports = crate::apply::group::commit(vfs, state_root, name, prepared)?;
    Ok(answers
        .into_iter()
        .zip(reports)
        .map(|((mut c, read), report)| {
            c.root = report.root;
            c.bytes_written = report.bytes_written;
            c.target_bytes_read += read.load(std::sync::atomic::Ordering::Relaxed);
            Outcome { committed: c, report: Some(report) }
        })
        .collect())
}
