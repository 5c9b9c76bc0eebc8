//! `diskferry hash`.

use std::time::Instant;

use anyhow::Result;
use diskferry_sync_engine::digest::{digest, ManifestOut};
use diskferry_sync_engine::error::{IoContext, Place};
use diskferry_sync_engine::thread_pool;
use serde_json::json;

use crate::cli::HashArgs;
use crate::ids::{new_generation, now_unix_ns};
use crate::output::print_json;
use crate::progress::Bar;
use crate::units::{human_bytes, mb_per_s, round_secs};

pub fn run(a: HashArgs) -> Result<()> {
    let pool = thread_pool(a.threads).ctx(Place::Source, "starting threads for", &a.disk)?;
    let bar = Bar::new();
    let start = Instant::now();
    let out = a.manifest.as_deref().map(|path| ManifestOut {
        path,
        generation: new_generation(),
        now_unix_ns: now_unix_ns(),
    });
    let source = crate::nbd::open_source(&a.disk, a.format, None)?;
    let d = pool.install(|| digest(source.vfs.clone(), &source.read_path, a.block_size, out, &bar))?;
    let (g, root, zero_blocks) = (d.geometry, d.root, d.zero_blocks);
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
        crate::outln!("{}  {}", root, a.disk.display());
        crate::outln!(
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
