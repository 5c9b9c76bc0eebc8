//! Scheduled protection and the status endpoint: an agent with a
//! `[[protect]]` entry pushes its disk to a peer every second; the peer's
//! and its own status endpoints show the jobs, the RPO and metrics that
//! match what happened. With the peer down, the disk goes over its RPO,
//! retries back off (under 1 % CPU), and catches up when the peer returns.
//! The endpoint refuses a non-loopback address without a token, and a
//! request without the token gets 401 and no body.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::{free_udp_port, sum, Agent, Identity, TargetSpec};
use crate::util::*;

/// A metric's value (the first sample of that name and labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// An agent's jobs and metrics, read while no job ran and none ended
/// between the reads: with a push every second, one could otherwise end
/// between reading the jobs and reading the metrics.
fn settled_jobs_and_metrics(status: u16, token: Option<&str>) -> (Value, String) {
    let mut settled = None;
    wait_for("a moment with no job running", Duration::from_secs(30), || {
        let before = http_json(status, "/api/jobs", token);
        let (_, metrics) = http_get(status, "/metrics", token);
        let after = http_json(status, "/api/jobs", token);
        let idle = after.as_array().is_some_and(|a| a.iter().all(|j| j["result"].is_object()));
        if before == after && idle {
            settled = Some((after, metrics));
        }
        settled.is_some()
    });
    settled.expect("settled")
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn write_token(dir: &Path) -> (std::path::PathBuf, String) {
    let token = "0123456789abcdef0123456789abcdef".to_string();
    let f = dir.join("token");
    std::fs::write(&f, format!("{token}\n")).unwrap();
    (f, token)
}

#[test]
fn a_protected_disk_is_pushed_on_schedule_with_status_and_metrics() {
    let mut rng = rng("protect");
    let tmp = tempdir("protect");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let disk = dir_a.join("vm.img");
    make_disk(&disk, 8 * MIB, 0.6, &mut rng);
    let id_a = Identity::init(&dir_a, "state");
    let (token_file, token) = write_token(&dir_b);
    let (status_a, status_b) = (free_udp_port(), free_udp_port());
    let replica = dir_b.join("vm.replica");
    let spec = [TargetSpec { name: "vm", path: replica.clone(), allowed: &["a"] }];
    let extra_b = format!("status_listen = \"127.0.0.1:{status_b}\"\nstatus_token_file = \"{}\"", token_file.display());
    let mut b = Agent::start(&dir_b, &[("a", &id_a.fingerprint)], &spec, &extra_b);
    let extra_a = format!(
        "status_listen = \"127.0.0.1:{status_a}\"\n[[protect]]\nsource = \"{}\"\npeer = \"{}\"\npeer_fingerprint = \"{}\"\ntarget = \"vm\"\nevery = \"1s\"\nrpo = \"4s\"\n",
        disk.display(),
        b.addr,
        b.id.fingerprint
    );
    let mut a = Agent::start_as(id_a, &dir_a, &[], &[], &extra_a);

    // Pushed on schedule: the replica follows the disk, the RPO is met.
    wait_for("a first point", Duration::from_secs(30), || {
        http_json(status_a, "/api/protect", None)[0]["last_point"].is_string()
    });
    let first_point = http_json(status_a, "/api/protect", None)[0]["last_point"].clone();
    scatter_writes(&disk, 10, 64 * KIB, &mut rng);
    let changed = sum(&disk);
    // The replica's bytes change in place before the push commits: wait
    // for the point too (CI once saw the bytes with that push still running).
    wait_for("the change to reach the replica", Duration::from_secs(30), || {
        std::fs::metadata(&replica).is_ok()
            && sum(&replica) == changed
            && http_json(status_a, "/api/protect", None)[0]["last_point"] != first_point
    });
    let p = http_json(status_a, "/api/protect", None);
    assert_eq!(p[0]["over_rpo"], false, "{p}");
    assert_eq!(p[0]["target"], "vm");

    // A's metrics equal the sums of its push jobs; B's of its received ones.
    let (jobs, m) = settled_jobs_and_metrics(status_a, None);
    let ok: Vec<&Value> = jobs.as_array().unwrap().iter().filter(|j| j["result"]["ok"] == true).collect();
    assert!(ok.len() >= 2, "{jobs}");
    let one = http_json(status_a, &format!("/api/jobs/{}", ok[0]["id"]), None);
    assert_eq!(one["id"], ok[0]["id"]);
    let sent: u64 = jobs.as_array().unwrap().iter().filter_map(|j| j["result"]["payload_bytes"].as_u64()).sum();
    assert_eq!(metric(&m, "diskferry_sent_bytes_total") as u64, sent, "{m}");
    assert_eq!(metric(&m, "diskferry_jobs_total{kind=\"push\",result=\"ok\"}") as usize, ok.len(), "{m}");
    assert!(m.contains("diskferry_rpo_seconds{disk="), "{m}");
    let (recv, mb) = settled_jobs_and_metrics(status_b, Some(&token));
    let recv_ok = recv.as_array().unwrap().iter().filter(|j| j["kind"] == "receive" && j["result"]["ok"] == true);
    let (mut payload, mut written, mut n) = (0, 0, 0);
    for j in recv_ok {
        payload += j["result"]["payload_bytes"].as_u64().unwrap();
        written += j["result"]["written_bytes"].as_u64().unwrap();
        n += 1;
    }
    assert!(n >= 2, "{recv}");
    assert_eq!(metric(&mb, "diskferry_written_bytes_total") as u64, written, "{mb}");
    assert_eq!(metric(&mb, "diskferry_received_bytes_total") as u64, payload, "{mb}");
    assert!(metric(&mb, "diskferry_points_committed_total{target=\"vm\"}") as u64 >= n as u64 - 1, "{mb}");
    // What A sent is what B received, push by push (matched by point).
    let recv_all = recv.as_array().unwrap();
    let mut matched = 0;
    for j in &ok {
        let g = &j["result"]["generation"];
        // A later push that found nothing new reports the same point, unchanged: pair like with like.
        let same_push = |r: &&Value| {
            r["result"]["generation"] == *g
                && r["result"]["ok"] == true
                && r["result"]["unchanged"] == j["result"]["unchanged"]
        };
        if let Some(r) = recv_all.iter().find(same_push) {
            assert_eq!(r["result"]["payload_bytes"], j["result"]["payload_bytes"], "{j} vs {r}");
            matched += 1;
        }
    }
    assert!(matched >= 2, "{jobs} vs {recv}");
    let t = http_json(status_b, "/api/targets", Some(&token));
    assert_eq!(t[0]["name"], "vm", "{t}");
    // The page renders the jobs, with no external assets.
    let (code, page) = http_get(status_a, "/", None);
    assert_eq!(code, 200);
    assert!(page.contains(&disk.display().to_string()), "{page}");
    assert!(page.contains("<span class=ok>ok</span>"), "a finished push's row: {page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "external assets: {page}");

    // `diskferry status` asks the agent over its socket.
    let st = df!("status", "--state-dir", a.id.state, "--json").ok_json();
    assert_eq!(st["protect"][0]["target"], "vm", "{st}");
    assert!(st["jobs"].as_array().unwrap().len() >= 2, "{st}");
    let human = df!("status", "--state-dir", a.id.state).ok();
    assert!(human.stdout.contains(&disk.display().to_string()) && human.stdout.contains("JOB"), "{human}");
    df!("status", "--state-dir", tmp.path().join("nobody")).expect_error("E_NOT_FOUND", 3);

    // Without the token: 401 and nothing else.
    let (code, body) = http_get(status_b, "/api/jobs", None);
    assert_eq!((code, body.trim()), (401, ""), "learns nothing");
    assert_eq!(http_get(status_b, "/metrics", Some("wrong-token-wrong-token")).0, 401);
    // A browser sends the token as a Basic password (it prompts, told by the 401).
    let basic = |password: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", status_b)).unwrap();
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("ops:{password}"));
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(basic(&token).starts_with("HTTP/1.1 200") && basic(&token).contains("<h1>diskferry</h1>"));
    let refused = basic("not-the-token-at-all");
    assert!(refused.starts_with("HTTP/1.1 401") && refused.contains("Basic realm"), "{refused}");

    // The peer goes down: over the RPO, retries back off, little CPU.
    b.kill9();
    wait_for("the RPO to go over", Duration::from_secs(30), || {
        http_json(status_a, "/api/protect", None)[0]["over_rpo"] == true
    });
    let t0 = cpu_ticks(a.pid());
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_ticks(a.pid()) - t0;
    eprintln!("protect: {used} ticks of CPU in 10 s while the peer was down");
    assert!(used <= 10, "{used} ticks of CPU in 10 s while the peer was down (1 % is 10)");
    let p = http_json(status_a, "/api/protect", None);
    assert!(p[0]["failures_in_a_row"].as_u64().unwrap() >= 1 || p[0]["running"] == true, "{p}");
    // Back: it catches up.
    b.spawn();
    scatter_writes(&disk, 5, 64 * KIB, &mut rng);
    let changed = sum(&disk);
    wait_for("the catch-up", Duration::from_secs(90), || {
        http_json(status_a, "/api/protect", None)[0]["over_rpo"] == false && sum(&replica) == changed
    });
    // A restart keeps the jobs (no id handed out twice) and the last point.
    let before = http_json(status_a, "/api/jobs", None);
    let max_id = before.as_array().unwrap().iter().filter_map(|j| j["id"].as_u64()).max().unwrap();
    let t0 = Instant::now();
    a.terminate();
    assert!(t0.elapsed() < Duration::from_secs(15), "the agent took {:?} to stop", t0.elapsed());
    a.spawn();
    let p = http_json(status_a, "/api/protect", None);
    assert!(p[0]["last_point"].is_string(), "{p}");
    wait_for("a push after the restart", Duration::from_secs(30), || {
        http_json(status_a, "/api/jobs", None).as_array().unwrap().iter().any(|j| j["id"].as_u64() > Some(max_id))
    });
    let after = http_json(status_a, "/api/jobs", None);
    let ids: Vec<u64> = after.as_array().unwrap().iter().filter_map(|j| j["id"].as_u64()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "an id was handed out twice: {after}");
}

#[test]
fn the_status_endpoint_refuses_other_addresses_without_a_token() {
    let tmp = tempdir("status-token");
    let cfg = tmp.path().join("serve.toml");
    let port = free_udp_port();
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\nstatus_listen = \"0.0.0.0:{port}\"\n",
            free_udp_port(),
            tmp.path().join("s").display()
        ),
    )
    .unwrap();
    let out = df!("serve", "--config", cfg);
    out.expect_error("E_CONFIG", 3);
    assert!(out.stderr.contains("status_token_file"), "{out}");
}
