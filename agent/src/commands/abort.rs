//! `diskferry abort`: discards an interrupted session's staged data on
//! purpose (a push that will not be resumed, or one whose redo log fills the
//! state directory), leaving the target at its last commit.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::apply::{Recovery, Target, TargetOptions, Trust};
use diskferry_sync_engine::store::RealFs;
use diskferry_sync_engine::Error;
use serde_json::json;

use crate::cli::AbortArgs;
use crate::config::Config;
use crate::output::print_json;
use crate::state;
use crate::units::human_bytes;

pub fn run(a: AbortArgs) -> Result<()> {
    // A target of a serve config by name, or a path.
    let (path, state_dir) = match &a.config {
        Some(file) => {
            let config = Config::load(file)?;
            let t = config.targets.get(&a.target).ok_or_else(|| {
                Error::new(ErrorCode::UnknownTarget, format!("{} has no target named {:?}", file.display(), a.target))
                    .hint("give a target name from that config, or a path without --config")
            })?;
            (t.path.clone(), a.common.state_dir.clone().or(config.state_dir))
        }
        None => (state::canonical_target(Path::new(&a.target))?, a.common.state_dir.clone()),
    };
    let state_root = state::prepare(&state::resolve(state_dir))?;
    if !Target::state_dir(&state_root, &path).is_dir() {
        return Err(Error::new(
            ErrorCode::NoState,
            format!("{} has no diskferry state in {}", path.display(), state_root.display()),
        )
        .hint("check the path and --state-dir (the target agent's state directory)")
        .into());
    }
    let mut target = Target::open(Arc::new(RealFs), &state_root, &path, TargetOptions::default())?;
    let finished = match target.recovery() {
        Recovery::Finished(g) => Some(*g),
        _ => None,
    };
    let incomplete = matches!(target.trust()?, Trust::Incomplete);
    let aborted = target.abort_staged()?;
    if a.common.json {
        print_json(&json!({
            "target": path,
            "discarded": aborted.is_some(),
            "entries": aborted.map_or(0, |x| x.entries),
            "bytes": aborted.map_or(0, |x| x.bytes),
            "full_copy": aborted.is_some_and(|x| x.full_copy),
            "finished_generation": finished.map(|g| g.to_hex()),
            "incomplete": incomplete,
        }));
        return Ok(());
    }
    if let Some(g) = finished {
        println!("{}: the interrupted session had committed; it was finished (generation {g})", path.display());
    }
    match aborted {
        Some(x) => println!(
            "{}: discarded the staged data of an interrupted {} ({} entries, {}); the target is at its last commit",
            path.display(),
            if x.full_copy { "full copy" } else { "push" },
            x.entries,
            human_bytes(x.bytes)
        ),
        None => println!("{}: nothing staged", path.display()),
    }
    if incomplete {
        println!(
            "{}: INCOMPLETE (a full copy into this device was interrupted): it holds no recovery point until a push finishes it",
            path.display()
        );
    }
    Ok(())
}
