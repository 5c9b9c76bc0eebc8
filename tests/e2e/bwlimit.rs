//! Bandwidth limits: a push at `--bwlimit` takes its payload over the
//! limit, ±10 %; two pushes sharing a daemon's `bandwidth_limit` get
//! shares within ±15 % of each other.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::{free_udp_port, pair, push_to, Agent, Identity, TargetSpec};
use crate::util::*;

const RATE: u64 = 2 << 20;

#[test]
fn a_push_takes_its_payload_over_the_limit() {
    let mut rng = rng("bwlimit-push");
    let p = pair("bwlimit-push", 1, "");
    let src = p.dir.join("src.img");
    // Random data: nothing compresses, the payload is the disk (CI once
    // drew a make_disk with 4 MiB of zeros, under the 8 s this needs).
    random_disk(&src, 20 * MIB, &mut rng);
    let out = push_to(&src, &p.source, &p.agent, "t0", &["--bwlimit", "2M", "--progress", "json"]);
    // `--progress json`: one object per phase change and about once a second.
    let lines: Vec<Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 7, "{} progress lines in 8 s: {}", lines.len(), out.stderr);
    for l in &lines {
        for k in ["phase", "bytes_done", "bytes_total", "rate", "eta_seconds"] {
            assert!(l.get(k).is_some(), "{k} missing: {l}");
        }
    }
    assert!(lines.iter().any(|l| l["phase"] == "pushing" && l["bytes_done"].as_u64() > Some(0)), "{}", out.stderr);
    let r = out.ok_json();
    let expected = uint(&r, "bytes_sent") as f64 / RATE as f64;
    let took = r["seconds"].as_f64().unwrap();
    eprintln!("bwlimit 2M: {took:.2} s for {expected:.2} s of payload ({:+.1} %)", (took / expected - 1.0) * 100.0);
    assert!(expected >= 8.0, "at least 8 s of payload: {r}");
    assert!((took / expected - 1.0).abs() <= 0.10, "{took:.2} s for {expected:.2} s of payload at 2 MiB/s: {r}");
    assert_same(&src, &p.dir.join("t0.img"));
}

#[test]
fn two_pushes_share_a_daemons_limit_evenly() {
    let mut rng = rng("bwlimit-share");
    let tmp = tempdir("bwlimit-share");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let id_a = Identity::init(&dir_a, "state");
    let specs: Vec<TargetSpec<'_>> = ["d1", "d2"]
        .iter()
        .map(|n| TargetSpec { name: n, path: dir_b.join(format!("{n}.replica")), allowed: &["a"] })
        .collect();
    let b = Agent::start(&dir_b, &[("a", &id_a.fingerprint)], &specs, "");
    let status = free_udp_port();
    let mut extra = format!("status_listen = \"127.0.0.1:{status}\"\nbandwidth_limit = \"4M\"\n");
    for n in ["d1", "d2"] {
        let disk = dir_a.join(format!("{n}.img"));
        // Equal payloads (no zero blocks to skip): both run the whole time, so
        // neither has the limit to itself after the other ended.
        random_disk(&disk, 17 * MIB, &mut rng);
        extra += &format!(
            "[[protect]]\nsource = \"{}\"\npeer = \"{}\"\npeer_fingerprint = \"{}\"\ntarget = \"{n}\"\nevery = \"1h\"\n",
            disk.display(),
            b.addr,
            b.id.fingerprint
        );
    }
    let _a = Agent::start_as(id_a, &dir_a, &[], &[], &extra);
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let jobs = http_json(status, "/api/jobs", None);
        let finished: Vec<Value> =
            jobs.as_array().unwrap().iter().filter(|j| j["result"].is_object()).cloned().collect();
        if finished.len() >= 2 {
            break finished;
        }
        assert!(Instant::now() < deadline, "the two pushes did not end: {jobs}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let rates: Vec<f64> = done
        .iter()
        .map(|j| {
            assert_eq!(j["result"]["ok"], true, "{j}");
            let secs = (j["ended_unix_ns"].as_i64().unwrap() - j["started_unix_ns"].as_i64().unwrap()) as f64 / 1e9;
            j["result"]["payload_bytes"].as_u64().unwrap() as f64 / secs
        })
        .collect();
    // Together: all the payload over the span from the first start to the
    // last end (the sum of the two averages overstates it when one push
    // ends first and the other has the limit to itself for its last part).
    let ns = |j: &Value, k: &str| j[k].as_i64().unwrap();
    let first_start = done.iter().map(|j| ns(j, "started_unix_ns")).min().unwrap();
    let last_end = done.iter().map(|j| ns(j, "ended_unix_ns")).max().unwrap();
    let secs = (last_end - first_start) as f64 / 1e9;
    let together = done.iter().map(|j| j["result"]["payload_bytes"].as_u64().unwrap()).sum::<u64>() as f64 / secs;
    let (x, y) = (rates[0], rates[1]);
    eprintln!(
        "daemon limit 4M: shares {:.2} and {:.2} MiB/s ({:+.1} %), together {:.2} MiB/s",
        x / MIB as f64,
        y / MIB as f64,
        (x / y - 1.0) * 100.0,
        together / MIB as f64
    );
    assert!((x / y - 1.0).abs() <= 0.15, "shares {x:.0} and {y:.0} B/s");
    assert!(together <= 4.0 * MIB as f64 * 1.1, "together {together:.0} B/s over the 4 MiB/s limit");
}
