//! The durable shadow of a crash-simulating filesystem and the operations
//! not yet durable: what [`crate::CrashFs`] records at every write, rename
//! and sync, and the images a power cut can leave.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::Rng;

use crate::model::{apply_ns, DataOp, Entries, Image, Inode, NsOp, SECTOR};

/// The durable shadow of a [`CrashFs`] and the operations not yet durable.
#[derive(Debug)]
pub(crate) struct CrashLog {
    pub(crate) durable: Image,
    pub(crate) data: BTreeMap<u64, Vec<DataOp>>,
    pub(crate) names: BTreeMap<PathBuf, Vec<NsOp>>,
    pub(crate) points: u64,
    pub(crate) freeze_at: Option<u64>,
    pub(crate) frozen: bool,
}

impl CrashLog {
    /// A new inode, durable as created.
    pub fn created(&mut self, ino: u64, inode: &Inode) {
        if !self.frozen {
            self.durable.inodes.insert(ino, inode.clone());
        }
    }

    /// A new directory, durable (empty) as created.
    pub fn made_dir(&mut self, dir: &Path) {
        if !self.frozen {
            self.durable.dirs.entry(dir.to_path_buf()).or_default();
        }
    }

    /// Records a data operation on `ino`.
    pub fn data(&mut self, ino: u64, op: DataOp) {
        if !self.frozen {
            self.data.entry(ino).or_default().push(op);
        }
    }

    /// Records a namespace operation in `dir`.
    pub fn names(&mut self, dir: &Path, op: NsOp) {
        if !self.frozen {
            self.names.entry(dir.to_path_buf()).or_default().push(op);
        }
    }

    /// Counts a sync point; whether it makes anything durable.
    fn point(&mut self) -> bool {
        let n = self.points;
        self.points += 1;
        if self.freeze_at == Some(n) {
            self.frozen = true;
        }
        !self.frozen
    }

    /// `Storage::sync` on `ino`, whose live state is `live`.
    pub fn sync_file(&mut self, ino: u64, live: &Inode) {
        if self.point() {
            self.durable.inodes.insert(ino, live.clone());
            self.data.remove(&ino);
        }
    }

    /// `Vfs::sync_dir` on `dir`, whose live entries are `live`.
    pub fn sync_dir(&mut self, dir: &Path, live: &Entries) {
        if self.point() {
            self.durable.dirs.insert(dir.to_path_buf(), live.clone());
            self.names.remove(dir);
        }
    }

    /// The state after a power cut; also the inodes that kept an unsynced operation.
    pub(crate) fn image(&self, survival: &mut Survival) -> (Image, Vec<u64>) {
        let mut img = self.durable.clone();
        for (dir, ops) in &self.names {
            let keep = survival.prefix(ops.len());
            let entries = img.dirs.entry(dir.clone()).or_default();
            for op in &ops[..keep] {
                apply_ns(entries, op);
            }
        }
        let mut touched = Vec::new();
        for (ino, ops) in &self.data {
            let Some(inode) = img.inodes.get_mut(ino) else { continue };
            let mut any = false;
            for op in ops {
                for piece in survival.pieces(op) {
                    inode.apply(&piece);
                    any = true;
                }
            }
            if any {
                touched.push(*ino);
            }
        }
        img.prune_unreachable();
        (img, touched)
    }
}

/// Which unsynced operations a crash keeps.
pub(crate) enum Survival {
    Nothing,
    Everything,
    Random(Box<StdRng>),
}

/// `[off, off+len)` cut at absolute sector boundaries.
pub(crate) fn sectors(off: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = off + len;
    let mut pos = off;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let next = ((pos / SECTOR + 1) * SECTOR).min(end);
            let piece = (pos, next - pos);
            pos = next;
            piece
        })
    })
}

impl Survival {
    fn prefix(&mut self, n: usize) -> usize {
        match self {
            Survival::Nothing => 0,
            Survival::Everything => n,
            Survival::Random(rng) => rng.random_range(0..=n),
        }
    }

    /// The parts of `op` that reach the medium.
    fn pieces(&mut self, op: &DataOp) -> Vec<DataOp> {
        let rng = match self {
            Survival::Nothing => return Vec::new(),
            Survival::Everything => return vec![op.clone()],
            Survival::Random(rng) => rng,
        };
        match rng.random_range(0..4) {
            0 => return Vec::new(),
            1 => return vec![op.clone()],
            _ => {}
        }
        match op {
            DataOp::SetLen(_) => {
                if rng.random_bool(0.5) {
                    vec![op.clone()]
                } else {
                    Vec::new()
                }
            }
            DataOp::Write { off, bytes } => sectors(*off, bytes.len() as u64)
                .filter(|_| rng.random_bool(0.5))
                .map(|(s, n)| DataOp::Write {
                    off: s,
                    bytes: bytes[(s - off) as usize..(s - off + n) as usize].to_vec(),
                })
                .collect(),
            DataOp::Zero { off, len } => sectors(*off, *len)
                .filter(|_| rng.random_bool(0.5))
                .map(|(s, n)| DataOp::Zero { off: s, len: n })
                .collect(),
        }
    }
}
