//! Block devices (loop devices) as sources and targets.

use std::fs;
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::util::*;

#[test]
fn loop_devices_as_source_and_target() {
    let mut rng = rng("loop_devices_as_source_and_target");
    let dir = tempdir("blockdev");
    let state = dir.path().join("state");
    // A size that is a multiple of 512 but not of the block size.
    let size = 48 * MIB + 3 * 64 * KIB + 4096;
    let src_img = dir.path().join("src.img");
    make_disk(&src_img, size, 0.6, &mut rng);
    let src = Loop::attach(&src_img);
    assert_eq!(disk_len(&src.dev), size);
    let dst = Loop::new(&dir.path().join("dst.img"), 64 * MIB);
    // Garbage on the target: a full copy must overwrite holes with zeros.
    let mut junk = vec![0u8; (64 * MIB) as usize];
    rng.fill_bytes(&mut junk);
    write_at(&dst.dev, 0, &junk);

    // Full copy, device to device.
    let s = df!("sync", src.dev, dst.dev, "--mode", "full", "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&s, "mode"), "full", "{s}");
    assert_eq!(uint(&s, "disk_bytes"), size, "{s}");
    compare_prefix(&dst.dev, &src.dev, size).unwrap();
    let v = df!("verify", dst.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(hex(&v, "generation", 32), string(&s, "generation"));
    // Nothing was written beside the device.
    let dev_dir = fs::read_dir("/dev").unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect::<Vec<_>>();
    assert!(!dev_dir.iter().any(|n| n.to_string_lossy().ends_with(".partial")), "a .partial file in /dev");

    // Delta, device to device: a few pages and a zeroed MiB, written through the source device.
    let mut page = [0u8; 4096];
    for i in 0..5u64 {
        rng.fill_bytes(&mut page);
        write_at(&src.dev, (3 + i * 40) * 64 * KIB + 4096, &page);
    }
    write_at(&src.dev, 20 * MIB, &vec![0u8; MIB as usize]);
    let s = df!("sync", src.dev, dst.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&s, "mode"), "delta", "{s}");
    let changed = uint(&s, "blocks_changed");
    assert!((5..=5 + 16).contains(&changed), "blocks_changed {changed}: {s}");
    assert!(uint(&s, "bytes_written") <= 5 * 64 * KIB + MIB, "{s}");
    compare_prefix(&dst.dev, &src.dev, size).unwrap();
    df!("verify", dst.dev, "--state-dir", state).ok();

    // The source grows and shrinks (a file now); the device keeps the source's logical size.
    let grown = dir.path().join("grown.img");
    copy_prefix(&src.dev, &grown, size);
    resize_with_data(&grown, size + MIB + 512, &mut rng);
    let s = df!("sync", grown, dst.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(uint(&s, "disk_bytes"), size + MIB + 512, "{s}");
    compare_prefix(&dst.dev, &grown, size + MIB + 512).unwrap();
    df!("verify", dst.dev, "--state-dir", state).ok();
    resize_with_data(&grown, size - 3 * MIB - 512, &mut rng);
    let s = df!("sync", grown, dst.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(uint(&s, "disk_bytes"), size - 3 * MIB - 512, "{s}");
    compare_prefix(&dst.dev, &grown, size - 3 * MIB - 512).unwrap();
    let v = df!("verify", dst.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(hex(&v, "generation", 32), string(&s, "generation"));

    // A device with no state gets a full compare: only differing blocks are written.
    let state2 = dir.path().join("state2");
    let dst2 = Loop::new(&dir.path().join("dst2.img"), 56 * MIB);
    let mut near = vec![0u8; size as usize];
    fs::File::open(&src.dev).map(|mut f| std::io::Read::read_exact(&mut f, &mut near)).unwrap().unwrap();
    for b in [1u64, 77, 300, 700] {
        near[(b * 64 * KIB + 10) as usize] ^= 0xff;
    }
    write_at(&dst2.dev, 0, &near);
    let s = df!("sync", src.dev, dst2.dev, "--state-dir", state2, "--json").ok_json();
    assert_eq!(uint(&s, "blocks_changed"), 4, "a stateless device target is compared, not overwritten: {s}");
    compare_prefix(&dst2.dev, &src.dev, size).unwrap();
    df!("verify", dst2.dev, "--state-dir", state2).ok();

    // Device source, file target.
    let out = dir.path().join("out.img");
    df!("sync", src.dev, out, "--state-dir", state2).ok();
    assert_same(&out, &src.dev);
    df!("verify", out, "--state-dir", state2).ok();
}

#[test]
fn device_smaller_than_source_is_refused() {
    let mut rng = rng("device_smaller_than_source_is_refused");
    let dir = tempdir("toosmall");
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    make_disk(&src, 24 * MIB, 0.8, &mut rng);
    let small = Loop::new(&dir.path().join("small.img"), 16 * MIB);
    let mut junk = vec![0u8; (16 * MIB) as usize];
    rng.fill_bytes(&mut junk);
    write_at(&small.dev, 0, &junk);
    let before = dir.path().join("before.img");
    copy_prefix(&small.dev, &before, 16 * MIB);

    for mode in ["auto", "full", "delta"] {
        df!("sync", src, small.dev, "--mode", mode, "--state-dir", state).expect_error("E_TARGET_TOO_SMALL", 3);
        let v = df!("sync", src, small.dev, "--mode", mode, "--state-dir", state, "--json")
            .expect_json_error("E_TARGET_TOO_SMALL", 3);
        assert_eq!(v["retryable"], serde_json::Value::Bool(false), "{v}");
        assert_same(&small.dev, &before);
    }
    // No recovery point appeared for it.
    let out = df!("verify", small.dev, "--state-dir", state);
    assert_ne!(out.code, 0, "verify of a never-synced device:\n{out}");
    assert_same(&small.dev, &before);
}

/// A full copy into a block device overwrites it from the first block on:
/// killed midway, the device is INCOMPLETE (no recovery point), `verify`
/// says so, and the next sync finishes it.
#[test]
fn interrupted_full_copy_to_a_device_is_incomplete() {
    let mut rng = rng("interrupted_full_copy_to_a_device_is_incomplete");
    let dir = tempdir("incomplete");
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    let size = 160 * MIB;
    make_disk(&src, size, 1.0, &mut rng);
    let dev = Loop::new(&dir.path().join("dev.img"), size);
    let first = df!("sync", src, dev.dev, "--mode", "full", "--state-dir", state, "--json").ok_json();
    let took = uint(&first, "disk_bytes") as f64 / 1e6 / first["mb_per_s"].as_f64().unwrap_or(500.0).max(1.0);
    scatter_writes(&src, 200, 64 * KIB, &mut rng);

    // The device holds a recovery point: a full copy over it needs --force.
    let out = df!("sync", src, dev.dev, "--mode", "full", "--state-dir", state, "--json");
    let v = out.expect_json_error("E_WOULD_DROP_POINTS", 5);
    assert!(v["message"].as_str().is_some_and(|m| m.contains("1 recovery point")), "{v}");
    df!("verify", dev.dev, "--state-dir", state).ok();

    // The kill is timed from the moment the copy marks the device INCOMPLETE
    // (its catalog is replaced, so the inode changes), not from a measured
    // run: under load the start-up and the source pass vary too much.
    let catalog = find_catalog(&state);
    let mut incomplete = None;
    for attempt in 0..20 {
        let before = inode(&catalog);
        let mut child = spawn(&[
            "sync".as_ref(),
            src.as_ref(),
            dev.dev.as_ref(),
            "--mode".as_ref(),
            "full".as_ref(),
            "--force".as_ref(),
            "--state-dir".as_ref(),
            state.as_ref(),
        ]);
        let began = std::time::Instant::now();
        while inode(&catalog) == before && began.elapsed() < std::time::Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let delay = took * (0.05 + 0.4 * attempt as f64 / 20.0);
        std::thread::sleep(std::time::Duration::from_secs_f64(delay));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(9) {
            continue;
        }
        let out = df!("verify", dev.dev, "--state-dir", state);
        if out.code != 0 {
            incomplete = Some(out);
            break;
        }
        // Killed before it began writing: still at the first generation.
        compare_prefix(&dev.dev, &dir.path().join("src.img"), 0).unwrap();
    }
    let out = incomplete.expect("no kill landed during the full copy");
    out.expect_error("E_INCOMPLETE", 5);
    let p = df!("points", dev.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(p["points"].as_array().map(Vec::len), Some(0), "an INCOMPLETE device offers no recovery point: {p}");
    let img = dir.path().join("point.img");
    let res = df!("export", dev.dev, "--point", string(&first, "generation"), img, "--state-dir", state);
    assert_ne!(res.code, 0, "export from an INCOMPLETE device:\n{res}");
    assert!(!img.exists());

    let s = df!("sync", src, dev.dev, "--state-dir", state, "--json").ok_json();
    compare_prefix(&dev.dev, &src, size).unwrap();
    let v = df!("verify", dev.dev, "--state-dir", state, "--json").ok_json();
    assert_eq!(string(&v, "generation"), string(&s, "generation"));
}

/// The one target catalog under a state dir.
fn find_catalog(state: &Path) -> PathBuf {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, found);
            } else if p.file_name().is_some_and(|n| n == "catalog") {
                found.push(p);
            }
        }
    }
    let mut found = Vec::new();
    walk(state, &mut found);
    assert_eq!(found.len(), 1, "one catalog under {}: {found:?}", state.display());
    found.remove(0)
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}
