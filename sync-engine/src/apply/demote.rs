//! `demote`: a live target goes back to being a replica once its VM moved
//! away. What the disk holds becomes a generation of its own history, so
//! the next push from the new primary is a delta from the point both hold,
//! or a split brain if this disk was written after its last push.

use diskferry_protocol::{Consistency, ErrorCode, Generation, Geometry};

use super::catalog::{write_catalog, Role};
use crate::disk::Disk;
use crate::error::{Error, IoContext, Place, Result};
use crate::hash::hash_blocks;
use crate::history::{History, HistoryWriter};
use crate::manifest::ManifestMeta;
use crate::progress::Progress;

use super::target::*;

/// What `demote` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoteReport {
    /// The generation the disk holds now.
    pub generation: Generation,
    /// Whether the disk had to be hashed (it was written since its last
    /// push or promote): `generation` is then new.
    pub hashed: bool,
    /// Recovery points dropped (they restored the promoted point, which
    /// the VM's writes replaced).
    pub points_dropped: usize,
}

impl Target {
    /// Demotes a live target to a replica. If the disk is still what it was
    /// last pushed as, or still the point it was promoted to, nothing is
    /// read; otherwise it is hashed once into generation `fresh` (made at
    /// `now_unix_ns`), recorded both as this target's point and as the
    /// disk's own history.
    pub fn demote(&mut self, fresh: Generation, now_unix_ns: i64, progress: &dyn Progress) -> Result<DemoteReport> {
        let c = self.complete_catalog()?.clone();
        if c.role != Role::Live {
            return Err(Error::new(ErrorCode::InvalidInput, format!("{} is a replica already", self.path.display()))
                .hint("demote only a target that was failed over (`diskferry failover`)"));
        }
        let vfs = self.vfs.clone();
        let meta = vfs
            .metadata(&self.path)
            .ctx(Place::Target, "reading", &self.path)?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("{} does not exist", self.path.display())))?;
        let history = History::load(vfs.as_ref(), &self.state_root, &self.path)?;
        if let Some(h) = history.as_ref().filter(|h| h.at_rest == Some(meta.stamp)) {
            // Pushed from since the promote, and not written since: the disk
            // is what it was last pushed as, which becomes the target's point.
            let m = h.manifest(vfs.clone(), &self.state_root)?;
            let generation = m.header().generation;
            let points_dropped = c.points.len();
            self.reset_to(&m, &meta)?;
            return Ok(DemoteReport { generation, hashed: false, points_dropped });
        }
        if let Trust::Trusted(p) = self.trust()? {
            self.set_role_kept(Role::Replica)?;
            return Ok(DemoteReport { generation: p.generation, hashed: false, points_dropped: 0 });
        }
        // Maybe written since: hash it once, comparing with the promoted point
        // on the way (a stamp that cannot tell is settled by the same pass).
        let lineage = match &history {
            Some(h) => h.lineage(),
            None => c.ancestry(),
        };
        let disk = Disk::open_on(vfs.as_ref(), &self.path).ctx(Place::Target, "opening", &self.path)?;
        let g = Geometry::new(disk.len(), c.points[0].geometry.block_size);
        let mut w = HistoryWriter::create(vfs.clone(), &self.state_root, &self.path, g, lineage.clone())?;
        let promoted = self.manifest_of(&c.points[0])?;
        let mut same = promoted.geometry() == g;
        let mut cursor = promoted.cursor();
        progress.phase("hashing", g.disk_bytes);
        for region in 0..g.region_count() {
            let range = g.region_range(region);
            let hashes = hash_blocks(&disk, &g, range.clone()).ctx(Place::Target, "reading", &self.path)?;
            if same {
                same = cursor.next_blocks(range.end - range.start)? == hashes;
            }
            w.push_region(region, &hashes.into())?;
            progress.advance(g.block_offset(range.end).min(g.disk_bytes) - g.block_offset(range.start));
        }
        let after = vfs.metadata(&self.path).ctx(Place::Target, "reading", &self.path)?;
        if after.map(|m| m.stamp) != Some(meta.stamp) {
            return Err(Error::new(
                ErrorCode::SourceChanged,
                format!("{} was written while it was hashed: its VM still runs", self.path.display()),
            )
            .hint("stop the VM on this host first (its disk must be at rest), then demote again"));
        }
        if same {
            // Touched, never changed: still the promoted point.
            drop(w);
            self.restamp()?;
            self.set_role_kept(Role::Replica)?;
            return Ok(DemoteReport { generation: c.points[0].generation, hashed: true, points_dropped: 0 });
        }
        let mmeta = ManifestMeta {
            generation: fresh,
            parent: lineage.first().copied(),
            consistency: Consistency::Crash,
            created_unix_ns: now_unix_ns,
        };
        w.commit(vfs.as_ref(), mmeta, Some(meta.stamp))?;
        let h = History::load(vfs.as_ref(), &self.state_root, &self.path)?
            .ok_or_else(|| Error::new(ErrorCode::Internal, "the history just written is gone"))?;
        let m = h.manifest(vfs.clone(), &self.state_root)?;
        let points_dropped = c.points.len();
        self.reset_to(&m, &meta)?;
        Ok(DemoteReport { generation: fresh, hashed: true, points_dropped })
    }

    /// Rewrites the catalog with another role, keeping its stamp.
    fn set_role_kept(&mut self, role: Role) -> Result<()> {
        let Some(mut c) = self.catalog.clone() else { return Ok(()) };
        c.role = role;
        write_catalog(self.vfs.as_ref(), &self.dir, &c)?;
        self.catalog = Some(c);
        Ok(())
    }
}
