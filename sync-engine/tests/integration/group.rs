//! A replication group's commit under power cuts: three members (a delta
//! through the redo log, a delta onto a block device, a file that grew)
//! committed as one point by `local::sync_group`. At every sync point of
//! the group commit, with every survival of the unsynced writes, recovery
//! of each member — opened alone, in any order — leaves all three at the
//! old point or all three at the new one, byte for byte, never a mix.

use std::path::PathBuf;
use std::sync::Arc;

use diskferry_protocol::{Generation, SessionId};
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::local::{self, NoProgress, SyncJob, SyncOptions};
use diskferry_sync_engine::store::Vfs;
use diskferry_testkit::{write_image, CrashFs, DiskGen, MemFs};

use super::util::*;

const OLD: u128 = 0x1001;
const NEW: u128 = 0x2002;

struct Member {
    source: PathBuf,
    target: PathBuf,
    old: Vec<u8>,
    new: Vec<u8>,
}

fn jobs(vfs: Arc<dyn Vfs>, members: &[Member], generation: u128) -> Vec<(SyncJob, SyncOptions)> {
    members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let job = SyncJob {
                vfs: vfs.clone(),
                state_root: STATE.into(),
                source: m.source.clone(),
                target: m.target.clone(),
                generation: Generation(generation),
                session: SessionId(generation * 10 + i as u128),
                now_unix_ns: generation as i64,
            };
            (job, opts(4096, 3))
        })
        .collect()
}

fn group_sync(vfs: Arc<dyn Vfs>, members: &[Member], generation: u128) -> diskferry_sync_engine::Result<()> {
    let jobs = jobs(vfs, members, generation);
    one_thread(|| local::sync_group("app", &jobs, &NoProgress)).map(|_| ())
}

/// Three members, synced once as a group (OLD), their sources then changed.
fn base() -> (MemFs, Vec<Member>) {
    let fs = fresh_fs();
    let mut g = DiskGen::new(41);
    let mut members = Vec::new();
    for (i, (size, device)) in [(300_000u64, false), (256 * 1024, true), (200_000, false)].into_iter().enumerate() {
        let old = g.disk(size);
        let mut new = old.clone();
        g.scribble(&mut new, 8, 20_000);
        if i == 2 {
            new.extend_from_slice(&g.disk(50_001));
        }
        new[0] ^= 0x5a;
        let source = PathBuf::from(format!("/disks/src{i}.img"));
        let target = PathBuf::from(format!("/disks/dst{i}.img"));
        write_image(&fs, &source, &old).unwrap();
        if device {
            fs.add_block_device(&target, size).unwrap();
        }
        members.push(Member { source, target, old, new });
    }
    group_sync(Arc::new(fs.clone()), &members, OLD).unwrap();
    for m in &members {
        assert_eq!(read(&fs, m.target.to_str().unwrap()).as_deref(), Some(&m.old[..]), "first group sync");
        write_image(&fs, &m.source, &m.new).unwrap();
    }
    (fs, members)
}

/// Opens each member (its recovery runs) in `order`; returns, per member,
/// whether it holds the new point (`None`: neither old nor new).
fn recovered(image: &MemFs, members: &[Member], order: &[usize], ctx: &str) -> Vec<bool> {
    let vfs: Arc<dyn Vfs> = Arc::new(image.clone());
    let mut at_new = vec![false; members.len()];
    for &i in order {
        let m = &members[i];
        let t =
            Target::open(vfs.clone(), p(STATE), &m.target, TargetOptions { retention: Some(3), ..Default::default() })
                .unwrap_or_else(|e| panic!("{ctx}: member {i}: recovery failed: [{}] {e}", e.code.as_str()));
        let current = t.catalog().and_then(|c| c.current()).map(|p| p.generation);
        let bytes = read(image, m.target.to_str().unwrap());
        let new = match current {
            Some(g) if g == Generation(NEW) => true,
            Some(g) if g == Generation(OLD) => false,
            other => panic!("{ctx}: member {i} is at {other:?}"),
        };
        let want = if new { &m.new } else { &m.old };
        // A block device keeps its size; a shrunk file does not.
        let got = bytes.unwrap_or_default();
        assert_eq!(&got[..want.len().min(got.len())], &want[..], "{ctx}: member {i}: bytes are not its point's");
        at_new[i] = new;
    }
    at_new
}

#[test]
fn a_group_commit_is_all_or_nothing_at_every_sync_point() {
    let (base, members) = base();
    let clean = CrashFs::new(&base);
    group_sync(Arc::new(clean.clone()), &members, NEW).unwrap();
    let count = clean.sync_points();
    assert!(count > 10, "only {count} sync points");
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..=count {
        let fs = CrashFs::new(&base);
        fs.freeze_at(k);
        let res = group_sync(Arc::new(fs.clone()), &members, NEW);
        let returned_committed = res.is_ok() && !fs.is_frozen();
        let mut images: Vec<(String, MemFs)> =
            (0..2).map(|seed| (format!("seed {seed}"), fs.crash(k * 1000 + seed))).collect();
        images.push(("nothing unsynced kept".into(), fs.crash_durable()));
        images.push(("everything issued kept".into(), fs.crash_keep_all()));
        for (n, (how, image)) in images.into_iter().enumerate() {
            let ctx = format!("power cut at sync point {k} of {count} ({how})");
            // Each member recovers alone, in a different order each time.
            let order = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]][n % 4];
            let at_new = recovered(&image, &members, &order, &ctx);
            assert!(at_new.iter().all(|&x| x == at_new[0]), "{ctx}: a mix of points: {at_new:?}");
            if returned_committed {
                assert!(at_new[0], "{ctx}: the group sync returned Ok, yet a power cut lost it");
            }
            seen.insert(at_new[0]);
        }
    }
    assert_eq!(seen.len(), 2, "the sweep saw only {seen:?}");
}
