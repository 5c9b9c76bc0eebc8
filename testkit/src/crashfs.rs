//! [`CrashFs`]: a [`Vfs`] that simulates power cuts, to prove a commit
//! protocol crash-safe at every sync point.
//!
//! # The model
//!
//! It follows the contracts of [`Storage`] and [`Vfs`], no more:
//!
//! - The filesystem has a **live** state (what the code under test sees, a
//!   [`MemFs`]) and a **durable** state (what a power cut leaves).
//! - A **data operation** (write, `set_len`, `zero_range`) on an inode is
//!   volatile until `Storage::sync` on that inode, which makes the inode's
//!   whole live state (bytes, size, holes, times) durable.
//! - A **namespace operation** in a directory (a link made by creating a
//!   file, a directory or a lock file; an unlink; a rename inside it) is
//!   volatile until `Vfs::sync_dir` on that directory, which makes its whole
//!   live entry list durable. A rename across directories is a link in one
//!   and an unlink in the other. Entries name inode numbers, so a file's data
//!   follows it through renames.
//! - A new inode or directory is durable, empty, from its creation: only its
//!   name needs a `sync_dir`. `reserve` changes only the ctime.
//! - **Sync points**: every `sync` and `sync_dir` call is one, numbered from
//!   0 since the `CrashFs` was made. [`CrashFs::freeze_at`]`(k)` makes the
//!   power fail during sync point `k`: that call and all later ones make
//!   nothing durable, and operations issued after it are not recorded (for
//!   the disk they never happened), while the live view goes on, so the code
//!   under test runs to its end.
//! - [`CrashFs::crash`]`(seed)` builds the image a reboot finds: the durable
//!   state, plus for each inode a random subset of its recorded unsynced data
//!   operations applied in order — each dropped, kept whole, or torn at
//!   4 KiB sector boundaries (a random subset of its sectors survives) — plus
//!   for each directory a random prefix of its recorded unsynced namespace
//!   operations; then directories no longer reachable from `/` vanish. An
//!   inode that kept any unsynced operation gets fresh times. The image is a
//!   new [`MemFs`] after a reboot: no locks held, a new boot id, block-device
//!   sector counters at zero.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use diskferry_sync_engine::store::{Meta, OpenHow, Storage, Vfs};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::crashlog::{CrashLog, Survival};
use crate::memfs::{Core, MemFs};

/// A filesystem that can lose power: the [module docs](self) state the model.
///
/// ```
/// use std::path::Path;
/// use diskferry_sync_engine::store::{OpenHow, Vfs};
/// use diskferry_testkit::{CrashFs, MemFs};
///
/// let fs = CrashFs::new(&MemFs::new());
/// let f = fs.open(Path::new("/a"), OpenHow::CreateNew).unwrap();
/// f.write_at(0, b"kept").unwrap();
/// f.sync().unwrap();
/// fs.sync_dir(Path::new("/")).unwrap();
/// f.write_at(0, b"lost").unwrap();
/// let image = fs.crash_durable();
/// let mut b = [0u8; 4];
/// image.open(Path::new("/a"), OpenHow::Read).unwrap().read_at(0, &mut b).unwrap();
/// assert_eq!(&b, b"kept");
/// assert_eq!(fs.sync_points(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct CrashFs {
    fs: MemFs,
}

impl CrashFs {
    /// A crash-simulating copy of `base`, all of whose state is durable.
    pub fn new(base: &MemFs) -> CrashFs {
        let snap = base.snapshot();
        {
            let mut core = snap.core();
            let durable = core.live.clone();
            core.log = Some(CrashLog {
                durable,
                data: BTreeMap::new(),
                names: BTreeMap::new(),
                points: 0,
                freeze_at: None,
                frozen: false,
            });
        }
        CrashFs { fs: snap }
    }

    /// The live view (what the code under test sees), e.g. to add a device.
    pub fn live(&self) -> &MemFs {
        &self.fs
    }

    fn with_log<R>(&self, f: impl FnOnce(&mut CrashLog) -> R) -> Option<R> {
        self.fs.core().log.as_mut().map(f)
    }

    /// Makes the power fail during sync point `k` (0-based, counted since
    /// creation): that sync and all later ones make nothing durable. If `k`
    /// has passed already, durability freezes now.
    pub fn freeze_at(&self, k: u64) {
        self.with_log(|log| {
            log.freeze_at = Some(k);
            if log.points > k {
                log.frozen = true;
            }
        });
    }

    /// Whether durability is frozen.
    pub fn is_frozen(&self) -> bool {
        self.with_log(|log| log.frozen).unwrap_or(false)
    }

    /// Sync points (`sync` and `sync_dir` calls) so far.
    pub fn sync_points(&self) -> u64 {
        self.with_log(|log| log.points).unwrap_or(0)
    }

    /// The image after a power cut now (or at the frozen sync point): the
    /// durable state plus a random, seed-determined part of what was not synced.
    pub fn crash(&self, seed: u64) -> MemFs {
        self.reboot(Survival::Random(Box::new(StdRng::seed_from_u64(seed))))
    }

    /// The image after a power cut that keeps nothing unsynced.
    pub fn crash_durable(&self) -> MemFs {
        self.reboot(Survival::Nothing)
    }

    /// The image after a power cut that happens to keep every unsynced
    /// operation recorded before the freeze (the live state at the freeze).
    pub fn crash_keep_all(&self) -> MemFs {
        self.reboot(Survival::Everything)
    }

    fn reboot(&self, mut survival: Survival) -> MemFs {
        let core = self.fs.core();
        let (mut live, touched) = match &core.log {
            Some(log) => log.image(&mut survival),
            None => (core.live.clone(), Vec::new()),
        };
        let mut clock = core.clock + 1000;
        for ino in touched {
            if let Some(inode) = live.inodes.get_mut(&ino) {
                clock += 1;
                inode.mtime = clock;
                inode.ctime = clock;
            }
        }
        for inode in live.inodes.values_mut() {
            inode.sectors_written = 0;
        }
        MemFs::from_core(Core { live, next_ino: core.next_ino, clock, boot: core.boot + 1, log: None })
    }
}

impl Vfs for CrashFs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<Arc<dyn Storage>> {
        self.fs.open(path, how)
    }

    fn metadata(&self, path: &Path) -> io::Result<Option<Meta>> {
        self.fs.metadata(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.fs.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.fs.remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.fs.create_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.fs.sync_dir(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.fs.list_dir(dir)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        self.fs.lock(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crashlog::sectors;
    use crate::gen::read_image;
    use crate::model::SECTOR;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    fn read(fs: &MemFs, path: &str) -> Option<Vec<u8>> {
        read_image(fs, p(path)).unwrap()
    }

    #[test]
    fn unsynced_names_and_data_may_vanish() {
        let fs = CrashFs::new(&MemFs::new());
        fs.create_dir_all(p("/d")).unwrap();
        let f = fs.open(p("/d/a"), OpenHow::CreateNew).unwrap();
        f.write_at(0, &[7; 10000]).unwrap();
        // Nothing synced: the directory itself may be gone.
        assert_eq!(read(&fs.crash_durable(), "/d/a"), None);
        assert!(fs.crash_durable().list_dir(p("/")).unwrap().is_empty());
        assert_eq!(read(&fs.crash_keep_all(), "/d/a"), Some(vec![7; 10000]));
        // Names synced, data not: an empty file.
        fs.sync_dir(p("/")).unwrap();
        fs.sync_dir(p("/d")).unwrap();
        assert_eq!(read(&fs.crash_durable(), "/d/a"), Some(Vec::new()));
        f.sync().unwrap();
        for seed in 0..20 {
            assert_eq!(read(&fs.crash(seed), "/d/a"), Some(vec![7; 10000]));
        }
    }

    #[test]
    fn writes_tear_at_sectors() {
        let base = MemFs::new();
        crate::gen::write_image(&base, p("/a"), &vec![1; 5 * SECTOR as usize]).unwrap();
        let fs = CrashFs::new(&base);
        let f = fs.open(p("/a"), OpenHow::ReadWrite).unwrap();
        f.write_at(100, &vec![2; 4 * SECTOR as usize]).unwrap();
        let mut seen_torn = false;
        for seed in 0..64 {
            let img = read(&fs.crash(seed), "/a").unwrap();
            assert_eq!(img.len(), 5 * SECTOR as usize);
            // Each sector's part of the write is wholly old or wholly new.
            for (s, n) in sectors(100, 4 * SECTOR) {
                let part = &img[s as usize..(s + n) as usize];
                assert!(part.iter().all(|&b| b == part[0]), "sector torn inside");
            }
            assert_eq!(img[..100], [1; 100]);
            let twos = img.iter().filter(|&&b| b == 2).count();
            seen_torn |= twos > 0 && twos < 4 * SECTOR as usize;
        }
        assert!(seen_torn);
    }

    #[test]
    fn renames_follow_prefixes_and_freeze_stops_durability() {
        let fs = CrashFs::new(&MemFs::new());
        let f = fs.open(p("/new.tmp"), OpenHow::CreateNew).unwrap();
        f.write_at(0, b"N").unwrap();
        f.sync().unwrap();
        fs.freeze_at(1);
        fs.rename(p("/new.tmp"), p("/cur")).unwrap();
        fs.sync_dir(p("/")).unwrap(); // point 1: frozen
        assert!(fs.is_frozen());
        assert_eq!(fs.sync_points(), 2);
        let f2 = fs.open(p("/after"), OpenHow::CreateNew).unwrap();
        f2.sync().unwrap();
        fs.sync_dir(p("/")).unwrap();
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let img = fs.crash(seed);
            assert_eq!(read(&img, "/after"), None, "created after the freeze");
            let names = img.list_dir(p("/")).unwrap();
            assert!(names.is_empty() || names == ["new.tmp"] || names == ["cur"], "{names:?}");
            if names == ["cur"] {
                assert_eq!(read(&img, "/cur").unwrap(), b"N");
            }
            outcomes.insert(names);
        }
        assert_eq!(outcomes.len(), 3);
    }
}
