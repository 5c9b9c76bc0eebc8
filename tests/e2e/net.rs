//! Two agents over QUIC on loopback: `diskferry serve` as a real process
//! and `diskferry push` (or a raw QUIC client) against it.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::*;
use crate::util::{self, compare, make_disk, tempdir, uint, MIB};

#[test]
fn full_then_delta_push() {
    let mut rng = util::rng("full_then_delta_push");
    let p = pair("net-fd", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 48 * MIB + 12345, 0.6, &mut rng);
    let full = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(full["mode"], "full");
    assert_eq!(uint(&full, "path_mtu"), 65000, "loopback uses 64 KiB datagrams");
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();

    let changed = util::change_data_pages(&src, 40, &mut rng);
    let delta = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(delta["mode"], "delta");
    assert_eq!(delta["plan"], "CompareManifest");
    compare(&src, &tgt).unwrap();
    let v = p.agent.verify(&tgt).ok_json();
    assert_eq!(v["generation"], delta["generation"]);
    // Only the changed pages travel (random data does not compress).
    let sent = uint(&delta, "bytes_sent");
    assert!(sent <= changed + 8192, "sent {sent} for {changed} changed bytes");
    assert!(uint(&delta, "blocks_changed") <= 40);
    // The previous generation is a recovery point on the target.
    let points = p.agent.points(&tgt).ok_json();
    assert_eq!(points["points"].as_array().unwrap().len(), 2);
}

#[test]
fn stateless_target_is_compared_never_overwritten() {
    let mut rng = util::rng("stateless_target");
    let p = pair("net-stateless", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 40 * MIB, 0.7, &mut rng);
    util::copy(&src, &tgt);
    let changed = util::change_data_pages(&src, 25, &mut rng);
    util::resize_with_data(&src, 44 * MIB, &mut rng);
    let out = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(out["plan"], "CompareHash");
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();
    let sent = uint(&out, "bytes_sent");
    assert!(sent <= changed + 4 * MIB + 65536, "sent {sent}: changed pages {changed} plus 4 MiB of growth");
}

#[test]
fn refusals_leave_the_target_untouched_and_serving() {
    let mut rng = util::rng("refusals");
    let tmp = tempdir("net-refuse");
    let dir = tmp.path();
    let good = Identity::init(dir, "good-state");
    let stranger = Identity::init(dir, "stranger-state");
    let limited = Identity::init(dir, "limited-state");
    let tgt = dir.join("t0.img");
    let agent = Agent::start(
        dir,
        &[("good", &good.fingerprint), ("limited", &limited.fingerprint)],
        &[
            TargetSpec { name: "t0", path: tgt.clone(), allowed: &["good"] },
            TargetSpec { name: "other", path: dir.join("other.img"), allowed: &["limited"] },
        ],
        "",
    );
    let src = dir.join("src.img");
    make_disk(&src, 8 * MIB, 0.8, &mut rng);
    push_to(&src, &good, &agent, "t0", &[]).ok();
    util::change_data_pages(&src, 10, &mut rng);
    let before = sum(&tgt);

    // Unknown peer: refused in the TLS handshake.
    let out = push_to(&src, &stranger, &agent, "t0", &[]);
    out.expect_json_error("E_UNKNOWN_PEER", 4);
    assert!(out.stderr.contains(&stranger.fingerprint), "the hint names our fingerprint:\n{out}");
    // Wrong fingerprint for the target.
    let wrong = "ab".repeat(32);
    push(&src, &good, &agent.addr.to_string(), &wrong, "t0", &[]).expect_json_error("E_PEER_FINGERPRINT", 4);
    // A trusted peer on a target it is not granted.
    push_to(&src, &limited, &agent, "t0", &[]).expect_json_error("E_NOT_AUTHORIZED", 4);
    // Names that look like paths never leave the source.
    for bad in ["../t0", "a/b", ".."] {
        push_to(&src, &good, &agent, bad, &[]).expect_json_error("E_BAD_TARGET_NAME", 4);
    }
    // A name the target does not have.
    push_to(&src, &good, &agent, "nope", &[]).expect_json_error("E_UNKNOWN_TARGET", 4);
    assert_eq!(sum(&tgt), before, "a refused push must not touch the target");
    let log = agent.log();
    assert!(log.contains("unknown peer") || log.contains("refused"), "the target says why it refused:\n{log}");
    // And it still serves.
    push_to(&src, &good, &agent, "t0", &[]).ok();
    compare(&src, &tgt).unwrap();
}

#[test]
fn malformed_frames_get_coded_errors() {
    let mut rng = util::rng("malformed");
    let p = pair("net-malformed", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 8 * MIB, 0.8, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    let committed = sum(&tgt);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage after hello", [hello(), b"\x05\x00\x00\x00\x99junk".to_vec()].concat(), "E_PROTOCOL"),
        ("oversized frame", [hello(), (u32::MAX - 1).to_le_bytes().to_vec()].concat(), "E_FRAME_TOO_LARGE"),
        ("open with a path as target name", [hello(), raw_open("../../etc/x")].concat(), "E_PROTOCOL"),
        ("truncated frame then end", [hello(), vec![40, 0, 0, 0, 3, 1, 2]].concat(), "E_PROTOCOL"),
        ("no hello", raw_open("t0"), "E_PROTOCOL"),
    ];
    for (what, bytes, code) in cases {
        let got = rt.block_on(raw_session(&p.source.state, p.agent.addr, &p.agent.id.fingerprint, &bytes));
        assert_eq!(got.as_deref(), Some(code), "{what}: the agent answers with a coded error");
    }
    assert_eq!(sum(&tgt), committed);
    p.agent.verify(&tgt).ok();
    util::change_data_pages(&src, 5, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    compare(&src, &tgt).unwrap();
}

#[test]
fn a_data_stream_for_no_session_is_stopped_not_kept() {
    let p = pair("net-stray-stream", 1, "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Both kinds: no preamble (the first session's), and a preamble naming
    // a session that never opens.
    let stray = [
        b"not a frame".to_vec(),
        [diskferry_agent::transport::DATA_STREAM_MAGIC.to_vec(), 99u64.to_be_bytes().to_vec(), b"x".to_vec()].concat(),
    ];
    let (_ep, conn) = rt.block_on(raw_connect(&p.source.state, p.agent.addr, &p.agent.id.fingerprint));
    let started = Instant::now();
    for bytes in stray {
        let code = rt.block_on(async {
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&bytes).await.unwrap();
            tokio::time::timeout(Duration::from_secs(40), s.stopped()).await
        });
        let code = code.expect("the agent stops a stream whose session never opens");
        assert_eq!(code.ok().flatten().map(|c| c.into_inner()), Some(3), "stopped with the no-session code");
    }
    assert!(started.elapsed() >= Duration::from_secs(10), "a stream gets its session's time to open");
    conn.close(0u32.into(), b"");
    // The agent still serves.
    let src = p.dir.join("src.img");
    make_disk(&src, 4 * MIB, 0.8, &mut util::rng("stray"));
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    compare(&src, &p.dir.join("t0.img")).unwrap();
}

#[test]
fn a_full_copy_block_sent_twice_is_refused_before_it_is_written() {
    use diskferry_protocol::message::{BlockFrame, Codec, Open, Plan, SyncMode};
    use diskferry_protocol::{BlockSize, Geometry, Message, SessionId, TargetName};
    use diskferry_sync_engine::hash::hash_block;
    let p = pair("net-block-twice", 1, "");
    let g = Geometry::new(8 * MIB, BlockSize::DEFAULT);
    let bs = g.block_size.get() as usize;
    let bytes = |i: u64, fill: u8| -> Vec<u8> {
        let mut b = vec![fill; bs];
        b[..8].copy_from_slice(&i.to_le_bytes());
        b
    };
    let frame = |i: u64, b: &[u8]| {
        Message::Block(BlockFrame {
            index: i,
            hash: hash_block(b),
            block_len: bs as u32,
            codec: Codec::Raw,
            patches: vec![(0, bs as u32)],
            payload: b.to_vec().into(),
        })
        .to_bytes()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        let (_ep, conn) = raw_connect(&p.source.state, p.agent.addr, &p.agent.id.fingerprint).await;
        let (mut ctl, rx) = conn.open_bi().await.unwrap();
        let open = Message::Open(Open {
            session: SessionId(9),
            target: TargetName::new("t0").unwrap(),
            disk_bytes: g.disk_bytes,
            block_size: g.block_size,
            mode: SyncMode::Full,
            force: false,
            discard_target_changes: false,
            lineage: Vec::new(),
            promote: false,
            group: None,
        });
        ctl.write_all(&[hello(), open.to_bytes().to_vec()].concat()).await.unwrap();
        let mut reader = diskferry_agent::transport::FrameReader::new(rx);
        let mut next = async || tokio::time::timeout(Duration::from_secs(20), reader.next()).await.unwrap().unwrap();
        loop {
            match next().await {
                Some(Message::Accept(a)) => break assert_eq!(a.plan, Plan::Full),
                Some(Message::Welcome { .. }) => {}
                other => panic!("no accept: {other:?}"),
            }
        }
        // The whole disk (one region), as the source would send it…
        let mut data = conn.open_uni().await.unwrap();
        let hashes: Vec<_> = (0..g.block_count()).map(|i| hash_block(&bytes(i, b'A'))).collect();
        for i in 0..g.block_count() {
            data.write_all(&frame(i, &bytes(i, b'A'))).await.unwrap();
        }
        let end = Message::RegionEnd {
            region: 0,
            hash: diskferry_sync_engine::tree::region_hash(&hashes),
            items: g.block_count() as u32,
        };
        ctl.write_all(&end.to_bytes()).await.unwrap();
        loop {
            match next().await {
                Some(Message::RegionDone { region: 0, .. }) => break,
                Some(Message::Error { code, message, .. }) => panic!("{code:?}: {message}"),
                Some(_) => {}
                None => panic!("the agent ended the session"),
            }
        }
        // …then block 0 again, with other bytes (verified: its hash is right).
        data.write_all(&frame(0, &bytes(0, b'B'))).await.unwrap();
        loop {
            match next().await {
                Some(Message::Error { code, .. }) => break code.as_str().to_string(),
                Some(_) => {}
                None => panic!("the agent ended the session without an error"),
            }
        }
    });
    assert_eq!(code, "E_PROTOCOL");
    // Nothing of the second frame reached the disk: block 0 keeps the
    // bytes the manifest's hash was taken from.
    let partial = diskferry_sync_engine::apply::partial_path(&p.dir.join("t0.img"));
    let staged = std::fs::read(&partial).unwrap();
    assert!(staged[..bs] == bytes(0, b'A')[..], "block 0 of {} is not the first frame's", partial.display());
}

fn hello() -> Vec<u8> {
    let v = diskferry_protocol::VERSION;
    diskferry_protocol::Message::Hello { min_version: v, max_version: v, capabilities: 3 }.to_bytes().to_vec()
}

/// An Open frame built by hand, so any name can be sent.
fn raw_open(name: &str) -> Vec<u8> {
    let mut body = vec![0x03];
    body.extend_from_slice(&7u128.to_le_bytes());
    body.extend_from_slice(&(name.len() as u16).to_le_bytes());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&(8u64 * MIB).to_le_bytes());
    body.extend_from_slice(&65536u32.to_le_bytes());
    body.extend_from_slice(&[0, 0]);
    // No lineage.
    body.extend_from_slice(&0u32.to_le_bytes());
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// Connects as a trusted peer, writes `bytes` on the control stream and
/// returns the code of the Error frame the agent answers with.
async fn raw_session(state: &Path, addr: SocketAddr, fingerprint: &str, bytes: &[u8]) -> Option<String> {
    let (_ep, conn) = raw_connect(state, addr, fingerprint).await;
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    tx.write_all(bytes).await.unwrap();
    let _ = tx.finish();
    let mut reader = diskferry_agent::transport::FrameReader::new(rx);
    let mut code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline, reader.next()).await {
        if let diskferry_protocol::Message::Error { code: c, .. } = m {
            code = Some(c.as_str().to_string());
            break;
        }
    }
    conn.close(0u32.into(), b"");
    code
}

/// A QUIC connection to the agent as a trusted peer, nothing opened on it.
async fn raw_connect(state: &Path, addr: SocketAddr, fingerprint: &str) -> (quinn::Endpoint, quinn::Connection) {
    use diskferry_agent::{identity, transport, trust};
    let id = identity::load(state).unwrap();
    let ep = transport::client_endpoint(&addr).unwrap();
    let tls = trust::client_config(&id, fingerprint).unwrap();
    let qc = transport::client_config(tls, &addr, None, Duration::from_secs(5)).unwrap();
    let conn = ep.connect_with(qc, addr, "diskferry").unwrap().await.unwrap();
    (ep, conn)
}

/// A UDP relay between a client and `server`: it stops forwarding (both
/// ways) after `limit` bytes from the client, and drops the server's
/// datagrams to the client while `drop_to_client` is set.
pub struct Proxy {
    pub addr: SocketAddr,
    pub forwarded: Arc<AtomicU64>,
    pub drop_to_client: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(server: SocketAddr, limit: u64) -> Proxy {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(server).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let drop_to_client = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (f1, s1, c1) = (forwarded.clone(), stop.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s1.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *c1.lock().unwrap() = Some(from);
                    if f1.fetch_add(n as u64, Ordering::Relaxed) < limit {
                        let _ = back.send(&buf[..n]);
                    }
                }
            }
        });
        let (f2, d2, s2) = (forwarded.clone(), drop_to_client.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(n) = back2.recv(&mut buf) {
                    let to = *client.lock().unwrap();
                    let pass = f2.load(Ordering::Relaxed) < limit && !d2.load(Ordering::Relaxed);
                    if let (Some(to), true) = (to, pass) {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Proxy { addr, forwarded, drop_to_client, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn connection_cut_then_resume() {
    let mut rng = util::rng("cut_resume");
    let p = pair("net-cut", 1, "idle_timeout_secs = 30");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 96 * MIB, 0.9, &mut rng);
    let data = util::allocated(&src);
    let limit = data / 2;
    let proxy = Proxy::start(p.agent.addr, limit);
    let out = push(
        &src,
        &p.source,
        &proxy.addr.to_string(),
        &p.agent.id.fingerprint,
        "t0",
        &["--idle-timeout", "2", "--compress", "off"],
    );
    out.expect_json_error("E_CONNECTION", 4);
    assert!(out.stderr.contains("resume"), "the error says a rerun resumes:\n{out}");
    assert!(!tgt.exists(), "nothing committed");
    let through = proxy.forwarded.load(Ordering::Relaxed).min(limit);
    drop(proxy);
    // At once, directly: the stale session is taken over, staged blocks reused.
    let again = push_to(&src, &p.source, &p.agent, "t0", &["--compress", "off"]).ok_json();
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();
    let sent = uint(&again, "bytes_sent");
    let missing = data.saturating_sub(through * 9 / 10);
    assert!(
        sent <= missing + data / 100 + 4 * MIB,
        "resume sent {sent} bytes; about {missing} were missing of {data} (cut after {through})"
    );
}

#[test]
fn source_killed_then_rerun_resumes() {
    let mut rng = util::rng("source_killed");
    let p = pair("net-srckill", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 160 * MIB, 0.9, &mut rng);
    for delay_ms in [150u64, 400] {
        let mut child = spawn_push(&src, &p.source, &p.agent, "t0", &["--compress", "off"]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // If it finished before the kill, the target is complete already.
        if tgt.exists() {
            compare(&src, &tgt).unwrap();
            util::change_data_pages(&src, 300, &mut rng);
        }
    }
    let start = Instant::now();
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert!(start.elapsed() < Duration::from_secs(15), "the stale session was taken over at once");
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();
}

#[test]
fn target_killed_during_apply_recovers() {
    let mut rng = util::rng("target_killed");
    let p = pair("net-tgtkill", 1, "");
    let mut agent = p.agent;
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    let old = p.dir.join("old.img");
    make_disk(&src, 96 * MIB, 0.8, &mut rng);
    push_to(&src, &p.source, &agent, "t0", &[]).ok();
    for round in 0..4 {
        util::copy(&src, &old);
        util::scatter_writes(&src, 400, 200 * 1024, &mut rng);
        let mut child = spawn_push(&src, &p.source, &agent, "t0", &["--idle-timeout", "2"]);
        std::thread::sleep(Duration::from_millis(100 + 150 * round));
        agent.kill9();
        let _ = child.wait();
        agent.spawn();
        // Recovery runs when the target is opened: old or new, never a mix.
        agent.verify(&tgt).ok();
        let is_old = compare(&old, &tgt).is_ok();
        let is_new = compare(&src, &tgt).is_ok();
        assert!(is_old || is_new, "round {round}: the target is neither the old nor the new generation");
        push_to(&src, &p.source, &agent, "t0", &[]).ok();
        compare(&src, &tgt).unwrap();
    }
}

#[test]
fn eight_pushes_at_once_into_one_agent() {
    let mut rng = util::rng("eight_at_once");
    let p = pair("net-eight", 8, "max_sessions = 16");
    let mut sources = Vec::new();
    for i in 0..8 {
        let src = p.dir.join(format!("src{i}.img"));
        make_disk(&src, 40 * MIB + i * 4096, 0.8, &mut rng);
        sources.push(src);
    }
    let results: Vec<util::Out> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(i, src)| {
                let (source, agent) = (&p.source, &p.agent);
                s.spawn(move || push_to(src, source, agent, &format!("t{i}"), &[]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, out) in results.into_iter().enumerate() {
        out.ok();
        let tgt = p.dir.join(format!("t{i}.img"));
        compare(&sources[i], &tgt).unwrap();
        p.agent.verify(&tgt).ok();
    }
    let rss = p.agent.peak_rss();
    assert!(rss < 300 * MIB, "target agent peak RSS {} MiB", rss / MIB);
}

#[test]
fn hash_exchange_grows_with_changes_not_disk() {
    let mut rng = util::rng("hash_economy");
    let p = pair("net-economy", 1, "");
    let src = p.dir.join("src.img");
    // 4 GiB with a little data spread over it: 64 regions to compare.
    let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&src).unwrap();
    f.set_len(4 << 30).unwrap();
    drop(f);
    for r in 0..64u64 {
        let mut chunk = vec![0u8; MIB as usize];
        rand::RngCore::fill_bytes(&mut rng, &mut chunk);
        util::write_at(&src, r * 64 * MIB + 3 * MIB, &chunk);
    }
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    let same = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(uint(&same, "blocks_changed"), 0);
    let c = uint(&same, "control_bytes");
    assert!(c < 64 * 1024, "an unchanged 4 GiB disk cost {c} bytes of hash exchange");
    util::write_at(&src, 17 * 64 * MIB + 3 * MIB + 12345, b"one changed block");
    let one = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(uint(&one, "blocks_changed"), 1);
    let c = uint(&one, "control_bytes");
    assert!(c < 16 * 1024, "one changed block cost {c} bytes of hash exchange");
    assert!(uint(&one, "bytes_sent") <= 4096, "one page travels");
    compare(&src, &p.dir.join("t0.img")).unwrap();
}

#[test]
fn shutdown_stops_sessions_at_a_safe_point() {
    let mut rng = util::rng("shutdown");
    let p = pair("net-shutdown", 1, "");
    let mut agent = p.agent;
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 64 * MIB, 0.8, &mut rng);
    push_to(&src, &p.source, &agent, "t0", &[]).ok();
    let old = p.dir.join("old.img");
    util::copy(&src, &old);
    util::scatter_writes(&src, 300, 256 * 1024, &mut rng);
    let child = spawn_push(&src, &p.source, &agent, "t0", &[]);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(agent.terminate(), 0, "SIGTERM is a clean exit:\n{}", agent.log());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap_or_default();
        assert!(v["code"].is_string(), "a coded error: {stdout}");
    }
    let is_old = compare(&old, &tgt).is_ok();
    let is_new = compare(&src, &tgt).is_ok();
    assert!(is_old || is_new, "the target is the old or the new generation");
    agent.spawn();
    agent.verify(&tgt).ok();
    push_to(&src, &p.source, &agent, "t0", &[]).ok();
    compare(&src, &tgt).unwrap();
}
