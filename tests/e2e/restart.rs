//! A target agent killed while it writes a committed delta in place leaves a
//! torn file for a moment; the restarted agent must repair it before it
//! listens, and a reload that adds the target before it serves it, so
//! nobody can boot a torn replica.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rand::RngCore;

use std::path::Path;

use crate::agents::{pair, push_to, spawn_push, Agent, Identity};
use crate::util::{self, compare, make_disk, KIB, MIB};

/// Pages sampled to see the in-place writes start.
fn sample_offsets(size: u64) -> Vec<u64> {
    (0..256).map(|i| (size / 256) * i / (4 * KIB) * (4 * KIB)).collect()
}

/// A push of fresh random bytes to `t0` whose agent is killed with -9 once
/// the in-place replay has begun; whether it left the replica torn.
fn kill_mid_replay(
    source: &Identity,
    agent: &mut Agent,
    src: &Path,
    tgt: &Path,
    rng: &mut impl RngCore,
    round: usize,
) -> bool {
    let size = std::fs::metadata(src).unwrap().len();
    // Every block changes, so the in-place replay takes a while.
    let mut new = vec![0u8; size as usize];
    rng.fill_bytes(&mut new);
    std::fs::write(src, &new).unwrap();
    let offsets = sample_offsets(size);
    let target = File::open(tgt).unwrap();
    let mut child = spawn_push(src, source, agent, "t0", &["--compress", "off"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut page = vec![0u8; 4096];
    let started = 'poll: loop {
        for &off in &offsets {
            target.read_exact_at(&mut page, off).unwrap();
            if page[..] == new[off as usize..off as usize + 4096] {
                break 'poll true;
            }
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
    };
    agent.kill9();
    // The source would only notice after its idle timeout.
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "round {round}: the push never started writing in place");
    compare(src, tgt).is_err()
}

#[test]
fn serve_repairs_a_torn_replica_before_it_listens() {
    let mut rng = util::rng("restart-torn");
    let p = pair("restart-torn", 1, "");
    let mut agent = p.agent;
    let size = 96 * MIB;
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, size, 1.0, &mut rng);
    push_to(&src, &p.source, &agent, "t0", &[]).ok();
    let mut torn_rounds = 0;
    for round in 0..6 {
        if kill_mid_replay(&p.source, &mut agent, &src, &tgt, &mut rng, round) {
            torn_rounds += 1;
        }
        agent.spawn();
        // As soon as it listens, before any other command: the new generation, whole.
        compare(&src, &tgt).unwrap_or_else(|e| panic!("round {round}: the replica is torn after restart: {e}"));
        let log = agent.log();
        assert!(log.contains("recovered") || torn_rounds == 0, "the agent logs what it recovered:\n{log}");
        agent.verify(&tgt).ok();
        if torn_rounds >= 1 {
            break;
        }
    }
    assert!(torn_rounds >= 1, "no kill landed in the middle of an in-place write");
}

/// A target a reload adds is recovered before any session may open it, as
/// at start: a replica torn by an agent killed mid-replay, left out of the
/// config of the agent that started next, is whole once the reload that
/// brings it back is done.
#[test]
fn a_target_a_reload_adds_is_repaired_before_it_is_served() {
    let mut rng = util::rng("reload-torn");
    let p = pair("reload-torn", 1, "");
    let mut agent = p.agent;
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 96 * MIB, 1.0, &mut rng);
    push_to(&src, &p.source, &agent, "t0", &[]).ok();
    let with_t0 = std::fs::read_to_string(&agent.config).unwrap();
    let at = with_t0.find("[[target]]").unwrap();
    let without_t0 = &with_t0[..at];
    for round in 0..6 {
        if !kill_mid_replay(&p.source, &mut agent, &src, &tgt, &mut rng, round) {
            agent.spawn();
            continue;
        }
        std::fs::write(&agent.config, without_t0).unwrap();
        agent.spawn();
        assert!(compare(&src, &tgt).is_err(), "round {round}: an agent without t0 touched it");
        std::fs::write(&agent.config, &with_t0).unwrap();
        let out = df!("reload", "--config", agent.config).ok();
        assert!(out.stdout.contains("t0"), "{out}");
        compare(&src, &tgt).unwrap_or_else(|e| panic!("round {round}: torn after the reload that added it: {e}"));
        assert!(agent.log().contains("recovered: replayed"), "{}", agent.log());
        push_to(&src, &p.source, &agent, "t0", &[]).ok();
        agent.verify(&tgt).ok();
        return;
    }
    panic!("no kill landed in the middle of an in-place write");
}
