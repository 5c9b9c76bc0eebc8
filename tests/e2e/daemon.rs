//! The agent as a daemon, beyond its schedules: `SIGHUP` reloads (a
//! push in flight survives it, new entries and targets start, removed
//! ones stop, a broken config keeps the old one running), a host that
//! only sends (no `listen`), target-side moves that have the running agent
//! release their target, and commands run beside the agent showing as
//! its jobs (a killed one does not stay "running").

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::agents::{free_udp_port, spawn_push, sum, Agent, Identity, TargetSpec};
use crate::util::*;

fn target_config(port: u16, status: u16, fp_a: &str, targets: &[(&str, &Path)]) -> String {
    let mut c = format!(
        "listen = \"127.0.0.1:{port}\"\nstatus_listen = \"127.0.0.1:{status}\"\n[[peer]]\nname = \"a\"\nfingerprint = \"{fp_a}\"\n"
    );
    for (name, path) in targets {
        c += &format!(
            "[[target]]\nname = \"{name}\"\npath = \"{}\"\nallowed_peers = [\"a\"]\nretention = 3\n",
            path.display()
        );
    }
    c
}

/// `[[protect]]` entries: (disk, target, extra keys).
fn protect_config(status: u16, peer: &Agent, entries: &[(&Path, &str, &str)], extra: &str) -> String {
    let mut c = format!("status_listen = \"127.0.0.1:{status}\"\n{extra}\n");
    for (disk, target, keys) in entries {
        c += &format!(
            "[[protect]]\nsource = \"{}\"\npeer = \"{}\"\npeer_fingerprint = \"{}\"\ntarget = \"{target}\"\nevery = \"1s\"\n{keys}\n",
            disk.display(),
            peer.addr,
            peer.id.fingerprint
        );
    }
    c
}

fn jobs(port: u16) -> Vec<Value> {
    http_json(port, "/api/jobs", None).as_array().cloned().unwrap_or_default()
}

fn job(port: u16, id: u64) -> Value {
    http_json(port, &format!("/api/jobs/{id}"), None)
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

#[test]
fn sighup_reloads_without_dropping_a_push_and_a_broken_config_keeps_the_old_one() {
    let mut rng = rng("sighup");
    let tmp = tempdir("sighup");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let (disk1, disk2) = (dir_a.join("vm1.img"), dir_a.join("vm2.img"));
    make_disk(&disk1, 12 * MIB, 1.0, &mut rng);
    make_disk(&disk2, 4 * MIB, 0.5, &mut rng);
    let (rep1, rep2) = (dir_b.join("vm1.replica"), dir_b.join("vm2.replica"));
    let id_a = Identity::init(&dir_a, "state");
    let id_b = Identity::init(&dir_b, "state");
    let (port_b, status_a, status_b) = (free_udp_port(), free_udp_port(), free_udp_port());
    let addr_b = format!("127.0.0.1:{port_b}").parse().unwrap();
    let b = Agent::start_config(
        id_b,
        &dir_b,
        Some(addr_b),
        &target_config(port_b, status_b, &id_a.fingerprint, &[("vm1", &rep1)]),
    );
    // Host A only sends: no listen, no [[peer]], no [[target]].
    let slow = "bandwidth_limit = \"2M\"";
    let a = Agent::start_config(id_a, &dir_a, None, &protect_config(status_a, &b, &[(&disk1, "vm1", slow)], ""));
    assert!(a.log().contains("sending only"), "{}", a.log());

    // vm1's first push (12 MiB at 2 MiB/s) is under way.
    let mut running = Value::Null;
    wait_for("vm1's first push to send", Duration::from_secs(30), || {
        running = jobs(status_a)
            .into_iter()
            .find(|j| j["result"].is_null() && j["bytes_done"].as_u64() > Some(0))
            .unwrap_or_default();
        !running.is_null()
    });
    let push_id = running["id"].as_u64().unwrap();

    // Both sides reload mid-push: B gains target vm2, A gains entry vm2.
    b.reload(&target_config(port_b, status_b, &a.id.fingerprint, &[("vm1", &rep1), ("vm2", &rep2)]));
    a.reload(&protect_config(status_a, &b, &[(&disk1, "vm1", slow), (&disk2, "vm2", "")], ""));
    wait_for("both reloads", Duration::from_secs(10), || {
        http_json(status_a, "/api/agent", None)["last_reload"]["ok"] == true
            && http_json(status_b, "/api/agent", None)["last_reload"]["ok"] == true
    });
    let rb = http_json(status_b, "/api/agent", None)["last_reload"].clone();
    assert_eq!(rb["targets_added"], serde_json::json!(["vm2"]), "{rb}");
    let ra = http_json(status_a, "/api/agent", None)["last_reload"].clone();
    assert_eq!(ra["protect_kept"], 1, "{ra}");
    assert_eq!(ra["protect_started"].as_array().map(Vec::len), Some(1), "{ra}");
    assert_eq!(ra["protect_replaced"].as_array().map(Vec::len), Some(0), "{ra}");

    // The push in flight was not dropped: it ends well, and so does B's session.
    wait_for("vm1's first push to end", Duration::from_secs(60), || !job(status_a, push_id)["result"].is_null());
    let done = job(status_a, push_id);
    assert_eq!(done["result"]["ok"], true, "the push in flight during the reloads: {done}");
    assert!(
        jobs(status_b).iter().filter(|j| j["target"] == "vm1").all(|j| j["result"]["ok"] != false),
        "{:?}",
        jobs(status_b)
    );
    // The new entry is pushed to the new target.
    wait_for("vm2 on the replica", Duration::from_secs(60), || rep2.exists() && sum(&rep2) == sum(&disk2));

    // A broken config: the old one keeps running, the reason is shown.
    std::fs::write(&a.config, "this is = not [ toml").unwrap();
    std::process::Command::new("kill").args(["-HUP", &a.pid().to_string()]).status().unwrap();
    wait_for("the refused reload", Duration::from_secs(10), || {
        http_json(status_a, "/api/agent", None)["last_reload"]["ok"] == false
    });
    let r = http_json(status_a, "/api/agent", None)["last_reload"].clone();
    assert!(r["error"].as_str().is_some_and(|e| e.contains("E_CONFIG") && e.contains("serve.toml")), "{r}");
    let (_, page) = http_get(status_a, "/", None);
    assert!(page.contains("reload was refused"), "{page}");
    scatter_writes(&disk2, 5, 64 * KIB, &mut rng);
    let changed = sum(&disk2);
    wait_for("vm2's change under the old config", Duration::from_secs(30), || sum(&rep2) == changed);

    // An entry removed stops; the other goes on.
    a.reload(&protect_config(status_a, &b, &[(&disk2, "vm2", "")], ""));
    wait_for("the reload without vm1", Duration::from_secs(10), || {
        http_json(status_a, "/api/agent", None)["last_reload"]["protect_stopped"].as_array().map(Vec::len) == Some(1)
    });
    let rows = http_json(status_a, "/api/protect", None);
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(rows[0]["disk"].as_str(), Some(canonical(&disk2).as_str()));
    let vm1_jobs = |port| jobs(port).iter().filter(|j| j["target"] == "vm1").count();
    let before = vm1_jobs(status_a);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vm1_jobs(status_a), before, "a removed entry is not pushed any more");
    scatter_writes(&disk2, 5, 64 * KIB, &mut rng);
    let changed = sum(&disk2);
    wait_for("vm2 still pushed", Duration::from_secs(30), || sum(&rep2) == changed);
}

#[test]
fn a_failover_has_the_running_agent_release_its_target_and_shows_as_a_job() {
    let mut rng = rng("release");
    let tmp = tempdir("release");
    let dir = tmp.path();
    let disk = dir.join("vm.img");
    make_disk(&disk, 16 * MIB, 1.0, &mut rng);
    let source = Identity::init(dir, "source-state");
    let status = free_udp_port();
    let replica = dir.join("vm.replica");
    let spec = [TargetSpec { name: "vm", path: replica.clone(), allowed: &["src"] }];
    let b =
        Agent::start(dir, &[("src", &source.fingerprint)], &spec, &format!("status_listen = \"127.0.0.1:{status}\""));
    crate::agents::push_to(&disk, &source, &b, "vm", &[]).ok();
    let first = sum(&replica);

    // A slow push is under way when the failover comes.
    scatter_writes(&disk, 64, 256 * KIB, &mut rng);
    let push = spawn_push(&disk, &source, &b, "vm", &["--bwlimit", "512K", "--mode", "full", "--force"]);
    wait_for("the receive to be under way", Duration::from_secs(30), || {
        jobs(status)
            .iter()
            .any(|j| j["kind"] == "receive" && j["result"].is_null() && j["bytes_done"].as_u64() > Some(0))
    });
    let started = std::time::Instant::now();
    // `--wait 1`: without the release, the busy target would fail it.
    let f = df!("failover", "vm", "--config", b.config, "--wait", "1", "--json").ok_json();
    assert!(started.elapsed() < Duration::from_secs(20), "the release took {:?}", started.elapsed());
    assert_eq!(f["role"], "live", "{f}");
    // The replica is whole at the point it had before the push.
    assert_eq!(sum(&replica), first);
    let out = push.wait_with_output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.contains("E_CANCELLED") && out.contains("local command (failover)"), "{out}");

    let all = jobs(status);
    let fo = all.iter().find(|j| j["kind"] == "failover").unwrap_or_else(|| panic!("no failover job: {all:?}"));
    assert_eq!(fo["result"]["ok"], true, "{fo}");
    assert_eq!(fo["target"], "vm");
    let recv =
        all.iter().find(|j| j["kind"] == "receive" && j["result"]["ok"] == false).unwrap_or_else(|| panic!("{all:?}"));
    assert_eq!(recv["result"]["code"], "E_CANCELLED", "{recv}");
    // The hold ended with the command: a push now meets the live replica, not a busy one.
    let again = crate::agents::push_to(&disk, &source, &b, "vm", &[]);
    assert_ne!(again.error_code().as_deref(), Some("E_BUSY"), "{again}");
    assert_ne!(again.code, 0, "a push into a live replica: {again}");
}

#[test]
fn a_command_run_beside_the_agent_is_its_job_and_a_killed_one_ends_failed() {
    let mut rng = rng("cli-jobs");
    let tmp = tempdir("cli-jobs");
    let dir = tmp.path();
    let disk = dir.join("vm.img");
    make_disk(&disk, 16 * MIB, 1.0, &mut rng);
    let status = free_udp_port();
    let replica = dir.join("vm.replica");
    // One host: its agent receives into `vm`, and a push from its own state dir is run by hand.
    let id = Identity::init(dir, "state");
    let spec = [TargetSpec { name: "vm", path: replica, allowed: &["self"] }];
    let b = Agent::start_as(
        Identity { state: id.state.clone(), fingerprint: id.fingerprint.clone() },
        dir,
        &[("self", &id.fingerprint)],
        &spec,
        &format!("status_listen = \"127.0.0.1:{status}\""),
    );
    let ok = crate::agents::push_to(&disk, &id, &b, "vm", &[]).ok_json();
    let all = jobs(status);
    let push = all.iter().find(|j| j["kind"] == "push").unwrap_or_else(|| panic!("no push job: {all:?}"));
    assert_eq!(push["result"]["ok"], true, "{push}");
    assert_eq!(push["result"]["generation"], ok["generation"], "{push}");
    assert_eq!(push["target"], "vm");
    assert_eq!(push["disk"].as_str(), Some(canonical(&disk).as_str()));

    // A slow one shows its progress advancing, then is killed.
    scatter_writes(&disk, 64, 256 * KIB, &mut rng);
    let mut child = spawn_push(&disk, &id, &b, "vm", &["--bwlimit", "1M", "--mode", "full", "--force"]);
    let running = |at_least: u64| {
        jobs(status)
            .into_iter()
            .find(|j| j["kind"] == "push" && j["result"].is_null() && j["bytes_done"].as_u64() > Some(at_least))
    };
    let mut first = Value::Null;
    wait_for("the push's progress", Duration::from_secs(30), || {
        first = running(0).unwrap_or_default();
        !first.is_null()
    });
    let id_running = first["id"].as_u64().unwrap();
    let done0 = first["bytes_done"].as_u64().unwrap();
    wait_for("the progress to advance", Duration::from_secs(15), || running(done0).is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the killed command's job to end", Duration::from_secs(15), || {
        !job(status, id_running)["result"].is_null()
    });
    let j = job(status, id_running);
    assert_eq!(j["result"]["ok"], false, "{j}");
    assert_eq!(j["result"]["code"], "E_CANCELLED", "{j}");
}

#[test]
fn a_disk_regrouped_by_a_reload_is_never_pushed_twice_at_once() {
    let mut rng = rng("regroup");
    let tmp = tempdir("regroup");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let (disk1, disk2) = (dir_a.join("vm1.img"), dir_a.join("vm2.img"));
    make_disk(&disk1, 8 * MIB, 1.0, &mut rng);
    make_disk(&disk2, 2 * MIB, 1.0, &mut rng);
    let (rep1, rep2) = (dir_b.join("vm1.replica"), dir_b.join("vm2.replica"));
    let id_a = Identity::init(&dir_a, "state");
    let id_b = Identity::init(&dir_b, "state");
    let (port_b, status_a, status_b) = (free_udp_port(), free_udp_port(), free_udp_port());
    let targets = [("vm1", rep1.as_path()), ("vm2", rep2.as_path())];
    let addr_b = format!("127.0.0.1:{port_b}").parse().unwrap();
    let b =
        Agent::start_config(id_b, &dir_b, Some(addr_b), &target_config(port_b, status_b, &id_a.fingerprint, &targets));
    let a = Agent::start_config(
        id_a,
        &dir_a,
        None,
        &protect_config(status_a, &b, &[(&disk1, "vm1", "bandwidth_limit = \"1M\"")], ""),
    );
    wait_for("vm1's first push to send", Duration::from_secs(30), || {
        jobs(status_a).iter().any(|j| j["result"].is_null() && j["bytes_done"].as_u64() > Some(0))
    });
    // vm1 moves into a group (another unit) while its push runs.
    let grouped = "group = \"g\"";
    a.reload(&protect_config(status_a, &b, &[(&disk1, "vm1", grouped), (&disk2, "vm2", grouped)], ""));
    wait_for("a group push to end well", Duration::from_secs(60), || {
        jobs(status_a).iter().any(|j| j["target"] == "vm2" && j["result"]["ok"] == true)
    });
    let vm1: Vec<(i64, i64)> = jobs(status_a)
        .iter()
        .filter(|j| j["target"] == "vm1")
        .map(|j| (j["started_unix_ns"].as_i64().unwrap(), j["ended_unix_ns"].as_i64().unwrap_or(i64::MAX)))
        .collect();
    assert!(vm1.len() >= 2, "{vm1:?}");
    for (i, x) in vm1.iter().enumerate() {
        for y in &vm1[i + 1..] {
            assert!(x.1 <= y.0 || y.1 <= x.0, "two pushes of vm1 at once: {x:?} and {y:?}");
        }
    }
    assert_eq!(sum(&rep1), sum(&disk1));
    // A group's members show their progress too.
    let member = jobs(status_a).into_iter().find(|j| j["target"] == "vm2" && j["result"]["ok"] == true).unwrap();
    assert_eq!(member["bytes_total"].as_u64(), Some(2 * MIB), "{member}");
}

#[test]
fn diskferry_reload_waits_for_the_reload_and_fails_when_it_is_refused() {
    let tmp = tempdir("reload-cmd");
    let dir = tmp.path();
    let source = Identity::init(dir, "source-state");
    let spec = [TargetSpec { name: "vm", path: dir.join("vm.replica"), allowed: &["src"] }];
    let b = Agent::start(dir, &[("src", &source.fingerprint)], &spec, "");
    let good = std::fs::read_to_string(&b.config).unwrap();
    // A new target, named in the report once the reload is done.
    let more = format!(
        "{good}[[target]]\nname = \"vm2\"\npath = \"{}\"\nallowed_peers = [\"src\"]\n",
        dir.join("vm2.replica").display()
    );
    std::fs::write(&b.config, &more).unwrap();
    let out = df!("reload", "--config", b.config).ok();
    assert!(out.stdout.contains("targets added    vm2"), "{out}");
    // A broken file: refused, said, and the agent runs on.
    std::fs::write(&b.config, format!("{more}\nlisten = 7")).unwrap();
    let v = df!("reload", "--state-dir", b.id.state, "--json").expect_json_error("E_CONFIG", 3);
    assert!(v["message"].as_str().is_some_and(|m| m.contains("old config keeps running")), "{v}");
    df!("status", "--state-dir", b.id.state).ok();
    // No agent: said so.
    df!("reload", "--state-dir", dir.join("nobody")).expect_error("E_NOT_FOUND", 3);
}
