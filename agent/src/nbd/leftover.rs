//! What a killed push leaves behind: the `qemu-nbd` and
//! `qemu-storage-daemon` diskferry starts outlive a `kill -9` of their push
//! (they are not its threads), each holding its image's lock so that a VM
//! could not start on the image, and the private directories of their
//! sockets stay in `/tmp`. The next push that needs one stops them.
//!
//! A directory's creator holds a lock on a file in it for as long as it
//! lives ([`OwnedDir`]): a free lock is a dead owner, whatever the pids say
//! (they can be reused, or seen from another pid namespace). Processes are
//! found by their arguments in `/proc` and signalled through a pidfd, so a
//! pid reused meanwhile is never signalled — written by hand: no
//! maintained crate gives a process's arguments and a pidfd more simply.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use rustix::process::{PidfdFlags, Signal};

/// The lock file in an [`OwnedDir`]: it appears only once locked.
const OWNER: &str = "owner.lock";

/// A private directory in `parent` whose creator is known to live by the
/// lock it holds; removed when dropped.
#[derive(Debug)]
pub struct OwnedDir {
    dir: tempfile::TempDir,
    _owner: File,
}

impl OwnedDir {
    /// Makes a directory named `prefix…` in `parent`, locked as this process's.
    pub fn new(parent: &Path, prefix: &str) -> io::Result<OwnedDir> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        // Locked under another name first, so that no cleaner ever finds
        // the lock file free while its owner lives. Opened close-on-exec:
        // a child must not keep the lock after its parent died.
        let staging = dir.path().join(".owner");
        let owner = File::create(&staging)?;
        rustix::fs::flock(&owner, FlockOperation::NonBlockingLockExclusive)?;
        std::fs::rename(&staging, dir.path().join(OWNER))?;
        Ok(OwnedDir { dir, _owner: owner })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the directories `prefix…` in `parent` whose owner is gone,
/// first stopping any `program` whose arguments name a path in one.
pub fn remove_orphans(parent: &Path, prefix: &str, program: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        if !e.file_name().to_str().is_some_and(|n| n.starts_with(prefix)) {
            continue;
        }
        let dir = e.path();
        // No lock file: not made by an OwnedDir, or not yet locked.
        let Ok(lock) = File::open(dir.join(OWNER)) else { continue };
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        if let Some(program) = program {
            let mut inside = dir.as_os_str().as_encoded_bytes().to_vec();
            inside.push(b'/');
            for pid in pids() {
                stop_if(pid, Duration::from_secs(5), |args| {
                    runs(args, program) && args.iter().any(|a| a.starts_with(&inside))
                });
            }
        }
        tracing::info!("removing {}, left by a killed push", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

/// The arguments of process `pid` (empty if it is gone).
pub fn args_of(pid: i32) -> Vec<Vec<u8>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args: Vec<Vec<u8>> = cmdline.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    if args.last().is_some_and(Vec::is_empty) {
        args.pop();
    }
    args
}

/// Whether `args` run `program` (by file name).
pub fn runs(args: &[Vec<u8>], program: &str) -> bool {
    args.first().is_some_and(|a| a.rsplit(|b| *b == b'/').next() == Some(program.as_bytes()))
}

/// Whether `pid` is gone (a zombie holds no lock: gone for this purpose).
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z')))
}

/// Stops process `pid` if its arguments pass `matches` (SIGTERM, then
/// SIGKILL after `term_wait`), and waits until it is gone.
pub fn stop_if(pid: i32, term_wait: Duration, matches: impl Fn(&[Vec<u8>]) -> bool) {
    let Some(p) = rustix::process::Pid::from_raw(pid) else { return };
    // The pidfd names this process even if the pid is reused later: the
    // arguments are checked after it is open.
    let Ok(fd) = rustix::process::pidfd_open(p, PidfdFlags::empty()) else { return };
    if !matches(&args_of(pid)) {
        return;
    }
    for (sig, wait) in [(Signal::TERM, term_wait), (Signal::KILL, Duration::from_secs(5))] {
        if rustix::process::pidfd_send_signal(&fd, sig).is_err() {
            return;
        }
        let deadline = Instant::now() + wait;
        while !gone(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if gone(pid) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_directory_is_an_orphan_once_its_owner_lets_go() {
        let parent = tempfile::tempdir().unwrap();
        let live = OwnedDir::new(parent.path(), "x-").unwrap();
        let dead = OwnedDir::new(parent.path(), "x-").unwrap();
        let dead_path = dead.path().to_path_buf();
        // A dead owner's lock is free, its directory still there.
        std::mem::forget(dead.dir);
        drop(dead._owner);
        let lockless = parent.path().join("x-lockless");
        std::fs::create_dir(&lockless).unwrap();
        // Again while a child forked by another test still shares the
        // closed lock's file (until its exec closes it).
        for _ in 0..200 {
            remove_orphans(parent.path(), "x-", Some("no-such-program"));
            if !dead_path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(live.path().is_dir());
        assert!(!dead_path.exists());
        assert!(lockless.is_dir());
    }

    #[test]
    fn a_process_is_known_by_its_arguments() {
        let me = std::process::id() as i32;
        assert!(!gone(me));
        assert!(!args_of(me).is_empty());
        assert!(runs(&[b"/usr/bin/qemu-nbd".to_vec()], "qemu-nbd"));
        assert!(!runs(&[b"/usr/bin/qemu-nbd2".to_vec()], "qemu-nbd"));
        assert!(gone(i32::MAX));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        // A process in the middle of its exec shows no arguments yet.
        while !runs(&args_of(pid), "sleep") {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop_if(pid, Duration::from_secs(5), |args| runs(args, "true"));
        assert!(child.try_wait().unwrap().is_none(), "stopped a process that did not match");
        stop_if(pid, Duration::from_secs(5), |args| runs(args, "sleep"));
        assert!(child.wait().unwrap().signal().is_some());
    }
}
