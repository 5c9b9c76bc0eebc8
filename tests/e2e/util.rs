//! Helpers for the end-to-end tests: running the binary, reading its JSON,
//! generating and changing disks, comparing bytes; the system tools (loop
//! devices and mounts that clean up after themselves even when a test
//! fails, HTTP, waiting) are in `system.rs`, re-exported here.
//!
//! Shared by several test binaries, each of which uses only some helpers.
#![allow(dead_code)]

pub use crate::system::*;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Runs `diskferry` with the given arguments and waits for it.
macro_rules! df {
    ($($a:expr),* $(,)?) => {
        $crate::util::run(&[$(::std::ffi::OsStr::new(&$a)),*])
    };
}

/// The binary under test: cargo's, or `DISKFERRY_E2E_BIN` (e.g. a release build).
pub fn bin() -> PathBuf {
    std::env::var_os("DISKFERRY_E2E_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_diskferry")), PathBuf::from)
}

fn command(args: &[&OsStr]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG").stdin(Stdio::null());
    c
}

/// What a finished `diskferry` process left.
#[derive(Debug)]
pub struct Out {
    pub args: String,
    /// Exit code (`128 + signal` when killed by one).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
}

/// Runs `diskferry ARGS…` to completion.
pub fn run(args: &[&OsStr]) -> Out {
    run_env(args, &[])
}

/// Runs `diskferry ARGS…` to completion with extra environment variables.
pub fn run_env(args: &[&OsStr], env: &[(&str, &OsStr)]) -> Out {
    let start = Instant::now();
    let mut c = command(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("running diskferry");
    Out {
        args: args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
        code: exit_code(out.status),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Runs `diskferry ARGS…` to completion, or kills it and fails the test
/// after `limit`: for moves whose failure mode is a hang.
#[track_caller]
pub fn run_within(args: &[&OsStr], limit: Duration) -> Out {
    let start = Instant::now();
    let mut child = KillOnDrop(spawn(args));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let stdout = drain(child.0.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let stderr = drain(child.0.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let args = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("waiting for diskferry") {
            break status;
        }
        assert!(start.elapsed() < limit, "`diskferry {args}` still ran after {limit:?}: it hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    Out {
        args,
        code: exit_code(status),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Runs `diskferry ARGS…`, again while it fails with `E_BUSY` (for up to
/// 10 s): a target agent releases a target a moment after a push returns.
pub fn run_settled(args: &[&OsStr]) -> Out {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run(args);
        if out.error_code().as_deref() != Some("E_BUSY") || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `diskferry ARGS…` without waiting; stdout and stderr are piped.
pub fn spawn(args: &[&OsStr]) -> Child {
    command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning diskferry")
}

/// A child process killed (SIGKILL) and reaped on drop, so a failing test
/// leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

impl Out {
    /// Panics with the whole output unless the process exited 0.
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code, 0, "`diskferry {}` failed:\n{self}", self.args);
        self
    }

    /// The last stdout line, parsed as one compact JSON object.
    #[track_caller]
    pub fn json(&self) -> Value {
        let line = self.stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_else(|| {
            panic!("`diskferry {}` printed nothing on stdout:\n{self}", self.args);
        });
        assert!(!line.contains("\n"));
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("last stdout line of `diskferry {}` is not JSON ({e}):\n{self}", self.args));
        assert!(v.is_object(), "not a JSON object: {line}");
        v
    }

    /// `ok` then `json`.
    #[track_caller]
    pub fn ok_json(self) -> Value {
        self.ok().json()
    }

    /// The code in the `error[E_…]` line on stderr, if there is one.
    pub fn error_code(&self) -> Option<String> {
        let line = self.stderr.lines().find(|l| l.starts_with("error["))?;
        let end = line.find(']')?;
        Some(line["error[".len()..end].to_string())
    }

    /// Checks the failure contract: exit `exit`, exactly one stderr line
    /// `error[CODE]: what happened — what to do`.
    #[track_caller]
    pub fn expect_error(&self, code: &str, exit: i32) -> &Out {
        assert_eq!(self.code, exit, "`diskferry {}`: expected exit {exit} ({code}):\n{self}", self.args);
        assert_eq!(self.error_code().as_deref(), Some(code), "`diskferry {}`: wrong error code:\n{self}", self.args);
        check_error_line(self);
        self
    }

    /// Like [`Out::expect_error`] for a run with `--json`: the last stdout
    /// line is the JSON error object.
    #[track_caller]
    pub fn expect_json_error(&self, code: &str, exit: i32) -> Value {
        self.expect_error(code, exit);
        let v = self.json();
        assert_eq!(v["ok"], Value::Bool(false), "{v}");
        assert_eq!(v["code"].as_str(), Some(code), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {v}");
        assert!(v["retryable"].is_boolean(), "no retryable: {v}");
        v
    }
}

#[track_caller]
fn check_error_line(out: &Out) {
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected exactly one error line:\n{out}");
    let line = errors[0];
    let rest = &line[line.find("]: ").map(|i| i + 3).expect("`error[CODE]: ` prefix")..];
    let (what, hint) = rest.split_once(" — ").unwrap_or_else(|| panic!("no ` — hint` in the error line: {line}"));
    assert!(!what.trim().is_empty() && !hint.trim().is_empty(), "empty message or hint: {line}");
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- exit {} after {:.3} s\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.seconds, self.stdout, self.stderr
        )
    }
}

/// A field of a JSON object that must be an unsigned integer.
#[track_caller]
pub fn uint(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("`{field}` is not an unsigned integer in {v}"))
}

/// A field of a JSON object that must be a string.
#[track_caller]
pub fn string(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_else(|| panic!("`{field}` is not a string in {v}")).to_string()
}

/// A field of a JSON object that must be lowercase hex of `len` digits.
#[track_caller]
pub fn hex(v: &Value, field: &str, len: usize) -> String {
    let s = string(v, field);
    assert!(
        s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "`{field}` is not {len} hex digits in {v}"
    );
    s
}

// ---------------------------------------------------------------- randomness

/// A seeded generator; the seed is printed so a failure can be replayed
/// with `DISKFERRY_E2E_SEED=…`.
pub fn rng(test: &str) -> SmallRng {
    let seed = std::env::var("DISKFERRY_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("{test}: seed {seed} (set DISKFERRY_E2E_SEED={seed} to replay)");
    SmallRng::seed_from_u64(seed)
}

// ---------------------------------------------------------------- temp dirs

/// A fresh directory under /tmp (a disk filesystem, never tmpfs), removed on drop.
pub fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("diskferry-e2e-{name}-")).tempdir_in("/tmp").expect("creating a temp dir")
}

// ---------------------------------------------------------------- disks

/// Makes a sparse disk image of `size` bytes: 1 MiB chunks that are holes,
/// random data (whole or partial) or explicit zeros, in proportions given by
/// `data` (the fraction of chunks that hold data).
pub fn make_disk(path: &Path, size: u64, data: f64, rng: &mut SmallRng) {
    let f = OpenOptions::new().write(true).create(true).truncate(true).open(path).expect("creating disk");
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let len = (size - off).min(MIB) as usize;
        let roll: f64 = rng.random();
        if roll < data {
            rng.fill_bytes(&mut buf[..len]);
            if rng.random_bool(0.2) {
                // Partly data, partly written zeros.
                let cut = rng.random_range(0..len);
                buf[cut..len].fill(0);
            }
            f.write_all_at(&buf[..len], off).unwrap();
        } else if roll < data + 0.05 {
            buf[..len].fill(0);
            f.write_all_at(&buf[..len], off).unwrap();
        }
        off += len as u64;
    }
    f.sync_all().unwrap();
}

/// A disk of `size` random bytes: no holes, no zeros, nothing compresses
/// ([`make_disk`] leaves some, so its payload varies from run to run).
pub fn random_disk(path: &Path, size: u64, rng: &mut SmallRng) {
    let mut bytes = vec![0u8; size as usize];
    rng.fill_bytes(&mut bytes);
    fs::write(path, bytes).expect("writing disk");
}

/// Random writes of random sizes (1 byte to `max_len`) at random unaligned
/// offsets, about `count` of them. Returns the number of bytes written.
/// The first write is at least 64 random bytes, so the file does change:
/// zero fills landing on zeros once made a push with nothing to send, and
/// a test counting points saw one fewer.
pub fn scatter_writes(path: &Path, count: usize, max_len: u64, rng: &mut SmallRng) -> u64 {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut buf = vec![0u8; max_len as usize];
    let mut total = 0;
    for i in 0..count {
        if size == 0 {
            break;
        }
        let most = max_len.min(size);
        let least = if i == 0 { most.min(64) } else { 1 };
        let len = rng.random_range(least..=most);
        let off = rng.random_range(0..=size - len);
        let b = &mut buf[..len as usize];
        if i > 0 && rng.random_bool(0.1) {
            b.fill(0);
        } else {
            rng.fill_bytes(b);
        }
        f.write_all_at(b, off).unwrap();
        total += len;
    }
    f.sync_all().unwrap();
    total
}

/// Overwrites `count` distinct, whole 4 KiB pages chosen among pages that
/// hold data (not holes or zeros) with fresh random bytes; returns the bytes changed.
pub fn change_data_pages(path: &Path, count: usize, rng: &mut SmallRng) -> u64 {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let pages = size / (4 * KIB);
    let mut chosen = std::collections::BTreeSet::new();
    let mut page = vec![0u8; 4 * KIB as usize];
    let mut tries = 0;
    while chosen.len() < count {
        tries += 1;
        assert!(tries < count * 1000, "not enough data pages in {}", path.display());
        let p = rng.random_range(0..pages);
        if chosen.contains(&p) {
            continue;
        }
        f.read_exact_at(&mut page, p * 4 * KIB).unwrap();
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        chosen.insert(p);
    }
    for p in &chosen {
        rng.fill_bytes(&mut page);
        f.write_all_at(&page, p * 4 * KIB).unwrap();
    }
    f.sync_all().unwrap();
    (chosen.len() as u64) * 4 * KIB
}

/// Sets a file's size, filling any new tail with random data.
pub fn resize_with_data(path: &Path, new_size: u64, rng: &mut SmallRng) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let old = f.metadata().unwrap().len();
    f.set_len(new_size).unwrap();
    if new_size > old {
        let mut buf = vec![0u8; (new_size - old) as usize];
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, old).unwrap();
    }
    f.sync_all().unwrap();
}

/// Punches a hole (`fallocate --punch-hole`) into a file.
pub fn punch_hole(path: &Path, off: u64, len: u64) {
    sh("fallocate", &["--punch-hole", "--offset", &off.to_string(), "--length", &len.to_string()], path);
}

/// Writes `data` at `off` into a file or device, synced, bypassing nothing.
pub fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

/// Size of a file or block device.
pub fn disk_len(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::End(0)).unwrap()
}

/// Bytes allocated to a file (sparseness check).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Bytes of a file in the page cache (util-linux `fincore`: `mincore` of a
/// map, which itself reads nothing).
pub fn cached_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "-o", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(out.status.success(), "fincore {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("fincore prints a byte count")
}

/// Whether the first `len` bytes of `a` and `b` are equal; `Err` names the
/// first differing offset.
pub fn compare_prefix(a: &Path, b: &Path, len: u64) -> Result<(), String> {
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).map_err(|e| format!("{} at {off}: {e}", a.display()))?;
        fb.read_exact(&mut bb[..n]).map_err(|e| format!("{} at {off}: {e}", b.display()))?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
            return Err(format!("{} and {} differ at byte {}", a.display(), b.display(), off + i as u64));
        }
        off += n as u64;
    }
    Ok(())
}

/// Whether two disks hold the same bytes and have the same size.
pub fn compare(a: &Path, b: &Path) -> Result<(), String> {
    let (la, lb) = (disk_len(a), disk_len(b));
    if la != lb {
        return Err(format!("{} has {la} bytes, {} has {lb}", a.display(), b.display()));
    }
    compare_prefix(a, b, la)
}

/// Panics unless `a` and `b` hold the same bytes.
#[track_caller]
pub fn assert_same(a: &Path, b: &Path) {
    if let Err(e) = compare(a, b) {
        panic!("{e}");
    }
}

/// A copy of `src` at `dst` (sparse-preserving is not needed: tests compare bytes).
pub fn copy(src: &Path, dst: &Path) {
    let _ = fs::remove_file(dst);
    fs::copy(src, dst).unwrap();
}

/// Copies the first `len` bytes of `src` (a file or device) into a new file.
pub fn copy_prefix(src: &Path, dst: &Path, len: u64) {
    let mut r = File::open(src).unwrap().take(len);
    let mut w = File::create(dst).unwrap();
    std::io::copy(&mut r, &mut w).unwrap();
}

/// Flips one bit of a file.
pub fn flip_bit(path: &Path, off: u64, bit: u8) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();
}

/// Truncates a file to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

/// The one target directory under `STATE/targets/`.
#[track_caller]
pub fn target_state_dir(state: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(state.join("targets")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "expected one target under {}: {dirs:?}", state.display());
    dirs.into_iter().next().unwrap()
}

/// Copies a directory tree of regular files (state snapshots).
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            fs::copy(e.path(), t).unwrap();
        }
    }
}
