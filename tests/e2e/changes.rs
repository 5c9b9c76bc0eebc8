//! Change hints on a push (`--changes ranges:FILE`): an honest change list
//! is read instead of the whole disk; a list not tied to the target's
//! generation, a full copy, or a list that lies (caught by the spot check)
//! fall back to reading everything — the replica is byte-exact every time.

use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore};
use serde_json::Value;

use crate::agents::{pair, push_to, sum, Pair};
use crate::util::{self, compare, make_disk, uint, MIB};

/// `count` writes of 1 byte to `max_len` at unaligned offsets; returns the
/// ranges written.
fn writes(path: &Path, count: usize, max_len: u64, rng: &mut SmallRng) -> Vec<(u64, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    for _ in 0..count {
        let len = rng.random_range(1..=max_len);
        let off = rng.random_range(0..size - len);
        let mut b = vec![0u8; len as usize];
        rng.fill_bytes(&mut b);
        f.write_all_at(&b, off).unwrap();
        out.push((off, len));
    }
    f.sync_all().unwrap();
    out
}

fn change_list(p: &Pair, since: &str, ranges: &[(u64, u64)]) -> String {
    let file = p.dir.join("changes.json");
    let ranges: Vec<Value> = ranges.iter().map(|&(o, l)| serde_json::json!([o, l])).collect();
    std::fs::write(&file, serde_json::json!({ "since": since, "ranges": ranges }).to_string()).unwrap();
    format!("ranges:{}", file.display())
}

#[test]
fn an_honest_change_list_reads_only_what_it_names() {
    let mut rng = util::rng("an_honest_change_list_reads_only_what_it_names");
    let p = pair("changes-honest", 1, "");
    let (src, tgt) = (p.dir.join("src.img"), p.dir.join("t0.img"));
    let size = 64 * MIB + 12345;
    make_disk(&src, size, 0.9, &mut rng);
    // A full copy reads everything whatever the hint says.
    let first = push_to(&src, &p.source, &p.agent, "t0", &["--changes", &change_list(&p, &"0".repeat(32), &[])]);
    let first = first.ok_json();
    assert_eq!(first["change_source"], "full-scan", "{first}");
    assert!(first["change_note"].as_str().is_some_and(|n| n.contains("full copy")), "{first}");
    let mut gen = first["generation"].as_str().unwrap().to_string();

    for round in 0..3 {
        let mut ranges = writes(&src, 40, 100_000, &mut rng);
        // Ranges a tracker calls dirty that hold the same bytes cost a read,
        // not a send: three blocks no write touched.
        let touched: std::collections::BTreeSet<u64> =
            ranges.iter().flat_map(|&(o, l)| o / 65536..(o + l).div_ceil(65536)).collect();
        let quiet = (0..1000u64).find(|b| (*b..b + 3).all(|x| !touched.contains(&x))).unwrap();
        ranges.push((quiet * 65536, 3 * 65536));
        let hint = change_list(&p, &gen, &ranges);
        let r = push_to(&src, &p.source, &p.agent, "t0", &["--changes", &hint]).ok_json();
        assert_eq!(r["change_source"], "ranges", "round {round}: {r}");
        assert!(r["change_note"].is_null(), "{r}");
        compare(&src, &tgt).unwrap_or_else(|e| panic!("round {round}: {e}"));
        p.agent.verify(&tgt).ok();
        // Read: the hinted blocks (hashed, then the changed ones again to
        // send them), the spot check's 16 blocks, and clean blocks between
        // two dirty runs that are read as one (the bound: 2x the
        // changed blocks plus 1 % of the disk).
        let hinted = uint(&r, "hinted_blocks") * 65536;
        let spot = uint(&r, "spot_checked_blocks") * 65536;
        assert_eq!(uint(&r, "spot_checked_blocks"), 16, "{r}");
        let read = uint(&r, "source_bytes_read");
        assert!(
            read <= 2 * hinted + spot + size / 100 && read >= hinted / 4,
            "round {round}: read {read}, hinted {hinted}: {r}"
        );
        let unchanged_but_named = 3;
        assert!(uint(&r, "blocks_changed") <= uint(&r, "hinted_blocks") - unchanged_but_named, "{r}");
        gen = r["generation"].as_str().unwrap().to_string();
    }
}

#[test]
fn a_hint_not_tied_to_the_targets_generation_is_not_used() {
    let mut rng = util::rng("a_hint_not_tied_to_the_targets_generation");
    let p = pair("changes-stale", 1, "");
    let (src, tgt) = (p.dir.join("src.img"), p.dir.join("t0.img"));
    make_disk(&src, 16 * MIB, 0.9, &mut rng);
    let old = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json()["generation"].as_str().unwrap().to_string();
    writes(&src, 10, 50_000, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    // A list counted from the older generation misses the second push's changes.
    let ranges = writes(&src, 10, 50_000, &mut rng);
    let r = push_to(&src, &p.source, &p.agent, "t0", &["--changes", &change_list(&p, &old, &ranges)]).ok_json();
    assert_eq!(r["change_source"], "full-scan", "{r}");
    let note = r["change_note"].as_str().unwrap_or_default();
    assert!(note.contains(&old) && note.contains("target holds"), "{r}");
    compare(&src, &tgt).unwrap();

    // Missing and malformed lists fail before anything is sent.
    let before = sum(&tgt);
    writes(&src, 5, 5000, &mut rng);
    let missing = format!("ranges:{}", p.dir.join("nope.json").display());
    push_to(&src, &p.source, &p.agent, "t0", &["--changes", &missing]).expect_json_error("E_NOT_FOUND", 3);
    std::fs::write(p.dir.join("bad.json"), "{\"since\": 1}").unwrap();
    let bad = format!("ranges:{}", p.dir.join("bad.json").display());
    push_to(&src, &p.source, &p.agent, "t0", &["--changes", &bad]).expect_json_error("E_USAGE", 2);
    assert_eq!(sum(&tgt), before);
}

/// A list that omits most of what changed: the spot check (seeded so that
/// its sample hits a changed block) distrusts it and the disk is read in
/// full in the same push.
#[test]
fn a_lying_change_list_is_caught_by_the_spot_check() {
    let mut rng = util::rng("a_lying_change_list_is_caught");
    let p = pair("changes-lie", 1, "");
    let (src, tgt) = (p.dir.join("src.img"), p.dir.join("t0.img"));
    make_disk(&src, 32 * MIB, 1.0, &mut rng);
    let gen = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json()["generation"].as_str().unwrap().to_string();
    // Every other block changes; the list names only the first four.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    for b in (0..512u64).step_by(2) {
        f.write_all_at(&[0xEE; 100], b * 65536 + 777).unwrap();
    }
    f.sync_all().unwrap();
    let told: Vec<(u64, u64)> = (0..8u64).step_by(2).map(|b| (b * 65536 + 777, 100)).collect();
    let hint = change_list(&p, &gen, &told);
    let args = ["--changes", &hint, "--spot-check-seed", "7"];
    let r = push_to(&src, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "full-scan", "{r}");
    assert!(r["change_note"].as_str().is_some_and(|n| n.contains("spot check")), "{r}");
    assert_eq!(uint(&r, "blocks_changed"), 256, "every changed block found: {r}");
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();
}

/// Extent maps of reflink snapshots on XFS: the clone of the last push is
/// kept, the next push reads only the extents its own clone no longer
/// shares with it; a rewrite with identical bytes is read but not sent.
#[test]
fn extent_maps_read_only_the_extents_that_changed() {
    let mut rng = util::rng("extent_maps_read_only_the_extents_that_changed");
    let p = pair("changes-extents", 1, "");
    let xfs = util::Mount::xfs_reflink("changes-extents-fs", 400 * MIB);
    let src = xfs.dir.join("vm.img");
    let tgt = p.dir.join("t0.img");
    let size = 48 * MIB;
    make_disk(&src, size, 0.8, &mut rng);
    let kept = xfs.dir.join(".vm.img.diskferry-snap");
    let args = ["--snapshot", "reflink", "--changes", "extent-map"];
    let first = push_to(&src, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(first["change_source"], "full-scan", "{first}");
    assert!(kept.exists(), "the first push keeps its clone");

    for round in 0..3 {
        let ranges = writes(&src, 30, 80_000, &mut rng);
        let r = push_to(&src, &p.source, &p.agent, "t0", &args).ok_json();
        assert_eq!(r["change_source"], "extent-map", "round {round}: {r}");
        compare(&src, &tgt).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let touched: std::collections::BTreeSet<u64> =
            ranges.iter().flat_map(|&(o, l)| o / 65536..(o + l).div_ceil(65536)).collect();
        let hinted = uint(&r, "hinted_blocks");
        assert!(hinted >= uint(&r, "blocks_changed") && hinted <= touched.len() as u64 + 4, "round {round}: {r}");
        let read = uint(&r, "source_bytes_read");
        let bound = 2 * hinted * 65536 + uint(&r, "spot_checked_blocks") * 65536 + size / 100;
        assert!(read <= bound, "round {round}: read {read} > {bound}: {r}");
        // The snapshot read for this push alone (now the kept clone) was read
        // past the page cache: caching it would only evict pages others use.
        let cached = util::cached_bytes(&kept);
        assert!(cached <= read / 4, "round {round}: {cached} bytes of the snapshot cached, {read} read");
        assert!(kept.exists() && !xfs.dir.join(".vm.img.diskferry-snap.next").exists());
        assert!(
            !xfs.dir.join(".vm.img.diskferry-snap.old").exists(),
            "the replaced clone is freed before the push exits"
        );
    }

    // Identical bytes written again: new extents, the same hashes.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&src).unwrap();
    let mut same = vec![0u8; 2 * MIB as usize];
    f.read_exact_at(&mut same, 5 * MIB).unwrap();
    f.write_all_at(&same, 5 * MIB).unwrap();
    f.sync_all().unwrap();
    let r = push_to(&src, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "extent-map", "{r}");
    assert!(uint(&r, "hinted_blocks") >= 32, "the rewritten extents are hinted: {r}");
    assert_eq!(uint(&r, "blocks_changed"), 0, "{r}");
    assert_eq!(uint(&r, "bytes_sent"), 0, "{r}");
    compare(&src, &tgt).unwrap();

    // A push without extent maps drops the kept clone; the next extent-map
    // push reads in full and says why.
    push_to(&src, &p.source, &p.agent, "t0", &["--snapshot", "reflink"]).ok();
    assert!(!kept.exists());
    writes(&src, 5, 10_000, &mut rng);
    let r = push_to(&src, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "full-scan", "{r}");
    assert!(r["change_note"].as_str().is_some_and(|n| n.contains("no snapshot is kept")), "{r}");
    compare(&src, &tgt).unwrap();
}
