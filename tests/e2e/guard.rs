//! A target agent never writes its own state, its config, an alias of another
//! target, or a file swapped in after it started; its identity must be
//! private and consistent.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::agents::{pair, push_to, sum, Identity};
use crate::util::{self, compare, make_disk, tempdir, Loop, MIB};

/// A serve config with one trusted peer and `targets` (name, path).
fn write_config(dir: &Path, state: &Path, peer: &Identity, targets: &[(&str, PathBuf)]) -> PathBuf {
    let port = crate::agents::free_udp_port();
    let mut cfg = format!(
        "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n[[peer]]\nname = \"src\"\nfingerprint = \"{}\"\n",
        state.display(),
        peer.fingerprint
    );
    for (name, path) in targets {
        cfg += &format!("[[target]]\nname = \"{name}\"\npath = \"{}\"\nallowed_peers = [\"src\"]\n", path.display());
    }
    let file = dir.join("serve.toml");
    fs::write(&file, cfg).unwrap();
    file
}

#[test]
fn serve_refuses_targets_that_alias_its_own_files_or_each_other() {
    let tmp = tempdir("guard-paths");
    let dir = tmp.path();
    let agent = Identity::init(dir, "state");
    let peer = Identity::init(dir, "src");
    let key = agent.state.join("identity").join("key.pem");
    let key_before = fs::read(&key).unwrap();
    fs::create_dir_all(dir.join("real/sub")).unwrap();
    fs::create_dir_all(agent.state.join("targets/other-0123")).unwrap();
    symlink(dir.join("real"), dir.join("link")).unwrap();
    fs::write(dir.join("real/x.img"), vec![7u8; 65536]).unwrap();
    fs::hard_link(&key, dir.join("real/key-alias.img")).unwrap();
    let config = dir.join("serve.toml");
    let x = dir.join("real/x.img");
    type Targets<'a> = Vec<(&'a str, PathBuf)>;
    let cases: Vec<(&str, Targets<'_>, &str)> = vec![
        ("the agent's private key", vec![("a", key.clone())], "key.pem"),
        ("another target's catalog", vec![("a", agent.state.join("targets/other-0123/catalog"))], "state directory"),
        (
            "the state directory through `..`",
            vec![("a", dir.join("real/../state/identity/cert.pem"))],
            "state directory",
        ),
        ("the config file", vec![("a", config.clone())], "config file"),
        ("the same file through `..`", vec![("a", x.clone()), ("b", dir.join("real/sub/../x.img"))], "also the path"),
        (
            "the same file through a symlinked directory",
            vec![("a", x.clone()), ("b", dir.join("link/x.img"))],
            "also the path",
        ),
        ("a hard link to the key", vec![("a", dir.join("real/key-alias.img"))], "key.pem"),
        ("a directory", vec![("a", dir.join("real"))], "not a disk"),
    ];
    for (what, targets, says) in cases {
        let cfg = write_config(dir, &agent.state, &peer, &targets);
        assert_eq!(cfg, config);
        let out = df!("serve", "--config", cfg);
        out.expect_error("E_CONFIG", 3);
        assert!(out.stderr.contains("target["), "{what}: the error names the config key:\n{out}");
        assert!(out.stderr.contains(says), "{what}: the error says {says:?}:\n{out}");
        assert!(!out.stderr.contains("serving on"), "{what}: it must not serve:\n{out}");
    }
    assert_eq!(fs::read(&key).unwrap(), key_before, "the key is untouched");
}

#[test]
fn a_file_or_symlink_swapped_in_after_start_is_refused() {
    let mut rng = util::rng("guard-swap");
    let p = pair("guard-swap", 1, "");
    let src = p.dir.join("src.img");
    let tgt = p.dir.join("t0.img");
    make_disk(&src, 8 * MIB, 0.8, &mut rng);
    // The first push creates the file: the agent pins the copy it renamed into place.
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    util::change_data_pages(&src, 10, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    compare(&src, &tgt).unwrap();

    let kept = p.dir.join("t0.kept");
    fs::rename(&tgt, &kept).unwrap();
    let victim = p.dir.join("victim.img");
    fs::write(&victim, vec![0x5a; 8 * MIB as usize]).unwrap();
    let key = p.agent.id.state.join("identity").join("key.pem");
    let key_before = sum(&key);
    util::change_data_pages(&src, 10, &mut rng);
    for (what, dest) in [("a symlink to another file", &victim), ("a symlink to the agent's key", &key)] {
        symlink(dest, &tgt).unwrap();
        for force in [false, true] {
            let extra: &[&str] = if force { &["--force"] } else { &[] };
            let out = push_to(&src, &p.source, &p.agent, "t0", extra);
            out.expect_json_error("E_TARGET_SWAPPED", 5);
            assert!(fs::symlink_metadata(&tgt).unwrap().file_type().is_symlink(), "{what}: the symlink stays");
        }
        fs::remove_file(&tgt).unwrap();
    }
    assert_eq!(fs::read(&victim).unwrap(), vec![0x5a; 8 * MIB as usize], "nothing written through the symlink");
    assert_eq!(sum(&key), key_before, "the key is untouched");

    // Another file moved into place (same bytes, another inode).
    fs::copy(&kept, &tgt).unwrap();
    let swapped = sum(&tgt);
    let out = push_to(&src, &p.source, &p.agent, "t0", &["--force"]);
    out.expect_json_error("E_TARGET_SWAPPED", 5);
    assert_eq!(sum(&tgt), swapped, "the swapped-in file is untouched");

    // The file the agent checked, put back, is written again.
    fs::remove_file(&tgt).unwrap();
    fs::rename(&kept, &tgt).unwrap();
    push_to(&src, &p.source, &p.agent, "t0", &[]).ok();
    compare(&src, &tgt).unwrap();
    p.agent.verify(&tgt).ok();
}

#[test]
fn block_device_targets_named_through_symlinks_keep_working() {
    let mut rng = util::rng("guard-lv");
    let tmp = tempdir("guard-lv");
    let dir = tmp.path();
    let source = Identity::init(dir, "source-state");
    let dev = Loop::new(&dir.join("lv.img"), 24 * MIB);
    // Like /dev/vg0/lv, a symlink to the device node.
    fs::create_dir(dir.join("vg0")).unwrap();
    let lv = dir.join("vg0/lv");
    symlink(&dev.dev, &lv).unwrap();
    let agent = crate::agents::Agent::start(
        dir,
        &[("src", &source.fingerprint)],
        &[crate::agents::TargetSpec { name: "lv", path: lv.clone(), allowed: &["src"] }],
        "",
    );
    let src = dir.join("src.img");
    make_disk(&src, 20 * MIB, 0.7, &mut rng);
    push_to(&src, &source, &agent, "lv", &[]).ok();
    util::compare_prefix(&src, &dev.dev, 20 * MIB).unwrap();
    util::change_data_pages(&src, 20, &mut rng);
    let delta = push_to(&src, &source, &agent, "lv", &[]).ok_json();
    assert_eq!(delta["mode"], "delta");
    util::compare_prefix(&src, &dev.dev, 20 * MIB).unwrap();
}

#[test]
fn a_readable_or_mismatched_key_is_refused_by_every_command() {
    let tmp = tempdir("guard-key");
    let dir = tmp.path();
    let a = Identity::init(dir, "a");
    let b = Identity::init(dir, "b");
    let key = a.state.join("identity").join("key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = df!("id", "--state-dir", a.state);
    out.expect_error("E_IDENTITY", 6);
    assert!(out.stderr.contains("chmod 600"), "{out}");
    let cfg = write_config(dir, &a.state, &b, &[]);
    df!("serve", "--config", cfg).expect_error("E_IDENTITY", 6);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    df!("id", "--state-dir", a.state).ok();
    // Another identity's key beside this certificate.
    fs::copy(b.state.join("identity").join("key.pem"), &key).unwrap();
    let out = df!("id", "--state-dir", a.state);
    out.expect_error("E_IDENTITY", 6);
    assert!(
        out.stderr.contains("does not belong to") && out.stderr.contains("diskferry init"),
        "a hint about the identity:\n{out}"
    );
}
