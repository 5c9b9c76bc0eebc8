//! The read-only `qemu-nbd` diskferry runs for an image file in a format
//! QEMU reads (`--format`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;

use super::leftover::{self, OwnedDir};
use super::url::{self, NbdUrl};

/// The name of every socket directory begins so.
const PREFIX: &str = "diskferry-nbd-";

/// `--format`: how the source's bytes are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The file or device is the disk, byte for byte.
    #[default]
    Raw,
    /// QEMU's copy-on-write image.
    Qcow2,
    /// VMware's image.
    Vmdk,
    /// Hyper-V's image.
    Vhdx,
    /// VirtualBox's image.
    Vdi,
}

impl Format {
    pub(super) fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
        }
    }
}

/// A read-only `qemu-nbd` serving an image file on a private unix socket,
/// stopped when dropped.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    dir: OwnedDir,
    image: PathBuf,
    format: Format,
}

impl QemuNbd {
    /// Starts `qemu-nbd` for `image` in `format` and waits until it listens.
    pub fn start(image: &Path, format: Format, bitmap: Option<&str>) -> Result<(QemuNbd, NbdUrl), Error> {
        let tmp = Path::new("/tmp");
        leftover::remove_orphans(tmp, PREFIX, Some("qemu-nbd"));
        let dir = OwnedDir::new(tmp, PREFIX)
            .map_err(|e| Error::new(ErrorCode::Io, format!("a directory for qemu-nbd's socket: {e}")))?;
        let socket = dir.path().join("s");
        let mut cmd = Command::new("qemu-nbd");
        if let Some(b) = bitmap {
            cmd.arg("--bitmap").arg(b);
        }
        let child = cmd
            .arg("--read-only")
            .arg(format!("--format={}", format.qemu_name()))
            .arg("--export-name=disk")
            .arg("--shared=8")
            .arg("--persistent")
            .arg("--socket")
            .arg(&socket)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::new(ErrorCode::NotFound, format!("cannot run qemu-nbd to read {}: {e}", image.display()))
                    .hint("install qemu-utils (qemu-nbd), or convert the image to raw")
            })?;
        let mut q = QemuNbd { child, dir, image: image.to_path_buf(), format };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(e) = q.exited(Duration::ZERO) {
                return Err(e);
            }
            if Instant::now() > deadline {
                return Err(Error::new(ErrorCode::Connection, "qemu-nbd did not start listening within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let url = NbdUrl { transport: url::Transport::Unix(socket), export: "disk".into() };
        Ok((q, url))
    }

    /// If `qemu-nbd` exits within `wait` (it could not open the image),
    /// why, in its own words.
    pub(super) fn exited(&mut self, wait: Duration) -> Option<Error> {
        let deadline = Instant::now() + wait;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                _ if Instant::now() >= deadline => return None,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = io::Read::read_to_string(&mut e, &mut err);
        }
        Some(
            Error::new(
                ErrorCode::InvalidInput,
                format!(
                    "qemu-nbd could not open {} as {}: {} ({status})",
                    self.image.display(),
                    self.format.qemu_name(),
                    err.trim()
                ),
            )
            .hint("check --format: `qemu-img info` names the image's format"),
        )
    }

    /// The directory holding its socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
