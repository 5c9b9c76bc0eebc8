//! The target agent's TOML config. Errors name the file, the key and what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use diskferry_protocol::{ErrorCode, TargetName};
use diskferry_sync_engine::Error;
use serde::Deserialize;

use crate::identity::normalize_fingerprint;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Where peers reach this agent; a host that only sends has none.
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default = "default_sessions")]
    max_sessions: u32,
    /// Upper bound for MTU discovery (default: 65000 on loopback, 1452 elsewhere).
    max_mtu: Option<u16>,
    /// Memory for received blocks waiting to be staged, across all sessions.
    #[serde(default = "default_budget")]
    memory_budget_mib: u32,
    /// Seconds a silent source is waited for before its session is dropped.
    #[serde(default = "default_idle")]
    idle_timeout_secs: u32,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    target: Vec<RawTarget>,
    /// Disks this agent pushes on a schedule.
    #[serde(default)]
    protect: Vec<crate::protect::RawProtect>,
    /// The status endpoint's address (off when unset).
    status_listen: Option<String>,
    /// The block payload rate every push of the daemon shares.
    bandwidth_limit: Option<String>,
    /// The bearer token the status endpoint requires (any non-loopback address needs one).
    status_token_file: Option<PathBuf>,
}

fn default_sessions() -> u32 {
    16
}

fn default_budget() -> u32 {
    128
}

fn default_idle() -> u32 {
    20
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    fingerprint: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    path: PathBuf,
    #[serde(default)]
    allowed_peers: Vec<String>,
    #[serde(default = "default_retention")]
    retention: RawRetention,
}

/// `retention = 3` (points) or `retention = "2h"` (every point that young).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRetention {
    Count(u32),
    Age(String),
}

fn default_retention() -> RawRetention {
    RawRetention::Count(2)
}

/// A configured target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Its place in the file (`target[N]` in errors).
    pub index: usize,
    pub path: PathBuf,
    pub allowed_peers: BTreeSet<String>,
    pub retention: u32,
    /// Keep every consistent point younger than this (`retention = "2h"`;
    /// `retention` is then 1: the current point).
    pub max_age: Option<std::time::Duration>,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (canonical when loaded from disk).
    pub file: PathBuf,
    /// `None`: the agent only sends (its `[[protect]]` entries).
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub max_sessions: u32,
    pub max_mtu: Option<u16>,
    pub memory_budget: u64,
    pub idle_timeout: std::time::Duration,
    /// fingerprint → peer name
    pub peers: BTreeMap<String, String>,
    pub targets: BTreeMap<String, TargetConfig>,
    /// Disks pushed on a schedule by `serve`.
    pub protect: Vec<crate::protect::Protect>,
    /// The status endpoint: its address, and its token file.
    pub status_listen: Option<SocketAddr>,
    pub status_token_file: Option<PathBuf>,
    /// The block payload rate (bytes a second) the daemon's pushes share.
    pub bandwidth_limit: Option<u64>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let mut err = Error::io(diskferry_sync_engine::Place::Source, "reading config", path, e);
            err.code = if err.code == ErrorCode::NotFound { ErrorCode::NotFound } else { ErrorCode::Config };
            err
        })?;
        let mut config = Self::parse(&text, path)?;
        config.file = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        // Targets are keyed by canonical path, as `diskferry verify PATH` finds them.
        for (name, t) in config.targets.iter_mut() {
            t.path = crate::state::canonical_target(&t.path).map_err(|e| {
                Error::new(
                    ErrorCode::Config,
                    format!("config {}: target {name:?}: path: {}", path.display(), e.message),
                )
                .hint("create the target's directory, or fix its path")
            })?;
        }
        Ok(config)
    }

    /// Validates config text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let bad = |key: &str, what: String| {
            Error::new(ErrorCode::Config, format!("config {}: {key}: {what}", path.display()))
                .hint("fix the config file and start again")
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            Error::new(ErrorCode::Config, format!("config {}: {msg}{at}", path.display()))
                .hint("fix the config file and start again")
        })?;
        let listen = match &raw.listen {
            Some(l) => Some(
                l.parse::<SocketAddr>()
                    .map_err(|_| bad("listen", format!("{l:?} is not an address like 127.0.0.1:7400")))?,
            ),
            None if raw.target.is_empty() && raw.peer.is_empty() && !raw.protect.is_empty() => None,
            None => {
                return Err(bad(
                    "listen",
                    "missing: an agent that receives (with [[target]] or [[peer]] entries, or no [[protect]] \
                     entry) needs an address like 0.0.0.0:7400"
                        .into(),
                ))
            }
        };
        if !(1..=3600).contains(&raw.idle_timeout_secs) {
            return Err(bad("idle_timeout_secs", "must be from 1 to 3600".into()));
        }
        if raw.max_sessions == 0 {
            return Err(bad("max_sessions", "must be at least 1".into()));
        }
        if let Some(m) = raw.max_mtu {
            if !(1200..=65000).contains(&m) {
                return Err(bad("max_mtu", format!("{m} is outside 1200..=65000")));
            }
        }
        let status_listen = match &raw.status_listen {
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .map_err(|_| bad("status_listen", format!("{a:?} is not an address like 127.0.0.1:7480")))?,
            ),
            None => None,
        };
        if status_listen.is_some_and(|a| !a.ip().is_loopback()) && raw.status_token_file.is_none() {
            return Err(bad(
                "status_listen",
                "an address other than loopback needs status_token_file (a bearer token every request must carry)"
                    .into(),
            ));
        }
        let mut peers = BTreeMap::new();
        let mut peer_names = BTreeSet::new();
        for (i, p) in raw.peer.iter().enumerate() {
            let fp = normalize_fingerprint(&p.fingerprint).ok_or_else(|| {
                bad(
                    &format!("peer[{i}].fingerprint"),
                    "must be 64 hex digits (SHA-256 of the peer's certificate; `diskferry id` prints it)".into(),
                )
            })?;
            if !peer_names.insert(p.name.clone()) {
                return Err(bad(&format!("peer[{i}].name"), format!("{:?} is listed twice", p.name)));
            }
            if peers.insert(fp, p.name.clone()).is_some() {
                return Err(bad(&format!("peer[{i}].fingerprint"), "the same fingerprint is listed twice".into()));
            }
        }
        let mut targets = BTreeMap::new();
        let mut paths = BTreeSet::new();
        for (i, t) in raw.target.iter().enumerate() {
            let name = TargetName::new(&t.name).map_err(|e| bad(&format!("target[{i}].name"), e.to_string()))?;
            if !t.path.is_absolute() {
                return Err(bad(&format!("target[{i}].path"), format!("{} is not an absolute path", t.path.display())));
            }
            if !paths.insert(t.path.clone()) {
                return Err(bad(&format!("target[{i}].path"), format!("{} is used by two targets", t.path.display())));
            }
            let (retention, max_age) = match &t.retention {
                RawRetention::Count(0) => {
                    return Err(bad(&format!("target[{i}].retention"), "must be at least 1".into()))
                }
                RawRetention::Count(n) => (*n, None),
                RawRetention::Age(a) => match crate::protect::parse_span(a) {
                    Some(d) => (1, Some(d)),
                    None => {
                        return Err(bad(
                            &format!("target[{i}].retention"),
                            format!("{a:?} is neither a count of points nor an age like \"2h\""),
                        ))
                    }
                },
            };
            for p in &t.allowed_peers {
                if !peer_names.contains(p) {
                    return Err(bad(
                        &format!("target[{i}].allowed_peers"),
                        format!("unknown peer {p:?} (no [[peer]] has that name)"),
                    ));
                }
            }
            let tc = TargetConfig {
                index: i,
                path: t.path.clone(),
                allowed_peers: t.allowed_peers.iter().cloned().collect(),
                retention,
                max_age,
            };
            if targets.insert(name.as_str().to_string(), tc).is_some() {
                return Err(bad(&format!("target[{i}].name"), format!("{:?} is listed twice", t.name)));
            }
        }
        Ok(Config {
            file: path.to_path_buf(),
            listen,
            state_dir: raw.state_dir,
            max_sessions: raw.max_sessions,
            max_mtu: raw.max_mtu,
            memory_budget: raw.memory_budget_mib as u64 * (1 << 20),
            idle_timeout: std::time::Duration::from_secs(raw.idle_timeout_secs as u64),
            peers,
            targets,
            protect: crate::protect::parse(raw.protect, path)?,
            status_listen,
            status_token_file: raw.status_token_file,
            bandwidth_limit: match &raw.bandwidth_limit {
                Some(b) => Some(
                    crate::pace::parse_rate(b)
                        .ok_or_else(|| bad("bandwidth_limit", format!("{b:?} is not a rate like 50M (50 MiB/s)")))?,
                ),
                None => None,
            },
        })
    }
}

/// The config a running agent goes by: replaced whole by a reload
/// (`SIGHUP`), read by each session at its start.
#[derive(Debug)]
pub struct LiveConfig {
    current: std::sync::RwLock<std::sync::Arc<Config>>,
    /// What the last reload did (or why it changed nothing).
    last_reload: std::sync::Mutex<Option<serde_json::Value>>,
}

impl LiveConfig {
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig { current: std::sync::RwLock::new(std::sync::Arc::new(config)), last_reload: Default::default() }
    }

    pub fn last_reload(&self) -> Option<serde_json::Value> {
        self.last_reload.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_last_reload(&self, report: serde_json::Value) {
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    pub fn get(&self) -> std::sync::Arc<Config> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, config: Config) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "9f2c000000000000000000000000000000000000000000000000000000000001";

    fn parse(s: &str) -> Result<Config, Error> {
        Config::parse(s, Path::new("/etc/df.toml"))
    }

    #[test]
    fn issue_example_parses() {
        let c = parse(&format!(
            r#"
listen = "127.0.0.1:7400"
state_dir = "/var/lib/diskferry"
max_sessions = 16
[[peer]]
name = "host-a"
fingerprint = "{FP}"
[[target]]
name = "vm1-disk0"
path = "/srv/replicas/vm1-disk0.img"
allowed_peers = ["host-a"]
retention = 3
"#
        ))
        .unwrap();
        assert_eq!(c.peers.get(FP).map(String::as_str), Some("host-a"));
        assert_eq!(c.targets["vm1-disk0"].retention, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("listen = \"nope\"").unwrap_err();
        assert!(e.message.contains("listen") && e.message.contains("/etc/df.toml"), "{}", e.message);
        let e = parse(&format!(
            "listen = \"127.0.0.1:1\"\n[[peer]]\nname=\"a\"\nfingerprint=\"{FP}\"\n[[target]]\nname=\"x/y\"\npath=\"/a\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("target[0].name"), "{}", e.message);
        let e = parse("listen = \"127.0.0.1:1\"\n[[target]]\nname=\"x\"\npath=\"/a\"\nallowed_peers=[\"ghost\"]\n")
            .unwrap_err();
        assert!(e.message.contains("allowed_peers") && e.message.contains("ghost"), "{}", e.message);
        let e = parse("listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        assert_eq!(e.code, ErrorCode::Config);
    }

    #[test]
    fn a_host_that_only_sends_needs_no_listen() {
        let fp = "ab".repeat(32);
        let c = parse(&format!(
            "[[protect]]\nsource = \"/d/a.img\"\npeer = \"10.0.0.2:7400\"\npeer_fingerprint = \"{fp}\"\ntarget = \"a\"\nevery = \"5m\"\n"
        ))
        .unwrap();
        assert_eq!(c.listen, None);
        assert_eq!(c.protect.len(), 1);
        // Receiving needs an address.
        let e = parse("[[target]]\nname=\"x\"\npath=\"/a\"\n").unwrap_err();
        assert!(e.message.contains("listen") && e.message.contains("missing"), "{}", e.message);
    }
}
