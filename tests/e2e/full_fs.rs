//! Full filesystems, separately for the state directory and for the
//! target's: a clear E_STATE_FULL / E_TARGET_FULL, the target still at its
//! previous generation byte for byte, `verify` passing; after space is
//! freed the next sync succeeds.

use std::fs;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

use crate::util::*;

/// Fills `count` of the source's all-zero 1 MiB chunks with random data;
/// returns the bytes written.
fn fill_holes(path: &Path, count: usize, rng: &mut SmallRng) -> u64 {
    let data = fs::read(path).unwrap();
    let mut zero: Vec<u64> = data
        .chunks(MIB as usize)
        .enumerate()
        .filter(|(_, c)| c.len() == MIB as usize && c.iter().all(|&b| b == 0))
        .map(|(i, _)| i as u64)
        .collect();
    assert!(zero.len() >= count, "only {} zero chunks in {}", zero.len(), path.display());
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..count {
        let i = zero.swap_remove(rng.random_range(0..zero.len()));
        rng.fill_bytes(&mut buf);
        write_at(path, i * MIB, &buf);
    }
    count as u64 * MIB
}

#[test]
fn state_filesystem_full() {
    let mut rng = rng("state_filesystem_full");
    let dir = tempdir("statefull");
    let fs_ = Mount::ext4("statefull-fs", 64 * MIB);
    let state = fs_.dir.join("state");
    let (src, dst, old) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("old.img"));
    make_disk(&src, 64 * MIB, 1.0, &mut rng);
    df!("sync", src, dst, "--state-dir", state).ok();
    copy(&src, &old);
    // 16 MiB of changed pages: a 16 MiB redo log and a 16 MiB undo segment.
    let changed = change_data_pages(&src, 4096, &mut rng);
    assert_eq!(changed, 16 * MIB);

    // Too little room for the redo log, then room for the log but not the undo.
    for leave in [6 * MIB, 24 * MIB] {
        let ballast = fill_leaving(&fs_.dir, leave);
        let what = format!("state filesystem with {} MiB free", leave / MIB);
        let out = df!("sync", src, dst, "--state-dir", state);
        out.expect_error("E_STATE_FULL", 6);
        let v = df!("sync", src, dst, "--state-dir", state, "--json").expect_json_error("E_STATE_FULL", 6);
        assert!(v["message"].is_string());
        assert_same(&dst, &old);
        let out = df!("verify", dst, "--state-dir", state);
        assert_eq!(out.code, 0, "{what}: verify after E_STATE_FULL:\n{out}");
        assert!(!target_state_dir(&state).join("redo.log").exists(), "{what}: the failed sync left its redo log");
        // The failed sync gave its space back.
        let free = free_bytes(&fs_.dir);
        assert!(free + MIB >= leave, "{what}: only {free} bytes free after the failure");
        fs::remove_file(&ballast).unwrap();
    }

    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&s, "mode"), "delta", "{s}");
    assert_same(&dst, &src);
    df!("verify", dst, "--state-dir", state).ok();
    // And the previous point survived all that.
    let p = df!("points", dst, "--state-dir", state, "--json").ok_json();
    let points = p["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{p}");
    let out = dir.path().join("previous.img");
    df!("export", dst, "--point", string(&points[1], "generation"), out, "--state-dir", state).ok();
    assert_same(&out, &old);
}

#[test]
fn target_filesystem_full() {
    let mut rng = rng("target_filesystem_full");
    let dir = tempdir("targetfull");
    let fs_ = Mount::ext4("targetfull-fs", 64 * MIB);
    let state = dir.path().join("state");
    let (src, old) = (dir.path().join("src.img"), dir.path().join("old.img"));
    let dst = fs_.dir.join("dst.img");
    let partial = fs_.dir.join("dst.img.partial");
    // 96 MiB with about 12 MiB of data: the replica fits only because holes stay holes.
    let size = 96 * MIB;
    make_disk(&src, size, 0.0, &mut rng);
    fill_holes(&src, 12, &mut rng);
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&s, "mode"), "full");
    assert_same(&dst, &src);
    assert!(
        allocated(&dst) < 20 * MIB,
        "zero runs were written, not left as holes: {} bytes allocated",
        allocated(&dst)
    );
    copy(&src, &old);
    // 24 MiB of new data where the replica has holes.
    fill_holes(&src, 24, &mut rng);
    scatter_writes(&src, 20, 50_000, &mut rng);

    let ballast = fill_leaving(&fs_.dir, 12 * MIB);
    for mode in ["auto", "delta", "full"] {
        let what = format!("--mode {mode} onto a full target filesystem");
        // A full copy would drop the kept point: forced, to reach the full filesystem.
        let force = if mode == "full" { "--force" } else { "--mode" };
        let mode_arg = if mode == "full" { "--mode=full" } else { mode };
        let out = df!("sync", src, dst, force, mode_arg, "--state-dir", state);
        assert_eq!(out.error_code().as_deref(), Some("E_TARGET_FULL"), "{what}:\n{out}");
        out.expect_error("E_TARGET_FULL", 6);
        let v = df!("sync", src, dst, force, mode_arg, "--state-dir", state, "--json")
            .expect_json_error("E_TARGET_FULL", 6);
        assert!(v["hint"].as_str().is_some_and(|h| !h.is_empty()), "{v}");
        assert_same(&dst, &old);
        assert!(!partial.exists(), "{what}: {} left behind", partial.display());
        let out = df!("verify", dst, "--state-dir", state);
        assert_eq!(out.code, 0, "{what}: verify afterwards:\n{out}");
    }
    fs::remove_file(&ballast).unwrap();

    // Room again: the next sync succeeds (the failures did not make the target look diverged).
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&s, "mode"), "delta", "{s}");
    assert_same(&dst, &src);
    df!("verify", dst, "--state-dir", state).ok();
}
