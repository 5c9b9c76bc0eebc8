//! Agents as real processes: `diskferry serve` with a generated config and
//! identity, `diskferry push` against it, and two hosts that replicate to
//! each other. Shared by the e2e and the VM test binaries.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use crate::util::{self, spawn, tempdir};
use serde_json::Value;

/// An identity made with `diskferry init`.
pub struct Identity {
    pub state: PathBuf,
    pub fingerprint: String,
}

impl Identity {
    pub fn init(dir: &Path, name: &str) -> Identity {
        let state = dir.join(name);
        let out = df!("init", "--state-dir", state).ok();
        let fingerprint = out.stdout.trim().to_string();
        assert_eq!(fingerprint.len(), 64, "init prints the fingerprint alone: {out}");
        assert_eq!(out.stdout.lines().count(), 1);
        Identity { state, fingerprint }
    }
}

/// A running `diskferry serve`, killed on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub id: Identity,
    pub config: PathBuf,
    log: Arc<std::sync::Mutex<String>>,
}

pub struct TargetSpec<'a> {
    pub name: &'a str,
    pub path: PathBuf,
    pub allowed: &'a [&'a str],
}

impl Agent {
    pub fn start(dir: &Path, peers: &[(&str, &str)], targets: &[TargetSpec<'_>], extra: &str) -> Agent {
        Agent::start_as(Identity::init(dir, "target-state"), dir, peers, targets, extra)
    }

    /// [`Agent::start`] with an identity (and state directory) made before:
    /// a host that also pushes, from the same state directory.
    pub fn start_as(
        id: Identity,
        dir: &Path,
        peers: &[(&str, &str)],
        targets: &[TargetSpec<'_>],
        extra: &str,
    ) -> Agent {
        let port = free_udp_port();
        let mut cfg = format!("listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n{extra}\n", id.state.display());
        for (name, fp) in peers {
            cfg += &format!("[[peer]]\nname = \"{name}\"\nfingerprint = \"{fp}\"\n");
        }
        for t in targets {
            let allowed: Vec<String> = t.allowed.iter().map(|a| format!("\"{a}\"")).collect();
            cfg += &format!(
                "[[target]]\nname = \"{}\"\npath = \"{}\"\nallowed_peers = [{}]\nretention = 3\n",
                t.name,
                t.path.display(),
                allowed.join(", ")
            );
        }
        let config = dir.join("serve.toml");
        std::fs::write(&config, cfg).unwrap();
        let mut agent =
            Agent { child: None, addr: format!("127.0.0.1:{port}").parse().unwrap(), id, config, log: Arc::default() };
        agent.spawn();
        agent
    }

    /// An agent with a config written by the caller (`config` without
    /// `state_dir`: the identity's is added). `addr` is its `listen`
    /// address, if it has one.
    pub fn start_config(id: Identity, dir: &Path, addr: Option<SocketAddr>, config: &str) -> Agent {
        let file = dir.join("serve.toml");
        std::fs::write(&file, format!("state_dir = \"{}\"\n{config}\n", id.state.display())).unwrap();
        let addr = addr.unwrap_or_else(|| "0.0.0.0:0".parse().unwrap());
        let mut agent = Agent { child: None, addr, id, config: file, log: Arc::default() };
        agent.spawn();
        agent
    }

    /// Rewrites its config (`state_dir` added) and sends it SIGHUP.
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, format!("state_dir = \"{}\"\n{config}\n", self.id.state.display())).unwrap();
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -HUP");
    }

    /// (Re)starts the process and waits until it serves.
    pub fn spawn(&mut self) {
        let mut child =
            spawn(&[std::ffi::OsStr::new("serve"), std::ffi::OsStr::new("--config"), self.config.as_os_str()]);
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let ready = line.contains("serving on") || line.contains("running, sending only");
                log.lock().unwrap().push_str(&(line + "\n"));
                if ready {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("serve did not start:\n{}", self.log());
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let mut c = self.child.take().unwrap();
        std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        let status = c.wait().unwrap();
        status.code().unwrap_or(-1)
    }

    /// Peak resident memory of the process, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// `verify` of a target, once the agent's session on it (which ends a
    /// moment after the push returns) has released it.
    pub fn verify(&self, path: &Path) -> util::Out {
        self.inspect("verify", path)
    }

    /// `points --json` of a target, likewise.
    pub fn points(&self, path: &Path) -> util::Out {
        self.inspect("points", path)
    }

    fn inspect(&self, command: &str, path: &Path) -> util::Out {
        let state = self.id.state.as_os_str();
        util::run_settled(&[
            OsStr::new(command),
            path.as_os_str(),
            OsStr::new("--state-dir"),
            state,
            OsStr::new("--json"),
        ])
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A free port below the kernel's ephemeral range (32768 and up by
/// default): an agent restarted on it cannot find it taken by some other
/// test's client socket in the meantime.
pub fn free_udp_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        let tcp_free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if tcp_free && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn push_args(
    src: &Path,
    source: &Identity,
    peer: &str,
    fingerprint: &str,
    target: &str,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "push".into(),
        src.into(),
        "--peer".into(),
        peer.into(),
        "--peer-fingerprint".into(),
        fingerprint.into(),
        "--target".into(),
        target.into(),
        "--state-dir".into(),
        source.state.clone().into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    args
}

pub fn push(src: &Path, source: &Identity, peer: &str, fingerprint: &str, target: &str, extra: &[&str]) -> util::Out {
    let args = push_args(src, source, peer, fingerprint, target, extra);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    util::run(&refs)
}

/// A push to `agent` that must end within `limit`.
pub fn push_within(
    src: &Path,
    source: &Identity,
    agent: &Agent,
    target: &str,
    extra: &[&str],
    limit: std::time::Duration,
) -> util::Out {
    let args = push_args(src, source, &agent.addr.to_string(), &agent.id.fingerprint, target, extra);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    util::run_within(&refs, limit)
}

/// Starts a push to `agent` without waiting for it.
pub fn spawn_push(src: &Path, source: &Identity, agent: &Agent, target: &str, extra: &[&str]) -> Child {
    let args = push_args(src, source, &agent.addr.to_string(), &agent.id.fingerprint, target, extra);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    spawn(&refs)
}

pub fn push_to(src: &Path, source: &Identity, agent: &Agent, target: &str, extra: &[&str]) -> util::Out {
    push(src, source, &agent.addr.to_string(), &agent.id.fingerprint, target, extra)
}

pub fn sum(path: &Path) -> [u8; 32] {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    *h.finalize().as_bytes()
}

pub struct Pair {
    pub _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub source: Identity,
    pub agent: Agent,
}

/// A source identity and a target agent trusting it, with targets `t0..tN`
/// at `dir/tK.img` that the source may write.
pub fn pair(name: &str, targets: usize, extra: &str) -> Pair {
    let tmp = tempdir(name);
    let dir = tmp.path().to_path_buf();
    let source = Identity::init(&dir, "source-state");
    let names: Vec<String> = (0..targets).map(|i| format!("t{i}")).collect();
    let specs: Vec<TargetSpec<'_>> =
        names.iter().map(|n| TargetSpec { name: n, path: dir.join(format!("{n}.img")), allowed: &["src"] }).collect();
    let agent = Agent::start(&dir, &[("src", &source.fingerprint)], &specs, extra);
    Pair { _dir: tmp, dir, source, agent }
}

/// Hosts A and B; each serves its disk `vm.img` as target "vm" to the other.
pub struct Hosts {
    pub _tmp: tempfile::TempDir,
    pub a: Agent,
    pub b: Agent,
    pub disk_a: PathBuf,
    pub disk_b: PathBuf,
}

impl Hosts {
    pub fn start(name: &str, retention: u32) -> Hosts {
        Hosts::start_with(name, retention, None)
    }

    /// [`Hosts::start`] with A's disk at `disk_a` (e.g. on a reflink
    /// filesystem) instead of in A's directory.
    pub fn start_with(name: &str, retention: u32, disk_a: Option<PathBuf>) -> Hosts {
        let tmp = tempdir(name);
        let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&da).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        let (ia, ib) = (Identity::init(&da, "state"), Identity::init(&db, "state"));
        let (fa, fb) = (ia.fingerprint.clone(), ib.fingerprint.clone());
        let (disk_a, disk_b) = (disk_a.unwrap_or_else(|| da.join("vm.img")), db.join("vm.img"));
        let target = |path: &Path, allowed| TargetSpec { name: "vm", path: path.to_path_buf(), allowed };
        let mut a = Agent::start_as(ia, &da, &[("b", &fb)], &[target(&disk_a, &["b"])], "");
        let mut b = Agent::start_as(ib, &db, &[("a", &fa)], &[target(&disk_b, &["a"])], "");
        if retention != 3 {
            for agent in [&mut a, &mut b] {
                agent.kill9();
                let cfg = std::fs::read_to_string(&agent.config).unwrap();
                std::fs::write(&agent.config, cfg.replace("retention = 3", &format!("retention = {retention}")))
                    .unwrap();
                agent.spawn();
            }
        }
        Hosts { _tmp: tmp, a, b, disk_a, disk_b }
    }

    /// Pushes A's disk to B (`from_a`) or B's to A.
    pub fn push(&self, from_a: bool, extra: &[&str]) -> util::Out {
        let src = if from_a { &self.disk_a } else { &self.disk_b };
        self.push_file(src, from_a, extra)
    }

    /// Pushes `src` from A to B's target (`from_a`) or from B to A's.
    pub fn push_file(&self, src: &Path, from_a: bool, extra: &[&str]) -> util::Out {
        let (me, peer) = if from_a { (&self.a, &self.b) } else { (&self.b, &self.a) };
        push(src, &me.id, &peer.addr.to_string(), &peer.id.fingerprint, "vm", extra)
    }

    /// `failover-sync` of A's disk to B (`from_a`) or of B's to A.
    pub fn failover_sync(&self, from_a: bool, extra: &[&str]) -> util::Out {
        let (src, me, peer) = if from_a { (&self.disk_a, &self.a, &self.b) } else { (&self.disk_b, &self.b, &self.a) };
        let mut args: Vec<&OsStr> = vec![OsStr::new("failover-sync"), src.as_os_str()];
        let addr = peer.addr.to_string();
        for (k, v) in [("--peer", addr.as_str()), ("--peer-fingerprint", &peer.id.fingerprint), ("--target", "vm")] {
            args.extend([OsStr::new(k), OsStr::new(v)]);
        }
        args.extend([OsStr::new("--config"), me.config.as_os_str(), OsStr::new("--json")]);
        args.extend(extra.iter().map(OsStr::new));
        util::run(&args)
    }

    /// A move command on the target "vm" of `host`'s agent, through its config.
    pub fn mv(&self, host: &Agent, command: &str, extra: &[&str]) -> util::Out {
        let mut args: Vec<&OsStr> = vec![OsStr::new(command), OsStr::new("vm"), OsStr::new("--config")];
        args.push(host.config.as_os_str());
        args.push(OsStr::new("--json"));
        args.extend(extra.iter().map(OsStr::new));
        util::run_settled(&args)
    }
}

pub fn points(host: &Agent, disk: &Path) -> Vec<Value> {
    host.points(disk).ok_json()["points"].as_array().cloned().unwrap_or_default()
}
