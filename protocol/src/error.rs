//! Stable error codes shared by the CLI, the engine and the wire.
//!
//! A code never changes meaning once released: scripts match on `E_…` strings
//! and on the exit code of its [`ErrorClass`].

use std::fmt;

/// Broad class of an error; each class has one documented process exit code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorClass {
    /// The command line is wrong (exit 2).
    Usage,
    /// An input is missing or unusable: a disk, a size, a config (exit 3).
    Input,
    /// The peer is unknown, untrusted, unreachable or misbehaved (exit 4).
    Peer,
    /// The target changed behind diskferry's back or does not verify (exit 5).
    Diverged,
    /// Storage failed or is full, or the state is damaged (exit 6).
    Storage,
    /// A bug or an unexpected condition (exit 70).
    Internal,
}

impl ErrorClass {
    /// Process exit code for this class.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Usage => 2,
            ErrorClass::Input => 3,
            ErrorClass::Peer => 4,
            ErrorClass::Diverged => 5,
            ErrorClass::Storage => 6,
            ErrorClass::Internal => 70,
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $num:literal, $code:literal, $class:ident, $retry:literal; )*) => {
        /// A stable, machine-readable error code.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The `E_…` string printed and sent on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The class, which decides the exit code.
            pub fn class(self) -> ErrorClass {
                match self { $(ErrorCode::$variant => ErrorClass::$class,)* }
            }

            /// Whether the same command may succeed later without changing its
            /// arguments or the config: the condition can pass by itself (a busy
            /// target, a lost connection) or once the environment is fixed (space
            /// freed). `false` means a different command is needed (`--force`,
            /// other arguments) or a repair.
            pub fn retryable(self) -> bool {
                match self { $(ErrorCode::$variant => $retry,)* }
            }

            /// Stable number used on the wire.
            pub fn to_u16(self) -> u16 {
                match self { $(ErrorCode::$variant => $num,)* }
            }

            /// Inverse of [`ErrorCode::to_u16`]; unknown numbers from a newer peer map to `Internal`.
            pub fn from_u16(n: u16) -> ErrorCode {
                match n { $($num => ErrorCode::$variant,)* _ => ErrorCode::Internal }
            }
        }
    };
}

error_codes! {
    /// Bad command-line arguments.
    Usage = 1, "E_USAGE", Usage, false;
    /// A file or device that must exist does not.
    NotFound = 2, "E_NOT_FOUND", Input, false;
    /// An argument or input value is out of range or malformed.
    InvalidInput = 3, "E_INVALID_INPUT", Input, false;
    /// A path is neither a regular file nor a block device.
    NotADisk = 4, "E_NOT_A_DISK", Input, false;
    /// A block-device target is smaller than the source.
    TargetTooSmall = 5, "E_TARGET_TOO_SMALL", Input, false;
    /// The config file is invalid.
    Config = 6, "E_CONFIG", Input, false;
    /// The target has no diskferry state (never synced, or another state dir).
    NoState = 7, "E_NO_STATE", Input, false;
    /// Another session holds the target.
    Busy = 8, "E_BUSY", Input, true;
    /// No recovery point with that generation is kept.
    NoSuchPoint = 9, "E_NO_SUCH_POINT", Input, false;
    /// The source shrank, vanished or was replaced while it was read.
    SourceChanged = 10, "E_SOURCE_CHANGED", Input, true;
    /// The source could not be snapshotted (no reflink on its filesystem,
    /// a snapshot command that printed no usable path).
    Snapshot = 11, "E_SNAPSHOT", Input, false;
    /// An operator hook (pre/post snapshot, snapshot command, quiesce)
    /// failed or outlived its timeout.
    Hook = 12, "E_HOOK", Input, true;
    /// The disks of a group push do not match the group the target agent
    /// knows: a disk in another group, or a group's members changed.
    GroupMembers = 13, "E_GROUP_MEMBERS", Input, false;
    /// The target was changed behind diskferry's back.
    Diverged = 20, "E_DIVERGED", Diverged, false;
    /// The target's bytes do not match its committed manifest.
    VerifyMismatch = 21, "E_VERIFY_MISMATCH", Diverged, false;
    /// The target is mid full-copy and is not a recovery point.
    Incomplete = 22, "E_INCOMPLETE", Diverged, true;
    /// The target path names another file or device than the one checked when
    /// the agent started (a symlink or file swapped in); `--force` does not override.
    TargetSwapped = 23, "E_TARGET_SWAPPED", Diverged, false;
    /// The move would drop kept recovery points (a full copy over them); needs `--force`.
    WouldDropPoints = 24, "E_WOULD_DROP_POINTS", Diverged, false;
    /// The target is `live` (promoted: a VM runs on it); no push lands on
    /// it, `--force` included, until it is demoted.
    Promoted = 25, "E_PROMOTED", Diverged, false;
    /// The receiving disk advanced past the last point it shares with the
    /// sender (both sides wrote): the push would discard its changes.
    SplitBrain = 26, "E_SPLIT_BRAIN", Diverged, false;
    /// The receiving disk has a history of its own with nothing in common
    /// with the sender's.
    Unrelated = 27, "E_UNRELATED", Diverged, false;
    /// The promoted disk was written since the promote: moving it to
    /// another point would lose those writes.
    WrittenSincePromote = 28, "E_WRITTEN_SINCE_PROMOTE", Diverged, false;
    /// The target's filesystem is full.
    TargetFull = 30, "E_TARGET_FULL", Storage, true;
    /// The state directory's filesystem is full.
    StateFull = 31, "E_STATE_FULL", Storage, true;
    /// A state file (manifest, catalog, log) is damaged.
    StateCorrupt = 32, "E_STATE_CORRUPT", Storage, false;
    /// The state directory is unusable (tmpfs, permissions).
    StateDir = 33, "E_STATE_DIR", Storage, false;
    /// An I/O error on a disk or state file.
    Io = 34, "E_IO", Storage, true;
    /// The agent's identity is missing or unreadable.
    Identity = 35, "E_IDENTITY", Storage, false;
    /// The peer's certificate is not in the trusted list.
    UnknownPeer = 40, "E_UNKNOWN_PEER", Peer, false;
    /// The peer's certificate does not match the expected fingerprint.
    PeerFingerprint = 41, "E_PEER_FINGERPRINT", Peer, false;
    /// The peer may not write this target.
    NotAuthorized = 42, "E_NOT_AUTHORIZED", Peer, false;
    /// The target name is not a plain identifier.
    BadTargetName = 43, "E_BAD_TARGET_NAME", Peer, false;
    /// The target name is not configured on the peer.
    UnknownTarget = 44, "E_UNKNOWN_TARGET", Peer, false;
    /// A malformed or unexpected frame.
    Protocol = 45, "E_PROTOCOL", Peer, false;
    /// A frame over the hard size limit.
    FrameTooLarge = 46, "E_FRAME_TOO_LARGE", Peer, false;
    /// The peers share no protocol version.
    Version = 47, "E_VERSION", Peer, false;
    /// The connection failed or was lost.
    Connection = 48, "E_CONNECTION", Peer, true;
    /// A block's bytes did not match the hash the source announced.
    HashMismatch = 49, "E_HASH_MISMATCH", Peer, true;
    /// The peer is at its session limit.
    PeerBusy = 50, "E_PEER_BUSY", Peer, true;
    /// The target agent's memory budget cannot hold a session with blocks
    /// this large (`memory_budget_mib`); the message names the budget needed.
    MemoryBudget = 51, "E_MEMORY_BUDGET", Peer, false;
    /// The session was cancelled (signal, shutdown).
    Cancelled = 60, "E_CANCELLED", Internal, true;
    /// A bug.
    Internal = 70, "E_INTERNAL", Internal, false;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert!(seen.insert(c.to_u16()), "duplicate number {c}");
            assert_eq!(ErrorCode::from_u16(c.to_u16()), c);
            assert!(c.as_str().starts_with("E_"));
        }
        assert_eq!(ErrorCode::from_u16(9999), ErrorCode::Internal);
    }
}
