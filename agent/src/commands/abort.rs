//! `diskferry abort`: discards an interrupted session's staged data on
//! purpose (a push that will not be resumed, or one whose redo log fills the
//! state directory), leaving the target at its last commit.

use anyhow::Result;
use diskferry_sync_engine::apply::{Recovery, Trust};
use serde_json::json;

use super::target_arg::{open_for_move, resolve_arg};
use crate::cli::AbortArgs;
use crate::jobs::JobResult;
use crate::output::print_json;
use crate::units::human_bytes;

pub fn run(a: AbortArgs) -> Result<()> {
    let r = resolve_arg(&a.target, a.common.state_dir.clone())?;
    let path = r.path.clone();
    let (mv, mut target) = open_for_move(&r, "abort", std::time::Duration::from_secs(a.target.wait))?;
    let finished = match target.recovery() {
        Recovery::Finished(g) => Some(*g),
        _ => None,
    };
    let incomplete = matches!(target.trust()?, Trust::Incomplete);
    let aborted = target.abort_staged();
    mv.job.finish_with(&aborted, |_| JobResult::ok(None, None));
    let aborted = aborted?;
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
        crate::outln!("{}: the interrupted session had committed; it was finished (generation {g})", path.display());
    }
    match aborted {
        Some(x) => crate::outln!(
            "{}: discarded the staged data of an interrupted {} ({} entries, {}); the target is at its last commit",
            path.display(),
            if x.full_copy { "full copy" } else { "push" },
            x.entries,
            human_bytes(x.bytes)
        ),
        None => crate::outln!("{}: nothing staged", path.display()),
    }
    if incomplete {
        crate::outln!(
            "{}: INCOMPLETE (a full copy into this device was interrupted): it holds no recovery point until a push finishes it",
            path.display()
        );
    }
    Ok(())
}
