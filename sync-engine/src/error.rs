//! The engine's error type: a stable [`ErrorCode`], a message saying what
//! happened and a hint saying what to do.

use std::io;
use std::path::Path;

use diskferry_protocol::ErrorCode;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which filesystem an I/O error happened on; decides `E_TARGET_FULL` vs `E_STATE_FULL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The source disk.
    Source,
    /// The target disk, its `.partial` file or an export image.
    Target,
    /// The state directory (catalog, manifests, logs).
    State,
}

/// An engine error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// Stable code.
    pub code: ErrorCode,
    /// What happened, for a person.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// The underlying I/O error, if any.
    #[source]
    pub source: Option<io::Error>,
}

impl Error {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into(), hint: None, source: None }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Maps an I/O error on `path` during `what` to a coded error (one
    /// carrying [`Panicked`] is this program's fault: `E_INTERNAL`).
    pub fn io(place: Place, what: &str, path: &Path, err: io::Error) -> Self {
        let (code, hint) = match (err.raw_os_error(), err.kind()) {
            (Some(errno), _) if errno == ENOSPC || errno == EDQUOT => match place {
                Place::State => (
                    ErrorCode::StateFull,
                    "free space on the state directory's filesystem (or point --state-dir elsewhere) and run again",
                ),
                _ => (
                    ErrorCode::TargetFull,
                    "free space on the target's filesystem and run again; the target stays at its last committed generation (a commit cut short is finished when the target is next used)",
                ),
            },
            _ if err.get_ref().is_some_and(|e| e.is::<crate::disk::SourceChanged>())
                || (place == Place::Source && err.kind() == io::ErrorKind::UnexpectedEof) =>
            {
                (
                    ErrorCode::SourceChanged,
                    "the source shrank or was replaced while it was read: push from a snapshot, or run again once nothing truncates it; the target keeps its last committed generation",
                )
            }
            (_, io::ErrorKind::NotFound) => (ErrorCode::NotFound, "check the path"),
            _ if err.get_ref().is_some_and(|e| e.is::<crate::store::NotADisk>()) => {
                (ErrorCode::NotADisk, "give a disk image file or a block device")
            }
            (Some(ELOOP), _) if place == Place::Target => {
                (ErrorCode::TargetSwapped, "a symlink was put where the target was; find out who replaced it")
            }
            _ if err.get_ref().is_some_and(|e| e.is::<crate::store::file::SymlinkRefused>()) => {
                (ErrorCode::TargetSwapped, "a symlink was put where the target was; find out who replaced it")
            }
            (_, io::ErrorKind::PermissionDenied) => (ErrorCode::Io, "check permissions (block devices need root)"),
            _ if err.get_ref().is_some_and(|e| e.is::<Panicked>()) => {
                (ErrorCode::Internal, "a bug in diskferry: report it with the log; the target is left as after a crash (old or new generation, never a mix, once it is next used)")
            }
            _ => (ErrorCode::Io, "check the device and the kernel log; the target stays at its last committed generation (a commit cut short is finished when the target is next used)"),
        };
        Error {
            code,
            message: format!("{what} {}: {err}", path.display()),
            hint: Some(hint.to_string()),
            source: Some(err),
        }
    }

    /// A damaged state file.
    pub fn corrupt(path: &Path, what: impl std::fmt::Display) -> Self {
        Error::new(ErrorCode::StateCorrupt, format!("{} is damaged: {what}", path.display()))
            .hint("the state file failed its checksum; run `diskferry verify` or resync with --mode full")
    }

    /// Whether running again may succeed.
    pub fn retryable(&self) -> bool {
        self.code.retryable()
    }
}

const ENOSPC: i32 = 28;
const ELOOP: i32 = 40;
const EDQUOT: i32 = 122;

/// Adds path context to `io::Result`s.
pub trait IoContext<T> {
    /// Maps the error with [`Error::io`].
    fn ctx(self, place: Place, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, place: Place, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(place, what, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_by_place() {
        let e = Error::io(Place::State, "writing", Path::new("/x"), io::Error::from_raw_os_error(28));
        assert_eq!(e.code, ErrorCode::StateFull);
        let e = Error::io(Place::Target, "writing", Path::new("/x"), io::Error::from_raw_os_error(28));
        assert_eq!(e.code, ErrorCode::TargetFull);
        let e = Error::io(Place::Source, "opening", Path::new("/x"), io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.code, ErrorCode::NotFound);
    }
}

/// A thread of ours panicked while doing I/O: carried in an [`io::Error`]
/// so [`Error::io`] reports it as `E_INTERNAL`, not as a device's fault.
#[derive(Debug)]
pub struct Panicked(pub String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} panicked", self.0)
    }
}

impl std::error::Error for Panicked {}
