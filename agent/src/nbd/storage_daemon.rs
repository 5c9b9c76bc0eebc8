//! A qcow2 image at rest for `--changes dirty-bitmap`: served for one push
//! by a `qemu-storage-daemon` diskferry starts, so the image is read and its
//! bitmaps kept through the same QMP commands as a running VM's disk
//! (`running.rs`).
//!
//! One daemon with a QMP monitor answers each bitmap step in about a
//! millisecond; the runs it replaces (`qemu-img info` and `bitmap --add`,
//! `qemu-nbd`, and three `qemu-img bitmap` steps after the commit) took
//! about 0.25 s of a 1 s hinted push. (`qemu-img map` still runs once, for
//! the direct reads of `direct.rs`.) The daemon opens the image read-write (bitmaps
//! are stored in it), which locks every other writer out while it runs,
//! and stores its persistent bitmaps when told to `quit`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use rustix::process::Signal;
use serde_json::json;

use super::leftover::{self, OwnedDir};
use super::qmp::Qmp;
use super::running::Node;

/// The daemon's name for the image's qcow2 node.
const NODE: &str = "disk";
/// How long it may take to open the image and listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to store its bitmaps and exit once told to quit.
const QUIT_TIMEOUT: Duration = Duration::from_secs(30);
/// The name of every monitor directory (and lock file) begins so.
const PREFIX: &str = "diskferry-qsd-";

/// A running `qemu-storage-daemon`: told to quit (storing its bitmaps in
/// the image) when the last [`Node`] that holds it drops.
pub struct Daemon {
    pid: i32,
    qmp: Option<Arc<Mutex<Qmp>>>,
    /// Waits for the daemon; what it said on stderr, and how it ended.
    waiter: Option<JoinHandle<(String, std::io::Result<ExitStatus>)>>,
    _dir: OwnedDir,
    claim: Claim,
}

/// One push at a time serves an image: a lock held for the daemon's life,
/// and a file naming the daemon, so the next push stops one that a killed
/// agent left behind (it would hold the image's lock for ever); its
/// monitor's directory is an [`OwnedDir`], removed as any orphan.
struct Claim {
    _lock: std::fs::File,
    pid_file: PathBuf,
}

impl Claim {
    fn take(dir: &Path, image: &Path, blockdev: &str) -> Result<Claim, Error> {
        let canonical = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
        let key = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
        let name = format!("{PREFIX}{}", &key[..16]);
        let lock_path = dir.join(format!("{name}.lock"));
        let io = |e: std::io::Error| Error::new(ErrorCode::Io, format!("{}: {e}", lock_path.display()));
        let mut tries = 0;
        let lock = loop {
            tries += 1;
            let lock =
                std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(Error::new(ErrorCode::Busy, format!("another push reads {} now", image.display()))
                        .hint("push again once it ended"))
                }
                Err(e) => return Err(io(e.into())),
            }
            // A lock on a file that a /tmp cleaner removed locks nobody
            // else out (the next push opens a new file): take the one the
            // path names, and mark it fresh, so an age-based cleaner (10
            // days in systemd's tmpfiles) passes it by while this push runs.
            if same_file(&lock, &lock_path) {
                let _ = lock.set_modified(std::time::SystemTime::now());
                break lock;
            }
            if tries == 3 {
                return Err(io(std::io::Error::other("the lock file keeps changing under its lock")));
            }
        };
        let pid_file = dir.join(format!("{name}.pid"));
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse::<i32>().ok()) {
            stop_leftover(pid, blockdev);
        }
        Ok(Claim { _lock: lock, pid_file })
    }
}

/// Whether `path` still names the open file `f`.
fn same_file(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Stops process `pid` if it is a storage daemon serving `blockdev` (the
/// lock says its push is gone), and waits until it is.
fn stop_leftover(pid: i32, blockdev: &str) {
    leftover::stop_if(pid, QUIT_TIMEOUT, |args| {
        let ours = leftover::runs(args, "qemu-storage-daemon") && args.iter().any(|a| a == blockdev.as_bytes());
        if ours {
            tracing::warn!("stopping the qemu-storage-daemon (pid {pid}) a killed push left on {blockdev}");
        }
        ours
    });
}

fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("pid", &self.pid).finish()
    }
}

/// Serves the qcow2 `image` (nothing may run on it) and returns its node.
pub fn serve(image: &Path) -> Result<Node, Error> {
    let filename = image.to_str().ok_or_else(|| {
        Error::new(ErrorCode::Usage, format!("{}: qemu-storage-daemon takes UTF-8 paths", image.display()))
    })?;
    // Under systemd, /tmp is the unit's own (PrivateTmp), as for QEMU's NBD socket.
    let parent = std::env::var_os("RUNTIME_DIRECTORY").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
    // QEMU's `file` driver refuses a block device (an image on an LV).
    let is_device =
        std::fs::metadata(image).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    let protocol = if is_device { "host_device" } else { "file" };
    let blockdev =
        json!({ "driver": "qcow2", "node-name": NODE, "file": { "driver": protocol, "filename": filename } })
            .to_string();
    let claim = Claim::take(&parent, image, &blockdev)?;
    // After the claim stopped this image's leftover daemon: other images'
    // leftovers are stopped by their own next push, through their pid files.
    leftover::remove_orphans(&parent, PREFIX, None);
    let dir = OwnedDir::new(&parent, PREFIX)
        .map_err(|e| Error::new(ErrorCode::Io, format!("a directory for qemu-storage-daemon's monitor: {e}")))?;
    let socket = dir.path().join("qmp");
    // QEMU's option syntax escapes a comma by doubling it.
    let chardev = format!("socket,id=qmp,server=on,wait=off,path={}", socket.to_string_lossy().replace(',', ",,"));
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev").arg(&blockdev).arg("--chardev").arg(chardev).arg("--monitor").arg("chardev=qmp");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("qemu-storage-daemon".into())
        .spawn(move || {
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return (String::new(), Ok(ExitStatus::default()));
                }
            };
            let _ = tx.send(Ok(child.id() as i32));
            let mut said = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut said);
            }
            (said, child.wait())
        })
        .map_err(|e| Error::new(ErrorCode::Internal, format!("a thread for qemu-storage-daemon: {e}")))?;
    let pid = match rx.recv() {
        Ok(Ok(pid)) => pid,
        Ok(Err(e)) => {
            return Err(Error::new(ErrorCode::NotFound, format!("cannot run qemu-storage-daemon: {e}"))
                .hint("install qemu-utils (it holds qemu-storage-daemon)"))
        }
        Err(_) => return Err(Error::new(ErrorCode::Internal, "the qemu-storage-daemon thread ended")),
    };
    if let Err(e) = std::fs::write(&claim.pid_file, format!("{pid}\n")) {
        tracing::warn!("{}: {e} (a killed push's daemon would stay until stopped by hand)", claim.pid_file.display());
    }
    let mut daemon = Daemon { pid, qmp: None, waiter: Some(waiter), _dir: dir, claim };
    let deadline = Instant::now() + START_TIMEOUT;
    while !socket.exists() {
        if daemon.waiter.as_ref().is_some_and(|w| w.is_finished()) {
            return Err(daemon.refusal(image));
        }
        if Instant::now() > deadline {
            return Err(Error::new(ErrorCode::Connection, "qemu-storage-daemon did not listen within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let qmp = match Qmp::connect(&socket) {
        Ok(Some(q)) => Arc::new(Mutex::new(q)),
        Ok(None) if daemon.waiter.as_ref().is_some_and(|w| w.is_finished()) => return Err(daemon.refusal(image)),
        Ok(None) => {
            return Err(Error::new(ErrorCode::Connection, "qemu-storage-daemon refused its monitor's connection"))
        }
        Err(e) => {
            return Err(Error::new(e.code, format!("qemu-storage-daemon's monitor: {}", e.message))
                .hint("see the agent's log; the next push starts a new daemon"))
        }
    };
    daemon.qmp = Some(qmp.clone());
    Node::open_served(qmp, &socket, NODE, image, daemon)
}

impl Daemon {
    /// Why the daemon stopped before it listened, in its own words.
    fn refusal(&mut self, image: &Path) -> Error {
        let said = match self.waiter.take().map(JoinHandle::join) {
            Some(Ok((said, status))) => format!("{} ({status:?})", said.trim()),
            _ => "it ended without a word".to_string(),
        };
        let what = format!("qemu-storage-daemon could not open {} as qcow2: {said}", image.display());
        if said.contains("\"write\" lock") {
            // Someone else has the image open: a running VM, or another push
            // (one from outside this agent's runtime directory).
            return Error::new(ErrorCode::Busy, what)
                .hint("a VM running on the image holds it: give its QMP socket (--qmp SOCKET --node NAME)");
        }
        Error::new(ErrorCode::InvalidInput, what)
            .hint("check that the image is a qcow2 that diskferry may write (its bitmaps are stored in it)")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            let _ = std::fs::remove_file(&self.claim.pid_file);
            return;
        };
        let quit = self.qmp.as_ref().map(|q| q.lock().unwrap_or_else(|p| p.into_inner()).execute("quit", json!({})));
        // Once the waiter reaped it, its pid may be another process's.
        if !matches!(quit, Some(Ok(Ok(_)))) && !waiter.is_finished() {
            tracing::warn!("qemu-storage-daemon did not take quit ({quit:?}): stopped with SIGTERM");
            signal(self.pid, Signal::TERM);
        }
        let deadline = Instant::now() + QUIT_TIMEOUT;
        while !waiter.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !waiter.is_finished() {
            // Killed, it leaves its bitmaps marked in use: the next push reads in full.
            tracing::warn!("qemu-storage-daemon did not quit within {QUIT_TIMEOUT:?}: killed");
            signal(self.pid, Signal::KILL);
        }
        let ended = waiter.join();
        let _ = std::fs::remove_file(&self.claim.pid_file);
        match ended {
            // It says why a bitmap could not be stored ("Lost persistent bitmaps"), and exits 0.
            Ok((said, Ok(status))) if status.success() && said.trim().is_empty() => {}
            Ok((said, status)) => tracing::warn!("qemu-storage-daemon ended with {status:?}: {}", said.trim()),
            Err(_) => tracing::warn!("the qemu-storage-daemon thread panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_file;

    #[test]
    fn a_lock_file_removed_under_its_holder_is_not_the_one_the_path_names() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("x.lock");
        let held = std::fs::File::create(&path).expect("created");
        assert!(same_file(&held, &path));
        std::fs::remove_file(&path).expect("removed");
        assert!(!same_file(&held, &path), "gone from the directory");
        let _new = std::fs::File::create(&path).expect("created again");
        assert!(!same_file(&held, &path), "another file under the same name");
    }
}
