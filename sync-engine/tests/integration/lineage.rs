//! Which push is allowed, as a table (`session::decide` with
//! `session::lineage`): each row sets up the receiving disk — missing, no
//! state, a replica, an old primary with its own history (at rest or
//! moved), live — and a sender's lineage, and checks the plan or the
//! refusal, the common point, what is read and what is discarded.

use std::sync::Arc;

use diskferry_protocol::message::{Plan, SyncMode};
use diskferry_protocol::{BlockSize, Consistency, ErrorCode, Generation, Geometry};
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::disk::Disk;
use diskferry_sync_engine::hash::hash_blocks;
use diskferry_sync_engine::history::HistoryWriter;
use diskferry_sync_engine::manifest::ManifestMeta;
use diskferry_sync_engine::session::{decide, Decision, Request};
use diskferry_sync_engine::store::{OpenHow, Vfs};
use diskferry_testkit::{write_image, DiskGen, MemFs};

use super::util::*;

const G: u128 = 0x61;
const F: u128 = 0x60;

/// Records `DST` as pushed under generation `last` after `older`, read at rest.
fn record_history(fs: &MemFs, chain: &[u128]) {
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let disk = Disk::open_on(vfs.as_ref(), p(DST)).unwrap();
    let g = Geometry::new(disk.len(), BlockSize::DEFAULT);
    let lineage: Vec<Generation> = chain[1..].iter().map(|&x| Generation(x)).collect();
    let mut w = HistoryWriter::create(vfs.clone(), p(STATE), p(DST), g, lineage).unwrap();
    for region in 0..g.region_count() {
        w.push_region(region, &hash_blocks(&disk, &g, g.region_range(region)).unwrap().into()).unwrap();
    }
    let stamp = vfs.metadata(p(DST)).unwrap().unwrap().stamp;
    let meta = ManifestMeta {
        generation: Generation(chain[0]),
        parent: None,
        consistency: Consistency::Crash,
        created_unix_ns: 1,
    };
    w.commit(vfs.as_ref(), meta, Some(stamp)).unwrap();
}

struct Row {
    lineage: Vec<u128>,
    force: bool,
    discard: bool,
}

fn ask(fs: &MemFs, row: Row) -> Result<Decision, (ErrorCode, String)> {
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let mut t = Target::open(vfs, p(STATE), p(DST), TargetOptions { retention: Some(2), ..Default::default() })
        .map_err(|e| (e.code, e.message.clone()))?;
    let req = Request {
        mode: SyncMode::Auto,
        force: row.force,
        geometry: Geometry::new(300_000, BlockSize::DEFAULT),
        lineage: row.lineage.into_iter().map(Generation).collect(),
        discard_target_changes: row.discard,
        discard_point: Generation(0xD),
        now_unix_ns: 5,
    };
    one_thread(|| decide(&mut t, &req)).map_err(|e| (e.code, e.message))
}

fn row(lineage: &[u128]) -> Row {
    Row { lineage: lineage.to_vec(), force: false, discard: false }
}

fn disk(fs: &MemFs, seed: u64) -> Vec<u8> {
    let bytes = DiskGen::new(seed).disk(300_000);
    write_image(fs, p(DST), &bytes).unwrap();
    bytes
}

fn scribble(fs: &MemFs, off: u64) {
    let d = fs.open(p(DST), OpenHow::ReadWrite).unwrap();
    d.write_at(off, &[0x5A; 10]).unwrap();
}

#[test]
fn rule_1_no_disk_is_a_full_download() {
    let fs = fresh_fs();
    let d = ask(&fs, row(&[G])).unwrap();
    assert_eq!(d.plan, Plan::Full);
    // Even where a history of the vanished disk is left.
    disk(&fs, 1);
    record_history(&fs, &[G]);
    fs.remove_file(p(DST)).unwrap();
    assert_eq!(ask(&fs, row(&[F])).unwrap().plan, Plan::Full);
}

#[test]
fn rule_2_a_disk_without_state_is_compared() {
    let fs = fresh_fs();
    disk(&fs, 2);
    let d = ask(&fs, row(&[G])).unwrap();
    assert_eq!((d.plan, d.base, d.lineage.applies), (Plan::CompareHash, None, false));
}

#[test]
fn rule_3_a_replica_deltas_from_its_manifest_or_diverges() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    write_image(&fs, p(SRC), &DiskGen::new(3).disk(300_000)).unwrap();
    sync(vfs.clone(), G, &opts(65536, 2)).unwrap();
    let d = ask(&fs, row(&[G, F])).unwrap();
    assert_eq!((d.plan, d.base, d.lineage.common), (Plan::CompareManifest, Some(Generation(G)), Some(Generation(G))));
    scribble(&fs, 70_000);
    assert_eq!(ask(&fs, row(&[G])).unwrap_err().0, ErrorCode::Diverged, "written behind diskferry's back");
    let forced = ask(&fs, Row { force: true, ..row(&[G]) }).unwrap();
    assert_eq!((forced.plan, forced.base), (Plan::CompareHash, None));
}

#[test]
fn rule_4_an_old_primary_at_rest_is_a_delta_without_reading_it() {
    let fs = fresh_fs();
    disk(&fs, 4);
    record_history(&fs, &[G, F]);
    let d = ask(&fs, row(&[0x99, G, F])).unwrap();
    assert_eq!((d.plan, d.base), (Plan::CompareManifest, Some(Generation(G))));
    assert_eq!((d.lineage.common, d.lineage.bytes_read), (Some(Generation(G)), 0));
    // Touched but not changed: hashed once, then the same delta.
    let fs2 = fresh_fs();
    let bytes = disk(&fs2, 4);
    record_history(&fs2, &[G]);
    write_image(&fs2, p(DST), &bytes).unwrap();
    let d = ask(&fs2, row(&[G])).unwrap();
    assert_eq!((d.plan, d.base, d.lineage.bytes_read), (Plan::CompareManifest, Some(Generation(G)), 300_000));
}

#[test]
fn rule_4_an_old_primary_that_moved_is_a_split_brain() {
    let fs = fresh_fs();
    disk(&fs, 5);
    record_history(&fs, &[G]);
    scribble(&fs, 65_530); // straddles blocks 0 and 1 of 64 KiB
    scribble(&fs, 200_000);
    let (code, msg) = ask(&fs, row(&[G])).unwrap_err();
    assert_eq!(code, ErrorCode::SplitBrain);
    assert!(msg.contains("3 blocks (196608 bytes)"), "{msg}");
    // The sender never received the disk's last generation: split brain too.
    let fs2 = fresh_fs();
    disk(&fs2, 6);
    record_history(&fs2, &[G, F]);
    let (code, msg) = ask(&fs2, row(&[F])).unwrap_err();
    assert_eq!(code, ErrorCode::SplitBrain);
    assert!(msg.contains("never received"), "{msg}");
    // Consent: the disk's state becomes a point, and the delta goes from it.
    let d = ask(&fs, Row { discard: true, ..row(&[G]) }).unwrap();
    assert_eq!((d.plan, d.base), (Plan::CompareManifest, Some(Generation(0xD))));
    assert_eq!((d.lineage.discarded_blocks, d.lineage.discarded_point), (3, Some(Generation(0xD))));
    let d = ask(&fs2, Row { discard: true, ..row(&[F]) }).unwrap();
    assert_eq!((d.base, d.lineage.discarded_point), (Some(Generation(G)), Some(Generation(G))));
}

#[test]
fn rule_5_nothing_in_common_is_unrelated() {
    let fs = fresh_fs();
    disk(&fs, 7);
    record_history(&fs, &[G, F]);
    for lineage in [&[][..], &[0x77, 0x78][..]] {
        let (code, _) = ask(&fs, row(lineage)).unwrap_err();
        assert_eq!(code, ErrorCode::Unrelated, "{lineage:?}");
        let (code, _) = ask(&fs, Row { discard: true, ..row(lineage) }).unwrap_err();
        assert_eq!(code, ErrorCode::Unrelated, "consent to a split brain is not --force");
    }
    let d = ask(&fs, Row { force: true, ..row(&[0x77]) }).unwrap();
    assert_eq!((d.plan, d.base), (Plan::CompareHash, None));
}

#[test]
fn a_live_target_refuses_every_push() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    write_image(&fs, p(SRC), &DiskGen::new(8).disk(300_000)).unwrap();
    sync(vfs.clone(), G, &opts(65536, 2)).unwrap();
    let mut t = Target::open(vfs, p(STATE), p(DST), TargetOptions::default()).unwrap();
    one_thread(|| t.failover(None)).unwrap();
    drop(t);
    for r in [row(&[G]), Row { force: true, ..row(&[G]) }, Row { discard: true, ..row(&[]) }] {
        assert_eq!(ask(&fs, r).unwrap_err().0, ErrorCode::Promoted);
    }
}

/// A replica pushed on to a third host (a cascade) has a history naming
/// another id for the same bytes: a push from its own source is still rule
/// 3, and a refused split brain changes nothing.
#[test]
fn a_cascaded_replica_is_still_a_replica() {
    let fs = fresh_fs();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    write_image(&fs, p(SRC), &DiskGen::new(9).disk(300_000)).unwrap();
    sync(vfs.clone(), G, &opts(65536, 2)).unwrap();
    record_history(&fs, &[0x70, G]);
    let d = ask(&fs, row(&[G, F])).unwrap();
    assert_eq!((d.plan, d.base, d.lineage.applies), (Plan::CompareManifest, Some(Generation(G)), false));
    // Written since: its history decides, and refusing leaves the catalog as it was.
    scribble(&fs, 1000);
    let before = Target::open(vfs.clone(), p(STATE), p(DST), TargetOptions::default()).unwrap().catalog().cloned();
    assert_eq!(ask(&fs, row(&[G])).unwrap_err().0, ErrorCode::SplitBrain);
    let after = Target::open(vfs, p(STATE), p(DST), TargetOptions::default()).unwrap().catalog().cloned();
    assert_eq!(before, after);
}
