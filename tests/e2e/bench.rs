//! `diskferry bench` against a real agent: its full-download estimate is
//! within 2x of a real full push of the same disk on this machine, it
//! names a bottleneck for both moves, the peer's targets are untouched,
//! and a stranger's fingerprint is refused like a push.

use crate::agents::pair;
use crate::util::*;

#[test]
fn the_bench_estimate_holds_against_a_real_push_and_strangers_are_refused() {
    let mut rng = rng("bench");
    let p = pair("bench", 1, "");
    let disk = p.dir.join("disk.img");
    make_disk(&disk, 512 * MIB, 1.0, &mut rng);
    // Measured on a settled host, as an operator would: the new disk's
    // writeback would otherwise be timed as the peer's write.
    assert!(std::process::Command::new("sync").status().unwrap().success());
    let peer = p.agent.addr.to_string();
    let fp = p.agent.id.fingerprint.clone();
    let b =
        df!("bench", "--peer", peer, "--peer-fingerprint", fp, "--disk", disk, "--state-dir", p.source.state, "--json")
            .ok_json();
    for k in ["read_hot", "read_cold", "hash", "write_fsync", "quic", "peer_write_fsync"] {
        assert!(b["rates"][k].as_f64().is_some_and(|r| r > 1e6), "{k}: {b}");
    }
    assert_eq!(uint(&b, "size_bytes"), 512 * MIB);
    let estimate = b["full_download"]["seconds"].as_f64().unwrap();
    let named = ["read", "hash", "network", "peer write", "one host's cores, shared"];
    assert!(named.contains(&b["full_download"]["bottleneck"].as_str().unwrap()), "{b}");
    assert!(["read", "hash"].contains(&b["delta"]["bottleneck"].as_str().unwrap()), "{b}");
    // The peer's targets were not touched.
    assert!(!p.dir.join("t0.img").exists(), "a bench session wrote a target");

    // The push reads the disk cold, as the estimate assumes (the bench's hot
    // read left it in the page cache).
    let f = std::fs::File::open(&disk).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let push = crate::agents::push_to(&disk, &p.source, &p.agent, "t0", &["--mode", "full"]).ok_json();
    let measured = push["seconds"].as_f64().unwrap();
    let ratio = estimate / measured;
    eprintln!("bench: estimate {estimate:.2} s, push {measured:.2} s (ratio {ratio:.2})");
    assert!((0.5..=2.0).contains(&ratio), "estimate {estimate:.2} s vs push {measured:.2} s: {b}");

    // A stranger's fingerprint: refused like a push, before anything is measured.
    let stranger = "ab".repeat(32);
    df!("bench", "--peer", p.agent.addr.to_string(), "--peer-fingerprint", stranger, "--state-dir", p.source.state)
        .expect_error("E_PEER_FINGERPRINT", 4);
    // An agent that does not know this one: refused too.
    let unknown = crate::agents::Identity::init(&p.dir, "unknown-state");
    df!(
        "bench",
        "--peer",
        p.agent.addr.to_string(),
        "--peer-fingerprint",
        p.agent.id.fingerprint,
        "--state-dir",
        unknown.state
    )
    .expect_error("E_UNKNOWN_PEER", 4);
}
