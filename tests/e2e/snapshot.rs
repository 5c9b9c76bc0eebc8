//! Snapshots and hooks on the source side of a push: a reflink clone on
//! XFS read while a writer keeps writing the disk, the hooks around it
//! (app-consistent), a snapshot command with its cleanup, and every way a
//! hook can fail — each failure is `E_HOOK` naming the hook, nothing is
//! committed, the post hook and the cleanup still run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::{Rng, RngCore};

use crate::agents::{pair, push_to, Pair};
use crate::util::*;

/// Writes random 4 KiB pages into `path` until stopped; while the file
/// `pause` exists it stops writing and says so with `paused`.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(path: &Path, dir: &Path, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, dir, s) = (path.to_path_buf(), dir.to_path_buf(), stop.clone());
        let handle = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let pages = f.metadata().unwrap().len() / 4096;
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
            let mut page = [0u8; 4096];
            let mut writes = 0;
            while !s.load(Ordering::Relaxed) {
                if dir.join("pause").exists() {
                    let _ = std::fs::write(dir.join("paused"), b"");
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    continue;
                }
                rng.fill_bytes(&mut page);
                f.write_all_at(&page, rng.random_range(0..pages) * 4096).unwrap();
                writes += 1;
            }
            writes
        });
        Writer { stop, handle: Some(handle) }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Hooks that pause the writer and copy the disk while it is still (the
/// snapshot then holds exactly that copy), then let it go on.
fn freeze_hooks(dir: &Path, disk: &Path, copy_to: &Path) -> (String, String) {
    let d = dir.display();
    let pre = format!(
        "touch {d}/pause; while [ ! -e {d}/paused ]; do sleep 0.01; done; cp --sparse=always {} {}",
        disk.display(),
        copy_to.display()
    );
    (pre, format!("rm -f {d}/pause {d}/paused"))
}

fn history_names(p: &Pair) -> Vec<String> {
    let dir = p.source.state.join("history");
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn reflink_snapshot_of_a_disk_being_written_is_app_consistent() {
    let mut rng = rng("reflink_snapshot_of_a_disk_being_written");
    let p = pair("snap-xfs", 1, "");
    let xfs = Mount::xfs_reflink("snap-xfs-fs", 400 * MIB);
    let src = xfs.dir.join("vm.img");
    make_disk(&src, 48 * MIB, 0.8, &mut rng);
    // A clone left by a killed run goes first.
    std::fs::write(xfs.dir.join(".vm.img.diskferry-snap"), b"stale").unwrap();
    // And one a killed run was freeing in the background.
    std::fs::write(xfs.dir.join(".vm.img.diskferry-snap.old"), b"stale").unwrap();
    let frozen = p.dir.join("frozen.img");
    let (pre, post) = freeze_hooks(&p.dir, &src, &frozen);
    let writer = Writer::start(&src, &p.dir, 1);
    let snap = ["--snapshot", "reflink", "--pre-snapshot", pre.as_str(), "--post-snapshot", post.as_str()];
    let r = push_to(&src, &p.source, &p.agent, "t0", &snap).ok_json();
    let writes = writer.stop();
    assert!(writes > 0, "the writer never wrote");
    assert_eq!(r["consistency"], "app-consistent", "{r}");
    assert_eq!(r["snapshot"], "reflink", "{r}");
    compare(&frozen, &p.dir.join("t0.img")).expect("the target holds the snapshot's bytes");
    assert!(!xfs.dir.join(".vm.img.diskferry-snap").exists(), "the clone is removed");
    assert!(!xfs.dir.join(".vm.img.diskferry-snap.old").exists(), "the clone is freed before the push exits");
    let names = history_names(&p);
    assert!(names.len() == 1 && names[0].starts_with("vm.img-"), "history keyed by the origin disk: {names:?}");
    // Without hooks the snapshot alone makes it crash-consistent.
    let writer = Writer::start(&src, &p.dir, 2);
    let r = push_to(&src, &p.source, &p.agent, "t0", &["--snapshot", "reflink"]).ok_json();
    writer.stop();
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    assert_eq!(r["mode"], "delta", "{r}");
    p.agent.verify(&p.dir.join("t0.img")).ok();
}

#[test]
fn reflink_without_support_pushes_nothing() {
    let mut rng = rng("reflink_without_support_pushes_nothing");
    let p = pair("snap-ext4", 1, "");
    let ext4 = Mount::ext4("snap-ext4-fs", 64 * MIB);
    let src = ext4.dir.join("vm.img");
    make_disk(&src, 8 * MIB, 0.5, &mut rng);
    push_to(&src, &p.source, &p.agent, "t0", &["--snapshot", "reflink"]).expect_json_error("E_SNAPSHOT", 3);
    assert!(!p.dir.join("t0.img").exists(), "nothing was pushed");
    assert!(!ext4.dir.join(".vm.img.diskferry-snap").exists());
}

/// A snapshot command and its cleanup, and each way a hook fails.
#[test]
fn snapshot_command_and_failing_hooks() {
    let mut rng = rng("snapshot_command_and_failing_hooks");
    let p = pair("snap-cmd", 1, "");
    let src = p.dir.join("vm.img");
    make_disk(&src, 8 * MIB, 0.5, &mut rng);
    let d = p.dir.display().to_string();
    let snapfile = p.dir.join("snap.img");
    let cmd = format!("cp --sparse=always \"$DISKFERRY_SOURCE\" {d}/snap.img && echo {d}/snap.img");
    let cleanup = format!("touch {d}/cleaned; rm -f");
    let post_ran: PathBuf = p.dir.join("post-ran");
    let post_ok = format!("touch {}", post_ran.display());
    let base = ["--snapshot", "cmd", "--snapshot-cmd", cmd.as_str(), "--snapshot-cleanup-cmd", cleanup.as_str()];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        push_to(&src, &p.source, &p.agent, "t0", &args)
    };
    let reset = || {
        for f in ["post-ran", "cleaned", "snap.img"] {
            let _ = std::fs::remove_file(p.dir.join(f));
        }
    };
    // The pre hook fails: no snapshot, the post hook still runs, nothing pushed.
    let e = run(&["--pre-snapshot", "echo freezing >&2; exit 4", "--post-snapshot", &post_ok])
        .expect_json_error("E_HOOK", 3);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("pre-snapshot") && msg.contains("status 4"), "{msg}");
    assert!(post_ran.exists(), "the post hook runs once the pre hook ran");
    assert!(!snapfile.exists() && !p.dir.join("t0.img").exists());
    reset();
    // The pre hook hangs: killed at the timeout; the post hook runs.
    let start = std::time::Instant::now();
    let e = run(&["--pre-snapshot", "sleep 30", "--post-snapshot", &post_ok, "--hook-timeout", "1"])
        .expect_json_error("E_HOOK", 3);
    assert!(e["message"].as_str().unwrap().contains("did not finish within 1 s"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    assert!(post_ran.exists());
    assert!(!p.dir.join("t0.img").exists());
    reset();
    // The post hook fails: the snapshot is cleaned up, nothing pushed.
    let e = run(&["--pre-snapshot", "true", "--post-snapshot", "exit 7"]).expect_json_error("E_HOOK", 3);
    assert!(e["message"].as_str().unwrap().contains("post-snapshot"), "{e}");
    assert!(p.dir.join("cleaned").exists() && !snapfile.exists(), "the cleanup command ran with the path");
    assert!(!p.dir.join("t0.img").exists());
    reset();
    // A command that prints no path, or the disk itself: refused, and no
    // cleanup runs (a cleanup of the disk would destroy it).
    for printed in ["echo /nonexistent/x", "echo \"$DISKFERRY_SOURCE\""] {
        let args = ["--snapshot", "cmd", "--snapshot-cmd", printed, "--snapshot-cleanup-cmd", cleanup.as_str()];
        push_to(&src, &p.source, &p.agent, "t0", &args).expect_json_error("E_SNAPSHOT", 3);
        assert!(src.exists() && !p.dir.join("cleaned").exists(), "{printed}: the cleanup ran");
    }
    // Hooks without a snapshot are a usage error, before anything runs.
    push_to(&src, &p.source, &p.agent, "t0", &["--pre-snapshot", &post_ok]).expect_json_error("E_USAGE", 2);
    assert!(!post_ran.exists());
    // A post hook alone quiesces nothing: crash-consistent.
    let r = run(&["--post-snapshot", &post_ok]).ok_json();
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    reset();
    // Success: app-consistent, the target holds the snapshot, the cleanup ran.
    let r = run(&["--pre-snapshot", "true", "--post-snapshot", &post_ok]).ok_json();
    assert_eq!(r["consistency"], "app-consistent", "{r}");
    assert!(p.dir.join("cleaned").exists() && !snapfile.exists());
    compare(&src, &p.dir.join("t0.img")).unwrap();
    // A push that fails after the snapshot (the target refuses) still cleans up.
    reset();
    std::fs::write(p.dir.join("t0.img"), b"someone else's disk").unwrap();
    let out = run(&[]);
    assert_ne!(out.code, 0, "{out}");
    assert!(p.dir.join("cleaned").exists() && !snapfile.exists(), "cleanup after a failed push");
}
