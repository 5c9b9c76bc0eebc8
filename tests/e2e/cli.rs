//! The CLI contract: `--help`, the JSON fields, error lines, exit codes,
//! the state directory's placement and permissions, locking, `demo`.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::util::*;

const COMMANDS: [&str; 6] = ["hash", "sync", "verify", "points", "export", "demo"];

/// Counts the all-zero `bs`-byte blocks of a file (the last may be short).
fn zero_blocks(path: &Path, bs: u64) -> u64 {
    let data = fs::read(path).unwrap();
    data.chunks(bs as usize).filter(|c| c.iter().all(|&b| b == 0)).count() as u64
}

#[test]
fn help_for_every_command() {
    let top = df!("--help").ok();
    assert!(top.stdout.contains("Usage:"), "{top}");
    // Every command the top-level help lists (the documented ones at least).
    let listed: Vec<&str> = top
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    for cmd in COMMANDS {
        assert!(listed.contains(&cmd), "top-level help does not list `{cmd}`: {listed:?}\n{top}");
    }
    for cmd in listed {
        let out = df!(cmd, "--help").ok();
        assert!(out.stdout.contains("Usage:") && out.stdout.contains(cmd), "`{cmd} --help`:\n{out}");
        assert!(!out.stderr.contains("error"), "`{cmd} --help`:\n{out}");
        let out = df!("help", cmd).ok();
        assert!(out.stdout.contains("Usage:"), "`help {cmd}`:\n{out}");
    }
    let sync = df!("sync", "--help").ok();
    for opt in ["--mode", "--block-size", "--state-dir", "--force", "--retention", "--json"] {
        assert!(sync.stdout.contains(opt), "`sync --help` does not document {opt}:\n{sync}");
    }
    let export = df!("export", "--help").ok();
    assert!(export.stdout.contains("--point"), "{export}");
}

#[test]
fn json_output_has_the_documented_fields() {
    let mut rng = rng("json_output_has_the_documented_fields");
    let dir = tempdir("json");
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let state = dir.path().join("state");
    // Not a multiple of the block size, with holes and written zeros.
    let size = 10 * MIB + 12345;
    make_disk(&src, size, 0.5, &mut rng);

    // hash
    let h = df!("hash", src, "--json").ok_json();
    assert_eq!(uint(&h, "disk_bytes"), size, "{h}");
    assert_eq!(uint(&h, "block_size"), 64 * KIB, "{h}");
    assert_eq!(uint(&h, "blocks"), size.div_ceil(64 * KIB), "{h}");
    assert_eq!(uint(&h, "zero_blocks"), zero_blocks(&src, 64 * KIB), "{h}");
    let root = hex(&h, "root", 64);
    assert!(h["seconds"].as_f64().is_some_and(|s| s >= 0.0), "{h}");
    let h4 = df!("hash", src, "--block-size", "4K", "--threads", "1", "--json").ok_json();
    assert_eq!(uint(&h4, "block_size"), 4 * KIB, "{h4}");
    assert_eq!(uint(&h4, "blocks"), size.div_ceil(4 * KIB), "{h4}");
    assert_eq!(uint(&h4, "zero_blocks"), zero_blocks(&src, 4 * KIB), "{h4}");
    // Same bytes, same root; other bytes, another root.
    let twin = dir.path().join("twin.img");
    copy(&src, &twin);
    assert_eq!(hex(&df!("hash", twin, "--threads", "1", "--json").ok_json(), "root", 64), root);
    // Flip the last byte (writing a fixed value could write the same byte).
    let last = std::fs::read(&twin).unwrap()[size as usize - 1];
    write_at(&twin, size - 1, &[!last]);
    assert_ne!(hex(&df!("hash", twin, "--json").ok_json(), "root", 64), root);

    // sync (full)
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    check_sync_fields(&s, size);
    assert_eq!(string(&s, "mode"), "full", "{s}");
    assert_same(&src, &dst);
    let first_gen = hex(&s, "generation", 32);

    // State directory 0700, its files 0600.
    assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    let tdir = target_state_dir(&state);
    for e in fs::read_dir(&tdir).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", e.path().display());
    }
    assert!(tdir.join("catalog").exists(), "no catalog in {}", tdir.display());
    assert!(tdir.join(format!("{first_gen}.dfm")).exists(), "no manifest for {first_gen}");

    // sync (delta): one 4 KiB page in each of 7 distinct blocks.
    for i in 0..7u64 {
        write_at(&src, i * 20 * 64 * KIB + 8 * KIB, &[0xa5; 4096]);
    }
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    check_sync_fields(&s, size);
    assert_eq!(string(&s, "mode"), "delta", "{s}");
    assert_eq!(uint(&s, "blocks_changed"), 7, "{s}");
    let written = uint(&s, "bytes_written");
    assert!((7 * 4 * KIB..=7 * 64 * KIB).contains(&written), "bytes_written {written}: {s}");
    assert!(uint(&s, "log_bytes") >= written, "{s}");
    assert_same(&src, &dst);
    let generation = hex(&s, "generation", 32);
    assert_ne!(generation, first_gen);

    // verify
    let v = df!("verify", dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert_eq!(hex(&v, "generation", 32), generation, "{v}");
    let src_root = hex(&df!("hash", src, "--json").ok_json(), "root", 64);
    assert_eq!(hex(&v, "root", 64), src_root, "verify's root is not the source's hash root: {v}");

    // An unchanged source: nothing to write, and no new point (an identical
    // point would only push an older, different one out of retention).
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(uint(&s, "blocks_changed"), 0, "{s}");
    assert_eq!(uint(&s, "bytes_written"), 0, "{s}");
    assert_eq!(s["unchanged"], Value::Bool(true), "{s}");
    assert_eq!(hex(&s, "generation", 32), generation, "{s}");
    assert_eq!(uint(&s, "points_dropped"), 0, "{s}");
    let p = df!("points", dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(p["points"].as_array().map(Vec::len), Some(2), "{p}");
    let first = generation.clone();
    write_at(&src, 5 * 64 * KIB, &[0x5a; 4096]);
    let s = df!("sync", src, dst, "--state-dir", state, "--json").ok_json();
    assert_eq!(s["unchanged"], Value::Bool(false), "{s}");
    let generation = first;

    // points
    let p = df!("points", dst, "--state-dir", state, "--json").ok_json();
    let points = p["points"].as_array().unwrap_or_else(|| panic!("no points array: {p}"));
    assert_eq!(points.len(), 2, "retention 2 keeps two points: {p}");
    for pt in points {
        hex(pt, "generation", 32);
        uint(pt, "disk_bytes");
        uint(pt, "undo_bytes");
        string(pt, "consistency");
    }
    assert_eq!(hex(&points[0], "generation", 32), string(&s, "generation"));
    assert_eq!(hex(&points[1], "generation", 32), generation);

    // Human output (no --json) is not JSON but says something useful.
    let human = df!("verify", dst, "--state-dir", state).ok();
    assert!(human.stdout.contains("ok"), "{human}");
}

#[track_caller]
fn check_sync_fields(s: &Value, size: u64) {
    let mode = string(s, "mode");
    assert!(mode == "full" || mode == "delta", "{s}");
    assert_eq!(uint(s, "disk_bytes"), size, "{s}");
    assert_eq!(uint(s, "blocks_total"), size.div_ceil(64 * KIB), "{s}");
    assert!(uint(s, "blocks_changed") <= uint(s, "blocks_total"), "{s}");
    assert!(uint(s, "bytes_written") <= size, "{s}");
    uint(s, "log_bytes");
    assert!(s["seconds"].as_f64().is_some_and(|x| x >= 0.0), "{s}");
    hex(s, "generation", 32);
    assert_eq!(string(s, "consistency"), "crash-consistent", "{s}");
    uint(s, "points_dropped");
    assert!(s["unchanged"].is_boolean(), "{s}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let dir = tempdir("usage");
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    fs::write(&a, vec![1u8; 100_000]).unwrap();
    let state = dir.path().join("state");
    let bare = df!();
    assert_eq!(bare.code, 2, "no arguments:\n{bare}");
    df!("frobnicate").expect_error("E_USAGE", 2);
    df!("sync", a).expect_error("E_USAGE", 2);
    df!("sync", a, b, "--mode", "sideways").expect_error("E_USAGE", 2);
    df!("sync", a, b, "--retention", "0").expect_error("E_USAGE", 2);
    df!("sync", a, b, "--no-such-flag").expect_error("E_USAGE", 2);
    df!("hash", a, "--threads", "many").expect_error("E_USAGE", 2);
    df!("export", b, "out.img").expect_error("E_USAGE", 2);
    df!("export", b, "--point", "not-a-generation", "out.img").expect_error("E_USAGE", 2);
    // A bad block size is named as given, never as "0".
    for bad in ["abc", "-1", "3K", "8M"] {
        let out = df!("hash", a, "--block-size", bad);
        out.expect_error("E_USAGE", 2);
        assert!(out.stderr.contains(bad.trim_start_matches('-')) && !out.stderr.contains("size 0 "), "{bad}:\n{out}");
    }
    let v = df!("sync", a, "--json", "--state-dir", state).expect_json_error("E_USAGE", 2);
    assert_eq!(v["retryable"], Value::Bool(false), "{v}");
    assert!(!b.exists(), "a usage error created the target");
}

#[test]
fn missing_source_is_not_found() {
    let dir = tempdir("notfound");
    let missing = dir.path().join("missing.img");
    let dst = dir.path().join("dst.img");
    let state = dir.path().join("state");
    df!("sync", missing, dst, "--state-dir", state).expect_error("E_NOT_FOUND", 3);
    let v = df!("sync", missing, dst, "--state-dir", state, "--json").expect_json_error("E_NOT_FOUND", 3);
    assert!(v["message"].as_str().unwrap().contains("missing.img"), "the message names the path: {v}");
    assert!(!dst.exists(), "a failed sync created the target");
    df!("hash", missing).expect_error("E_NOT_FOUND", 3);
    df!("hash", missing, "--json").expect_json_error("E_NOT_FOUND", 3);
    // A target diskferry never synced.
    fs::write(&dst, b"x").unwrap();
    let out = df!("verify", dst, "--state-dir", state);
    assert_eq!(out.code, 3, "verify without state:\n{out}");
    assert!(out.error_code().is_some_and(|c| c == "E_NO_STATE" || c == "E_NOT_FOUND"), "{out}");
    let out = df!("sync", dir.path().join("src.img"), dst, "--mode", "delta", "--state-dir", state);
    out.expect_error("E_NOT_FOUND", 3);
    // A delta needs an existing target.
    let src = dir.path().join("src.img");
    fs::write(&src, vec![7u8; 10_000]).unwrap();
    df!("sync", src, dir.path().join("nope.img"), "--mode", "delta", "--state-dir", state)
        .expect_error("E_NOT_FOUND", 3);
    // A point that is not kept.
    df!("sync", src, dst, "--state-dir", state, "--force").ok();
    df!("export", dst, "--point", "0123456789abcdef0123456789abcdef", dir.path().join("out.img"), "--state-dir", state)
        .expect_error("E_NO_SUCH_POINT", 3);
    assert!(!dir.path().join("out.img").exists());
    // Source and target the same file, however it is spelled: the same
    // path, a symlink (either side), a hard link.
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let hard = dir.path().join("hard.img");
    fs::hard_link(&src, &hard).unwrap();
    let dotted = dir.path().join(".").join("src.img");
    for (a, b) in [(&src, &dotted), (&src, &link), (&link, &src), (&src, &hard)] {
        let out = df!("sync", a, b, "--state-dir", state);
        assert_eq!(out.error_code().as_deref(), Some("E_INVALID_INPUT"), "sync {a:?} {b:?}:\n{out}");
        out.expect_error("E_INVALID_INPUT", 3);
        assert_eq!(fs::read(&src).unwrap(), vec![7u8; 10_000]);
        assert!(!dir.path().join("src.img.partial").exists());
    }
}

#[test]
fn bad_block_size_is_a_coded_error() {
    let dir = tempdir("blocksize");
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let state = dir.path().join("state");
    fs::write(&src, vec![3u8; 300_000]).unwrap();
    for bs in ["3K", "2K", "8M", "1000", "0", "64Q", "-4K", "8192K"] {
        for json in [false, true] {
            let mut args: Vec<&OsStr> =
                vec!["sync".as_ref(), src.as_ref(), dst.as_ref(), "--state-dir".as_ref(), state.as_ref()];
            args.extend(["--block-size".as_ref(), OsStr::new(bs)]);
            if json {
                args.push("--json".as_ref());
            }
            let out = run(&args);
            assert!(out.code == 2 || out.code == 3, "--block-size {bs}: expected exit 2 or 3:\n{out}");
            let code = out.error_code().unwrap_or_default();
            assert!(code == "E_USAGE" || code == "E_INVALID_INPUT", "--block-size {bs}:\n{out}");
            out.expect_error(&code, out.code);
            if json {
                out.expect_json_error(&code, out.code);
            }
            assert!(!dst.exists(), "--block-size {bs} created the target");
        }
        let out = df!("hash", src, "--block-size", bs);
        assert!(out.code == 2 || out.code == 3, "hash --block-size {bs}:\n{out}");
        assert!(out.error_code().is_some(), "{out}");
    }
    // The bounds themselves are fine.
    for bs in ["4K", "4M", "4096", "1M"] {
        df!("hash", src, "--block-size", bs, "--json").ok_json();
    }
}

#[test]
fn demo_runs_without_arguments() {
    let dir = tempdir("demo");
    let out = run_env(&[OsStr::new("demo")], &[("TMPDIR", dir.path().as_os_str())]).ok();
    for word in ["full", "delta"] {
        assert!(out.stdout.contains(word), "the demo table lacks `{word}`:\n{out}");
    }
    assert!(out.stdout.to_lowercase().contains("ok"), "the demo does not report its verify:\n{out}");
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "the demo left files behind: {left:?}");
}

/// E_STATE_DIR: state on tmpfs would be lost at reboot.
#[test]
fn state_dir_on_tmpfs_is_refused() {
    let dir = tempdir("tmpfs");
    let tmpfs = Mount::tmpfs("tmpfs-state");
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    fs::write(&src, vec![9u8; 200_000]).unwrap();
    let state = tmpfs.dir.join("state");
    df!("sync", src, dst, "--state-dir", state).expect_error("E_STATE_DIR", 6);
    df!("sync", src, dst, "--state-dir", state, "--json").expect_json_error("E_STATE_DIR", 6);
    assert!(!dst.exists(), "the refused sync created the target");
    // The tmpfs root itself, and the other commands.
    df!("sync", src, dst, "--state-dir", tmpfs.dir).expect_error("E_STATE_DIR", 6);
    df!("verify", dst, "--state-dir", state).expect_error("E_STATE_DIR", 6);
    df!("points", dst, "--state-dir", state).expect_error("E_STATE_DIR", 6);
    assert!(!dst.exists());
    // The same sync with the state on disk works.
    df!("sync", src, dst, "--state-dir", dir.path().join("state")).ok();
    assert_same(&src, &dst);
}

/// One session per target: a held lock gives E_BUSY; the lock of a killed
/// holder does not stay stuck.
#[test]
fn locked_target_is_busy_until_its_holder_dies() {
    let dir = tempdir("busy");
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let state = dir.path().join("state");
    fs::write(&src, vec![5u8; 500_000]).unwrap();
    df!("sync", src, dst, "--state-dir", state).ok();
    let points = df!("points", dst, "--state-dir", state, "--json").ok_json();
    let point = points["points"][0]["generation"].as_str().unwrap().to_string();
    let lock = target_state_dir(&state).join("lock");
    assert!(lock.exists(), "no lock file in the target's state");
    // `flock` holds the same kind of lock diskferry takes.
    let mut holder = KillOnDrop(
        Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(&lock)
            .args(["sleep", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut busy = None;
    for _ in 0..100 {
        let out = df!("sync", src, dst, "--state-dir", state);
        if out.code != 0 {
            busy = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let busy = busy.expect("sync never saw the held lock");
    busy.expect_error("E_BUSY", 3);
    let v = df!("verify", dst, "--state-dir", state, "--wait", "1", "--json").expect_json_error("E_BUSY", 3);
    assert_eq!(v["retryable"], Value::Bool(true), "E_BUSY is worth retrying: {v}");
    for cmd in ["points", "export"] {
        let mut args = vec![cmd.into(), dst.clone().into_os_string(), "--state-dir".into(), state.clone().into()];
        if cmd == "export" {
            args.extend(["--point".into(), point.clone().into(), dir.path().join("out.img").into_os_string()]);
        }
        args.extend(["--wait".into(), "0".into(), "--json".into()]);
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        run(&refs).expect_json_error("E_BUSY", 3);
    }
    // A read with time to wait gets the target once its holder lets go.
    let waiting = Command::new(bin())
        .args([OsStr::new("verify"), dst.as_os_str(), OsStr::new("--state-dir"), state.as_os_str()])
        .args(["--wait", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    let waited = waiting.wait_with_output().unwrap();
    assert!(waited.status.success(), "verify --wait 30: {}", String::from_utf8_lossy(&waited.stderr));
    // `--no-fork`: the killed process was the lock's only holder.
    let mut last = None;
    for _ in 0..100 {
        let out = df!("verify", dst, "--state-dir", state);
        if out.code == 0 {
            last = None;
            break;
        }
        last = Some(out);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(last.is_none(), "the lock stayed stuck after its holder died:\n{}", last.unwrap());
}

/// Output to a reader that stopped reading (`| head -1`) ends the command
/// quietly with success; output that cannot be written (a full disk) is a
/// coded error. Neither panics.
#[test]
fn closed_or_full_stdout_is_not_a_panic() {
    let dir = tempdir("stdout");
    let disk = dir.path().join("d.img");
    fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    // The reader (`true`) is gone before diskferry writes its line.
    let closed = Command::new("bash")
        .arg("-c")
        .arg(r#"(sleep 0.3; "$0" hash "$1"; echo "rc=$?" >&2) | true"#)
        .arg(bin())
        .arg(&disk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&closed.stderr);
    assert!(err.contains("rc=0") && !err.contains("panicked"), "{err}");
    let full = Command::new(bin())
        .arg("hash")
        .arg(&disk)
        .arg("--json")
        .stdout(fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(6), "{err}");
    assert!(err.contains("error[E_IO]") && !err.contains("panicked"), "{err}");
}
