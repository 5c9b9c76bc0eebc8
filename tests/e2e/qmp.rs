//! A running VM's disk as a source (`--qmp SOCKET --node NAME`): QEMU reads
//! the qcow2 image (no guest: `-machine none`; writes go through QEMU's own
//! `qemu-io` over HMP, as a guest's would), diskferry keeps its dirty
//! bitmaps over QMP and reads through QEMU's NBD server. Then the VM stops
//! and the same chain of bitmaps is read at rest.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agents::{pair, push_to};
use crate::nbd::{qcow2, raw_of};
use crate::util::{compare, uint, MIB};

/// QEMU with the image as block node `disk0`: one QMP socket for the
/// test, one for diskferry.
struct Qemu {
    child: Child,
    ours: Option<std::cell::RefCell<(BufReader<UnixStream>, UnixStream)>>,
    agents: PathBuf,
}

impl Qemu {
    fn start(image: &Path, dir: &Path) -> Qemu {
        let (ours, agents) = (dir.join("test.qmp"), dir.join("agent.qmp"));
        // A killed QEMU leaves its sockets behind.
        let _ = (std::fs::remove_file(&ours), std::fs::remove_file(&agents));
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-nodefaults", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", ours.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", agents.display()))
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=none,node-name=disk0,cache=writeback", image.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut q = Qemu { child, ours: None, agents };
        let t = Instant::now();
        while !(ours.exists() && q.agents.exists()) {
            assert!(t.elapsed() < Duration::from_secs(20), "QEMU did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // One connection for the whole test: QEMU takes a moment to listen
        // again after a client leaves.
        let s = loop {
            match UnixStream::connect(&ours) {
                Ok(s) => break s,
                Err(e) => assert!(t.elapsed() < Duration::from_secs(20), "QMP: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        q.ours = Some(std::cell::RefCell::new((BufReader::new(s.try_clone().unwrap()), s)));
        q.qmp("qmp_capabilities", json!({}));
        q
    }

    /// One QMP command on the test's own monitor: its answer.
    fn qmp(&self, command: &str, arguments: Value) -> Value {
        let mut conn = self.ours.as_ref().unwrap().borrow_mut();
        let (r, w) = &mut *conn;
        writeln!(w, "{}", json!({ "execute": command, "arguments": arguments })).unwrap();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed during {command}");
            let answer: Value = serde_json::from_str(&line).unwrap();
            if answer.get("return").is_some() || answer.get("error").is_some() {
                return answer;
            }
        }
    }

    /// Writes `len` bytes of `pattern` at `off` as a guest would, and the
    /// same into `mirror` (the raw disk the replica must equal).
    fn write(&self, mirror: &Path, off: u64, len: u64, pattern: u8) {
        let line = format!("qemu-io disk0 \"write -P {pattern} {off} {len}\"");
        let a = self.qmp("human-monitor-command", json!({ "command-line": line }));
        // Its report goes to QEMU's stdout; the replica's compare with the
        // mirror proves the write.
        assert!(a["return"].as_str().is_some_and(|o| !o.contains("rror")), "{a}");
        let f = std::fs::OpenOptions::new().write(true).open(mirror).unwrap();
        f.write_all_at(&vec![pattern; len as usize], off).unwrap();
    }

    /// diskferry's bitmaps on the node: name and whether it records.
    fn bitmaps(&self) -> Vec<(String, bool)> {
        let nodes = self.qmp("query-named-block-nodes", json!({ "flat": true }));
        let node = nodes["return"].as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap().clone();
        let list = node["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
        list.iter().map(|b| (b["name"].as_str().unwrap().to_string(), b["recording"] == true)).collect()
    }

    fn quit(mut self) {
        self.qmp("quit", json!({}));
        self.child.wait().unwrap();
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[track_caller]
fn assert_hinted(r: &Value, min: u64, max: u64, size: u64) {
    assert_eq!(r["change_source"], "dirty-bitmap", "{r}");
    let hinted = uint(r, "hinted_blocks");
    assert!((min..=max).contains(&hinted), "the bitmap names about the written blocks: {r}");
    let bound = 2 * hinted * 65536 + uint(r, "spot_checked_blocks") * 65536 + size / 100;
    assert!(uint(r, "source_bytes_read") <= bound, "read more than {bound}: {r}");
}

#[test]
fn a_running_vms_bitmaps_over_qmp_then_at_rest() {
    crate::nbd::need_qemu();
    let p = pair("qmp", 1, "");
    let img = p.dir.join("vm.qcow2");
    let tgt = p.dir.join("t0.img");
    let size = 64 * MIB;
    qcow2(&img, size, &[(0, 20 * MIB, 0x11), (30 * MIB + 7, 5 * MIB, 0x22)]);
    let mirror = raw_of(&img);
    let vm = Qemu::start(&img, &p.dir);
    let agents = vm.agents.to_str().unwrap().to_string();
    let args = ["--format", "qcow2", "--changes", "dirty-bitmap", "--qmp", &agents, "--node", "disk0"];

    // The first pass reads all, through QEMU's NBD server; nothing wrote
    // during the read, so it is a crash-consistent point.
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    eprintln!("{r}");
    assert_eq!((&r["read_through"], &r["change_source"]), (&json!("qmp"), &json!("full-scan")), "{r}");
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    compare(&mirror, &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(vm.bitmaps(), vec![(format!("diskferry-{gen}"), true)]);

    // Writes at unaligned offsets and sizes, while QEMU runs.
    vm.write(&mirror, 3 * MIB + 5, 70_000, 0x33);
    vm.write(&mirror, 40 * MIB + 4095, 2, 0x44);
    vm.write(&mirror, 63 * MIB, 12_345, 0x55);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    eprintln!("{r}");
    assert_hinted(&r, 3, 8, size);
    compare(&mirror, &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(vm.bitmaps(), vec![(format!("diskferry-{gen}"), true)], "handed on");

    // Nothing written: the target keeps its generation, and so does the
    // bitmap (no pending bitmaps pile up over idle pushes).
    for _ in 0..2 {
        let idle = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
        assert_eq!(idle["generation"], gen.as_str(), "{idle}");
        assert_eq!(vm.bitmaps(), vec![(format!("diskferry-{gen}"), true)], "after an idle push");
    }

    // A killed agent's leftovers: an export of a union bitmap on a server of
    // its own. The next pass removes them and reads as usual.
    let dead = p.dir.join("dead.sock");
    vm.qmp(
        "block-dirty-bitmap-add",
        json!({ "node": "disk0", "name": "diskferry-union-00000000000000aa", "disabled": true }),
    );
    vm.qmp("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": dead } } }));
    let a = vm.qmp(
        "block-export-add",
        json!({ "type": "nbd", "id": "diskferry-dead", "node-name": "disk0", "writable": false, "bitmaps": ["diskferry-union-00000000000000aa"] }),
    );
    assert!(a.get("return").is_some(), "{a}");
    vm.write(&mirror, 5 * MIB, 4096, 0x5a);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_hinted(&r, 1, 2, size);
    compare(&mirror, &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(vm.bitmaps(), vec![(format!("diskferry-{gen}"), true)], "the leftovers went");
    assert_eq!(vm.qmp("query-block-exports", json!({}))["return"], json!([]));

    // A pass that fails after its bitmap started: the chain stays, and the
    // next pass reads the union of the old bitmap and the failed pass's.
    vm.write(&mirror, 10 * MIB + 1, 1000, 0x66);
    push_to(&img, &p.source, &p.agent, "nope", &args).expect_json_error("E_UNKNOWN_TARGET", 4);
    let left = vm.bitmaps();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&(format!("diskferry-{gen}"), false)), "stopped recording: {left:?}");
    vm.write(&mirror, 50 * MIB + 3, 200_000, 0x77);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    eprintln!("{r}");
    assert_hinted(&r, 5, 10, size);
    compare(&mirror, &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(vm.bitmaps(), vec![(format!("diskferry-{gen}"), true)]);

    // Someone else's NBD export: refused, not stopped.
    let theirs = p.dir.join("theirs.sock");
    vm.qmp("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": theirs } } }));
    vm.qmp("block-export-add", json!({ "type": "nbd", "id": "theirs", "node-name": "disk0", "writable": false }));
    push_to(&img, &p.source, &p.agent, "t0", &args).expect_json_error("E_BUSY", 3);
    assert!(vm.qmp("query-block-exports", json!({}))["return"].as_array().unwrap().len() == 1);
    vm.qmp("block-export-del", json!({ "id": "theirs" }));
    vm.qmp("nbd-server-stop", json!({}));
    let bad_node = ["--format", "qcow2", "--changes", "dirty-bitmap", "--qmp", &agents, "--node", "nosuch"];
    push_to(&img, &p.source, &p.agent, "t0", &bad_node).expect_json_error("E_NOT_FOUND", 3);
    let no_bitmap = ["--format", "qcow2", "--qmp", &agents, "--node", "disk0"];
    push_to(&img, &p.source, &p.agent, "t0", &no_bitmap).expect_json_error("E_USAGE", 2);

    // The VM stops: its persistent bitmap is read at rest.
    vm.write(&mirror, 20 * MIB - 1, 3, 0x88);
    vm.quit();
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    eprintln!("{r}");
    assert_eq!(r["read_through"], "qemu-storage-daemon", "{r}");
    assert_hinted(&r, 2, 6, size);
    assert_eq!(r["consistency"], "crash-consistent", "{r}");
    compare(&mirror, &tgt).unwrap();
    compare(&raw_of(&img), &tgt).unwrap();

    // QEMU killed with its bitmap in use: inconsistent when it starts again.
    let vm = Qemu::start(&img, &p.dir);
    vm.write(&mirror, 7 * MIB, 4096, 0x99);
    vm.kill9();
    let vm = Qemu::start(&img, &p.dir);
    vm.write(&mirror, 8 * MIB, 4096, 0xaa);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    eprintln!("{r}");
    assert_eq!(r["change_source"], "full-scan", "{r}");
    assert!(r["change_note"].as_str().is_some_and(|n| n.contains("inconsistent")), "{r}");
    compare(&mirror, &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(vm.bitmaps(), vec![(format!("diskferry-{gen}"), true)], "the inconsistent one went");
    vm.write(&mirror, 9 * MIB + 9, 9, 0xbb);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    eprintln!("{r}");
    assert_hinted(&r, 1, 3, size);
    compare(&mirror, &tgt).unwrap();
    p.agent.verify(&tgt).ok();
}
