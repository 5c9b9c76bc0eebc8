//! The VM harness: the guest (built once per run by `guest.sh`), QEMU under
//! software emulation with its console in a file and QMP on a unix socket,
//! the writer guest on a disk, a clean power-down or a power cut, and the
//! checker guest that boots a replica and says PASS or FAIL.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Each guest takes a whole core under TCG: the tests run one at a time.
static ONE_VM_TEST: Mutex<()> = Mutex::new(());

pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_VM_TEST.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vm/guest.sh")
}

/// The kernel and initramfs, built on first use. As root, QEMU, busybox and
/// the kernel package are installed first if missing (what `.ci/run` does
/// too): a test that needs them never skips.
pub fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let root = rustix::process::geteuid().is_root();
        if root {
            let s = Command::new("bash").arg(script()).arg("install").status().expect("run guest.sh install");
            assert!(s.success(), "tests/vm/guest.sh install failed ({s})");
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-guest");
        let o = Command::new("bash").arg(script()).arg("build").arg(&out).output().expect("run guest.sh build");
        assert!(
            o.status.success(),
            "tests/vm/guest.sh build failed{}:\n{}",
            if root { "" } else { " (as root, the tests install what it needs)" },
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
}

/// A raw disk of `mib` MiB holding an ext4 (4 KiB blocks, inode tables
/// written now so that no lazy init writes behind the tests' back) with a
/// file of `ballast_mib` MiB of random data (what a disk that is mostly
/// installed system looks like to a pass that reads it).
pub fn make_ext4(path: &Path, mib: u64, ballast_mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    let root = tempfile::tempdir().unwrap();
    if ballast_mib > 0 {
        let mut ballast = std::fs::File::create(root.path().join("ballast")).unwrap();
        let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
        std::io::copy(&mut std::io::Read::take(&mut urandom, ballast_mib << 20), &mut ballast).unwrap();
    }
    let s = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
        .arg(root.path())
        .arg(path)
        .status()
        .expect("mkfs.ext4");
    assert!(s.success(), "mkfs.ext4 {}", path.display());
}

/// A running QEMU guest, killed if dropped.
pub struct Vm {
    child: Option<Child>,
    pub log: PathBuf,
    qmp: PathBuf,
    /// A second QMP monitor, for diskferry (`--qmp`); the disk is block
    /// node `disk0`.
    pub agent_qmp: PathBuf,
}

impl Vm {
    fn launch(disk: &Path, log: &Path, drive_opts: &str, cmdline: &str) -> Vm {
        Vm::launch_as(disk, "raw", log, drive_opts, cmdline)
    }

    fn launch_as(disk: &Path, format: &str, log: &Path, drive_opts: &str, cmdline: &str) -> Vm {
        Vm::launch_disks(&[disk], format, log, drive_opts, cmdline)
    }

    /// A guest with `disks` as /dev/vda, /dev/vdb, … (block nodes `disk0`, `disk1`, …).
    fn launch_disks(disks: &[&Path], format: &str, log: &Path, drive_opts: &str, cmdline: &str) -> Vm {
        let g = guest();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Unix socket paths must stay under 108 bytes: not in the test's dir.
        let qmp = PathBuf::from(format!("/tmp/diskferry-vm-{}-{n}.qmp", std::process::id()));
        let agent_qmp = qmp.with_extension("agent.qmp");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&agent_qmp);
        let _ = std::fs::remove_file(log);
        let mut qemu = Command::new("qemu-system-x86_64");
        for (i, disk) in disks.iter().enumerate() {
            qemu.arg("-drive").arg(format!(
                "file={},format={format},if=virtio,node-name=disk{i},{drive_opts}",
                disk.display().to_string().replace(',', ",,")
            ));
        }
        let child = qemu
            // No KVM: the nested KVM here cannot run a stock kernel.
            .args(["-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-nic", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", agent_qmp.display()))
            .arg("-kernel")
            .arg(g.join("vmlinuz"))
            .arg("-initrd")
            .arg(g.join("initrd.gz"))
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 {cmdline}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm { child: Some(child), log: log.to_path_buf(), qmp, agent_qmp }
    }

    /// Boots the writer guest on `disk` (through the host's page cache, so
    /// diskferry reads what the guest wrote) and waits until it writes.
    pub fn writer(disk: &Path, secs: u32, keep: u32) -> Vm {
        Vm::writer_as(disk, "raw", secs, keep)
    }

    /// [`Vm::writer`] on an image in `format` (e.g. qcow2).
    pub fn writer_as(disk: &Path, format: &str, secs: u32, keep: u32) -> Vm {
        let log = disk.with_extension("writer.log");
        let cmdline = format!("vmp.mode=writer vmp.secs={secs} vmp.keep={keep}");
        let mut vm = Vm::launch_as(disk, format, &log, "cache=writeback", &cmdline);
        // Not before: a power button pressed before the guest loaded its
        // ACPI module is ignored.
        vm.wait_for("VMP writer-start", Duration::from_secs(180));
        vm
    }

    pub fn console(&self) -> String {
        let raw = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&raw).replace('\r', "")
    }

    /// Waits for a console line containing `needle`; panics with the log
    /// if the guest stops or the time runs out first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.console().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            let exited = self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some());
            assert!(
                !exited && Instant::now() < deadline,
                "guest {} before {needle:?}; console:\n{}",
                if exited { "stopped" } else { "timed out" },
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest has listed `n` files in all (durably: the
    /// manifest was synced), counting from the start of this boot.
    pub fn wait_listed(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.listed() < n {
            assert!(
                Instant::now() < deadline,
                "the guest listed fewer than {n} files in {timeout:?}:\n{}",
                self.console()
            );
            self.wait_for("VMP listed", timeout);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Files this boot has listed so far.
    pub fn listed(&self) -> usize {
        self.console().lines().filter(|l| l.starts_with("VMP listed ")).count()
    }

    /// Files this boot wrote, as the guest counted them when it stopped.
    pub fn files_written(&self) -> u64 {
        let c = self.console();
        let done = c.lines().find_map(|l| l.split("VMP writer-done files=").nth(1).map(str::to_string));
        let n = done.expect("the writer did not report its count");
        n.split_whitespace().next().and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("writer-done: {n}"))
    }

    /// QMP `system_powerdown` (the ACPI power button, what `virsh shutdown`
    /// sends), then waits until the guest has unmounted and powered off.
    /// The writer guest with two disks: the manifest on `manifest`, the
    /// data files on `data`.
    pub fn writer2(manifest: &Path, data: &Path, secs: u32, keep: u32) -> Vm {
        let log = manifest.with_extension("writer.log");
        let cmdline = format!("vmp.mode=writer2 vmp.secs={secs} vmp.keep={keep}");
        let mut vm = Vm::launch_disks(&[manifest, data], "raw", &log, "cache=writeback", &cmdline);
        vm.wait_for("VMP writer-start", Duration::from_secs(180));
        vm
    }

    pub fn powerdown(&mut self, timeout: Duration) {
        qmp(&self.qmp, "system_powerdown");
        let status = self.wait_exit(timeout);
        let c = self.console();
        assert!(status.success() && c.contains("stop=powerbutton") && c.contains("VMP unmounted"), "{status}:\n{c}");
    }

    /// Waits for the guest to power itself off (its timer ran out).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("the guest runs");
        loop {
            if let Some(s) = child.try_wait().expect("wait for qemu") {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the guest did not power off in {timeout:?}; console:\n{}", self.console());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to QEMU: a power cut. The page cache keeps what QEMU wrote
    /// (the host did not crash), the guest's own caches are lost.
    pub fn power_cut(&mut self) {
        let mut c = self.child.take().expect("the guest runs");
        c.kill().expect("kill qemu");
        let _ = c.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.agent_qmp);
    }
}

/// Sends one QMP command (after the capabilities handshake) and waits for
/// its answer.
fn qmp(socket: &Path, command: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("QMP {}: {e}", socket.display()),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "QMP greeting: {line}");
    for cmd in ["qmp_capabilities", command] {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed during {cmd}");
            // Events ("event": …) may come before the answer.
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "QMP {cmd}: {line}");
        }
    }
}

/// What the checker guest said about a disk.
#[derive(Debug)]
pub struct Verdict {
    pub pass: bool,
    pub line: String,
    pub console: String,
}

impl Verdict {
    /// How many files the disk's manifest listed (all verified on a PASS).
    pub fn listed(&self) -> u64 {
        let v = self.line.split("listed=").nth(1).and_then(|x| x.split_whitespace().next());
        v.and_then(|x| x.parse().ok()).unwrap_or(0)
    }
}

/// Boots the checker on `disk` as a replica would boot: e2fsck, mount (a
/// journal replay if it was not unmounted cleanly), every listed file's
/// checksum, e2fsck again. `snapshot=on`: the disk itself is never changed.
pub fn check(disk: &Path) -> Verdict {
    let log = disk.with_extension("check.log");
    let mut vm = Vm::launch(disk, &log, "snapshot=on", "vmp.mode=check");
    let status = vm.wait_exit(Duration::from_secs(300));
    let console = vm.console();
    let line = console.lines().rev().find(|l| l.contains("VMP VERDICT:")).map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("the checker gave no verdict ({status}):\n{console}"));
    Verdict { pass: line.contains("VERDICT: PASS"), line, console }
}

/// [`check`] of a two-disk replica: the manifest's disk and the data disk.
pub fn check2(manifest: &Path, data: &Path) -> Verdict {
    let log = manifest.with_extension("check.log");
    let mut vm = Vm::launch_disks(&[manifest, data], "raw", &log, "snapshot=on", "vmp.mode=check2");
    let status = vm.wait_exit(Duration::from_secs(300));
    let console = vm.console();
    let line = console.lines().rev().find(|l| l.contains("VMP VERDICT:")).map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("the checker gave no verdict ({status}):\n{console}"));
    Verdict { pass: line.contains("VERDICT: PASS"), line, console }
}

/// Boots the checker and panics with its console unless it passes.
pub fn assert_passes(disk: &Path, what: &str) -> Verdict {
    let v = check(disk);
    assert!(v.pass, "{what}: {}\n{}", v.line, v.console);
    v
}

/// Reads a file of the (cleanly unmounted) ext4 on `disk` with debugfs.
pub fn debugfs(disk: &Path, request: &str) -> String {
    let o = Command::new("debugfs").arg("-R").arg(request).arg(disk).output().expect("debugfs");
    assert!(o.status.success(), "debugfs {request}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The files the disk's manifest lists as present (what the checker verifies).
pub fn listed_files(disk: &Path) -> Vec<String> {
    let manifest = debugfs(disk, "cat /MANIFEST");
    let mut files: Vec<String> = Vec::new();
    for l in manifest.lines() {
        let mut w = l.split_whitespace();
        match (w.next(), w.next()) {
            (Some("DEL"), Some(f)) => files.retain(|x| x != f),
            (Some(f), Some(sum)) if sum.len() == 64 => files.push(f.to_string()),
            _ => {}
        }
    }
    files
}

/// The byte offset, in `disk`, of the first data block of `file` on its ext4.
pub fn data_offset(disk: &Path, file: &str) -> u64 {
    let stats = debugfs(disk, "stats");
    let block_size: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("debugfs stats: no block size");
    let bmap = debugfs(disk, &format!("bmap /{file} 0"));
    let block: u64 = bmap.trim().parse().unwrap_or_else(|_| panic!("bmap /{file}: {bmap:?}"));
    assert!(block > 0, "/{file} has no first block");
    block * block_size
}

/// The ext4 journal's size in bytes (what metadata writes can touch).
pub fn journal_bytes(disk: &Path) -> u64 {
    let o = Command::new("dumpe2fs").arg("-h").arg(disk).output().expect("dumpe2fs");
    let text = String::from_utf8_lossy(&o.stdout);
    let field = |name: &str| -> u64 {
        let v = text.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("dumpe2fs: no {name}"));
        v.trim().parse().unwrap_or_else(|_| panic!("dumpe2fs {name} {v:?}"))
    };
    field("Total journal blocks:") * field("Block size:")
}
