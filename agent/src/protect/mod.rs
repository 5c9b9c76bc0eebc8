//! Scheduled protection (`[[protect]]` in the agent's config): each entry
//! is a disk that `serve` pushes to its peer every `every`, one push at a
//! time, retrying failures with capped exponential backoff and jitter. Its
//! RPO is the age of the newest consistent point the peer committed.
//! This module reads the entries; `schedule.rs` runs them.

mod schedule;

use std::path::PathBuf;
use std::time::Duration;

use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::Error;
use serde::Deserialize;

pub use schedule::{Changed, ProtectStatus, Protected, Protector};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProtect {
    source: String,
    peer: String,
    peer_fingerprint: String,
    target: String,
    every: String,
    rpo: Option<String>,
    snapshot: Option<String>,
    pre_snapshot: Option<String>,
    post_snapshot: Option<String>,
    changes: Option<String>,
    format: Option<String>,
    compress: Option<String>,
    group: Option<String>,
    bandwidth_limit: Option<String>,
}

/// A checked `[[protect]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Protect {
    /// Disk path or NBD URL, as written.
    pub source: PathBuf,
    pub peer: String,
    pub peer_fingerprint: String,
    pub target: TargetName,
    /// The schedule.
    pub every: Duration,
    /// The RPO target (default: `every`).
    pub rpo: Duration,
    pub snapshot: crate::snapshot::SnapshotKind,
    pub pre_snapshot: Option<String>,
    pub post_snapshot: Option<String>,
    pub changes: crate::changes::Changes,
    pub format: crate::nbd::Format,
    pub compress: Option<i32>,
    /// Entries with one group name are pushed together as a replication group.
    pub group: Option<TargetName>,
    /// This disk's block payload rate, bytes a second.
    pub bandwidth_limit: Option<u64>,
}

impl Protect {
    /// A name for logs, status and metrics: the source as written.
    pub fn disk(&self) -> String {
        self.source.display().to_string()
    }
}

/// The longest schedule or RPO.
const MAX_SPAN: Duration = Duration::from_secs(366 * 86400);

/// `30s`, `5m`, `2h`, `1h 30m`: a positive span.
pub fn parse_span(s: &str) -> Option<Duration> {
    let d: jiff::SignedDuration = s.trim().parse().ok()?;
    let d = Duration::try_from(d).ok()?;
    (!d.is_zero()).then_some(d)
}

/// Checks the `[[protect]]` entries (`at` names the config in errors).
pub fn parse(raw: Vec<RawProtect>, at: &std::path::Path) -> Result<Vec<Protect>, Error> {
    use clap::ValueEnum;
    let mut out: Vec<Protect> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let bad = |key: &str, what: String| {
            Error::new(ErrorCode::Config, format!("config {}: protect[{i}].{key}: {what}", at.display()))
                .hint("fix the config file and start again")
        };
        let every = parse_span(&r.every)
            .filter(|d| *d <= MAX_SPAN)
            .ok_or_else(|| bad("every", format!("{:?} is not a span like 30s, 5m, 2h (at most a year)", r.every)))?;
        let rpo = match &r.rpo {
            Some(s) => parse_span(s)
                .filter(|d| *d <= MAX_SPAN)
                .ok_or_else(|| bad("rpo", format!("{s:?} is not a span like 30s, 5m, 2h (at most a year)")))?,
            None => every,
        };
        let peer_fingerprint = crate::identity::normalize_fingerprint(&r.peer_fingerprint)
            .ok_or_else(|| bad("peer_fingerprint", "must be 64 hex digits (`diskferry id` on the peer)".into()))?;
        if r.peer.trim().is_empty() {
            return Err(bad("peer", "must be HOST:PORT".into()));
        }
        let target = TargetName::new(&r.target).map_err(|e| bad("target", e.to_string()))?;
        let snapshot = match &r.snapshot {
            Some(s) => crate::snapshot::SnapshotKind::from_str(s, true)
                .ok()
                .filter(|k| *k != crate::snapshot::SnapshotKind::Cmd)
                .ok_or_else(|| bad("snapshot", format!("{s:?} is not none or reflink")))?,
            None => crate::snapshot::SnapshotKind::None,
        };
        if snapshot == crate::snapshot::SnapshotKind::None && (r.pre_snapshot.is_some() || r.post_snapshot.is_some()) {
            return Err(bad("pre_snapshot", "the hooks go with snapshot = \"reflink\"".into()));
        }
        let changes = match &r.changes {
            Some(s) => s.parse::<crate::changes::Changes>().map_err(|e| bad("changes", e))?,
            None => crate::changes::Changes::FullScan,
        };
        let format = match &r.format {
            Some(f) => crate::nbd::Format::from_str(f, true)
                .map_err(|_| bad("format", format!("{f:?} is not raw, qcow2, vmdk, vhdx or vdi")))?,
            None => crate::nbd::Format::Raw,
        };
        let compress = match r.compress.as_deref() {
            None => Some(1),
            Some("off") => None,
            Some(l) => Some(
                l.parse::<i32>()
                    .ok()
                    .filter(|l| (1..=19).contains(l))
                    .ok_or_else(|| bad("compress", format!("{l:?} is not a zstd level 1..=19 or off")))?,
            ),
        };
        let group = match &r.group {
            Some(g) => Some(TargetName::new(g).map_err(|e| bad("group", e.to_string()))?),
            None => None,
        };
        let bandwidth_limit = match &r.bandwidth_limit {
            Some(b) => Some(
                crate::pace::parse_rate(b)
                    .ok_or_else(|| bad("bandwidth_limit", format!("{b:?} is not a rate like 50M (50 MiB/s)")))?,
            ),
            None => None,
        };
        // One entry per disk: a disk is never pushed twice at once, and its
        // history (what its peer holds) is one.
        let source = match crate::nbd::url::is_nbd_url(&r.source) {
            true => PathBuf::from(&r.source),
            false => std::fs::canonicalize(&r.source).unwrap_or_else(|_| PathBuf::from(&r.source)),
        };
        let p = Protect {
            source,
            peer: r.peer,
            peer_fingerprint,
            target,
            every,
            rpo,
            snapshot,
            pre_snapshot: r.pre_snapshot,
            post_snapshot: r.post_snapshot,
            changes,
            format,
            compress,
            group,
            bandwidth_limit,
        };
        if out.iter().any(|q| q.source == p.source) {
            return Err(bad("source", format!("{} is protected twice: a disk has one [[protect]] entry", r.source)));
        }
        if let Some(first) = p.group.as_ref().and_then(|g| out.iter().find(|q| q.group.as_ref() == Some(g))) {
            if first.peer != p.peer || first.every != p.every {
                return Err(bad("group", "the entries of one group share their peer and schedule".into()));
            }
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(extra: &str) -> Result<Vec<Protect>, Error> {
        #[derive(Deserialize)]
        struct R {
            protect: Vec<RawProtect>,
        }
        let fp = "ab".repeat(32);
        let text = format!(
            "[[protect]]\nsource = \"/d/a.img\"\npeer = \"127.0.0.1:7400\"\npeer_fingerprint = \"{fp}\"\ntarget = \"a\"\n{extra}\n"
        );
        let r: R = toml::from_str(&text).map_err(|e| Error::new(ErrorCode::Config, e.to_string()))?;
        parse(r.protect, std::path::Path::new("/etc/df.toml"))
    }

    #[test]
    fn spans_and_defaults() {
        assert_eq!(parse_span("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_span("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_span("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_span("0s"), None);
        assert_eq!(parse_span("soon"), None);
        let p = raw("every = \"30s\"").unwrap();
        assert_eq!((p[0].every, p[0].rpo, p[0].compress), (Duration::from_secs(30), Duration::from_secs(30), Some(1)));
        let p = raw("every = \"30s\"\nrpo = \"2m\"\nsnapshot = \"reflink\"\ncompress = \"off\"").unwrap();
        assert_eq!((p[0].rpo, p[0].compress), (Duration::from_secs(120), None));
    }

    #[test]
    fn mistakes_name_the_key() {
        for (extra, key) in [
            ("every = \"often\"", "every"),
            ("every = \"30s\"\nrpo = \"-\"", "rpo"),
            ("every = \"30s\"\nsnapshot = \"lvm\"", "snapshot"),
            ("every = \"30s\"\npre_snapshot = \"true\"", "pre_snapshot"),
            ("every = \"30s\"\nformat = \"iso\"", "format"),
            ("every = \"30s\"\ncompress = \"99\"", "compress"),
        ] {
            let e = raw(extra).unwrap_err();
            assert_eq!(e.code, ErrorCode::Config);
            assert!(e.message.contains(&format!("protect[0].{key}")), "{key}: {}", e.message);
        }
        assert!(raw("every = \"30s\"\nbandwidth = 1").unwrap_err().message.contains("bandwidth"));
        assert_eq!(raw("every = \"30s\"\nbandwidth_limit = \"2M\"").unwrap()[0].bandwidth_limit, Some(2 << 20));
        assert!(raw("every = \"30s\"\nbandwidth_limit = \"lots\"").is_err());
    }
}
