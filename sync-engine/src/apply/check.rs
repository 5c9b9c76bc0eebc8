//! Checking a target's bytes against its committed manifest (`verify`, and
//! settling trust when the stamp cannot tell).

use diskferry_protocol::{BlockHash, ErrorCode, Generation};

use super::catalog::Status;
use super::target::Target;
use crate::error::{Error, IoContext, Place, Result};
use crate::progress::Progress;
use crate::store::DiskKind;

/// What a verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// The committed generation.
    pub generation: Generation,
    /// Root of its manifest.
    pub root: BlockHash,
    /// Whether every block matched.
    pub ok: bool,
    /// Blocks that did not match.
    pub mismatched_blocks: u64,
    /// The first of them.
    pub first_mismatch: Option<u64>,
    /// Set when the size alone differs from the commit.
    pub size_mismatch: Option<(u64, u64)>,
}

impl Target {
    /// Hashes the target and compares every block with the committed
    /// manifest, without refreshing the stamp (`verify` does).
    pub fn check(&self, progress: &dyn Progress) -> Result<VerifyReport> {
        let target = self;
        let catalog = target.catalog().ok_or_else(|| {
            Error::new(ErrorCode::NoState, format!("diskferry has no state for {}", target.path().display()))
                .hint("sync it first, or pass the --state-dir it was synced with")
        })?;
        if catalog.status == Status::Incomplete {
            return Err(Error::new(
                ErrorCode::Incomplete,
                format!("{} is in the middle of a full copy and holds no recovery point", target.path().display()),
            )
            .hint("run the sync again to finish it"));
        }
        let Some(point) = catalog.current().copied() else {
            return Err(Error::new(ErrorCode::NoState, "no committed generation"));
        };
        let manifest = target.manifest_of(&point)?;
        let g = point.geometry;
        let path = target.path().to_path_buf();
        let vfs = target.vfs().clone();
        let meta = vfs
            .metadata(&path)
            .ctx(Place::Target, "reading", &path)?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("target {} does not exist", path.display())))?;
        let size_ok = match meta.kind {
            DiskKind::File => meta.len == g.disk_bytes,
            DiskKind::BlockDevice => meta.len >= g.disk_bytes,
        };
        let mut report = VerifyReport {
            generation: point.generation,
            root: manifest.header().root,
            ok: size_ok,
            mismatched_blocks: 0,
            first_mismatch: None,
            size_mismatch: (!size_ok).then_some((g.disk_bytes, meta.len)),
        };
        if !size_ok {
            return Ok(report);
        }
        let disk = crate::disk::Disk::open_on(vfs.as_ref(), &path).ctx(Place::Target, "opening", &path)?;
        progress.phase("verifying", g.disk_bytes);
        let (mismatched, first) =
            crate::manifest::compare::compare_with_manifest(&disk, &path, &manifest, progress, false)?;
        report.mismatched_blocks = mismatched;
        report.first_mismatch = first;
        report.ok = mismatched == 0;
        Ok(report)
    }
}
