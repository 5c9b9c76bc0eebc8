//! Rules 4 and 5 of the push decision (`docs/design.md` §6.4): a receiving
//! disk that has its own history as a source (an old primary) syncs only
//! from the last point it shares with the sender.
//!
//! | receiving disk | sender's lineage | outcome |
//! |---|---|---|
//! | last pushed as G, provably still at G (stamp at rest, or hash = G) | holds G | delta from G's manifest, the disk not hashed when the stamp proves it |
//! | moved past G, or G unknown to the sender but an older one shared | — | `E_SPLIT_BRAIN` with what would be discarded; `--discard-target-changes` keeps it as a point (pinned until `commit`) and proceeds |
//! | nothing shared | — | `E_UNRELATED`; `--force` compares by hashing (new chain) |

use std::path::Path;

use diskferry_protocol::{Consistency, ErrorCode, Generation, Geometry};

use crate::apply::{manifest_file, Role, Target, Trust};
use crate::disk::Disk;
use crate::error::{Error, IoContext, Place, Result};
use crate::hash::hash_blocks;
use crate::history::History;
use crate::manifest::{Manifest, ManifestMeta, ManifestWriter};
use crate::store::{Meta, Vfs};

/// What the receiving disk's own history decided.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The disk had a history of its own (rules 4 and 5 applied).
    pub applies: bool,
    /// The last point both sides hold.
    pub common: Option<Generation>,
    /// Blocks of the disk's own changes the push discards.
    pub discarded_blocks: u64,
    /// The point that keeps them until `commit`.
    pub discarded_point: Option<Generation>,
    /// Bytes of its own disk the target read to decide.
    pub bytes_read: u64,
    /// Unrelated, and forced: compare by hashing, new chain.
    pub forced: bool,
}

/// What the source asked that these rules read.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    /// The source's lineage, newest first.
    pub lineage: &'a [Generation],
    /// `--force`: an unrelated disk is compared by hashing and overwritten.
    pub force: bool,
    /// `--discard-target-changes`: a split brain proceeds.
    pub discard_target_changes: bool,
    /// The id of the point that keeps discarded changes, if one is hashed.
    pub discard_point: Generation,
    /// Its time.
    pub now_unix_ns: i64,
}

/// Applies rules 4 and 5. When the disk is at the common point, or its
/// changes are discarded on request, the target's catalog is set to that
/// point (adopted from the history, or hashed), so the ordinary rules then
/// see a trusted replica.
pub fn check(target: &mut Target, req: &Ask<'_>) -> Result<Verdict> {
    let vfs = target.vfs().clone();
    let root = target.state_root().to_path_buf();
    let path = target.path().to_path_buf();
    let Some(meta) = vfs.metadata(&path).ctx(Place::Target, "reading", &path)? else {
        return Ok(Verdict::default());
    };
    let Some(history) = History::load(vfs.as_ref(), &root, &path)? else { return Ok(Verdict::default()) };
    // A replica untouched since its last commit whose point the sender
    // holds is rule 3, whatever it was pushed on as since (a cascade: its
    // history then names another id for the same bytes).
    if let (Some(Role::Replica), Trust::Trusted(p)) = (target.role(), target.trust()?) {
        if req.lineage.contains(&p.generation) && history.at_rest == Some(meta.stamp) {
            return Ok(Verdict::default());
        }
    }
    let mut v = Verdict { applies: true, ..Verdict::default() };
    let Some(last) = history.last() else { return Ok(v) };
    v.common = history.lineage().into_iter().find(|g| req.lineage.contains(g));
    let Some(common) = v.common else {
        if req.force {
            v.forced = true;
            return Ok(v);
        }
        return Err(Error::new(
            ErrorCode::Unrelated,
            format!(
                "{} has a history of its own (last pushed as {last}) with nothing in common with this source's",
                path.display()
            ),
        )
        .hint("check the target name; if the disk's content may go, push again with --force"));
    };
    let manifest = history.manifest(vfs.clone(), &root)?;
    let at_rest = history.at_rest == Some(meta.stamp) && meta.len == manifest.geometry().disk_bytes;
    let (blocks, bytes, hashed) = if at_rest {
        (0, 0, None)
    } else {
        v.bytes_read += meta.len;
        let counted = count_changes(target, &manifest, &meta, req.discard_target_changes)?;
        // Bytes that moved while they were hashed prove nothing.
        if vfs.metadata(&path).ctx(Place::Target, "reading", &path)?.map(|m| m.stamp) != Some(meta.stamp) {
            return Err(target.diverged("it was written while it was compared with its last pushed generation"));
        }
        counted
    };
    if blocks == 0 && common == last {
        // Exactly at `last`: its manifest is the target's point from here on.
        adopt(target, &manifest, &meta)?;
        return Ok(v);
    }
    let lost = if common == last {
        format!("{blocks} blocks ({bytes} bytes) written since it was last pushed as {last}")
    } else if blocks == 0 {
        format!("generation {last}, which this source never received (the last point both hold is {common})")
    } else {
        format!(
            "generation {last}, which this source never received (the last point both hold is {common}), and \
             {blocks} blocks ({bytes} bytes) written since"
        )
    };
    if !req.discard_target_changes {
        return Err(Error::new(
            ErrorCode::SplitBrain,
            format!(
                "{} advanced past the last point it shares with this source: a push would discard {lost}",
                path.display()
            ),
        )
        .hint(
            "both sides wrote after the split: keep this disk's changes (stop here), or push again with \
               --discard-target-changes, which keeps them as a recovery point until `diskferry commit`",
        ));
    }
    // The push goes ahead over the disk's own state: that state is kept.
    let kept = match hashed.filter(|_| blocks > 0) {
        Some(w) => {
            let meta_d = ManifestMeta {
                generation: req.discard_point,
                parent: Some(last),
                consistency: Consistency::Crash,
                created_unix_ns: req.now_unix_ns,
            };
            keep_discarded(target, w, meta_d, &meta)?;
            meta_d.generation
        }
        None => {
            adopt(target, &manifest, &meta)?;
            last
        }
    };
    target.pin_discarded(kept)?;
    v.discarded_blocks = blocks;
    v.discarded_point = Some(kept);
    Ok(v)
}

/// Hashes the disk (with the manifest's block size), counting the blocks
/// that differ from `manifest` and their bytes; with `keep`, writes the
/// disk's own manifest on the way.
fn count_changes(
    target: &Target,
    manifest: &Manifest,
    meta: &Meta,
    keep: bool,
) -> Result<(u64, u64, Option<ManifestWriter>)> {
    let vfs = target.vfs().clone();
    let path = target.path();
    let disk = Disk::open_on(vfs.as_ref(), path).ctx(Place::Target, "opening", path)?;
    let g = Geometry::new(meta.len.min(disk.len()), manifest.geometry().block_size);
    let mut writer = match keep {
        true => Some(ManifestWriter::create(vfs.clone(), &target.dir().join("discarded.tmp"), g)?),
        false => None,
    };
    let want_g = manifest.geometry();
    // A block's bytes: the longer of what the disk and the manifest hold.
    let block_bytes = |b: u64| g.block_len(b).max(want_g.block_len(b)) as u64;
    let mut cursor = manifest.cursor();
    let (mut blocks, mut bytes, mut compared) = (0u64, 0u64, 0u64);
    for region in 0..g.region_count() {
        let range = g.region_range(region);
        let have = hash_blocks(&disk, &g, range.clone()).ctx(Place::Target, "reading", path)?;
        let n = (range.end.min(want_g.block_count())).saturating_sub(range.start.min(want_g.block_count()));
        let want = cursor.next_blocks(n)?;
        compared += n;
        for (i, h) in have.iter().enumerate() {
            let b = range.start + i as u64;
            if want.get(i) != Some(h) {
                blocks += 1;
                bytes += block_bytes(b);
            }
        }
        if let Some(w) = &mut writer {
            w.push_region(region, &have)?;
        }
    }
    // Blocks of the old size the disk no longer has count as changed too.
    for b in compared.max(g.block_count())..want_g.block_count() {
        blocks += 1;
        bytes += block_bytes(b);
    }
    Ok((blocks, bytes, writer))
}

/// The disk is exactly at the history's newest generation: that becomes the
/// target's trusted point (its manifest copied in, the stamp of now).
fn adopt(target: &mut Target, manifest: &Manifest, meta: &Meta) -> Result<()> {
    let h = manifest.header();
    if target.catalog().and_then(|c| c.current()).is_some_and(|p| p.generation == h.generation) {
        // Adopted by an earlier push that was cut: its staged blocks stay
        // for the resume; the bytes were just proven, so the stamp is now.
        return target.restamp();
    }
    target.discard()?;
    target.reset_to(manifest, meta)
}

/// Keeps the disk's own state (hashed into `w`) as the target's current
/// point, pinned until `commit`, so the push's undo data makes it a
/// recovery point the operator can export.
fn keep_discarded(target: &mut Target, w: ManifestWriter, meta_d: ManifestMeta, meta: &Meta) -> Result<()> {
    let vfs = target.vfs().clone();
    let path = target.path().to_path_buf();
    let after = vfs.metadata(&path).ctx(Place::Target, "reading", &path)?;
    if after.map(|m| m.stamp) != Some(meta.stamp) {
        return Err(Error::new(
            ErrorCode::SplitBrain,
            format!("{} was written while its changes were being saved", path.display()),
        )
        .hint("stop whatever writes it (the old VM), then push again"));
    }
    target.discard()?;
    w.finish(meta_d)?;
    let tmp = target.dir().join("discarded.tmp");
    let to = target.dir().join(manifest_file(meta_d.generation));
    vfs.rename(&tmp, &to).ctx(Place::State, "renaming", &to)?;
    target.reset_to(&Manifest::open(vfs.as_ref(), &to)?, meta)
}

/// The lineage a push or sync of `disk` offers: its own history when it
/// has one, else, when it is a target of this agent (a promoted replica),
/// its current generation and the parents kept in its catalog.
pub fn lineage_of(vfs: &dyn Vfs, state_root: &Path, disk: &Path) -> Result<Vec<Generation>> {
    if let Some(h) = History::load(vfs, state_root, disk)? {
        return Ok(h.lineage());
    }
    let c = crate::apply::catalog::read_catalog(vfs, &Target::state_dir(state_root, disk))?;
    Ok(c.map(|c| c.ancestry()).unwrap_or_default())
}
