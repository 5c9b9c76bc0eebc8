//! The state directory: where it is, and refusing places that would lose it.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;

const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// `--state-dir`, else `/var/lib/diskferry` as root, else `$XDG_STATE_HOME/diskferry`.
pub fn resolve(arg: Option<PathBuf>) -> PathBuf {
    if let Some(p) = arg {
        return p;
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/diskferry");
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("diskferry")
}

/// Creates the state directory (0700) and refuses memory-backed filesystems,
/// whose loss at reboot would leave replicas with no trustworthy state.
pub fn prepare(dir: &Path) -> Result<PathBuf, Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(diskferry_sync_engine::Place::State, "creating state directory", dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| Error::io(diskferry_sync_engine::Place::State, "reading", dir, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(diskferry_sync_engine::Place::State, "securing", dir, e))?;
    }
    let st = rustix::fs::statfs(dir)
        .map_err(|e| Error::io(diskferry_sync_engine::Place::State, "inspecting", dir, e.into()))?;
    let fs_type = st.f_type as u64;
    if fs_type == TMPFS_MAGIC || fs_type == RAMFS_MAGIC {
        return Err(Error::new(
            ErrorCode::StateDir,
            format!("state directory {} is on a memory filesystem (tmpfs/ramfs/devtmpfs)", dir.display()),
        )
        .hint("state must survive a reboot: choose a --state-dir on a disk"));
    }
    fs::canonicalize(dir).map_err(|e| Error::io(diskferry_sync_engine::Place::State, "resolving", dir, e))
}

/// The canonical path of a target, which need not exist yet (its directory must).
pub fn canonical_target(path: &Path) -> Result<PathBuf, Error> {
    if let Ok(p) = fs::canonicalize(path) {
        return Ok(p);
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorCode::InvalidInput, format!("{} is not a file path", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = fs::canonicalize(parent)
        .map_err(|e| Error::io(diskferry_sync_engine::Place::Target, "resolving the directory of", path, e))?;
    Ok(parent.join(name))
}
