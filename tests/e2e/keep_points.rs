//! Recovery points are never dropped without asking: a full copy over a
//! target that holds points, or any push onto a target whose file vanished,
//! is refused unless `--force`, and a forced push says how many it dropped.
//! Retention by age keeps every point younger than it.

use std::ffi::OsStr;

use serde_json::Value;

use crate::agents::{pair, push_to, sum};
use crate::util::{
    self, assert_same, compare, compare_prefix, make_disk, rng, scatter_writes, tempdir, uint, Loop, MIB,
};

fn listed(state: &std::path::Path, target: &std::path::Path) -> usize {
    let args =
        [OsStr::new("points"), target.as_os_str(), OsStr::new("--state-dir"), state.as_os_str(), OsStr::new("--json")];
    let p = crate::util::run_settled(&args).ok_json();
    p["points"].as_array().map_or(0, Vec::len)
}

#[test]
fn full_copies_and_vanished_targets_keep_points_unless_forced() {
    let mut rng = util::rng("keep-points");
    let p = pair("keep-points", 1, "");
    let state = &p.agent.id.state;
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 16 * MIB, 0.8, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    util::change_data_pages(&src, 10, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    assert_eq!(listed(state, &tgt), 2);

    // A full copy would start a new chain without them.
    let before = sum(&tgt);
    util::change_data_pages(&src, 10, &mut rng);
    let v = push_to(&src, &p.source, &p.agent, "t0", &["--mode", "full"]).expect_json_error("E_WOULD_DROP_POINTS", 5);
    assert!(v["message"].as_str().is_some_and(|m| m.contains("2 recovery points")), "{v}");
    assert!(v["hint"].as_str().is_some_and(|h| h.contains("--force")), "{v}");
    assert_eq!(sum(&tgt), before, "nothing written");
    assert_eq!(listed(state, &tgt), 2);
    p.agent.verify(&tgt).ok();
    // The operator says so.
    let forced = push_to(&src, &p.source, &p.agent, "t0", &["--mode", "full", "--force"]).ok_json();
    assert_eq!(uint(&forced, "points_dropped"), 2, "{forced}");
    compare(&src, &tgt).unwrap();
    assert_eq!(listed(state, &tgt), 1);

    // The replica's file vanished: an auto push must not quietly re-copy it.
    util::change_data_pages(&src, 10, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    std::fs::remove_file(&tgt).unwrap();
    for mode in ["auto", "full"] {
        let v = push_to(&src, &p.source, &p.agent, "t0", &["--mode", mode]).expect_json_error("E_DIVERGED", 5);
        let m = v["message"].as_str().unwrap_or_default();
        assert!(m.contains("no longer exists") && m.contains("2 recovery points"), "{mode}: {v}");
        assert!(!tgt.exists(), "{mode}: nothing created");
    }
    let forced = push_to(&src, &p.source, &p.agent, "t0", &["--force"]).ok_json();
    assert_eq!(uint(&forced, "points_dropped"), 2, "{forced}");
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();

    // A delta never drops points, and says so.
    util::change_data_pages(&src, 3, &mut rng);
    let delta = push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(uint(&delta, "points_dropped"), 0, "{delta}");
    assert_eq!(delta["unchanged"], Value::Bool(false));
}

#[test]
fn a_full_copy_onto_a_device_with_points_is_refused_before_it_is_marked_incomplete() {
    let mut rng = util::rng("keep-points-dev");
    let dir = tempdir("keep-points-dev");
    let state = dir.path().join("state");
    let src = dir.path().join("src.img");
    let size = 24 * MIB;
    make_disk(&src, size, 0.8, &mut rng);
    let dev = Loop::new(&dir.path().join("dev.img"), size);
    df!("sync", src, dev.dev, "--mode", "full", "--state-dir", state).ok();
    util::change_data_pages(&src, 20, &mut rng);
    df!("sync", src, dev.dev, "--state-dir", state).ok();
    let before = util::disk_len(&dev.dev);
    util::change_data_pages(&src, 20, &mut rng);
    let v = df!("sync", src, dev.dev, "--mode", "full", "--state-dir", state, "--json")
        .expect_json_error("E_WOULD_DROP_POINTS", 5);
    assert!(v["message"].as_str().is_some_and(|m| m.contains("2 recovery points")), "{v}");
    // Still a complete replica with both points, not INCOMPLETE.
    df!("verify", dev.dev, "--state-dir", state).ok();
    assert_eq!(listed(&state, &dev.dev), 2);
    assert_eq!(util::disk_len(&dev.dev), before);
    let forced = df!("sync", src, dev.dev, "--mode", "full", "--force", "--state-dir", state, "--json").ok_json();
    assert_eq!(uint(&forced, "points_dropped"), 2, "{forced}");
    compare_prefix(&src, &dev.dev, size).unwrap();
}

/// `retention = "AGE"`: every consistent point younger than AGE is kept,
/// however many; older ones go at the next push (or the next start).
#[test]
fn retention_by_age_keeps_every_young_point() {
    let mut rng = rng("retention-age");
    let mut p = crate::agents::pair("retention-age", 1, "");
    let src = p.dir.join("src.img");
    make_disk(&src, 4 * MIB, 0.5, &mut rng);
    let set_retention = |p: &mut crate::agents::Pair, value: &str| {
        p.agent.kill9();
        let cfg = std::fs::read_to_string(&p.agent.config).unwrap();
        let cfg =
            cfg.lines()
                .map(|l| if l.starts_with("retention = ") { format!("retention = {value}") } else { l.to_string() });
        std::fs::write(&p.agent.config, cfg.collect::<Vec<_>>().join("\n") + "\n").unwrap();
        p.agent.spawn();
    };
    set_retention(&mut p, "\"1h\"");
    for _ in 0..5 {
        scatter_writes(&src, 3, 20_000, &mut rng);
        crate::agents::push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    }
    let target = p.dir.join("t0.img");
    let points = crate::agents::points(&p.agent, &target);
    assert_eq!(points.len(), 5, "every point of the last hour: {points:?}");
    // An hour is long; three seconds are not: after them only the newest stays.
    set_retention(&mut p, "\"3s\"");
    std::thread::sleep(std::time::Duration::from_secs(4));
    scatter_writes(&src, 3, 20_000, &mut rng);
    crate::agents::push_to(&src, &p.source, &p.agent, "t0", &[]).ok_json();
    let points = crate::agents::points(&p.agent, &target);
    assert_eq!(points.len(), 1, "{points:?}");
    assert_same(&src, &target);
    // A bad value is refused at start.
    let cfg = std::fs::read_to_string(&p.agent.config).unwrap().replace("retention = \"3s\"", "retention = \"soon\"");
    std::fs::write(&p.agent.config, cfg).unwrap();
    df!("serve", "--config", p.agent.config).expect_error("E_CONFIG", 3);
}
