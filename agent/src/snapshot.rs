//! The source's snapshot around a push: the pre-snapshot hook, the
//! snapshot itself (a reflink clone beside the disk, or an operator
//! command that prints the snapshot's path), the post-snapshot hook — run
//! always once the pre hook ran — and, at the end, the snapshot's removal
//! (also after a failure). The push then reads the snapshot; the disk's
//! history stays keyed by the origin disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::store::{RealFs, Vfs};
use diskferry_sync_engine::Error;

use crate::hooks;

/// How the source is snapshotted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotKind {
    /// Read the disk itself (a running disk gives a fuzzy point).
    #[default]
    None,
    /// FICLONE the disk into `.NAME.diskferry-snap` beside it (XFS, btrfs).
    Reflink,
    /// `--snapshot-cmd` prints the snapshot's path (LVM and the like).
    Cmd,
}

impl SnapshotKind {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::None => "none",
            SnapshotKind::Reflink => "reflink",
            SnapshotKind::Cmd => "cmd",
        }
    }
}

/// The snapshot options of a push.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    pub kind: SnapshotKind,
    pub cmd: Option<String>,
    pub cleanup_cmd: Option<String>,
    pub pre: Option<String>,
    pub post: Option<String>,
    pub hook_timeout: Duration,
    /// Keep the clone after the push (`--changes extent-map`): the next
    /// push compares its own clone's extents with it.
    pub keep: bool,
    /// A running QEMU guest's QMP socket: the guest is paused while the
    /// snapshots are taken (one moment for all of a group's disks).
    pub pause_qmp: Option<PathBuf>,
}

impl SnapshotOptions {
    /// Refuses combinations that cannot work, before anything runs.
    pub fn check(&self) -> Result<(), Error> {
        let usage = |m: &str| Err(Error::new(ErrorCode::Usage, m.to_string()));
        match self.kind {
            SnapshotKind::Cmd if self.cmd.is_none() => usage("--snapshot cmd needs --snapshot-cmd"),
            SnapshotKind::None if self.pre.is_some() || self.post.is_some() => {
                usage("--pre-snapshot/--post-snapshot need a snapshot (--snapshot reflink or cmd)")
            }
            k if k != SnapshotKind::Cmd && (self.cmd.is_some() || self.cleanup_cmd.is_some()) => {
                usage("--snapshot-cmd and --snapshot-cleanup-cmd go with --snapshot cmd")
            }
            k if k != SnapshotKind::Reflink && self.keep => usage("--changes extent-map needs --snapshot reflink"),
            SnapshotKind::None if self.pause_qmp.is_some() => {
                usage("--pause-vm-qmp pauses the VM for a snapshot: add --snapshot reflink or cmd")
            }
            _ => Ok(()),
        }
    }
}

/// A snapshot taken for one push; removed by [`Snapshot::finish`] (or on drop).
#[derive(Debug)]
pub struct Snapshot {
    /// What the push reads.
    pub read_path: PathBuf,
    /// The pre and post hooks ran and succeeded: the point is app-consistent.
    pub app_consistent: bool,
    /// How it was taken.
    pub kind: SnapshotKind,
    cleanup: Option<Cleanup>,
    /// Held while a reflink clone exists (`.NAME.diskferry-snap.lock`).
    lock: Option<std::fs::File>,
}

#[derive(Debug)]
enum Cleanup {
    Remove(PathBuf),
    Command { cmd: String, path: PathBuf, timeout: Duration },
}

/// Takes the lock of `src`'s clone, or `E_BUSY` if another push holds it.
fn lock_clone(src: &Path) -> Result<std::fs::File, Error> {
    let mut name = reflink_path(src).into_os_string();
    name.push(".lock");
    let path = PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(diskferry_sync_engine::Place::Source, "opening", &path, e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(_) => Err(Error::new(
            ErrorCode::Busy,
            format!("another push of {} is taking or reading its snapshot", src.display()),
        )
        .hint("wait for it to finish, then push again")),
    }
}

/// Whether two paths name the same file or device.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            (x.dev(), x.ino()) == (y.dev(), y.ino())
                || (x.rdev() != 0 && x.rdev() == y.rdev() && x.file_type() == y.file_type())
        }
        _ => false,
    }
}

/// The hidden reflink clone beside `src`.
pub fn reflink_path(src: &Path) -> PathBuf {
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    src.with_file_name(format!(".{name}.diskferry-snap"))
}

/// Where an extent-map push clones to while the last clone is kept.
fn next_path(src: &Path) -> PathBuf {
    let mut name = reflink_path(src).into_os_string();
    name.push(".next");
    PathBuf::from(name)
}

/// Where a clone goes while a background thread frees it.
fn aside_path(clone: &Path) -> PathBuf {
    let mut name = clone.as_os_str().to_os_string();
    name.push(".old");
    PathBuf::from(name)
}

/// Removes a clone off the push's path: renamed aside at once, its blocks
/// freed by a thread the command waits for before it exits. Unlinking a
/// reflinked 4 GiB image on XFS took up to 140 ms, after the commit but
/// before the push could report it. A kill leaves the `.old` file, which
/// the next snapshot of the disk removes.
fn discard(clone: &Path) -> std::io::Result<()> {
    let aside = aside_path(clone);
    match std::fs::rename(clone, &aside) {
        Ok(()) => diskferry_sync_engine::store::unlink_in_background(&aside),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn remove_if_there(path: &Path) -> Result<(), Error> {
    std::fs::remove_file(path)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .map_err(|e| Error::io(diskferry_sync_engine::Place::Source, "removing", path, e))
}

/// The record tying the kept clone to the generation it holds, in the
/// disk's history directory (gone with the history).
fn kept_record(state_root: &Path, src: &Path) -> PathBuf {
    diskferry_sync_engine::history::history_dir(state_root, src).join("kept-snapshot")
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().filter(|m| m.is_file()).map(|m| (m.dev(), m.ino()))
}

/// The clone kept by the last extent-map push of `src` and the generation
/// it holds — only if the record names exactly that file. A clone without
/// a matching record is stale and removed.
pub fn kept_snapshot(src: &Path, state_root: &Path) -> Result<Option<(PathBuf, Generation)>, Error> {
    let kept = reflink_path(src);
    let record = std::fs::read_to_string(kept_record(state_root, src)).unwrap_or_default();
    let mut words = record.split_whitespace();
    let parsed = (words.next().and_then(|g| g.parse::<Generation>().ok()), words.next(), words.next());
    let id = file_id(&kept);
    match (parsed, id) {
        ((Some(gen), Some(dev), Some(ino)), Some((d, i))) if dev == d.to_string() && ino == i.to_string() => {
            Ok(Some((kept, gen)))
        }
        (_, Some(_)) => remove_if_there(&kept).map(|()| None),
        (_, None) => Ok(None),
    }
}

/// SIGINT and SIGTERM, deferred while hooks run: a push stopped between a
/// freeze and its thaw would leave the guest frozen. Outside [`take`] they
/// act as always (the default action).
struct DeferSignals {
    allow: Arc<AtomicBool>,
    seen: Arc<AtomicBool>,
}

impl DeferSignals {
    fn get() -> &'static DeferSignals {
        static ONCE: OnceLock<DeferSignals> = OnceLock::new();
        ONCE.get_or_init(|| {
            let d = DeferSignals { allow: Arc::new(AtomicBool::new(true)), seen: Arc::new(AtomicBool::new(false)) };
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                // Registration fails only for forbidden signals; these are not.
                let _ = signal_hook::flag::register(sig, d.seen.clone());
                let _ = signal_hook::flag::register_conditional_default(sig, d.allow.clone());
            }
            d
        })
    }
}

/// Runs the hooks and takes the snapshot of `src` (canonical). With
/// [`SnapshotKind::None`] and no hooks, the push reads `src` itself. A
/// SIGINT or SIGTERM meanwhile is acted on once the post hook and the
/// cleanup ran: `E_CANCELLED`.
pub fn take(src: &Path, o: &SnapshotOptions) -> Result<Snapshot, Error> {
    let mut taken = take_all(&[src.to_path_buf()], o)?;
    taken.pop().ok_or_else(|| Error::new(ErrorCode::Internal, "no snapshot"))
}

/// Snapshots of several disks at one moment (a replication group): the pre
/// hook once, every snapshot, the post hook once. `DISKFERRY_SOURCE` holds
/// the disks' paths, one per line.
pub fn take_all(srcs: &[PathBuf], o: &SnapshotOptions) -> Result<Vec<Snapshot>, Error> {
    o.check()?;
    if o.kind == SnapshotKind::None {
        return take_inner(srcs, o);
    }
    let d = DeferSignals::get();
    d.seen.store(false, Ordering::SeqCst);
    d.allow.store(false, Ordering::SeqCst);
    let taken = take_inner(srcs, o);
    d.allow.store(true, Ordering::SeqCst);
    if d.seen.load(Ordering::SeqCst) {
        drop(taken);
        return Err(Error::new(ErrorCode::Cancelled, "interrupted while the snapshot was taken")
            .hint("the post hook and the snapshot's cleanup ran; nothing was pushed"));
    }
    taken
}

fn take_inner(srcs: &[PathBuf], o: &SnapshotOptions) -> Result<Vec<Snapshot>, Error> {
    if o.kind == SnapshotKind::None {
        return Ok(srcs
            .iter()
            .map(|src| Snapshot {
                read_path: src.clone(),
                app_consistent: false,
                kind: o.kind,
                cleanup: None,
                lock: None,
            })
            .collect());
    }
    let joined = srcs.iter().map(|s| s.as_os_str()).collect::<Vec<_>>().join(std::ffi::OsStr::new("\n"));
    let env = [("DISKFERRY_SOURCE", joined.as_os_str())];
    let mut locks = Vec::with_capacity(srcs.len());
    if o.kind == SnapshotKind::Reflink {
        for src in srcs {
            // One clone per disk at a time: two pushes of it (to two targets)
            // must not remove each other's clone as a leftover.
            locks.push(Some(lock_clone(src)?));
            // A clone left by a killed run is stale: it goes before anything
            // runs. The clone kept for extent maps stays for such pushes.
            let mut leftovers = vec![next_path(src), aside_path(&next_path(src)), aside_path(&reflink_path(src))];
            if !o.keep {
                leftovers.push(reflink_path(src));
            }
            for leftover in leftovers {
                remove_if_there(&leftover)?;
            }
        }
    }
    let pre = o.pre.as_ref().map(|cmd| hooks::run("pre-snapshot", cmd, &[], &env, o.hook_timeout));
    let taken: Option<Result<Vec<Snapshot>, Error>> = match &pre {
        Some(Err(_)) => None,
        // Dropping the ones taken removes them when a later one fails.
        _ => Some(paused(o.pause_qmp.as_deref(), || srcs.iter().map(|src| snapshot(src, o)).collect())),
    };
    // Always once the pre hook ran, whatever failed in between.
    let post = o.post.as_ref().map(|cmd| hooks::run("post-snapshot", cmd, &[], &env, o.hook_timeout));
    let mut snaps = match taken {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Err(e),
        None => {
            return Err(pre.and_then(Result::err).unwrap_or_else(|| Error::new(ErrorCode::Internal, "no snapshot")))
        }
    };
    if let Some(Err(e)) = post {
        snaps.iter_mut().for_each(Snapshot::finish);
        return Err(e);
    }
    if let Some(Err(e)) = pre {
        snaps.iter_mut().for_each(Snapshot::finish);
        return Err(e);
    }
    locks.resize_with(snaps.len(), || None);
    for (snap, lock) in snaps.iter_mut().zip(locks) {
        // The pre hook is what quiesces the application; a post hook alone does not.
        snap.app_consistent = o.pre.is_some();
        snap.lock = lock;
    }
    Ok(snaps)
}

/// Runs `take` with the guest behind `qmp` paused: QMP `stop` drains its
/// in-flight I/O, so the snapshots taken meanwhile are one moment of every
/// disk (crash-consistent across them). A guest that is not running (shut
/// down, or paused by someone else) is left as it is.
fn paused(qmp: Option<&Path>, take: impl FnOnce() -> Result<Vec<Snapshot>, Error>) -> Result<Vec<Snapshot>, Error> {
    let Some(socket) = qmp else { return take() };
    let Some(mut q) = crate::nbd::qmp::Qmp::connect(socket)? else { return take() };
    let status = q.run("query-status", serde_json::json!({}))?;
    if status["status"] != "running" {
        return take();
    }
    q.run("stop", serde_json::json!({}))?;
    let taken = take();
    // Resumed whatever the snapshots did; a guest left paused is an outage.
    if let Err(e) = q.run("cont", serde_json::json!({})) {
        return Err(Error::new(
            ErrorCode::Snapshot,
            format!(
                "the VM behind {} was paused for the snapshot and could not be resumed: {}",
                socket.display(),
                e.message
            ),
        )
        .hint("resume it now (QMP `cont`, `virsh resume`); nothing was pushed"));
    }
    taken
}

fn snapshot(src: &Path, o: &SnapshotOptions) -> Result<Snapshot, Error> {
    match o.kind {
        SnapshotKind::Reflink => {
            let to = if o.keep { next_path(src) } else { reflink_path(src) };
            let cloned = RealFs
                .reflink(src, &to)
                .map_err(|e| Error::io(diskferry_sync_engine::Place::Source, "cloning", src, e))?;
            if !cloned {
                return Err(Error::new(
                    ErrorCode::Snapshot,
                    format!("{} cannot be cloned: its filesystem has no reflink (FICLONE)", src.display()),
                )
                .hint("put the disk on XFS (reflink=1) or btrfs, or use --snapshot cmd (LVM and the like); nothing was pushed"));
            }
            Ok(Snapshot {
                read_path: to.clone(),
                app_consistent: false,
                kind: o.kind,
                cleanup: Some(Cleanup::Remove(to)),
                lock: None,
            })
        }
        SnapshotKind::Cmd => {
            let cmd = o.cmd.as_deref().unwrap_or_default();
            let env = [("DISKFERRY_SOURCE", src.as_os_str())];
            let printed = hooks::run("snapshot", cmd, &[], &env, o.hook_timeout)?;
            let printed = printed.lines().last().unwrap_or_default().trim().to_string();
            // No cleanup runs for a path that is not a snapshot: above all
            // not for the disk itself (a cleanup like `lvremove -f` would
            // destroy it).
            let Ok(path) = std::fs::canonicalize(&printed) else {
                return Err(Error::new(
                    ErrorCode::Snapshot,
                    format!("the snapshot command printed {printed:?}, which is no readable path"),
                )
                .hint(
                    "the command must print the snapshot's path as its last line; if it made one, remove it by hand",
                ));
            };
            if same_file(&path, src) {
                return Err(Error::new(
                    ErrorCode::Snapshot,
                    format!(
                        "the snapshot command printed {}, which is the disk itself, not a snapshot of it",
                        path.display()
                    ),
                )
                .hint("print the snapshot's own path (for LVM, the snapshot volume's); no cleanup was run"));
            }
            let cleanup =
                o.cleanup_cmd.clone().map(|cmd| Cleanup::Command { cmd, path: path.clone(), timeout: o.hook_timeout });
            Ok(Snapshot { read_path: path, app_consistent: false, kind: o.kind, cleanup, lock: None })
        }
        SnapshotKind::None => Ok(Snapshot {
            read_path: src.to_path_buf(),
            app_consistent: false,
            kind: o.kind,
            cleanup: None,
            lock: None,
        }),
    }
}

impl Snapshot {
    /// Keeps this push's reflink clone as `src`'s kept snapshot of
    /// `generation` (the target committed it), replacing the last one.
    pub fn keep_for(&mut self, src: &Path, state_root: &Path, generation: Generation) -> Result<(), Error> {
        let Some(Cleanup::Remove(clone)) = &self.cleanup else { return Ok(()) };
        let kept = reflink_path(src);
        let io = |what, path: &Path, e| Error::io(diskferry_sync_engine::Place::Source, what, path, e);
        // The last kept clone is discarded, not replaced by the rename
        // (that would free its blocks here). Renamed first, recorded
        // second: a crash between leaves a record that names another
        // file, so the clone is not trusted.
        discard(&kept).map_err(|e| io("removing", &kept, e))?;
        std::fs::rename(clone, &kept).map_err(|e| io("keeping", clone, e))?;
        self.cleanup = None;
        let (dev, ino) = file_id(&kept).ok_or_else(|| Error::new(ErrorCode::Io, "the kept clone vanished"))?;
        let record = kept_record(state_root, src);
        let tmp = record.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {dev} {ino}\n", generation.to_hex())).map_err(|e| io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &record).map_err(|e| io("writing", &record, e))
    }

    /// Removes the snapshot (the clone, or the cleanup command with its
    /// path); a failure is logged, the push's own outcome stands.
    pub fn finish(&mut self) {
        match self.cleanup.take() {
            Some(Cleanup::Remove(p)) => {
                if let Err(e) = discard(&p) {
                    tracing::warn!("could not remove the snapshot {}: {e}", p.display());
                }
            }
            Some(Cleanup::Command { cmd, path, timeout }) => {
                let args = [path.as_os_str()];
                let env = [("DISKFERRY_SNAPSHOT", path.as_os_str())];
                if let Err(e) = hooks::run("snapshot-cleanup", &cmd, &args, &env, timeout) {
                    tracing::warn!("{}", e.message);
                    eprintln!("warning: {} — remove {} by hand", e.message, path.display());
                }
            }
            None => {}
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discarded_clone_leaves_its_name_at_once_and_is_freed_by_exit() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let clone = reflink_path(&dir.path().join("vm.img"));
        std::fs::write(&clone, vec![7u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
        discard(&clone).unwrap_or_else(|e| panic!("{e}"));
        assert!(!clone.exists(), "the clone's name is taken away at once");
        diskferry_sync_engine::store::wait_for_removals();
        assert!(!aside_path(&clone).exists(), "the clone is freed once the removals are waited for");
        // Nothing there: nothing to do.
        discard(&clone).unwrap_or_else(|e| panic!("{e}"));
    }
}
