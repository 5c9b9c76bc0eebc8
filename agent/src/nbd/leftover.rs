//! Processes a killed push left behind: the `qemu-nbd` and
//! `qemu-storage-daemon` diskferry starts outlive a `kill -9` of their push
//! (they are not its threads), and each holds its image's lock, so a VM
//! could not start on the image. The next push that serves an image stops
//! them.
//!
//! Written by hand over `/proc`: what is needed is a process's arguments
//! and parent, which no maintained crate gives more simply.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;

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

/// Process `pid`'s state letter and parent, from `/proc/PID/stat`.
fn state_of(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Whether `pid` is gone (a zombie holds no lock: gone for this purpose).
pub fn gone(pid: i32) -> bool {
    state_of(pid).is_none_or(|(state, _)| state == 'Z')
}

/// Stops `pid` (SIGTERM, then SIGKILL after `term_wait`) and waits until it is gone.
pub fn stop(pid: i32, term_wait: Duration) {
    for (sig, wait) in [(Signal::TERM, term_wait), (Signal::KILL, Duration::from_secs(5))] {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, sig);
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

/// The prefix of the socket directory of a `qemu-nbd` started by agent
/// process `owner`: the name says whose it is, so an orphan is known by
/// a parent that is not its owner any more.
pub fn nbd_dir_prefix(owner: u32) -> String {
    format!("diskferry-nbd-{owner}-")
}

/// Stops every `qemu-nbd` whose socket directory in `parent` names an
/// owner that is not its parent (the owner was killed), and removes the
/// directory.
pub fn stop_orphaned_nbd(parent: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    // Pids name owners only within one pid namespace (an agent in a
    // container sharing this /tmp would look orphaned from outside it).
    let ours = std::fs::read_link("/proc/self/ns/pid").ok();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let args = args_of(pid);
        if !runs(&args, "qemu-nbd") {
            continue;
        }
        let Some(dir) = socket_dir(&args).filter(|d| d.parent() == Some(parent)) else { continue };
        if ours.is_none() || std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != ours {
            continue;
        }
        let Some(owner) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("diskferry-nbd-"))
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        match state_of(pid) {
            Some((state, parent)) if state != 'Z' && parent != owner => {
                tracing::warn!("stopping the qemu-nbd (pid {pid}) a killed push left on {}", dir.display());
                stop(pid, Duration::from_secs(5));
                let _ = std::fs::remove_dir_all(&dir);
            }
            _ => {}
        }
    }
}

/// The directory of the socket a `qemu-nbd` listens on.
fn socket_dir(args: &[Vec<u8>]) -> Option<PathBuf> {
    let at = args.iter().position(|a| a == b"--socket")?;
    let socket = PathBuf::from(String::from_utf8(args.get(at + 1)?.clone()).ok()?);
    socket.parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_arguments_and_state() {
        let me = std::process::id() as i32;
        assert!(!gone(me));
        let args = args_of(me);
        assert!(!args.is_empty());
        assert!(!runs(&args, "qemu-nbd"));
        assert!(runs(&[b"/usr/bin/qemu-nbd".to_vec()], "qemu-nbd"));
        assert!(!runs(&[b"/usr/bin/qemu-nbd2".to_vec()], "qemu-nbd"));
        let nbd = [b"qemu-nbd".to_vec(), b"--socket".to_vec(), b"/tmp/diskferry-nbd-1-x/s".to_vec()];
        assert_eq!(socket_dir(&nbd), Some(PathBuf::from("/tmp/diskferry-nbd-1-x")));
        assert!(gone(i32::MAX));
    }
}
