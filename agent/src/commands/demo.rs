//! `diskferry demo`: a full then a delta push of a generated sample disk to
//! a target agent started in-process on loopback with throw-away identities.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use diskferry_protocol::message::SyncMode;
use diskferry_protocol::{parse_size, BlockSize, ErrorCode, TargetName};
use diskferry_sync_engine::apply::{Target, TargetOptions};
use diskferry_sync_engine::local::NoProgress;
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::verify::verify;
use diskferry_sync_engine::Error;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use super::net::{push_json, runtime};
use crate::cli::DemoArgs;
use crate::config::Config;
use crate::identity::Identity;
use crate::output::print_json;
use crate::push::{self, PushOptions};
use crate::serve::Server;
use crate::state;
use crate::units::{human_bytes, mb_per_s};

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
    let target_state = state::prepare(&dir.path().join("target-state"))?;
    let source_state = state::prepare(&dir.path().join("source-state"))?;
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let data = make_sample(&src, size, &mut rng)?;
    eprintln!(
        "demo: {} sample disk ({} of data, the rest holes) in {}",
        human_bytes(size),
        human_bytes(data),
        dir.path().display()
    );

    // Two throw-away agents on loopback: a target serving `replica`, a source pushing to it.
    let source_id = Identity::generate()?;
    let target_id = Identity::generate()?;
    let config = Config::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\n[[peer]]\nname = \"demo-source\"\nfingerprint = \"{}\"\n[[target]]\nname = \"replica\"\npath = \"{}\"\nallowed_peers = [\"demo-source\"]\n",
            source_id.fingerprint(),
            state::canonical_target(&dst)?.display()
        ),
        Path::new("(demo)"),
    )?;
    let rt = runtime()?;
    let (full, delta) = rt.block_on(async {
        let server = Server::bind(config, target_state.clone(), &target_id)?;
        let addr =
            server.local_addr()?.ok_or_else(|| Error::new(ErrorCode::Internal, "the demo agent does not listen"))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async {
            let _ = stop_rx.await;
        }));
        let opts = PushOptions {
            source: src.clone(),
            peer: addr,
            peer_fingerprint: target_id.fingerprint(),
            target: TargetName::new("replica").map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?,
            mode: SyncMode::Auto,
            block_size: BlockSize::DEFAULT,
            compress: Some(1),
            force: false,
            discard_target_changes: false,
            snapshot: Default::default(),
            promote: false,
            fuzzy: false,
            threads: None,
            max_mtu: None,
            state_root: Some(source_state.clone()),
            idle_timeout: crate::transport::DEFAULT_IDLE_TIMEOUT,
            changes: Default::default(),
            qmp: None,
            group: None,
            cancel: None,
            shared: None,
            pace: Vec::new(),
            format: Default::default(),
            spot_check: diskferry_sync_engine::changes::SpotCheck::with_seed(1),
        };
        let timed = |opts: PushOptions| {
            let id = &source_id;
            async move {
                let start = Instant::now();
                let r = push::push(id, opts, Arc::new(NoProgress)).await?;
                Ok::<_, Error>((r, start.elapsed().as_secs_f64()))
            }
        };
        let full = timed(opts.clone()).await;
        let changed = change_one_percent(&src, size, &mut rng);
        let delta = match (&full, changed) {
            (Ok(_), Ok(_)) => timed(opts).await,
            (Err(_), _) => Err(Error::new(ErrorCode::Internal, "skipped")),
            (_, Err(e)) => Err(Error::new(ErrorCode::Io, format!("changing the sample disk: {e}"))),
        };
        let _ = stop_tx.send(());
        let _ = serving.await;
        Ok::<_, anyhow::Error>((full?, delta?))
    })?;
    let mut target = Target::open(Arc::new(RealFs), &target_state, &dst.canonicalize()?, TargetOptions::default())?;
    let check = verify(&mut target, &NoProgress)?;
    drop(target);

    if a.common.json {
        print_json(&json!({
            "disk_bytes": size,
            "full": push_json(&full.0, full.1, 0.0),
            "delta": push_json(&delta.0, delta.1, 0.0),
            "verify": { "ok": check.ok, "generation": check.generation.to_hex(), "root": check.root.to_hex() },
        }));
    } else {
        crate::outln!(
            "{:<7} {:<6} {:>15} {:>13} {:>13} {:>9} {:>9}",
            "push",
            "mode",
            "blocks changed",
            "block data",
            "on the wire",
            "seconds",
            "MB/s"
        );
        for (step, (r, secs)) in [("first", &full), ("second", &delta)] {
            crate::outln!(
                "{:<7} {:<6} {:>15} {:>13} {:>13} {:>9.3} {:>9.0}",
                step,
                r.mode(),
                r.committed.blocks_changed,
                human_bytes(r.bytes_sent),
                human_bytes(r.wire_bytes),
                secs,
                mb_per_s(r.disk_bytes, *secs)
            );
        }
        crate::outln!(
            "verify  {}: the replica is at generation {} ({}, path MTU {})",
            if check.ok { "ok" } else { "FAILED" },
            check.generation,
            delta.0.consistency.as_str(),
            delta.0.path_mtu
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
