//! Running `qemu-img` for what it prints: the map and info of an image
//! diskferry reads straight from its files (`direct.rs`).

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Stdio};

/// Why `qemu-img` gave no answer.
#[derive(Debug)]
pub(super) enum QemuImgError {
    /// It could not be started (not installed).
    Spawn(std::io::Error),
    /// It failed; what it said on stderr, or why its output was not read.
    Failed(String),
}

impl std::fmt::Display for QemuImgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QemuImgError::Spawn(e) => write!(f, "cannot run qemu-img: {e}"),
            QemuImgError::Failed(m) => f.write_str(m),
        }
    }
}

/// What `qemu-img ARGS` prints on stdout, at most `cap` bytes (more is a
/// failure: it is killed rather than held in memory).
pub(super) fn run(args: &[&OsStr], cap: u64) -> Result<String, QemuImgError> {
    let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let what = format!("qemu-img {}", shown.join(" "));
    let mut child = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(QemuImgError::Spawn)?;
    let mut out = Vec::new();
    let read = child.stdout.take().map(|o| o.take(cap + 1).read_to_end(&mut out));
    if out.len() as u64 > cap {
        let _ = child.kill();
        let _ = child.wait();
        return Err(QemuImgError::Failed(format!("{what}: more than {} MiB of output", cap >> 20)));
    }
    // Its stderr is a few lines: read after stdout closed.
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|e| QemuImgError::Failed(format!("{what}: {e}")))?;
    match read {
        Some(Err(e)) => Err(QemuImgError::Failed(format!("{what}: {e}"))),
        _ if !status.success() => Err(QemuImgError::Failed(format!("{what}: {}", err.trim()))),
        _ => Ok(String::from_utf8_lossy(&out).into_owned()),
    }
}
