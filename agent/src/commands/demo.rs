//! `diskferry demo`: a full then a delta sync of a generated sample disk.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use diskferry_protocol::{parse_size, ErrorCode};
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::local::{self, Mode, NoProgress, SyncJob, SyncOptions, SyncReport};
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::verify::verify;
use diskferry_sync_engine::Error;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use super::sync::report_json;
use super::{human_bytes, mb_per_s, new_generation, new_session, now_unix_ns};
use crate::cli::DemoArgs;
use crate::output::print_json;
use crate::state;

const UNIT: u64 = 1 << 20;

pub fn run(a: DemoArgs) -> Result<()> {
    let size = parse_size(&a.size)
        .filter(|s| (16 * UNIT..=64 << 30).contains(s))
        .ok_or_else(|| Error::new(ErrorCode::Usage, format!("--size {} is not between 16M and 64G", a.size)))?;
    let base = demo_parent();
    let dir = tempfile::Builder::new()
        .prefix("diskferry-demo-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a directory in {}", base.display()))?;
    let src = dir.path().join("source.img");
    let dst = dir.path().join("replica.img");
    let state_root = state::prepare(&dir.path().join("state"))?;
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let data = make_sample(&src, size, &mut rng)?;
    eprintln!(
        "demo: {} sample disk ({} of data, the rest holes) in {}",
        human_bytes(size),
        human_bytes(data),
        dir.path().display()
    );

    let full = sync_once(&src, &dst, &state_root, Mode::Full)?;
    let changed = change_one_percent(&src, size, &mut rng)?;
    let delta = sync_once(&src, &dst, &state_root, Mode::Auto)?;
    let mut target = Target::open(Arc::new(RealFs), &state_root, &dst.canonicalize()?, TargetOptions::default())?;
    let check = verify(&mut target, &NoProgress)?;
    drop(target);

    if a.common.json {
        print_json(&json!({
            "disk_bytes": size,
            "changed_pages": changed,
            "full": report_json(&full.0, full.1),
            "delta": report_json(&delta.0, delta.1),
            "verify": { "ok": check.ok, "generation": check.generation.to_hex(), "root": check.root.to_hex() },
        }));
    } else {
        println!(
            "{:<7} {:<6} {:<13} {:>14} {:>15} {:>9} {:>9}",
            "step", "mode", "compare", "bytes written", "blocks changed", "seconds", "MB/s"
        );
        for (step, (r, secs)) in [("first", &full), ("second", &delta)] {
            println!(
                "{:<7} {:<6} {:<13} {:>14} {:>15} {:>9.3} {:>9.0}",
                step,
                r.mode,
                r.compare,
                human_bytes(r.bytes_written),
                r.blocks_changed,
                secs,
                mb_per_s(r.disk_bytes, *secs)
            );
        }
        println!(
            "verify  {}: replica is at generation {} ({})",
            if check.ok { "ok" } else { "FAILED" },
            check.generation,
            delta.0.consistency.as_str()
        );
    }
    if !check.ok {
        return Err(Error::new(ErrorCode::VerifyMismatch, "the demo replica does not verify").into());
    }
    Ok(())
}

/// A disk-backed temporary directory: the state directory refuses tmpfs.
fn demo_parent() -> PathBuf {
    let candidates = [std::env::temp_dir(), PathBuf::from("/var/tmp"), PathBuf::from(".")];
    for c in &candidates {
        if let Ok(st) = rustix::fs::statfs(c) {
            if st.f_type as u64 != 0x0102_1994 {
                return c.clone();
            }
        }
    }
    candidates[0].clone()
}

fn sync_once(src: &Path, dst: &Path, state_root: &Path, mode: Mode) -> Result<(SyncReport, f64)> {
    let job = SyncJob {
        vfs: Arc::new(RealFs),
        state_root: state_root.to_path_buf(),
        source: src.to_path_buf(),
        target: state::canonical_target(dst)?,
        generation: new_generation(),
        session: new_session(),
        now_unix_ns: now_unix_ns(),
    };
    let start = Instant::now();
    let r = local::sync(&job, &SyncOptions { mode, ..SyncOptions::default() }, &NoProgress)?;
    Ok((r, start.elapsed().as_secs_f64()))
}

/// Writes random data into about three quarters of the 1 MiB units; the rest stay holes.
fn make_sample(path: &Path, size: u64, rng: &mut SmallRng) -> Result<u64> {
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; UNIT as usize];
    let mut data = 0;
    let mut off = 0;
    while off < size {
        let run = rng.random_range(1..=12) * UNIT;
        let is_data = rng.random_bool(0.75);
        let end = (off + run).min(size);
        if is_data {
            let mut pos = off;
            while pos < end {
                rng.fill_bytes(&mut buf);
                f.write_all_at(&buf[..(end - pos).min(UNIT) as usize], pos)?;
                pos += UNIT;
            }
            data += end - off;
        }
        off = end;
    }
    f.sync_all()?;
    Ok(data)
}

/// Writes 4 KiB of new data into 1% of the 64 KiB blocks, as a running VM would.
fn change_one_percent(path: &Path, size: u64, rng: &mut SmallRng) -> Result<u64> {
    let f = OpenOptions::new().write(true).open(path)?;
    let blocks = size / 65536;
    let n = (blocks / 100).max(1);
    let mut page = [0u8; 4096];
    for _ in 0..n {
        let b = rng.random_range(0..blocks);
        let p = rng.random_range(0..16u64);
        rng.fill_bytes(&mut page);
        f.write_all_at(&page, b * 65536 + p * 4096)?;
    }
    f.sync_all()?;
    Ok(n)
}
