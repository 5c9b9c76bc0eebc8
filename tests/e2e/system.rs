//! System tools for the end-to-end tests: commands, free space, loop
//! devices and mounts that clean up after themselves even when a test
//! fails, the status endpoint over HTTP, waiting for a condition.
//! Re-exported by `util.rs`; shared by several test binaries.
#![allow(dead_code)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::{tempdir, MIB};

/// Runs a system command with `path` as its last argument; panics on failure.
#[track_caller]
pub fn sh(cmd: &str, args: &[&str], path: &Path) -> String {
    let out = Command::new(cmd).args(args).arg(path).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} {} failed: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes available to root on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let out = sh("stat", &["-f", "-c", "%f %S"], path);
    let mut it = out.split_whitespace().map(|s| s.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

/// Fills the filesystem holding `dir` with a ballast file so that about
/// `leave` bytes stay free; returns the ballast's path.
pub fn fill_leaving(dir: &Path, leave: u64) -> PathBuf {
    let ballast = dir.join("ballast");
    let free = free_bytes(dir);
    assert!(free > leave + MIB, "{} has only {free} bytes free", dir.display());
    sh("fallocate", &["-l", &(free - leave).to_string()], &ballast);
    ballast
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = sh("losetup", &["--find", "--show"], file);
        Loop { dev: PathBuf::from(out.trim()) }
    }

    /// A loop device over a new `size`-byte file at `file`.
    pub fn new(file: &Path, size: u64) -> Loop {
        File::create(file).unwrap().set_len(size).unwrap();
        Loop::attach(file)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("losetup").arg("-d").arg(&self.dev).output().is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.dev.display());
    }
}

/// A filesystem mounted at a fresh directory, unmounted (and its loop
/// device detached, its image removed) on drop.
pub struct Mount {
    pub dir: PathBuf,
    dev: Option<Loop>,
    _tmp: tempfile::TempDir,
}

impl Mount {
    /// A fresh ext4 of `size` bytes (no reserved blocks).
    pub fn ext4(name: &str, size: u64) -> Mount {
        Self::with_mkfs(name, size, "mkfs.ext4", &["-q", "-F", "-m", "0", "-E", "nodiscard"])
    }

    /// A fresh XFS with reflink support (`size` at least 300 MiB).
    pub fn xfs_reflink(name: &str, size: u64) -> Mount {
        Self::with_mkfs(name, size, "mkfs.xfs", &["-q", "-f", "-K", "-m", "reflink=1"])
    }

    fn with_mkfs(name: &str, size: u64, mkfs: &str, args: &[&str]) -> Mount {
        let tmp = tempdir(name);
        let image = tmp.path().join("fs.img");
        File::create(&image).unwrap().set_len(size).unwrap();
        sh(mkfs, args, &image);
        let dev = Loop::attach(&image);
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        let out = Command::new("mount").arg(&dev.dev).arg(&dir).output().unwrap();
        assert!(out.status.success(), "mount {}: {}", dev.dev.display(), String::from_utf8_lossy(&out.stderr));
        Mount { dir, dev: Some(dev), _tmp: tmp }
    }

    /// A fresh tmpfs.
    pub fn tmpfs(name: &str) -> Mount {
        let tmp = tempdir(name);
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(&dir).output().unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Mount { dir, dev: None, _tmp: tmp }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let mut done = false;
        for _ in 0..50 {
            if Command::new("umount").arg(&self.dir).output().is_ok_and(|o| o.status.success()) {
                done = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !done {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        }
        drop(self.dev.take());
    }
}

/// `GET path` on a status endpoint at `127.0.0.1:port`: the HTTP status and body.
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use diskferry_agent::status::client::{request, Addr};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let a = request(Addr::Tcp(addr), "GET", path, token, None, std::time::Duration::from_secs(10)).unwrap();
    (a.status, a.body)
}

/// `GET path` as JSON, requiring 200.
pub fn http_json(port: u16, path: &str, token: Option<&str>) -> Value {
    let (code, body) = http_get(port, path, token);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Waits for `f` to hold, polling every 200 ms.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
