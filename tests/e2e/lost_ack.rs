//! The target commits but its acknowledgement never reaches the source: the
//! failed push says the commit may have landed, and a rerun says the target
//! already holds this data instead of making another point.

use std::io::{BufRead, BufReader};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::agents::{pair, push_to, Identity};
use crate::net::Proxy;
use crate::util::{self, make_disk, string, MIB};

/// Pushes through `proxy`, cutting the target's answers the moment the
/// source has sent Finish; returns the failed push's output.
fn push_losing_the_ack(src: &std::path::Path, source: &Identity, proxy: &Proxy, fp: &str) -> util::Out {
    let args: Vec<std::ffi::OsString> = vec![
        "push".into(),
        src.into(),
        "--peer".into(),
        proxy.addr.to_string().into(),
        "--peer-fingerprint".into(),
        fp.into(),
        "--target".into(),
        "t0".into(),
        "--state-dir".into(),
        source.state.clone().into(),
        "--idle-timeout".into(),
        "2".into(),
        "--json".into(),
    ];
    let mut child = std::process::Command::new(util::bin())
        .args(&args)
        .env("RUST_LOG", "diskferry_agent::push=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("finish sent") {
            proxy.drop_to_client.store(true, Ordering::Relaxed);
        }
        log += &(line + "\n");
    }
    let out = child.wait_with_output().unwrap();
    util::Out {
        args: "push (through a proxy that loses the acknowledgement)".into(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: log.lines().filter(|l| l.starts_with("error")).collect::<Vec<_>>().join("\n"),
        seconds: 0.0,
    }
}

#[test]
fn a_lost_acknowledgement_is_reported_and_the_rerun_finds_the_commit() {
    let mut rng = util::rng("lost-ack");
    let p = pair("lost-ack", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 24 * MIB, 0.8, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    let mut landed = 0;
    for round in 0..3 {
        util::change_data_pages(&src, 30, &mut rng);
        let proxy = Proxy::start(p.agent.addr, u64::MAX);
        let failed = push_losing_the_ack(&src, &p.source, &proxy, &p.agent.id.fingerprint);
        let v = failed.expect_json_error("E_CONNECTION", 4);
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains("after the commit was requested"), "round {round}: {v}");
        assert!(v["hint"].as_str().is_some_and(|h| h.contains("already holds")), "round {round}: {v}");
        drop(proxy);
        // What the target holds now (its session may still be closing).
        std::thread::sleep(Duration::from_millis(300));
        let held = p.agent.verify(&tgt).ok_json();
        let rerun = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
        util::compare(&src, &tgt).unwrap();
        if util::compare(&src, &tgt).is_ok() && string(&held, "root") == string(&rerun, "root") {
            // The commit had landed: the rerun finds it and adds no point.
            assert_eq!(rerun["unchanged"], Value::Bool(true), "round {round}: {rerun}");
            assert_eq!(string(&rerun, "generation"), string(&held, "generation"), "round {round}");
            assert_eq!(rerun["blocks_changed"], 0);
            landed += 1;
        }
    }
    assert!(landed >= 1, "no commit landed behind a lost acknowledgement");
}
