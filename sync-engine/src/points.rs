//! Recovery points: listing them and exporting an image of one.

use std::path::{Path, PathBuf};

use diskferry_protocol::{Consistency, ErrorCode, Generation};

use crate::apply::undo::apply_undo;
use crate::apply::{Status, Target, Trust};
use crate::error::{Error, IoContext, Place, Result};
use crate::hash::is_zero;
use crate::progress::NoProgress;
use crate::store::{OpenHow, Storage};

/// One recovery point as listed to an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointInfo {
    /// The generation.
    pub generation: Generation,
    /// Commit time, ns since the epoch.
    pub created_unix_ns: i64,
    /// Crash- or app-consistent.
    pub consistency: Consistency,
    /// Disk size at that point.
    pub disk_bytes: u64,
    /// Bytes of undo data kept for it (0 for the current generation).
    pub undo_bytes: u64,
    /// Whether the target is at this point now.
    pub current: bool,
    /// Kept by a test-failover image while it exists.
    pub pinned: bool,
    /// Holds a disk's own changes a push discarded (kept until `commit`).
    pub discarded: bool,
}

/// The kept recovery points, newest first (fuzzy generations are not
/// recovery points and are left out).
pub fn list(target: &Target) -> Vec<PointInfo> {
    let Some(c) = target.catalog().filter(|c| c.status == Status::Complete) else { return Vec::new() };
    let mut points: Vec<(usize, &crate::apply::PointRecord)> = c.points.iter().enumerate().collect();
    // After a failover the current point need not be the newest.
    points.sort_by_key(|(_, p)| std::cmp::Reverse(p.created_unix_ns));
    points
        .into_iter()
        .filter(|(_, p)| p.consistency.is_recovery_point())
        .map(|(i, p)| PointInfo {
            generation: p.generation,
            created_unix_ns: p.created_unix_ns,
            consistency: p.consistency,
            disk_bytes: p.geometry.disk_bytes,
            undo_bytes: p.undo.map_or(0, |u| u.data_bytes),
            current: i == 0,
            pinned: c.pins.iter().any(|x| x.generation == p.generation && !x.is_discarded()),
            discarded: c.pins.iter().any(|x| x.generation == p.generation && x.is_discarded()),
        })
        .collect()
}

/// How an export was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    /// The exported point.
    pub generation: Generation,
    /// Size of the image.
    pub disk_bytes: u64,
    /// Whether the image shares blocks with the target (reflink).
    pub reflinked: bool,
    /// Undo segments applied.
    pub segments: usize,
}

/// Writes an image of recovery point `generation` to `out` (which must not
/// exist): a reflink of the target where the filesystem can, else a sparse
/// copy, then the undo segments back to that point. The image is checked
/// against the point's manifest before it appears under its name; the
/// target is only read.
pub fn export(target: &Target, generation: Generation, out: &Path) -> Result<ExportReport> {
    let vfs = target.vfs().clone();
    let catalog = target
        .catalog()
        .filter(|c| c.status == Status::Complete)
        .ok_or_else(|| Error::new(ErrorCode::NoState, format!("{} has no recovery points", target.path().display())))?;
    let Some(index) = catalog.points.iter().position(|p| p.generation == generation) else {
        return Err(Error::new(
            ErrorCode::NoSuchPoint,
            format!("no recovery point {generation} is kept for {}", target.path().display()),
        )
        .hint("list them with `diskferry points`"));
    };
    let point = catalog.points[index];
    if !point.consistency.is_recovery_point() {
        return Err(Error::new(
            ErrorCode::NoSuchPoint,
            format!("generation {generation} is fuzzy, not a recovery point"),
        ));
    }
    match target.trust()? {
        Trust::Trusted(_) | Trust::Unverified(_) => {}
        Trust::Diverged { why, .. } => {
            return Err(Error::new(
                ErrorCode::Diverged,
                format!(
                    "target {} changed behind diskferry's back ({why}): its points cannot be rebuilt",
                    target.path().display()
                ),
            ))
        }
        _ => return Err(Error::new(ErrorCode::NoState, "no committed generation")),
    }
    if vfs.metadata(out).ctx(Place::Target, "reading", out)?.is_some() {
        return Err(Error::new(ErrorCode::InvalidInput, format!("{} already exists", out.display()))
            .hint("export to a new path"));
    }
    let tmp = crate::apply::partial_path(out);
    vfs.remove_file(&tmp).ctx(Place::Target, "removing", &tmp)?;
    let result = build_image(target, index, &tmp);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = vfs.remove_file(&tmp);
            return Err(e);
        }
    };
    vfs.rename(&tmp, out).ctx(Place::Target, "renaming", &tmp)?;
    let parent =
        out.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    vfs.sync_dir(&parent).ctx(Place::Target, "syncing", &parent)?;
    Ok(report)
}

fn build_image(target: &Target, index: usize, tmp: &Path) -> Result<ExportReport> {
    let vfs = target.vfs().clone();
    let Some(catalog) = target.catalog() else { return Err(Error::new(ErrorCode::NoState, "no catalog")) };
    let current = catalog.points[0];
    let point = catalog.points[index];
    let reflinked = vfs.reflink(target.path(), tmp).ctx(Place::Target, "cloning", tmp)?;
    let image = if reflinked {
        let image = vfs.open(tmp, OpenHow::ReadWrite).ctx(Place::Target, "opening", tmp)?;
        image.set_len(current.geometry.disk_bytes).ctx(Place::Target, "resizing", tmp)?;
        image
    } else {
        let image = vfs.open(tmp, OpenHow::CreateNew).ctx(Place::Target, "creating", tmp)?;
        let src = vfs.open(target.path(), OpenHow::Read).ctx(Place::Target, "opening", target.path())?;
        sparse_copy(src.as_ref(), image.as_ref(), current.geometry.disk_bytes, target.path(), tmp)?;
        image
    };
    let path = catalog.path_to(point.generation).ok_or_else(|| {
        Error::corrupt(&target.dir().join("catalog"), "a kept point's undo links do not reach the current one")
    })?;
    for p in &path {
        let (upath, header) = target.checked_undo(p)?;
        apply_undo(vfs.as_ref(), &upath, &header, image.as_ref(), tmp)?;
    }
    image.sync().ctx(Place::Target, "syncing", tmp)?;
    // Prove the image is the point before it appears under its name.
    let manifest = target.manifest_of(&point)?;
    let g = point.geometry;
    let disk = crate::disk::Disk::open_on(vfs.as_ref(), tmp).ctx(Place::Target, "opening", tmp)?;
    let (mismatched, _) = crate::manifest::compare::compare_with_manifest(&disk, tmp, &manifest, &NoProgress, true)?;
    if mismatched > 0 {
        return Err(Error::new(
            ErrorCode::StateCorrupt,
            format!("the rebuilt image of {} does not match its manifest", point.generation),
        )
        .hint("an undo segment or the target is damaged; this point cannot be exported"));
    }
    Ok(ExportReport { generation: point.generation, disk_bytes: g.disk_bytes, reflinked, segments: path.len() })
}

/// Copies `len` bytes, skipping holes and zero chunks (the copy stays sparse).
fn sparse_copy(src: &dyn Storage, dst: &dyn Storage, len: u64, src_path: &Path, dst_path: &Path) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    for (off, n) in src.data_ranges(0, len).ctx(Place::Target, "reading", src_path)? {
        let mut pos = off;
        while pos < off + n {
            let k = (off + n - pos).min(CHUNK) as usize;
            src.read_at(pos, &mut buf[..k]).ctx(Place::Target, "reading", src_path)?;
            if !is_zero(&buf[..k]) {
                dst.write_at(pos, &buf[..k]).ctx(Place::Target, "writing", dst_path)?;
            }
            pos += k as u64;
        }
    }
    dst.set_len(len).ctx(Place::Target, "resizing", dst_path)
}
