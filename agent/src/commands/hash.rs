//! `diskferry hash`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use diskferry_protocol::{BlockHash, Consistency, Geometry};
use diskferry_sync_engine::error::{IoContext, Place};
use diskferry_sync_engine::hash::hash_blocks;
use diskferry_sync_engine::local::Progress;
use diskferry_sync_engine::manifest::{ManifestMeta, ManifestWriter};
use diskferry_sync_engine::store::{RealFs, Vfs};
use diskferry_sync_engine::thread_pool;
use diskferry_sync_engine::tree::{region_hash, RootHasher};
use diskferry_sync_engine::Disk;
use serde_json::json;

use super::{human_bytes, mb_per_s, new_generation, now_unix_ns, round_secs};
use crate::cli::HashArgs;
use crate::output::print_json;
use crate::progress::Bar;

pub fn run(a: HashArgs) -> Result<()> {
    let vfs: Arc<dyn Vfs> = Arc::new(RealFs);
    let before = vfs.metadata(&a.disk).ctx(Place::Source, "reading", &a.disk)?;
    let disk = Disk::open(&a.disk).ctx(Place::Source, "opening", &a.disk)?;
    let g = Geometry::new(disk.len(), a.block_size);
    let pool = thread_pool(a.threads).ctx(Place::Source, "starting threads for", &a.disk)?;
    let bar = Bar::new();
    let start = Instant::now();
    let mut writer = match &a.manifest {
        Some(p) => Some(ManifestWriter::create(vfs.clone(), p, g)?),
        None => None,
    };
    let mut root = RootHasher::new(&g);
    let mut zero_blocks = 0u64;
    bar.phase("hashing", g.disk_bytes);
    pool.install(|| -> Result<()> {
        for region in 0..g.region_count() {
            let range = g.region_range(region);
            let hashes = hash_blocks(&disk, &g, range.clone()).ctx(Place::Source, "reading", &a.disk)?;
            zero_blocks += hashes.iter().filter(|h| h.is_zero()).count() as u64;
            root.update(&region_hash(&hashes));
            if let Some(w) = &mut writer {
                w.push_region(region, &hashes)?;
            }
            bar.advance(g.block_offset(range.end).min(g.disk_bytes) - g.block_offset(range.start));
        }
        Ok(())
    })?;
    let root: BlockHash = root.finish();
    if let Some(w) = writer {
        let after = vfs.metadata(&a.disk).ctx(Place::Source, "reading", &a.disk)?;
        let consistency = if before == after { Consistency::Crash } else { Consistency::Fuzzy };
        w.finish(ManifestMeta {
            generation: new_generation(),
            parent: None,
            consistency,
            created_unix_ns: now_unix_ns(),
        })?;
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish();
    if a.common.json {
        print_json(&json!({
            "disk_bytes": g.disk_bytes,
            "block_size": g.block_size.get(),
            "blocks": g.block_count(),
            "zero_blocks": zero_blocks,
            "root": root.to_hex(),
            "seconds": round_secs(secs),
        }));
    } else {
        println!("{}  {}", root, a.disk.display());
        println!(
            "{} in {} blocks of {} ({} zero), {:.3} s, {:.0} MB/s",
            human_bytes(g.disk_bytes),
            g.block_count(),
            g.block_size,
            zero_blocks,
            secs,
            mb_per_s(g.disk_bytes, secs)
        );
    }
    Ok(())
}
