//! The one decision table: from what the target holds and what the source
//! asks for, how the session compares (plan) and how it writes (apply
//! mode). Local `sync` and `serve` both decide here (`docs/design.md` §6.3).
//!
//! | target | asked | plan | apply mode | base |
//! |---|---|---|---|---|
//! | live (promoted) | any, `--force` included | refused: `E_PROMOTED` | | |
//! | a disk with its own history (an old primary) | any | rules 4 and 5 first (`lineage.rs`): at the common point → as trusted at it; else `E_SPLIT_BRAIN` / `E_UNRELATED` | | |
//! | trusted, same block size | delta or auto | compare with the manifest | journal | current |
//! | trusted, other block size | delta or auto | compare by hashing | journal | current |
//! | diverged | without `--force` | refused: `E_DIVERGED` | | |
//! | diverged (forced), no state, unprovable | delta or auto | compare by hashing | journal | none |
//! | device, INCOMPLETE | any | compare by hashing the device | direct | none |
//! | missing file | auto or full | full copy | partial | none |
//! | any | full | full copy (a resumed one compares with its `.partial`) | partial or direct | none |
//!
//! Before a full copy, [`Target::check_full_overwrite`] refuses to drop
//! recovery points or overwrite a diverged or vanished replica unless forced.

use diskferry_protocol::message::{Open, Plan, SyncMode};
use diskferry_protocol::{ErrorCode, Generation, Geometry};

use super::lineage::{self, Verdict};
use crate::apply::journal::JournalKind;
use crate::apply::{partial_path, ApplyMode, Role, Target, Trust};
use crate::error::{Error, IoContext, Place, Result};
use crate::manifest::Manifest;
use crate::store::DiskKind;
use crate::view::ViewSource;

/// What a source asks of a target.
#[derive(Clone, Debug)]
pub struct Request {
    /// Delta, full or auto.
    pub mode: SyncMode,
    /// Overwrite a diverged or unrelated target, drop recovery points.
    pub force: bool,
    /// The source's geometry.
    pub geometry: Geometry,
    /// The source disk's lineage, newest first.
    pub lineage: Vec<Generation>,
    /// Proceed over a split brain, keeping the target's changes as a point.
    pub discard_target_changes: bool,
    /// The id that point gets if the target's bytes must be hashed into one.
    pub discard_point: Generation,
    /// Now, ns since the epoch (that point's time).
    pub now_unix_ns: i64,
}

impl Request {
    /// What a source's `Open` asks, with the values the engine does not make:
    /// the id a discarded state would get, and the time.
    pub fn from_open(o: &Open, geometry: Geometry, discard_point: Generation, now_unix_ns: i64) -> Request {
        Request {
            mode: o.mode,
            force: o.force,
            geometry,
            lineage: o.lineage.clone(),
            discard_target_changes: o.discard_target_changes,
            discard_point,
            now_unix_ns,
        }
    }
}

/// How a session runs.
#[derive(Debug)]
pub struct Decision {
    /// How the target compares.
    pub plan: Plan,
    /// How it writes.
    pub mode: ApplyMode,
    /// The committed generation the updates apply to (`None`: a new chain).
    pub base: Option<Generation>,
    /// Where the target's side of the comparison comes from.
    pub view: Option<ViewSource>,
    /// The trusted manifest of `base`, when the plan compares with it.
    pub trusted: Option<Manifest>,
    /// Recovery points a new chain drops (only ever when forced).
    pub points_dropped: u32,
    /// What the receiving disk's own history decided.
    pub lineage: Verdict,
}

impl Decision {
    fn new(plan: Plan, mode: ApplyMode, base: Option<Generation>, view: Option<ViewSource>) -> Decision {
        Decision { plan, mode, base, view, trusted: None, points_dropped: 0, lineage: Verdict::default() }
    }
}

/// Decides a session on an opened (recovered) target.
pub fn decide(target: &mut Target, req: &Request) -> Result<Decision> {
    if target.role() == Some(Role::Live) {
        let g = target.catalog().and_then(|c| c.current()).map(|p| p.generation);
        return Err(Error::new(
            ErrorCode::Promoted,
            format!(
                "{} is live: it was promoted{} and a VM may run on it; no push lands on it",
                target.path().display(),
                g.map(|g| format!(" to {g}")).unwrap_or_default()
            ),
        )
        .hint("push the other way (this disk is the primary now), or `diskferry demote` it once its VM moved away"));
    }
    let ask = lineage::Ask {
        lineage: &req.lineage,
        force: req.force,
        discard_target_changes: req.discard_target_changes,
        discard_point: req.discard_point,
        now_unix_ns: req.now_unix_ns,
    };
    let verdict = lineage::check(target, &ask)?;
    let forced = verdict.forced;
    let mut d = decide_inner(target, req, forced)?;
    if d.plan != Plan::Full && d.view.as_ref().is_some_and(|v| matches!(v, ViewSource::Disk(_))) {
        d.lineage.bytes_read += req.geometry.disk_bytes;
    }
    d.lineage.applies = verdict.applies;
    d.lineage.common = verdict.common.or_else(|| d.base.filter(|b| req.lineage.contains(b)));
    d.lineage.discarded_blocks = verdict.discarded_blocks;
    d.lineage.discarded_point = verdict.discarded_point;
    d.lineage.bytes_read += verdict.bytes_read;
    if d.base.is_none() {
        d.points_dropped = target.kept_points() as u32;
    }
    Ok(d)
}

fn decide_inner(target: &mut Target, req: &Request, unrelated_forced: bool) -> Result<Decision> {
    let g = req.geometry;
    let vfs = target.vfs().clone();
    let path = target.path().to_path_buf();
    let meta = vfs.metadata(&path).ctx(Place::Target, "reading", &path)?;
    let device = meta.is_some_and(|m| m.kind == DiskKind::BlockDevice);
    if let Some(m) = meta.filter(|m| m.kind == DiskKind::BlockDevice && m.len < g.disk_bytes) {
        return Err(Error::new(
            ErrorCode::TargetTooSmall,
            format!("target {} holds {} bytes but the source has {}", path.display(), m.len, g.disk_bytes),
        )
        .hint("give the target a block device at least as large as the source; it was not touched"));
    }
    let staged_partial =
        target.staged().is_some_and(|s| s.header.kind == JournalKind::Partial && s.header.geometry == g);
    let incomplete_device = device && matches!(target.trust()?, Trust::Incomplete);
    let full = match (req.mode, meta) {
        (SyncMode::Full, _) | (SyncMode::Auto, None) => true,
        (SyncMode::Delta, None) => {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("target {} does not exist yet; a delta needs it", path.display()),
            )
            .hint("use --mode full or auto"))
        }
        _ => false,
    };
    let disk_view = |p: &std::path::Path| -> Result<ViewSource> {
        Ok(ViewSource::Disk(crate::disk::Disk::open_on(vfs.as_ref(), p).ctx(Place::Target, "opening", p)?))
    };
    if unrelated_forced && !full {
        // A disk with a history of its own the source shares nothing with:
        // compare with its bytes, start a new chain.
        return Ok(Decision::new(Plan::CompareHash, ApplyMode::Journal, None, Some(disk_view(&path)?)));
    }
    if full {
        target.check_full_overwrite(req.force)?;
        return Ok(if staged_partial {
            // A full copy was interrupted: compare with what it already wrote.
            Decision::new(Plan::CompareHash, ApplyMode::Partial, None, Some(disk_view(&partial_path(&path))?))
        } else if incomplete_device {
            Decision::new(Plan::CompareHash, ApplyMode::Direct, None, Some(disk_view(&path)?))
        } else {
            let mode = if device { ApplyMode::Direct } else { ApplyMode::Partial };
            Decision::new(Plan::Full, mode, None, None)
        });
    }
    if incomplete_device {
        // Continue the interrupted copy into the device.
        return Ok(Decision::new(Plan::CompareHash, ApplyMode::Direct, None, Some(disk_view(&path)?)));
    }
    match target.settle_trust()? {
        Trust::Trusted(p) if p.geometry.block_size == g.block_size => {
            let m = target.manifest_of(&p)?;
            let cursor = m.cursor();
            let view = ViewSource::Manifest { manifest: Box::new(m.clone()), cursor: Box::new(cursor), device };
            let mut d = Decision::new(Plan::CompareManifest, ApplyMode::Journal, Some(p.generation), Some(view));
            d.trusted = Some(m);
            Ok(d)
        }
        // Another block size: the chain continues, compared by hashing.
        Trust::Trusted(p) => {
            Ok(Decision::new(Plan::CompareHash, ApplyMode::Journal, Some(p.generation), Some(disk_view(&path)?)))
        }
        Trust::Diverged { why, .. } if !req.force => Err(target.diverged(&why)),
        // No state, forced, or unprovable: compare with the bytes; never a blind overwrite.
        _ => Ok(Decision::new(Plan::CompareHash, ApplyMode::Journal, None, Some(disk_view(&path)?))),
    }
}
