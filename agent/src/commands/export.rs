//! `diskferry export`.

use std::time::Instant;

use anyhow::Result;

use diskferry_sync_engine::points;
use serde_json::json;

use crate::cli::ExportArgs;
use crate::output::print_json;
use crate::state;
use crate::units::{human_bytes, round_secs};

pub fn run(a: ExportArgs) -> Result<()> {
    let state_root = state::prepare(&state::resolve(a.common.state_dir.clone()))?;
    let path = state::canonical_target(&a.dst)?;
    let out = state::canonical_target(&a.out)?;
    let target = super::target_arg::open_path_waiting(&state_root, &path, a.wait.wait)?;
    let start = Instant::now();
    let r = points::export(&target, a.point, &out)?;
    let secs = start.elapsed().as_secs_f64();
    if a.common.json {
        print_json(&json!({
            "generation": r.generation.to_hex(),
            "out": out,
            "disk_bytes": r.disk_bytes,
            "reflinked": r.reflinked,
            "undo_segments": r.segments,
            "seconds": round_secs(secs),
        }));
    } else {
        crate::outln!(
            "exported {} ({}) to {} ({}, {} undo segment(s) applied, verified) in {:.3} s",
            r.generation,
            human_bytes(r.disk_bytes),
            a.out.display(),
            if r.reflinked { "reflink" } else { "copy" },
            r.segments,
            secs
        );
    }
    Ok(())
}
