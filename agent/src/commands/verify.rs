//! `diskferry verify`.

use anyhow::Result;
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::apply::Recovery;
use diskferry_sync_engine::error::{IoContext, Place};
use diskferry_sync_engine::thread_pool;
use diskferry_sync_engine::verify::verify;
use serde_json::json;

use crate::cli::VerifyArgs;
use crate::output::{print_json, CommandFailure};
use crate::progress::Bar;
use crate::state;

pub fn run(a: VerifyArgs) -> Result<()> {
    let state_root = state::prepare(&state::resolve(a.common.state_dir.clone()))?;
    let path = state::canonical_target(&a.dst)?;
    let mut target = super::target_arg::open_path_waiting(&state_root, &path, a.wait.wait)?;
    let recovery = target.recovery().clone();
    match &recovery {
        Recovery::Finished(g) => eprintln!("recovered: finished the interrupted commit of generation {g}"),
        Recovery::Discarded => eprintln!("recovered: discarded an interrupted, uncommitted apply"),
        Recovery::Staged { entries } => {
            eprintln!("{entries} staged blocks of an interrupted session are kept for resume")
        }
        Recovery::Clean => {}
    }
    let pool = thread_pool(a.threads).ctx(Place::Target, "starting threads for", &path)?;
    let bar = Bar::new();
    let report = pool.install(|| verify(&mut target, &bar));
    bar.finish();
    let report = report?;
    if report.ok {
        if a.common.json {
            print_json(&json!({
                "ok": true,
                "generation": report.generation.to_hex(),
                "root": report.root.to_hex(),
            }));
        } else {
            crate::outln!("ok: {} is at generation {} (root {})", a.dst.display(), report.generation, report.root);
        }
        return Ok(());
    }
    let message = match report.size_mismatch {
        Some((want, have)) => format!(
            "{} holds {have} bytes but generation {} has {want}: it was changed behind diskferry's back",
            a.dst.display(),
            report.generation
        ),
        None => format!(
            "{} of {}'s blocks differ from generation {} (first: block {})",
            report.mismatched_blocks,
            a.dst.display(),
            report.generation,
            report.first_mismatch.unwrap_or(0)
        ),
    };
    Err(CommandFailure {
        code: ErrorCode::VerifyMismatch,
        message,
        hint: Some("the target was written behind diskferry's back or is damaged; resync with --force".into()),
        extra: Some(json!({
            "generation": report.generation.to_hex(),
            "root": report.root.to_hex(),
            "mismatched_blocks": report.mismatched_blocks,
        })),
    }
    .into())
}
