//! The commit of a replication group: several targets become one recovery
//! point, or none does (`docs/design.md` §4.6).
//!
//! Every member is prepared, then every logged member sealed with a commit
//! record marked `grouped`; then one **group record**
//! (`STATE/groups/committed/<generation>`) is written and synced: that is
//! the group's commit point. Then each member finishes. Recovery of a
//! member whose record is `grouped` finishes it only if the group record
//! exists; otherwise it takes the record off the log and the member stays
//! at its old point, like any apply interrupted before its commit point.
//! The group record goes once every member has finished.
//!
//! A member that is a block device written directly (a full copy) has no
//! log and held no recovery point while it was written: it is sealed after
//! the group record.

use std::path::{Path, PathBuf};

use diskferry_protocol::{ErrorCode, Generation};

use super::commit::{CommitReport, Prepared, Sealed};
use crate::error::{Error, IoContext, Place, Result};
use crate::store::{OpenHow, Vfs};

/// Where the records of group commits in progress live.
pub fn records_dir(state_root: &Path) -> PathBuf {
    state_root.join("groups").join("committed")
}

fn record_path(state_root: &Path, generation: Generation) -> PathBuf {
    records_dir(state_root).join(generation.to_string())
}

/// Whether the group commit of `generation` reached its commit point.
pub fn is_committed(vfs: &dyn Vfs, state_root: &Path, generation: Generation) -> Result<bool> {
    let p = record_path(state_root, generation);
    Ok(vfs.metadata(&p).ctx(Place::State, "reading", &p)?.is_some())
}

/// The group's commit point: the record (`text` says what it is for the
/// operator), synced, and its name durable.
pub fn write_record(vfs: &dyn Vfs, state_root: &Path, generation: Generation, text: &str) -> Result<()> {
    let dir = records_dir(state_root);
    vfs.create_dir_all(&dir).ctx(Place::State, "creating", &dir)?;
    for d in [state_root.to_path_buf(), state_root.join("groups"), dir.clone()] {
        vfs.sync_dir(&d).ctx(Place::State, "syncing", &d)?;
    }
    let p = record_path(state_root, generation);
    let tmp = p.with_extension("tmp");
    let f = vfs.open(&tmp, OpenHow::Truncate).ctx(Place::State, "creating", &tmp)?;
    f.write_at(0, text.as_bytes()).ctx(Place::State, "writing", &tmp)?;
    f.sync().ctx(Place::State, "syncing", &tmp)?;
    drop(f);
    vfs.rename(&tmp, &p).ctx(Place::State, "renaming", &p)?;
    vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir)
}

/// Removes the record once every member finished (its logs are gone).
pub fn forget_record(vfs: &dyn Vfs, state_root: &Path, generation: Generation) -> Result<()> {
    let p = record_path(state_root, generation);
    vfs.remove_file(&p).ctx(Place::State, "removing", &p)?;
    let dir = records_dir(state_root);
    vfs.sync_dir(&dir).ctx(Place::State, "syncing", &dir)
}

/// Commits `members` (prepared with `grouped` and one generation) as one
/// point of group `name`; the reports come in the members' order. On an error before the group record, every
/// member stays at its old point once its target is opened again (a
/// sealed member is taken back by recovery); after it, every member is at
/// the new one (recovery finishes what this did not).
pub fn commit<'t>(
    vfs: &dyn Vfs,
    state_root: &Path,
    name: &str,
    members: Vec<Prepared<'t>>,
) -> Result<Vec<CommitReport>> {
    let Some(generation) = members.first().map(Prepared::generation) else {
        return Err(Error::new(ErrorCode::Internal, "a group commit with no members"));
    };
    if members.iter().any(|m| m.generation() != generation) {
        return Err(Error::new(ErrorCode::Internal, "a group's members commit different generations"));
    }
    let listing: Vec<String> = members.iter().map(|m| m.target_path().display().to_string()).collect();
    let mut slots: Vec<Result<Sealed<'t>, Prepared<'t>>> = Vec::with_capacity(members.len());
    for m in members {
        slots.push(if m.is_direct() { Err(m) } else { Ok(m.seal()?) });
    }
    let text = format!("group {name}\ngeneration {generation}\n{}\n", listing.join("\n"));
    write_record(vfs, state_root, generation, &text)?;
    let mut sealed = Vec::with_capacity(slots.len());
    for slot in slots {
        sealed.push(match slot {
            Ok(s) => s,
            Err(direct) => direct.seal()?,
        });
    }
    let reports = sealed.into_iter().map(Sealed::finish).collect::<Result<Vec<_>>>()?;
    forget_record(vfs, state_root, generation)?;
    Ok(reports)
}
