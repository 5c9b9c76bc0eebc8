//! The full download over the network onto every kind of target the
//! writer meets: a regular file (direct I/O), a block device, tmpfs, odd
//! sizes and block sizes, and a filesystem that fills up part way (a clear
//! retryable `E_TARGET_FULL`, the replica untouched, the next push
//! finishing the copy).

use std::fs;

use crate::agents::{pair, push_to, Agent, Identity, TargetSpec};
use crate::util::*;

#[test]
fn full_download_onto_files_devices_and_tmpfs() {
    let mut rng = rng("full_download_onto_files_devices_and_tmpfs");
    let dir = tempdir("fulldl");
    let tmpfs = Mount::tmpfs("fulldl-tmpfs");
    let dev = Loop::new(&dir.path().join("dev.img"), 24 * MIB);
    let source = Identity::init(dir.path(), "source-state");
    let file = dir.path().join("file.img");
    let on_tmpfs = tmpfs.dir.join("replica.img");
    let targets = [
        TargetSpec { name: "file", path: file.clone(), allowed: &["src"] },
        TargetSpec { name: "dev", path: dev.dev.clone(), allowed: &["src"] },
        TargetSpec { name: "tmpfs", path: on_tmpfs.clone(), allowed: &["src"] },
    ];
    let agent = Agent::start(dir.path(), &[("src", &source.fingerprint)], &targets, "");
    // Sizes that end inside a page, block sizes from 4 KiB to 1 MiB.
    let cases: [(&str, &std::path::Path, u64, &str); 4] = [
        ("file", &file, 20 * MIB + 4096 * 3 + 777, "64K"),
        ("dev", &dev.dev, 24 * MIB, "1M"),
        ("tmpfs", &on_tmpfs, 9 * MIB + 123, "4K"),
        ("file", &file, 17 * MIB + 5, "256K"),
    ];
    for (i, (name, path, size, bs)) in cases.into_iter().enumerate() {
        let what = format!("full download {i} to {name}, {size} bytes in {bs} blocks");
        let src = dir.path().join(format!("src{i}.img"));
        make_disk(&src, size, 0.7, &mut rng);
        let out = push_to(&src, &source, &agent, name, &["--mode", "full", "--force", "--block-size", bs]).ok_json();
        assert_eq!(out["mode"], "full", "{what}: {out}");
        if name == "dev" {
            compare_prefix(&src, path, size).unwrap_or_else(|e| panic!("{what}: {e}"));
        } else {
            compare(&src, path).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        let v = agent.verify(path).ok_json();
        assert_eq!(v["generation"], out["generation"], "{what}: {v}");
    }
    // Holes stay holes in a new file.
    assert!(allocated(&file) < 17 * MIB, "{} bytes allocated for 70% data", allocated(&file));
}

#[test]
fn full_download_onto_a_filesystem_that_fills_up() {
    let mut rng = rng("full_download_onto_a_filesystem_that_fills_up");
    let p = pair("fulldl-enospc", 0, "");
    let fs_ = Mount::ext4("fulldl-enospc-fs", 64 * MIB);
    let target = fs_.dir.join("replica.img");
    let agent = Agent::start(
        &p.dir.join("agent2"),
        &[("src", &p.source.fingerprint)],
        &[TargetSpec { name: "r", path: target.clone(), allowed: &["src"] }],
        "",
    );
    let src = p.dir.join("src.img");
    make_disk(&src, 40 * MIB, 0.9, &mut rng);
    let ballast = fill_leaving(&fs_.dir, 16 * MIB);
    let out = push_to(&src, &p.source, &agent, "r", &["--mode", "full"]);
    let v = out.expect_json_error("E_TARGET_FULL", 6);
    assert_eq!(v["retryable"], serde_json::Value::Bool(true), "{v}");
    assert!(!target.exists(), "a failed first copy left a replica behind");
    // Room again: the push resumes (what was written is compared, not
    // sent again) and completes; the replica is whole.
    fs::remove_file(&ballast).unwrap();
    let out = push_to(&src, &p.source, &agent, "r", &["--mode", "full"]).ok_json();
    let data_blocks = 40 * 16 * 9 / 10;
    assert!(uint(&out, "blocks_changed") < data_blocks - 16, "nothing of the first attempt was kept: {out}");
    compare(&src, &target).unwrap();
    agent.verify(&target).ok();
}
