//! What `serve` checks about the targets it may write.
//!
//! - At start, no target may be a file the agent itself depends on: nothing
//!   inside the state directory (the private key, every target's state), not
//!   the config file, not another target's file or device — judged on
//!   canonical paths and on file identities, so `..`, symlinked directories
//!   and hard links cannot alias them.
//! - Each target's identity (device and inode, or the device number) is
//!   pinned then. At every session the path must still name the pinned file,
//!   must not be a symlink, and is opened for writing without following one;
//!   a file swapped in later is refused before anything is written. The pin
//!   moves only when diskferry itself renames a new copy into place.
//! - Before the agent listens, every target that has state is opened once,
//!   which runs recovery: a commit interrupted by a crash is finished, an
//!   uncommitted apply set aside, so nobody reads a torn replica.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::apply::{Recovery, Target, TargetOptions};
use diskferry_sync_engine::store::file::file_id;
use diskferry_sync_engine::store::{FileId, Vfs};
use diskferry_sync_engine::{Error, Place};

use crate::config::{Config, TargetConfig};

/// The identity each target's path must still name, and the files no target may be.
#[derive(Debug, Default)]
pub struct Pins {
    pins: Mutex<HashMap<String, Option<FileId>>>,
    /// Each target's path when pinned: a session that outlived a reload
    /// moving its target does not overwrite the new path's pin.
    paths: Mutex<HashMap<String, PathBuf>>,
    /// The agent's key, certificate and config file.
    protected: Vec<(FileId, PathBuf)>,
}

/// A config error about one target's path.
fn bad_path(config: &Config, t: &TargetConfig, what: String) -> Error {
    Error::new(ErrorCode::Config, format!("config {}: target[{}].path: {what}", config.file.display(), t.index))
        .hint("a target must be a disk image or block device of its own, outside the state directory; fix the config and start again")
}

fn lstat(path: &Path) -> io::Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => Ok(Some(md)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_disk(md: &std::fs::Metadata) -> bool {
    md.is_file() || md.file_type().is_block_device()
}

/// Checks every target's path against the state directory, the config file
/// and the other targets, and pins what each names now.
pub fn check(config: &Config, state_root: &Path) -> Result<Pins, Error> {
    let mut protected = Vec::new();
    let identity = state_root.join("identity");
    for p in [identity.join("key.pem"), identity.join("cert.pem"), config.file.clone()] {
        if let Ok(Some(md)) = lstat(&p) {
            protected.push((file_id(&md), p));
        }
    }
    let mut pins = HashMap::new();
    let mut by_path: BTreeMap<&Path, &str> = BTreeMap::new();
    let mut by_id: HashMap<FileId, &str> = HashMap::new();
    for (name, t) in &config.targets {
        let path = t.path.as_path();
        if path.starts_with(state_root) {
            return Err(bad_path(
                config,
                t,
                format!(
                    "{} is inside the agent's state directory {}, which holds its private key (identity/key.pem) \
                     and every target's state",
                    path.display(),
                    state_root.display()
                ),
            ));
        }
        if path == config.file {
            return Err(bad_path(config, t, format!("{} is the agent's own config file", path.display())));
        }
        if let Some(other) = by_path.insert(path, name) {
            return Err(bad_path(
                config,
                t,
                format!("{} is also the path of target {other:?} (after resolving `..` and symlinks)", path.display()),
            ));
        }
        let md = lstat(path).map_err(|e| bad_path(config, t, format!("cannot inspect {}: {e}", path.display())))?;
        let Some(md) = md else {
            // Created by the first full copy.
            pins.insert(name.clone(), None);
            continue;
        };
        if !is_disk(&md) {
            return Err(bad_path(config, t, format!("{} is not a disk image file or a block device", path.display())));
        }
        let id = file_id(&md);
        if let Some((_, p)) = protected.iter().find(|(pid, _)| *pid == id) {
            return Err(bad_path(
                config,
                t,
                format!("{} is the same file as {} (a hard link)", path.display(), p.display()),
            ));
        }
        if let Some(other) = by_id.insert(id, name) {
            return Err(bad_path(
                config,
                t,
                format!("{} is the same file or device as the path of target {other:?}", path.display()),
            ));
        }
        pins.insert(name.clone(), Some(id));
    }
    let paths = config.targets.iter().map(|(n, t)| (n.clone(), t.path.clone())).collect();
    Ok(Pins { pins: Mutex::new(pins), paths: Mutex::new(paths), protected })
}

impl Pins {
    /// What `name`'s path must name now (`None`: nothing is pinned yet).
    pub fn get(&self, name: &str) -> Option<FileId> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied().flatten()
    }

    /// At session open: the path must not be a symlink, nor a file the agent
    /// depends on or another target's, and must name the pinned file.
    /// Returns what it names (`None`: nothing yet).
    pub fn precheck(&self, name: &str, path: &Path) -> Result<Option<FileId>, Error> {
        let swapped = |what: String| {
            Error::new(ErrorCode::TargetSwapped, format!("target {name:?}: {} {what}: nothing was written", path.display()))
                .hint("find out who replaced it; if the new file is meant to be the target, restart the agent so it checks the path again")
        };
        let Some(md) = lstat(path).map_err(|e| Error::io(Place::Target, "inspecting", path, e))? else {
            return Ok(None);
        };
        if md.file_type().is_symlink() {
            return Err(swapped("is now a symlink".into()));
        }
        if !is_disk(&md) {
            return Err(Error::io(Place::Target, "inspecting", path, diskferry_sync_engine::store::not_a_disk()));
        }
        let id = file_id(&md);
        if let Some((_, p)) = self.protected.iter().find(|(pid, _)| *pid == id) {
            return Err(swapped(format!("is now the same file as {}", p.display())));
        }
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((other, _)) = pins.iter().find(|(n, pin)| n.as_str() != name && **pin == Some(id)) {
            return Err(swapped(format!("is now the same file as target {other:?}")));
        }
        match pins.get(name).copied().flatten() {
            Some(pin) if pin != id => Err(swapped("now names another file or device than the one checked".into())),
            _ => Ok(Some(id)),
        }
    }

    /// After a reload: the pins of `fresh` (checked against the new
    /// config), except that targets whose path did not change keep theirs
    /// (a file swapped in since is still refused).
    pub fn adopt(&self, fresh: Pins, unchanged: &std::collections::BTreeSet<String>) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = fresh.pins.into_inner().unwrap_or_else(|p| p.into_inner());
        for name in unchanged {
            if let Some(pin) = pins.get(name) {
                next.insert(name.clone(), *pin);
            }
        }
        *pins = next;
        *self.paths.lock().unwrap_or_else(|p| p.into_inner()) =
            fresh.paths.into_inner().unwrap_or_else(|p| p.into_inner());
    }

    /// Records what `path` names after diskferry itself wrote it, if
    /// `name` still has that path (a reload may have moved it since).
    pub fn update(&self, name: &str, path: &Path, id: Option<FileId>) {
        if id.is_none() {
            return;
        }
        let paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        if paths.get(name).is_some_and(|p| p == path) {
            self.pins.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), id);
        }
    }
}

/// The points a target with `retention = "AGE"` keeps besides its
/// current one: every consistent point younger than `max_age` (read from
/// its catalog, which is replaced whole).
pub fn young_points(
    state_root: &Path,
    path: &Path,
    max_age: Option<std::time::Duration>,
) -> Vec<diskferry_protocol::Generation> {
    let Some(age) = max_age else { return Vec::new() };
    let since = crate::ids::now_unix_ns().saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX));
    let catalog = diskferry_sync_engine::apply::catalog::read_catalog(
        &diskferry_sync_engine::store::RealFs,
        &Target::state_dir(state_root, path),
    );
    let Ok(Some(c)) = catalog else { return Vec::new() };
    c.points
        .iter()
        .filter(|p| p.consistency.is_recovery_point() && p.created_unix_ns >= since)
        .map(|p| p.generation)
        .collect()
}

/// Opens every target that has state once, before the agent listens:
/// recovery finishes an interrupted commit (or sets an uncommitted apply
/// aside) and is logged. A target that cannot be recovered is logged and
/// refuses sessions until fixed; the other targets are served.
pub fn recover_all(config: &Config, state_root: &Path, vfs: &Arc<dyn Vfs>, pins: &Pins) {
    recover_some(config, state_root, vfs, pins, |_| true)
}

/// [`recover_all`] for the targets `which` names (those a reload added).
pub fn recover_some(config: &Config, state_root: &Path, vfs: &Arc<dyn Vfs>, pins: &Pins, which: impl Fn(&str) -> bool) {
    for (name, t) in config.targets.iter().filter(|(n, _)| which(n)) {
        let dir = Target::state_dir(state_root, &t.path);
        if !dir.is_dir() {
            continue;
        }
        let opts = TargetOptions {
            retention: Some(t.retention),
            name: Some(name.clone()),
            expect_identity: pins.get(name),
            keep_points: young_points(state_root, &t.path, t.max_age),
        };
        match Target::open(vfs.clone(), state_root, &t.path, opts) {
            Ok(target) => {
                match target.recovery() {
                    Recovery::Clean => tracing::debug!(target = %name, "nothing to recover"),
                    Recovery::Finished(g) => {
                        tracing::info!(target = %name, generation = %g, "recovered: replayed an interrupted commit")
                    }
                    Recovery::Discarded => {
                        tracing::info!(target = %name, "recovered: discarded an uncommitted apply; the target is at its last commit")
                    }
                    Recovery::Staged { entries } => {
                        tracing::info!(target = %name, entries, "recovered: kept the staged blocks of an interrupted push for its resume")
                    }
                }
                pins.update(name, &t.path, target.expected_identity());
            }
            Err(e) if e.code == ErrorCode::Busy => {
                tracing::warn!(target = %name, "not recovered now: another diskferry process holds it (it recovers it)")
            }
            Err(e) => tracing::error!(
                target = %name,
                "recovery failed: error[{}]: {} — pushes to this target are refused until it is fixed",
                e.code,
                e.message
            ),
        }
    }
}
