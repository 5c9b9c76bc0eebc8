//! Replication groups (`push-group`): three disks — two files and a loop
//! device — pushed as one group point. The target agent is killed with
//! SIGKILL at random moments of group pushes; after a restart of `serve`,
//! or after `verify` of a single member with no `serve` running, all three
//! members are at the same group point, old or new, byte for byte.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::agents::{Agent, Identity, TargetSpec};
use crate::util::*;

struct Group {
    _dir: tempfile::TempDir,
    source: Identity,
    agent: Agent,
    /// (source disk, target path, target name)
    members: Vec<(PathBuf, PathBuf, String)>,
    _device: Loop,
}

impl Group {
    fn new(name: &str, rng: &mut rand::rngs::SmallRng) -> Group {
        let tmp = tempdir(name);
        let dir = tmp.path().to_path_buf();
        let source = Identity::init(&dir, "source-state");
        let device = Loop::new(&dir.join("dev1.backing"), 16 * MIB);
        let sizes = [24 * MIB + 4096 * 3, 16 * MIB, 8 * MIB + 77];
        let targets = [dir.join("t0.img"), device.dev.clone(), dir.join("t2.img")];
        let mut members = Vec::new();
        for (i, (size, target)) in sizes.into_iter().zip(targets).enumerate() {
            let src = dir.join(format!("src{i}.img"));
            make_disk(&src, size, 0.7, rng);
            members.push((src, target, format!("t{i}")));
        }
        let specs: Vec<TargetSpec<'_>> =
            members.iter().map(|(_, path, name)| TargetSpec { name, path: path.clone(), allowed: &["src"] }).collect();
        let agent = Agent::start(&dir, &[("src", &source.fingerprint)], &specs, "");
        Group { _dir: tmp, source, agent, members, _device: device }
    }

    fn args(&self, extra: &[&str]) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "push-group".into(),
            "--group".into(),
            "app".into(),
            "--peer".into(),
            self.agent.addr.to_string().into(),
            "--peer-fingerprint".into(),
            self.agent.id.fingerprint.clone().into(),
            "--state-dir".into(),
            self.source.state.clone().into(),
            "--json".into(),
        ];
        for (src, _, name) in &self.members {
            let mut d = src.clone().into_os_string();
            d.push("=");
            d.push(name);
            a.push("--disk".into());
            a.push(d);
        }
        a.extend(extra.iter().map(Into::into));
        a
    }

    fn push(&self, extra: &[&str]) -> Out {
        let args = self.args(extra);
        let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        run(&refs)
    }

    /// Each member's current generation and content hash (opening each
    /// member recovers it).
    fn state(&self) -> Vec<(String, [u8; 32])> {
        self.members
            .iter()
            .map(|(src, target, _)| {
                let p = self.agent.points(target).ok_json();
                let current = p["points"].as_array().unwrap().iter().find(|x| x["current"] == true).cloned();
                let gen = current.map_or_else(String::new, |c| c["generation"].as_str().unwrap().to_string());
                let len = disk_len(src);
                let mut h = blake3::Hasher::new();
                let mut f = std::fs::File::open(target).unwrap();
                let mut left = len;
                let mut buf = vec![0u8; 1 << 20];
                while left > 0 {
                    let n = std::io::Read::read(&mut f, &mut buf[..left.min(1 << 20) as usize]).unwrap();
                    assert!(n > 0);
                    h.update(&buf[..n]);
                    left -= n as u64;
                }
                (gen, *h.finalize().as_bytes())
            })
            .collect()
    }
}

#[test]
fn a_group_push_commits_one_point_for_every_member() {
    let mut rng = rng("group-basic");
    let g = Group::new("group-basic", &mut rng);
    let r = g.push(&[]).ok_json();
    let gen = r["generation"].as_str().unwrap().to_string();
    let members = r["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{r}");
    for (m, (src, target, _)) in members.iter().zip(&g.members) {
        assert_eq!(m["generation"], gen.as_str(), "every member carries the group point: {r}");
        compare_prefix(src, target, disk_len(src)).unwrap();
    }
    // A delta of the group: only what changed is sent; still one point.
    for (src, _, _) in &g.members {
        scatter_writes(src, 5, 100_000, &mut rng);
    }
    let r = g.push(&[]).ok_json();
    let gen2 = r["generation"].as_str().unwrap();
    assert_ne!(gen2, gen);
    for (m, (src, target, _)) in r["members"].as_array().unwrap().iter().zip(&g.members) {
        assert_eq!(m["mode"], "delta", "{r}");
        assert_eq!(m["generation"], gen2, "{r}");
        compare_prefix(src, target, disk_len(src)).unwrap();
    }
    // A member unchanged since still gets the group's new point.
    scatter_writes(&g.members[0].0, 2, 10_000, &mut rng);
    let r = g.push(&[]).ok_json();
    let gen3 = r["generation"].as_str().unwrap().to_string();
    let state = g.state();
    assert!(state.iter().all(|(gen, _)| *gen == gen3), "{state:?} vs {gen3}");
    // Each group push came on one connection carrying every member.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let connections = loop {
        let log = g.agent.log();
        let closed: Vec<String> = log.lines().filter(|l| l.contains("connection closed")).map(String::from).collect();
        if closed.len() >= 3 || std::time::Instant::now() > deadline {
            break closed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(connections.len(), 3, "{connections:?}");
    assert!(connections.iter().all(|l| l.contains("sessions=3")), "{connections:?}");
    // A fourth disk, and one the agent does not know: refused (the group
    // has three members), nobody moves.
    let mut bad = g.args(&[]);
    bad.push("--disk".into());
    bad.push(format!("{}=nosuch", g.members[0].0.with_file_name("extra.img").display()).into());
    std::fs::write(g.members[0].0.with_file_name("extra.img"), vec![1u8; 65536]).unwrap();
    scatter_writes(&g.members[1].0, 2, 10_000, &mut rng);
    let refs: Vec<&OsStr> = bad.iter().map(|a| a.as_os_str()).collect();
    // Whichever member's refusal comes first is reported.
    let out = run(&refs);
    match out.error_code().as_deref() {
        Some("E_GROUP_MEMBERS") => out.expect_json_error("E_GROUP_MEMBERS", 3),
        _ => out.expect_json_error("E_UNKNOWN_TARGET", 4),
    };
    let after = g.state();
    assert_eq!(after, state, "a failed group push moved a member");
}

/// One kill trial: a group push after random writes, the target agent
/// killed at a random moment, then recovery (by `verify` of one member
/// with no `serve` running, or by restarting `serve`). Returns whether the
/// group ended at the new point.
fn kill_trial(g: &mut Group, rng: &mut rand::rngs::SmallRng, via_verify: bool, span: Duration) -> bool {
    let before = g.state();
    for (src, _, _) in &g.members {
        scatter_writes(src, rng.random_range(1..6), 300_000, rng);
    }
    let args = g.args(&[]);
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut child = KillOnDrop(spawn(&refs));
    let wait = span.mul_f64(rng.random_range(0.0..1.2));
    let t = Instant::now();
    while t.elapsed() < wait && child.0.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    g.agent.kill9();
    // The source would wait out its idle timeout for the dead agent.
    let _ = child.0.kill();
    let _ = child.0.wait();
    if via_verify {
        // One member alone, no serve: its recovery must read the group record.
        g.agent.verify(&g.members[1].1).ok();
    }
    g.agent.spawn();
    let after = g.state();
    let gens: Vec<&String> = after.iter().map(|(gen, _)| gen).collect();
    assert!(gens.iter().all(|x| *x == gens[0]), "members at different points: {after:?} (before {before:?})");
    let new = after != before;
    if new {
        // At the new point every member holds its source's bytes.
        for (src, target, _) in &g.members {
            compare_prefix(src, target, disk_len(src)).unwrap();
        }
    } else {
        for ((gen, bytes), (gen0, bytes0)) in after.iter().zip(&before) {
            assert_eq!((gen, bytes), (gen0, bytes0), "the old point moved");
        }
    }
    // The next group push lands whatever the kill left.
    let r = g.push(&[]).ok_json();
    let gen = r["generation"].as_str().unwrap();
    assert!(g.state().iter().all(|(x, _)| x == gen));
    new
}

fn kill_trials(name: &str, trials: usize) {
    let mut rng = rng(name);
    let mut g = Group::new(name, &mut rng);
    g.push(&[]).ok_json();
    // How long a group delta takes here: the kills land across it.
    for (src, _, _) in &g.members {
        scatter_writes(src, 5, 300_000, &mut rng);
    }
    let t = Instant::now();
    g.push(&[]).ok_json();
    let span = t.elapsed();
    let mut news = 0;
    for i in 0..trials {
        news += usize::from(kill_trial(&mut g, &mut rng, i % 2 == 1, span));
    }
    eprintln!("{name}: {trials} kills over {span:?}, {news} at the new point, {} at the old", trials - news);
    assert!(news > 0 && news < trials, "the kills all landed on one side of the commit");
}

#[test]
fn a_killed_target_agent_never_leaves_a_group_mixed() {
    kill_trials("group-kill", 20);
}

/// The long run by hand: `cargo test -p diskferry-agent --test e2e -- --ignored group_kill_stress`.
#[test]
#[ignore]
fn group_kill_stress() {
    kill_trials("group-kill-stress", 100);
}

/// The group's moves on the recovery site: its points are the generations
/// every member holds (a member pushed alone adds none), `failover --group`
/// makes every member live at one of them, `commit --group` keeps it; a
/// disk of one group cannot be pushed in another, nor the group with other
/// members.
#[test]
fn group_points_failover_and_commit() {
    let mut rng = rng("group-moves");
    let g = Group::new("group-moves", &mut rng);
    let first = g.push(&[]).ok_json();
    let p1 = first["generation"].as_str().unwrap().to_string();
    let bytes_at_p1: Vec<Vec<u8>> = g.members.iter().map(|(src, _, _)| std::fs::read(src).unwrap()).collect();
    for (src, _, _) in &g.members {
        scatter_writes(src, 4, 100_000, &mut rng);
    }
    let p2 = g.push(&[]).ok_json()["generation"].as_str().unwrap().to_string();
    let bytes_at_p2: Vec<Vec<u8>> = g.members.iter().map(|(src, _, _)| std::fs::read(src).unwrap()).collect();
    // A member pushed alone: a point of its own, not a group point.
    scatter_writes(&g.members[0].0, 2, 50_000, &mut rng);
    let solo = crate::agents::push_to(&g.members[0].0, &g.source, &g.agent, "t0", &[]).ok_json();
    let solo = solo["generation"].as_str().unwrap().to_string();

    // The group with a member fewer: refused, and no member moves.
    let before = g.state();
    let mut fewer = g.args(&[]);
    fewer.truncate(fewer.len() - 2);
    let refs: Vec<&OsStr> = fewer.iter().map(|a| a.as_os_str()).collect();
    scatter_writes(&g.members[1].0, 2, 50_000, &mut rng);
    run(&refs).expect_json_error("E_GROUP_MEMBERS", 3);
    assert_eq!(g.state(), before, "a refused group push moved a member");

    let state = g.agent.id.state.clone();
    let s = state.to_str().unwrap();
    let pts = run_settled(&[
        OsStr::new("points"),
        OsStr::new("--group"),
        OsStr::new("app"),
        OsStr::new("--state-dir"),
        OsStr::new(s),
        OsStr::new("--json"),
    ])
    .ok_json();
    let gens: Vec<&str> = pts["points"].as_array().unwrap().iter().map(|p| p["generation"].as_str().unwrap()).collect();
    assert!(gens.contains(&p1.as_str()) && gens.contains(&p2.as_str()), "{pts}");
    assert!(!gens.contains(&solo.as_str()), "a solo push is no group point: {pts}");
    assert_eq!(pts["members"].as_array().unwrap().len(), 3, "{pts}");

    let mv = |args: &[&str]| {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.extend([
            OsStr::new("--group"),
            OsStr::new("app"),
            OsStr::new("--state-dir"),
            OsStr::new(s),
            OsStr::new("--json"),
        ]);
        run_settled(&a)
    };
    mv(&["failover", "--point", &solo]).expect_json_error("E_NO_SUCH_POINT", 3);
    // t0 is at its solo point, the others at P2: no point to keep on all.
    mv(&["commit"]).expect_json_error("E_NO_SUCH_POINT", 3);
    // A test failover of the group: one image per member, of the group point.
    let images = g.members[0].0.with_file_name("test-images");
    let im = images.to_str().unwrap();
    mv(&["test-failover", "--point", &solo, "--out", im]).expect_json_error("E_NO_SUCH_POINT", 3);
    let t = mv(&["test-failover", "--point", &p2, "--out", im]).ok_json();
    for ((bytes, (_, _, name)), m) in bytes_at_p2.iter().zip(&g.members).zip(t["members"].as_array().unwrap()) {
        let image = std::fs::read(images.join(format!("{name}.img"))).unwrap();
        assert_eq!(&image[..bytes.len()], &bytes[..], "{name}'s test image is not the group point: {m}");
    }
    mv(&["test-failover", "--cleanup", im]).ok_json();
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 0, "test images left after cleanup");
    let ungroup = |name: &str| {
        run_settled(&[
            OsStr::new("ungroup"),
            OsStr::new("--group"),
            OsStr::new(name),
            OsStr::new("--state-dir"),
            OsStr::new(s),
            OsStr::new("--json"),
        ])
    };
    // A group failover cut after its first member: t0 live at P1, the
    // others replicas. Forgetting the group now would strand them apart.
    run_settled(&[
        OsStr::new("failover"),
        g.members[0].1.as_os_str(),
        OsStr::new("--point"),
        OsStr::new(&p1),
        OsStr::new("--state-dir"),
        OsStr::new(s),
        OsStr::new("--json"),
    ])
    .ok_json();
    let apart = ungroup("app").expect_json_error("E_GROUP_MEMBERS", 3);
    assert!(apart["hint"].as_str().is_some_and(|h| h.contains("failover --group")), "{apart}");
    // The same group failover finishes the others.
    let f = mv(&["failover", "--point", &p1]).ok_json();
    assert_eq!(f["generation"], p1.as_str(), "{f}");
    // (The members come in the order the group was learned, which is not
    // the order of the --disk arguments.)
    for m in f["members"].as_array().unwrap() {
        assert_eq!(m["moved"], m["name"] != "t0", "only t0 was at P1 already: {f}");
    }
    for (src_bytes, (_, target, _)) in bytes_at_p1.iter().zip(&g.members) {
        let now = std::fs::read(target).unwrap();
        assert_eq!(&now[..src_bytes.len()], &src_bytes[..], "{} is not at the group point", target.display());
        assert_eq!(g.agent.points(target).ok_json()["role"], "live");
    }
    let c = mv(&["commit"]).ok_json();
    for m in c["members"].as_array().unwrap() {
        assert_eq!(m["generation"], p1.as_str(), "{c}");
    }

    // Membership: a member of "app" cannot join another group, and "app"
    // cannot change its members.
    let push_other = || {
        run(&[
            OsStr::new("push-group"),
            OsStr::new("--group"),
            OsStr::new("other"),
            OsStr::new("--peer"),
            OsStr::new(&g.agent.addr.to_string()),
            OsStr::new("--peer-fingerprint"),
            OsStr::new(&g.agent.id.fingerprint),
            OsStr::new("--state-dir"),
            g.source.state.as_os_str(),
            OsStr::new("--json"),
            OsStr::new("--disk"),
            OsStr::new(&format!("{}=t0", g.members[0].0.display())),
        ])
    };
    let refused = push_other().expect_json_error("E_GROUP_MEMBERS", 3);
    assert!(refused["hint"].as_str().is_some_and(|h| h.contains("diskferry ungroup")), "{refused}");

    // Regrouping: `ungroup` forgets "app" (its members keep their points),
    // then t0 may join "other".
    ungroup("nope").expect_json_error("E_NOT_FOUND", 3);
    let u = ungroup("app").ok_json();
    assert_eq!(u["members"].as_array().unwrap().len(), 3, "{u}");
    mv(&["points"]).expect_json_error("E_NOT_FOUND", 3);
    let t0_points = g.agent.points(&g.members[0].1).ok_json();
    assert!(
        t0_points["points"].as_array().unwrap().iter().any(|p| p["generation"] == p1.as_str()),
        "ungroup dropped a member's point: {t0_points}"
    );
    // t0 is live since the failover: a replica again before it is pushed.
    run_settled(&[
        OsStr::new("demote"),
        g.members[0].1.as_os_str(),
        OsStr::new("--state-dir"),
        OsStr::new(s),
        OsStr::new("--json"),
    ])
    .ok_json();
    let joined = push_other().ok_json();
    let p3 = joined["generation"].as_str().unwrap().to_string();
    let other = run_settled(&[
        OsStr::new("points"),
        OsStr::new("--group"),
        OsStr::new("other"),
        OsStr::new("--state-dir"),
        OsStr::new(s),
        OsStr::new("--json"),
    ])
    .ok_json();
    assert_eq!(other["members"].as_array().unwrap().len(), 1, "{other}");
    assert!(other["points"].as_array().unwrap().iter().any(|p| p["generation"] == p3.as_str()), "{other}");
}

/// A group push cut by a SIGKILL of the source resumes every member where
/// it stopped (the rerun sends less than a full copy), and lands as one
/// group point.
#[test]
fn a_cut_group_push_resumes_as_one() {
    let mut rng = rng("group-resume");
    let g = Group::new("group-resume", &mut rng);
    g.push(&[]).ok_json();
    let full = ["--mode", "full", "--force", "--compress", "off"];
    let t = Instant::now();
    let base = g.push(&full).ok_json();
    let span = t.elapsed();
    let data: u64 = g.members.iter().map(|(src, _, _)| allocated(src)).sum();
    let base_sent: u64 = base["members"].as_array().unwrap().iter().map(|m| uint(m, "bytes_sent")).sum();
    assert!(base_sent >= data / 2, "an uncut full copy sends the data ({base_sent} of {data})");
    let mut resumed = false;
    for attempt in 0..8 {
        for (src, _, _) in &g.members {
            scatter_writes(src, 3, 100_000, &mut rng);
        }
        let args = g.args(&full);
        let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let mut child = KillOnDrop(spawn(&refs));
        std::thread::sleep(span.mul_f64(0.3 + 0.08 * attempt as f64));
        let _ = child.0.kill();
        let _ = child.0.wait();
        // At once: the agent hands a dead source's sessions to the same
        // peer's new push.
        let out = g.push(&full);
        if out.code != 0 {
            panic!("the rerun failed: {out}\nagent log:\n{}", g.agent.log());
        }
        let r = out.ok_json();
        let gen = r["generation"].as_str().unwrap();
        let mut sent = 0;
        for (m, (src, target, _)) in r["members"].as_array().unwrap().iter().zip(&g.members) {
            assert_eq!(m["generation"], gen, "{r}");
            compare_prefix(src, target, disk_len(src)).unwrap();
            sent += uint(m, "bytes_sent");
        }
        eprintln!(
            "attempt {attempt}: cut at {:?} of {span:?}, the rerun sent {sent} of {data}",
            span.mul_f64(0.3 + 0.08 * attempt as f64)
        );
        if sent < base_sent * 9 / 10 {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "no rerun of a cut group push reused what the cut one had staged");
}

/// The group keeps the smallest retention of its members on every member,
/// so pruning never leaves a group point on some members only.
#[test]
fn group_points_are_pruned_as_one() {
    let mut rng = rng("group-prune");
    let mut g = Group::new("group-prune", &mut rng);
    g.push(&[]).ok_json();
    // t1 keeps 2 points, the others 3.
    g.agent.kill9();
    let cfg = std::fs::read_to_string(&g.agent.config).unwrap();
    let marker =
        format!("name = \"t1\"\npath = \"{}\"\nallowed_peers = [\"src\"]\nretention = 3", g.members[1].1.display());
    assert!(cfg.contains(&marker), "{cfg}");
    std::fs::write(&g.agent.config, cfg.replace(&marker, &marker.replace("retention = 3", "retention = 2"))).unwrap();
    g.agent.spawn();
    for _ in 0..4 {
        for (src, _, _) in &g.members {
            scatter_writes(src, 2, 50_000, &mut rng);
        }
        g.push(&[]).ok_json();
    }
    let lists: Vec<Vec<String>> = g
        .members
        .iter()
        .map(|(_, target, _)| {
            let p = g.agent.points(target).ok_json();
            p["points"].as_array().unwrap().iter().map(|x| x["generation"].as_str().unwrap().to_string()).collect()
        })
        .collect();
    assert_eq!(lists[0].len(), 2, "{lists:?}");
    assert!(lists.iter().all(|l| *l == lists[0]), "members keep different points: {lists:?}");
    // A member pushed alone gets points of its own; it still keeps the
    // group's newest points, whole on every member.
    let group_points = |g: &Group| -> Vec<String> {
        let v = run_settled(&[
            "points".as_ref(),
            "--group".as_ref(),
            "app".as_ref(),
            "--config".as_ref(),
            g.agent.config.as_os_str(),
            "--json".as_ref(),
        ])
        .ok_json();
        v["points"].as_array().unwrap().iter().map(|x| x["generation"].as_str().unwrap().to_string()).collect()
    };
    let before = group_points(&g);
    assert_eq!(before.len(), 2, "{before:?}");
    let (src, target, name) = &g.members[0];
    for _ in 0..3 {
        scatter_writes(src, 2, 50_000, &mut rng);
        crate::agents::push_to(src, &g.source, &g.agent, name, &[]).ok_json();
    }
    let alone = g.agent.points(target).ok_json();
    assert!(alone["points"].as_array().unwrap().len() >= 4, "its own two newest and the group's two: {alone}");
    assert_eq!(group_points(&g), before, "the group points stay whole");
    // And a group push after that keeps them whole on every member too.
    for (src, _, _) in &g.members {
        scatter_writes(src, 2, 50_000, &mut rng);
    }
    g.push(&[]).ok_json();
    let after = group_points(&g);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[1], before[0], "{after:?} after {before:?}");
}

/// Eight members under a 16 MiB memory budget: they share one session's
/// share of it, so members waiting for each other in their commits never
/// starve one still waiting for memory (a deadlock otherwise).
#[test]
fn a_large_group_fits_a_small_memory_budget() {
    let mut rng = rng("group-budget");
    let p = crate::agents::pair("group-budget", 8, "memory_budget_mib = 16");
    let mut args: Vec<std::ffi::OsString> = vec![
        "push-group".into(),
        "--group".into(),
        "eight".into(),
        "--peer".into(),
        p.agent.addr.to_string().into(),
        "--peer-fingerprint".into(),
        p.agent.id.fingerprint.clone().into(),
        "--state-dir".into(),
        p.source.state.clone().into(),
        "--json".into(),
    ];
    let mut srcs = Vec::new();
    for i in 0..8 {
        let src = p.dir.join(format!("s{i}.img"));
        make_disk(&src, 6 * MIB + i * 4096, 0.8, &mut rng);
        args.push("--disk".into());
        args.push(format!("{}=t{i}", src.display()).into());
        srcs.push(src);
    }
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let watch = crate::memory::RssAnon::watch(p.agent.pid());
    let mut child = KillOnDrop(spawn(&refs));
    let t = Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(90), "the group push hangs:\n{}", p.agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.0.wait().unwrap().success(), "{}", p.agent.log());
    // I4: the group stays inside the budget, with the slack the
    // single-session memory tests allow.
    let peak = watch.peak();
    assert!(peak <= (16 + 64) * MIB, "peak RssAnon {} MiB over the 16 MiB budget plus 64 MiB", peak / MIB);
    for (i, src) in srcs.iter().enumerate() {
        compare(src, &p.dir.join(format!("t{i}.img"))).unwrap();
    }
}
