//! Targets written behind diskferry's back: refused with E_DIVERGED and left
//! untouched; `--force` brings them back by a full compare.

use std::fs::{self, OpenOptions};
use std::path::Path;

use rand::RngCore;
use serde_json::Value;

use crate::util::*;

/// Blocks (of `bs`) in which two equally long files differ.
fn differing_blocks(a: &Path, b: &Path, bs: usize) -> u64 {
    let (a, b) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    a.chunks(bs).zip(b.chunks(bs)).filter(|(x, y)| x != y).count() as u64
}

#[test]
fn file_target_changed_behind_our_back() {
    let mut rng = rng("file_target_changed_behind_our_back");
    let dir = tempdir("diverge-file");
    let (src, dst, state) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("state"));
    let saved = dir.path().join("saved.img");
    make_disk(&src, 24 * MIB + 999, 0.6, &mut rng);
    df!("sync", src, dst, "--state-dir", state).ok();
    change_data_pages(&src, 20, &mut rng);
    df!("sync", src, dst, "--state-dir", state).ok();
    assert_same(&src, &dst);

    // A test VM writes the replica; the source moves on meanwhile.
    let mut page = [0u8; 4096];
    rng.fill_bytes(&mut page);
    write_at(&dst, 5 * MIB + 1234, &page);
    change_data_pages(&src, 20, &mut rng);
    copy(&dst, &saved);
    for _ in 0..2 {
        df!("sync", src, dst, "--state-dir", state).expect_error("E_DIVERGED", 5);
        let v = df!("sync", src, dst, "--state-dir", state, "--json").expect_json_error("E_DIVERGED", 5);
        assert_eq!(v["retryable"], Value::Bool(false), "{v}");
        assert_same(&dst, &saved);
        // verify reports it too, and must not bless the changed bytes.
        let out = df!("verify", dst, "--state-dir", state);
        assert_eq!(out.code, 5, "verify of a diverged target:\n{out}");
        let code = out.error_code().unwrap_or_default();
        assert!(code == "E_VERIFY_MISMATCH" || code == "E_DIVERGED", "{out}");
        out.expect_error(&code, 5);
        assert_same(&dst, &saved);
    }
    // Explicit delta and full modes refuse as well.
    df!("sync", src, dst, "--mode", "delta", "--state-dir", state).expect_error("E_DIVERGED", 5);
    assert_same(&dst, &saved);

    // --force: a full compare, then equal.
    let expect = differing_blocks(&src, &dst, 64 * 1024);
    let s = df!("sync", src, dst, "--force", "--state-dir", state, "--json").ok_json();
    assert_eq!(uint(&s, "blocks_changed"), expect, "--force compares, it does not copy everything: {s}");
    if let Some(c) = s["compare"].as_str() {
        assert_eq!(c, "full-compare", "{s}");
    }
    assert_same(&src, &dst);
    df!("verify", dst, "--state-dir", state).ok();
    // And the next delta trusts its manifest again.
    change_data_pages(&src, 3, &mut rng);
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&s, "mode"), "delta");
    if let Some(c) = s["compare"].as_str() {
        assert_eq!(c, "manifest", "{s}");
    }
    assert_same(&src, &dst);

    // A replica grown behind our back.
    OpenOptions::new().write(true).open(&dst).unwrap().set_len(30 * MIB).unwrap();
    copy(&dst, &saved);
    change_data_pages(&src, 3, &mut rng);
    df!("sync", src, dst, "--state-dir", state).expect_error("E_DIVERGED", 5);
    assert_same(&dst, &saved);
    assert_ne!(df!("verify", dst, "--state-dir", state).code, 0);
    df!("sync", src, dst, "--force", "--state-dir", state).ok();
    assert_same(&src, &dst);
    df!("verify", dst, "--state-dir", state).ok();

    // A replica deleted behind our back is not silently recreated by a delta.
    fs::remove_file(&dst).unwrap();
    let out = df!("sync", src, dst, "--mode", "delta", "--state-dir", state);
    assert!(out.code == 3 || out.code == 5, "delta onto a deleted replica:\n{out}");
    assert!(out.error_code().is_some(), "{out}");
}

#[test]
fn file_target_without_state_gets_a_full_compare() {
    let mut rng = rng("file_target_without_state_gets_a_full_compare");
    let dir = tempdir("nostate");
    let (src, dst, state) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("state"));
    make_disk(&src, 16 * MIB, 0.7, &mut rng);
    copy(&src, &dst);
    change_data_pages(&src, 12, &mut rng);
    scatter_writes(&src, 5, 100_000, &mut rng);
    let expect = differing_blocks(&src, &dst, 64 * 1024);
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(uint(&s, "blocks_changed"), expect, "a stateless target is compared, not overwritten: {s}");
    assert!(uint(&s, "bytes_written") <= expect * 64 * KIB, "{s}");
    assert_same(&src, &dst);
    df!("verify", dst, "--state-dir", state).ok();
}

#[test]
fn device_target_changed_behind_our_back() {
    let mut rng = rng("device_target_changed_behind_our_back");
    let dir = tempdir("diverge-dev");
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    let saved = dir.path().join("saved.img");
    let size = 24 * MIB;
    make_disk(&src, size, 0.7, &mut rng);
    let dev = Loop::new(&dir.path().join("dev.img"), 32 * MIB);
    df!("sync", src, dev.dev, "--mode", "full", "--state-dir", state).ok();
    compare_prefix(&dev.dev, &src, size).unwrap();
    df!("verify", dev.dev, "--state-dir", state).ok();

    // Written behind our back with dd (direct, synced).
    sh(
        "dd",
        &["if=/dev/urandom", "bs=4096", "count=3", "seek=1000", "oflag=direct", "conv=fsync,notrunc", "status=none"],
        Path::new(&format!("of={}", dev.dev.display())),
    );
    change_data_pages(&src, 10, &mut rng);
    copy_prefix(&dev.dev, &saved, 32 * MIB);
    df!("sync", src, dev.dev, "--state-dir", state).expect_error("E_DIVERGED", 5);
    df!("sync", src, dev.dev, "--state-dir", state, "--json").expect_json_error("E_DIVERGED", 5);
    compare_prefix(&dev.dev, &saved, 32 * MIB).unwrap();
    let out = df!("verify", dev.dev, "--state-dir", state);
    assert_eq!(out.code, 5, "verify of a diverged device:\n{out}");
    assert!(out.error_code().is_some_and(|c| c.starts_with("E_")), "{out}");
    compare_prefix(&dev.dev, &saved, 32 * MIB).unwrap();
    // Still refused after verify looked at it.
    df!("sync", src, dev.dev, "--state-dir", state).expect_error("E_DIVERGED", 5);

    let s = df!("sync", src, dev.dev, "--force", "--state-dir", state, "--json").ok_json();
    assert!(uint(&s, "blocks_changed") < 64, "--force compares, it does not copy everything: {s}");
    compare_prefix(&dev.dev, &src, size).unwrap();
    df!("verify", dev.dev, "--state-dir", state).ok();
    change_data_pages(&src, 2, &mut rng);
    df!("sync", src, dev.dev, "--state-dir", state).ok();
    compare_prefix(&dev.dev, &src, size).unwrap();
}
