//! Damaged state: a bit-flipped or truncated catalog, manifest, undo segment
//! or committed redo log is reported as E_STATE_CORRUPT (or, where the damage
//! cannot be told from an interrupted write, never leads to a target that
//! passes `verify` while holding a mix), and the target is not touched.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;

use crate::util::*;

/// One way of damaging a state file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flip bit `.1` of byte `.0`.
    Flip(u64, u8),
    /// Cut the file to this length.
    Truncate(u64),
}

impl Damage {
    fn apply(self, path: &Path) {
        match self {
            Damage::Flip(off, bit) => flip_bit(path, off, bit),
            Damage::Truncate(len) => truncate(path, len),
        }
    }
}

/// A target with two points (full sync, then a delta).
struct Fixture {
    dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    state: PathBuf,
    /// The source of the first sync.
    old: PathBuf,
    first: String,
    second: String,
}

impl Fixture {
    fn new(name: &str, size: u64) -> Fixture {
        let mut rng = rng(name);
        let dir = tempdir(name);
        let (src, dst, state) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("state"));
        let old = dir.path().join("old.img");
        make_disk(&src, size, 0.7, &mut rng);
        let first = string(&df!("sync", src, dst, "--state-dir", state, "--json").ok_json(), "generation");
        copy(&src, &old);
        change_data_pages(&src, 40, &mut rng);
        let second = string(&df!("sync", src, dst, "--state-dir", state, "--json").ok_json(), "generation");
        // The source moves on: a sync now would have work to do.
        change_data_pages(&src, 40, &mut rng);
        Fixture { dir, src, dst, state, old, first, second }
    }

    fn tdir(&self) -> PathBuf {
        target_state_dir(&self.state)
    }

    /// Damages `file` in each way, checks that `verify` and `sync` refuse with
    /// E_STATE_CORRUPT and leave the target alone, then restores the file.
    fn expect_corrupt_on_verify_and_sync(&self, file: &Path, what: &str) {
        let good = fs::read(file).unwrap();
        let len = good.len() as u64;
        let dst_before = self.dir.path().join("dst-before.img");
        copy(&self.dst, &dst_before);
        let damages = [
            Damage::Flip(0, 0),
            Damage::Flip(9.min(len - 1), 3),
            Damage::Flip(len / 2, 5),
            Damage::Flip(len - 1, 7),
            Damage::Truncate(len / 2),
            Damage::Truncate(len - 1),
            Damage::Truncate(0),
        ];
        for damage in damages {
            let case = format!("{what}: {damage:?} of {len} bytes");
            fs::write(file, &good).unwrap();
            damage.apply(file);
            let out = df!("verify", self.dst, "--state-dir", self.state, "--json");
            assert_eq!(out.error_code().as_deref(), Some("E_STATE_CORRUPT"), "{case}: verify:\n{out}");
            out.expect_json_error("E_STATE_CORRUPT", 6);
            let out = df!("sync", self.src, self.dst, "--state-dir", self.state);
            assert_eq!(out.error_code().as_deref(), Some("E_STATE_CORRUPT"), "{case}: sync:\n{out}");
            out.expect_error("E_STATE_CORRUPT", 6);
            if let Err(e) = compare(&self.dst, &dst_before) {
                panic!("{case}: the target was touched: {e}");
            }
            assert!(file.exists() || len == 0, "{case}: the damaged file was deleted, losing the evidence");
        }
        fs::write(file, &good).unwrap();
        let v = df!("verify", self.dst, "--state-dir", self.state, "--json").ok_json();
        assert_eq!(string(&v, "generation"), self.second);
    }
}

#[test]
fn corrupt_catalog_is_detected() {
    let f = Fixture::new("corrupt-catalog", 8 * MIB);
    let catalog = f.tdir().join("catalog");
    f.expect_corrupt_on_verify_and_sync(&catalog, "catalog");
    // `points` and `export` too.
    flip_bit(&catalog, fs::metadata(&catalog).unwrap().len() / 2, 1);
    df!("points", f.dst, "--state-dir", f.state).expect_error("E_STATE_CORRUPT", 6);
    let out = f.dir.path().join("out.img");
    df!("export", f.dst, "--point", f.first, out, "--state-dir", f.state).expect_error("E_STATE_CORRUPT", 6);
    assert!(!out.exists());
}

#[test]
fn corrupt_manifest_is_detected() {
    let f = Fixture::new("corrupt-manifest", 8 * MIB);
    let current = f.tdir().join(format!("{}.dfm", f.second));
    f.expect_corrupt_on_verify_and_sync(&current, "current manifest");

    // The previous point's manifest: its export is refused; the current point is unaffected.
    let previous = f.tdir().join(format!("{}.dfm", f.first));
    let good = fs::read(&previous).unwrap();
    for (case, off) in [("header", 3u64), ("middle", good.len() as u64 / 2), ("end", good.len() as u64 - 2)] {
        fs::write(&previous, &good).unwrap();
        flip_bit(&previous, off, 2);
        let out = f.dir.path().join("previous.img");
        let res = df!("export", f.dst, "--point", f.first, out, "--state-dir", f.state);
        assert_eq!(res.error_code().as_deref(), Some("E_STATE_CORRUPT"), "previous manifest, {case}:\n{res}");
        res.expect_error("E_STATE_CORRUPT", 6);
        assert!(!out.exists(), "an export from a damaged manifest was written");
    }
    fs::write(&previous, &good).unwrap();
    let out = f.dir.path().join("previous.img");
    df!("export", f.dst, "--point", f.first, out, "--state-dir", f.state).ok();
    assert_same(&out, &f.old);
}

#[test]
fn corrupt_undo_segment_is_detected() {
    let f = Fixture::new("corrupt-undo", 8 * MIB);
    let undo = f.tdir().join(format!("{}.undo", f.first));
    assert!(undo.exists(), "no undo segment at {}", undo.display());
    let good = fs::read(&undo).unwrap();
    let len = good.len() as u64;
    let damages = [
        Damage::Flip(5, 0),
        Damage::Flip(len / 2, 4),
        Damage::Flip(len - 1, 7),
        Damage::Truncate(len / 2),
        Damage::Truncate(len - 1),
    ];
    for damage in damages {
        let case = format!("{damage:?} of {len} bytes");
        fs::write(&undo, &good).unwrap();
        damage.apply(&undo);
        let out = f.dir.path().join("previous.img");
        let res = df!("export", f.dst, "--point", f.first, out, "--state-dir", f.state, "--json");
        assert_eq!(res.error_code().as_deref(), Some("E_STATE_CORRUPT"), "undo segment, {case}:\n{res}");
        res.expect_json_error("E_STATE_CORRUPT", 6);
        assert!(!out.exists(), "undo segment, {case}: an image was written");
        assert!(!f.dir.path().join("previous.img.partial").exists(), "undo segment, {case}: partial image left");
        // The current generation does not depend on it.
        df!("verify", f.dst, "--state-dir", f.state).ok();
    }
    fs::write(&undo, &good).unwrap();
    let out = f.dir.path().join("previous.img");
    df!("export", f.dst, "--point", f.first, out, "--state-dir", f.state).ok();
    assert_same(&out, &f.old);
}

/// A committed redo log, made by killing syncs until one dies during its
/// commit: the target and state as they were at that moment, plus the old
/// and new sources.
struct Committed {
    _dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    state: PathBuf,
    old: PathBuf,
    snap_dst: PathBuf,
    snap_state: PathBuf,
}

impl Committed {
    fn make() -> Committed {
        let mut rng = rng("committed redo log");
        let dir = tempdir("corrupt-redo");
        let p = |n: &str| dir.path().join(n);
        let (src, dst, state, old) = (p("src.img"), p("dst.img"), p("state"), p("old.img"));
        let (snap_dst, snap_state) = (p("snap-dst.img"), p("snap-state"));
        make_disk(&src, 96 * MIB, 0.8, &mut rng);
        df!("sync", src, dst, "--state-dir", state).ok();
        let change = |rng: &mut rand::rngs::SmallRng| scatter_writes(&src, 600, 128 * KIB, rng);
        change(&mut rng);
        let t = df!("sync", src, dst, "--state-dir", state).ok().seconds;
        for attempt in 0..80 {
            // The target at the source's bytes, whatever the last attempt left.
            df!("sync", src, dst, "--state-dir", state).ok();
            copy(&src, &old);
            change(&mut rng);
            let mut child =
                spawn(&["sync".as_ref(), src.as_ref(), dst.as_ref(), "--state-dir".as_ref(), state.as_ref()]);
            std::thread::sleep(Duration::from_secs_f64(rng.random_range(t * 0.4..t * 1.05)));
            child.kill().unwrap();
            let status = child.wait().unwrap();
            if status.signal() != Some(9) {
                continue;
            }
            let _ = fs::remove_dir_all(&snap_state);
            copy_tree(&state, &snap_state);
            copy(&dst, &snap_dst);
            let out = df!("verify", dst, "--state-dir", state).ok();
            if out.stderr.contains("recovered: finished") {
                eprintln!("committed redo log after {} attempts", attempt + 1);
                let c = Committed { _dir: dir, src, dst, state, old, snap_dst, snap_state };
                assert!(c.snap_redo().exists());
                return c;
            }
        }
        panic!("no kill landed in a commit in 80 attempts");
    }

    fn snap_redo(&self) -> PathBuf {
        target_state_dir(&self.snap_state).join("redo.log")
    }

    fn redo(&self) -> PathBuf {
        target_state_dir(&self.state).join("redo.log")
    }

    /// Puts the target and the state back as they were at the kill.
    fn restore(&self) {
        fs::remove_dir_all(&self.state).unwrap();
        copy_tree(&self.snap_state, &self.state);
        // Same inode, the snapshot's bytes.
        let bytes = fs::read(&self.snap_dst).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&self.dst).unwrap();
        f.set_len(bytes.len() as u64).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
        f.sync_all().unwrap();
    }
}

#[test]
fn corrupt_committed_redo_log_is_detected() {
    let c = Committed::make();
    let len = fs::metadata(c.snap_redo()).unwrap().len();
    // Damage inside the entries (and the header, which names what they
    // apply to) cannot be a torn write: the commit record proves the
    // entries were durable. It must be reported, never replayed or dropped.
    let strict: [(&str, u64); 4] =
        [("header", 20), ("first entry", 100), ("middle", len / 2), ("last entry", len - 200)];
    let mut failures = Vec::new();
    for (case, off) in strict {
        for cmd in ["verify", "sync"] {
            c.restore();
            flip_bit(&c.redo(), off, 6);
            let out = if cmd == "verify" {
                df!("verify", c.dst, "--state-dir", c.state, "--json")
            } else {
                df!("sync", c.src, c.dst, "--state-dir", c.state, "--json")
            };
            let what = format!("committed redo log, bit flipped in the {case} (offset {off} of {len}), {cmd}");
            if out.error_code().as_deref() != Some("E_STATE_CORRUPT") || out.code != 6 {
                failures.push(format!("{what}: expected E_STATE_CORRUPT, exit 6:\n{out}"));
                continue;
            }
            out.expect_json_error("E_STATE_CORRUPT", 6);
            if let Err(e) = compare(&c.dst, &c.snap_dst) {
                failures.push(format!("{what}: the target was written: {e}"));
            }
            if !c.redo().exists() {
                failures.push(format!("{what}: the damaged committed redo log was deleted"));
            }
        }
    }
    // A cut-off log has lost its commit record and looks uncommitted. That
    // may be discarded, but then the target must hold a whole generation,
    // or `verify` must fail.
    for (case, cut) in [("commit record torn", len - 10), ("cut in half", len / 2)] {
        c.restore();
        truncate(&c.redo(), cut);
        let out = df!("verify", c.dst, "--state-dir", c.state);
        let whole = compare(&c.dst, &c.old).is_ok() || compare(&c.dst, &c.src).is_ok();
        if out.code == 0 {
            assert!(whole, "committed redo log {case}: verify passed on a mixed target:\n{out}");
        } else {
            let code = out.error_code().unwrap_or_default();
            assert!(
                (code == "E_STATE_CORRUPT" && out.code == 6) || (code == "E_VERIFY_MISMATCH" && out.code == 5),
                "committed redo log {case}: verify:\n{out}"
            );
        }
    }
    // The undamaged snapshot recovers to the new source.
    c.restore();
    let out = df!("verify", c.dst, "--state-dir", c.state).ok();
    assert!(out.stderr.contains("recovered: finished"), "{out}");
    assert_same(&c.dst, &c.src);
    assert!(
        failures.is_empty(),
        "{} of {} damaged logs were not reported:\n{}",
        failures.len(),
        strict.len() * 2,
        failures.join("\n")
    );
}
