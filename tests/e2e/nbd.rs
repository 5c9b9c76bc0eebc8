//! Sources read through NBD: qcow2 images through the `qemu-nbd` diskferry
//! starts itself, NBD URLs served by anyone (unix socket and TCP), and a
//! hostile fake server — correct bytes or a typed error within a timeout,
//! never a panic or a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agents::{pair, push_to};
use crate::util::{self, compare, tempdir, uint, MIB};

/// QEMU's tools (and QEMU itself) for these tests: as root they are
/// installed when missing, as `.ci/run` does, so the tests never skip.
pub fn need_qemu() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
        let missing = !(have("qemu-img") && have("qemu-nbd") && have("qemu-io") && have("qemu-system-x86_64"));
        if missing && rustix::process::geteuid().is_root() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vm/guest.sh");
            let s = Command::new("bash").arg(script).arg("install").status().unwrap();
            assert!(s.success(), "tests/vm/guest.sh install failed ({s})");
        }
    });
}

pub fn sh(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A qcow2 image written by `qemu-io` at unaligned offsets and sizes, with
/// holes between.
pub fn qcow2(path: &Path, size: u64, writes: &[(u64, u64, u8)]) {
    sh("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), &size.to_string()]);
    qemu_io(path, writes);
}

pub fn qemu_io(path: &Path, writes: &[(u64, u64, u8)]) {
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for (off, len, pattern) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pattern} {off} {len}"));
    }
    args.push(path.to_str().unwrap().into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sh("qemu-io", &refs);
}

pub fn raw_of(image: &Path) -> std::path::PathBuf {
    let raw = image.with_extension("raw");
    sh("qemu-img", &["convert", "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()]);
    raw
}

fn hash(args: &[&str]) -> util::Out {
    let mut a: Vec<&std::ffi::OsStr> = vec!["hash".as_ref()];
    a.extend(args.iter().map(std::ffi::OsStr::new));
    a.push("--json".as_ref());
    util::run(&a)
}

#[test]
fn qcow2_images_are_read_as_the_guest_sees_them() {
    need_qemu();
    let p = pair("nbd-qcow2", 1, "");
    let img = p.dir.join("vm.qcow2");
    let size = 96 * MIB + 4096;
    qcow2(&img, size, &[(12345, 70_000, 0xa1), (5 * MIB + 1, 3 * MIB, 0x5c), (90 * MIB, 77, 0x01)]);
    let raw = raw_of(&img);
    let via_nbd = hash(&[img.to_str().unwrap(), "--format", "qcow2"]).ok_json();
    let direct = hash(&[raw.to_str().unwrap()]).ok_json();
    assert_eq!(via_nbd["root"], direct["root"], "{via_nbd} vs {direct}");
    assert_eq!(uint(&via_nbd, "disk_bytes"), size);

    let tgt = p.dir.join("t0.img");
    let r = push_to(&img, &p.source, &p.agent, "t0", &["--format", "qcow2"]).ok_json();
    assert_eq!(r["mode"], "full");
    assert_eq!(r["consistency"], "crash-consistent", "an image at rest, served read-only: {r}");
    compare(&raw, &tgt).unwrap();
    // The guest writes again: a delta, still byte-exact; the history is the image's.
    qemu_io(&img, &[(7 * MIB + 3, 100_000, 0x77), (0, 1, 0x02)]);
    let raw = raw_of(&img);
    let r = push_to(&img, &p.source, &p.agent, "t0", &["--format", "qcow2"]).ok_json();
    assert_eq!(r["mode"], "delta", "{r}");
    assert!(uint(&r, "bytes_sent") < 2 * MIB, "{r}");
    compare(&raw, &tgt).unwrap();
    p.agent.verify(&tgt).ok();

    // A local sync reads it the same way.
    let local = p.dir.join("local.img");
    df!("sync", &img, &local, "--format", "qcow2", "--state-dir", &p.source.state, "--json").ok();
    compare(&raw, &local).unwrap();
    // A file that is no qcow2: a clear error, nothing pushed.
    let junk = p.dir.join("junk.qcow2");
    std::fs::write(&junk, vec![7u8; 65536]).unwrap();
    let e = push_to(&junk, &p.source, &p.agent, "t0", &["--format", "qcow2"]).expect_json_error("E_INVALID_INPUT", 3);
    assert!(e["message"].as_str().unwrap().contains("qemu-nbd"), "{e}");
    // --snapshot does not apply to an image read through qemu-nbd.
    push_to(&img, &p.source, &p.agent, "t0", &["--format", "qcow2", "--snapshot", "reflink"])
        .expect_json_error("E_USAGE", 2);
}

/// Starts `qemu-nbd` on `image` (qcow2, read-only) at `listen` args.
struct Server(std::process::Child);

impl Server {
    fn start(image: &Path, listen: &[&str], ready: impl Fn() -> bool) -> Server {
        let mut args = vec!["--read-only", "--format=qcow2", "--export-name=vm", "--persistent", "--shared=4"];
        args.extend_from_slice(listen);
        args.push(image.to_str().unwrap());
        let child = Command::new("qemu-nbd").args(&args).spawn().unwrap();
        let t = Instant::now();
        while !ready() {
            assert!(t.elapsed() < Duration::from_secs(20), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbd_urls_over_unix_sockets_and_tcp() {
    need_qemu();
    let p = pair("nbd-urls", 2, "");
    let img = p.dir.join("vm.qcow2");
    qcow2(&img, 32 * MIB, &[(100, 1_000_000, 0x31), (20 * MIB, 4097, 0x32)]);
    let raw = raw_of(&img);
    let want = hash(&[raw.to_str().unwrap()]).ok_json()["root"].clone();

    let sock = std::path::PathBuf::from(format!("/tmp/df-nbd-test-{}.sock", std::process::id()));
    let s = sock.clone();
    let _unix = Server::start(&img, &["--socket", sock.to_str().unwrap()], move || s.exists());
    let unix_url = format!("nbd+unix:///vm?socket={}", sock.display());
    assert_eq!(hash(&[&unix_url]).ok_json()["root"], want);
    let r = push_to(Path::new(&unix_url), &p.source, &p.agent, "t0", &[]).ok_json();
    assert_eq!(r["consistency"], "fuzzy", "an export served by anyone may be written meanwhile: {r}");
    compare(&raw, &p.dir.join("t0.img")).unwrap();

    let port = crate::agents::free_udp_port();
    let listen = ["--bind", "127.0.0.1", "--port"];
    let port_s = port.to_string();
    let _tcp = Server::start(&img, &[listen[0], listen[1], listen[2], &port_s], move || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let tcp_url = format!("nbd://127.0.0.1:{port}/vm");
    assert_eq!(hash(&[&tcp_url]).ok_json()["root"], want);
    push_to(Path::new(&tcp_url), &p.source, &p.agent, "t1", &[]).ok();
    compare(&raw, &p.dir.join("t1.img")).unwrap();

    // An export that does not exist, a socket nobody listens on.
    let missing = format!("nbd+unix:///nope?socket={}", sock.display());
    hash(&[&missing]).expect_json_error("E_NOT_FOUND", 3);
    let dead = format!("nbd+unix:///vm?socket={}", p.dir.join("none.sock").display());
    hash(&[&dead]).expect_json_error("E_CONNECTION", 4);
}

/// How the fake server misbehaves once the handshake is done.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    WrongCookie,
    Stall,
    ExtentPastEnd,
    ErrorMidRead,
    ShortRead,
    Garbage,
    HugeChunk,
    EndlessErrors,
    Overlap,
}

fn be(v: u64, n: usize) -> Vec<u8> {
    v.to_be_bytes()[8 - n..].to_vec()
}

fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = be(0x668e_33ef, 4);
    v.extend(be(u64::from(flags), 2));
    v.extend(be(u64::from(kind), 2));
    v.extend(be(cookie, 8));
    v.extend(be(payload.len() as u64, 4));
    v.extend_from_slice(payload);
    v
}

/// One connection: a correct handshake (export of `size` bytes with
/// `base:allocation` as context 1), then requests answered as `how` says.
fn fake_server(listener: UnixListener, size: u64, how: Hostile) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut out = b"NBDMAGIC".to_vec();
        out.extend(be(0x4948_4156_454f_5054, 8));
        out.extend(be(3, 2));
        let reply = |out: &mut Vec<u8>, opt: u64, kind: u64, data: &[u8]| {
            out.extend(be(0x0003_e889_0455_65a9, 8));
            out.extend(be(opt, 4));
            out.extend(be(kind, 4));
            out.extend(be(data.len() as u64, 4));
            out.extend_from_slice(data);
        };
        reply(&mut out, 8, 1, &[]);
        let mut ctx = be(1, 4);
        ctx.extend_from_slice(b"base:allocation");
        reply(&mut out, 10, 4, &ctx);
        reply(&mut out, 10, 1, &[]);
        let mut info = be(0, 2);
        info.extend(be(size, 8));
        info.extend(be(1, 2));
        reply(&mut out, 7, 3, &info);
        reply(&mut out, 7, 1, &[]);
        if s.write_all(&out).is_err() {
            return;
        }
        // The client's flags and three options.
        let mut flags = [0u8; 4];
        if s.read_exact(&mut flags).is_err() {
            return;
        }
        for _ in 0..3 {
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let mut data = vec![0u8; u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize];
            if s.read_exact(&mut data).is_err() {
                return;
            }
        }
        let mut req = [0u8; 28];
        while s.read_exact(&mut req).is_ok() {
            let kind = u16::from_be_bytes([req[6], req[7]]);
            let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
            let offset = u64::from_be_bytes(req[16..24].try_into().unwrap());
            let len = u64::from(u32::from_be_bytes(req[24..28].try_into().unwrap()));
            let answer = match (how, kind) {
                (_, 2) => return,
                (Hostile::Stall, _) => {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                (Hostile::WrongCookie, _) => structured(1, 0, cookie + 1000, &[]),
                (Hostile::Garbage, _) => b"this is not an NBD reply at all".to_vec(),
                (Hostile::HugeChunk, _) => {
                    let mut v = structured(1, 1, cookie, &[]);
                    v[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                    v
                }
                (Hostile::ExtentPastEnd, 7) => {
                    let mut p = be(1, 4);
                    p.extend(be(len + size, 4));
                    p.extend(be(0, 4));
                    structured(1, 5, cookie, &p)
                }
                (_, 7) => {
                    let mut p = be(1, 4);
                    p.extend(be(len, 4));
                    p.extend(be(0, 4));
                    structured(1, 5, cookie, &p)
                }
                (Hostile::EndlessErrors, _) => {
                    // Error chunks that never end their reply, as fast as it reads them.
                    let mut p = be(5, 4);
                    p.extend(be(0, 2));
                    let one = structured(0, (1 << 15) | 1, cookie, &p);
                    while s.write_all(&one).is_ok() {}
                    return;
                }
                (Hostile::Overlap, _) => {
                    let mut a = be(offset, 8);
                    a.extend(vec![1u8; len as usize / 2 + 10]);
                    let mut b = be(offset + len / 2, 8);
                    b.extend(vec![2u8; (len - len / 2) as usize]);
                    let mut v = structured(0, 1, cookie, &a);
                    v.extend(structured(1, 1, cookie, &b));
                    v
                }
                (Hostile::ErrorMidRead, _) => {
                    let mut p = be(5, 4);
                    p.extend(be(3, 2));
                    p.extend_from_slice(b"bad");
                    structured(1, (1 << 15) | 1, cookie, &p)
                }
                (_, _) => {
                    // Hostile::ShortRead (and ExtentPastEnd's reads): half the bytes.
                    let mut p = be(offset, 8);
                    p.extend(vec![9u8; (len / 2).max(1) as usize]);
                    structured(1, 1, cookie, &p)
                }
            };
            if s.write_all(&answer).is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_hostile_nbd_server_gets_typed_errors_not_panics_or_hangs() {
    let tmp = tempdir("nbd-hostile");
    for how in [
        Hostile::WrongCookie,
        Hostile::Stall,
        Hostile::ExtentPastEnd,
        Hostile::ErrorMidRead,
        Hostile::ShortRead,
        Hostile::Garbage,
        Hostile::HugeChunk,
        Hostile::EndlessErrors,
        Hostile::Overlap,
    ] {
        let sock = tmp.path().join(format!("{how:?}.sock"));
        let server = fake_server(UnixListener::bind(&sock).unwrap(), 8 * MIB, how);
        let url = format!("nbd+unix:///x?socket={}", sock.display());
        let start = Instant::now();
        let out = util::run_env(
            &["hash".as_ref(), url.as_ref(), "--json".as_ref()],
            &[("DISKFERRY_NBD_TIMEOUT", "2".as_ref())],
        );
        let secs = start.elapsed().as_secs_f64();
        assert!(out.code != 0 && out.code != 101, "{how:?}: exit {} {}", out.code, out.stderr);
        let e = out.json();
        assert!(e["code"].as_str().is_some_and(|c| c.starts_with("E_")), "{how:?}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| m.contains("NBD")), "{how:?}: {e}");
        assert!(secs < 20.0, "{how:?} took {secs:.1} s");
        drop(server);
    }
}

fn bitmaps(image: &Path) -> Vec<(String, bool)> {
    let o = Command::new("qemu-img").args(["info", "--output=json", "--force-share"]).arg(image).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = v["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|b| {
            let in_use = b["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "in-use"));
            (b["name"].as_str().unwrap().to_string(), in_use)
        })
        .collect()
}

/// The bitmap lifecycle: started after each push, read by the next one
/// (only the dirty extents), rotated after its commit; removed, or left in
/// use by a writer killed with -9 → a full read, still byte-exact.
#[test]
fn dirty_bitmaps_of_a_qcow2_image() {
    need_qemu();
    let p = pair("nbd-bitmap", 1, "");
    let img = p.dir.join("vm.qcow2");
    let tgt = p.dir.join("t0.img");
    let size = 64 * MIB;
    qcow2(&img, size, &[(0, 20 * MIB, 0x11), (30 * MIB + 7, 5 * MIB, 0x22)]);
    let args = ["--format", "qcow2", "--changes", "dirty-bitmap"];
    let first = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(first["change_source"], "full-scan");
    assert!(first["change_note"].as_str().is_some_and(|n| n.contains("no history")), "{first}");
    let gen = first["generation"].as_str().unwrap().to_string();
    assert_eq!(bitmaps(&img), vec![(format!("diskferry-{gen}"), false)]);

    // Writes at unaligned offsets and sizes.
    qemu_io(&img, &[(3 * MIB + 5, 70_000, 0x33), (40 * MIB + 4095, 2, 0x44), (63 * MIB, 12_345, 0x55)]);
    // The storage daemon opens the image read-write (for its bitmaps): the
    // guest's bytes must come out of the push as they went in.
    let before = p.dir.join("before.raw");
    std::fs::rename(raw_of(&img), &before).unwrap();
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "dirty-bitmap", "{r}");
    assert_eq!(r["read_through"], "qemu-storage-daemon", "{r}");
    compare(&raw_of(&img), &before).expect("the push changed the guest's bytes");
    compare(&before, &tgt).unwrap();
    let hinted = uint(&r, "hinted_blocks");
    assert!((3..=8).contains(&hinted), "the bitmap names about the written blocks: {r}");
    let read = uint(&r, "source_bytes_read");
    let bound = 2 * hinted * 65536 + uint(&r, "spot_checked_blocks") * 65536 + size / 100;
    assert!(read <= bound, "read {read} > {bound}: {r}");
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(bitmaps(&img), vec![(format!("diskferry-{gen}"), false)], "rotated");

    // Removed: a full read that says why, and a new bitmap after it.
    sh("qemu-img", &["bitmap", "--remove", img.to_str().unwrap(), &format!("diskferry-{gen}")]);
    qemu_io(&img, &[(10 * MIB + 1, 1000, 0x66)]);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "full-scan", "{r}");
    assert!(r["change_note"].as_str().is_some_and(|n| n.contains("no bitmap")), "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(bitmaps(&img), vec![(format!("diskferry-{gen}"), false)]);

    // A writer killed with -9 leaves the bitmap in use: not trusted.
    killed_with_the_image_open(&img, b"write -P 119 5000 300000\n", Duration::from_millis(300));
    assert!(bitmaps(&img).iter().any(|b| b.1), "left in use");
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "full-scan", "{r}");
    assert!(r["change_note"].as_str().is_some_and(|n| n.contains("in use")), "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
    p.agent.verify(&tgt).ok();
    // A disabled bitmap records nothing: not trusted either.
    let gen = r["generation"].as_str().unwrap().to_string();
    sh("qemu-img", &["bitmap", "--disable", img.to_str().unwrap(), &format!("diskferry-{gen}")]);
    qemu_io(&img, &[(33 * MIB, 5000, 0x78)]);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "full-scan", "{r}");
    assert!(r["change_note"].as_str().is_some_and(|n| n.contains("disabled")), "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
    // Left in use by a reader killed with -9, nothing written since: a full
    // read finds the target unchanged, and this push's bitmap takes the
    // kept one's place (QEMU cannot merge into a bitmap in use).
    let gen = r["generation"].as_str().unwrap().to_string();
    killed_with_the_image_open(&img, b"", Duration::ZERO);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!((&r["change_source"], &r["generation"]), (&"full-scan".into(), &gen.clone().into()), "{r}");
    assert_eq!(bitmaps(&img), vec![(format!("diskferry-{gen}"), false)], "one bitmap, not in use");
    qemu_io(&img, &[(12 * MIB + 9, 777, 0x21)]);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "dirty-bitmap", "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
    // Dirty bitmaps need a qcow2 image.
    push_to(&raw_of(&img), &p.source, &p.agent, "t0", &["--changes", "dirty-bitmap"]).expect_json_error("E_USAGE", 2);
}

/// A `qemu-io` on `image` given `commands`, SIGKILLed `settle` after it
/// opened the image (its bitmaps marked in use).
fn killed_with_the_image_open(image: &Path, commands: &[u8], settle: Duration) {
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    holder.stdin.as_mut().unwrap().write_all(commands).unwrap();
    let t = Instant::now();
    while !bitmaps(image).iter().any(|b| b.1) {
        assert!(t.elapsed() < Duration::from_secs(20), "qemu-io never opened the image");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(settle);
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// The pid of a `qemu-storage-daemon` serving `image`, if one runs.
fn storage_daemon_of(image: &Path) -> Option<i32> {
    process_serving(b"qemu-storage-daemon", image)
}

/// The pid of a live `program` whose arguments name `image`, if one runs.
fn process_serving(program: &[u8], image: &Path) -> Option<i32> {
    let image = image.to_str().unwrap().as_bytes();
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
        let ours = cmdline.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(program));
        (ours && !zombie && cmdline.windows(image.len()).any(|w| w == image)).then_some(pid)
    })
}

/// The directory holding the monitor socket of storage daemon `pid`.
fn monitor_dir_of(pid: i32) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let chardev = cmdline.split(|b| *b == 0).find(|a| a.starts_with(b"socket,")).expect("a monitor chardev");
    let chardev = String::from_utf8_lossy(chardev);
    let path = chardev.split(",path=").nth(1).expect("a socket path");
    Path::new(path).parent().unwrap().to_path_buf()
}

/// A 32 MiB qcow2 image pushed slowly (`--bwlimit 2M`) with `args`, once
/// `program` serves it: the pair, the image, the target, the push and the
/// server's pid.
fn slow_push_served_by(
    name: &str,
    program: &[u8],
    args: &[&str],
) -> (crate::agents::Pair, PathBuf, PathBuf, std::process::Child, i32) {
    need_qemu();
    let p = pair(name, 1, "");
    let (img, raw, tgt) = (p.dir.join("vm.qcow2"), p.dir.join("random.raw"), p.dir.join("t0.img"));
    util::random_disk(&raw, 32 * MIB, &mut util::rng(name));
    sh("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), img.to_str().unwrap()]);
    let slow = crate::agents::spawn_push(&img, &p.source, &p.agent, "t0", &[args, &["--bwlimit", "2M"]].concat());
    let t = Instant::now();
    let pid = loop {
        if let Some(pid) = process_serving(program, &img) {
            break pid;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no {} started", String::from_utf8_lossy(program));
        std::thread::sleep(Duration::from_millis(20));
    };
    (p, img, tgt, slow, pid)
}

/// An image at rest is served by a storage daemon diskferry starts for
/// the push: a second push of the image meanwhile is refused as busy, and
/// a push killed with -9 leaves its daemon holding the image's lock, which
/// the next push stops (its bitmaps stored) before going on.
#[test]
fn a_killed_pushs_storage_daemon_is_stopped_by_the_next_push() {
    let args = ["--format", "qcow2", "--changes", "dirty-bitmap"];
    let (p, img, tgt, mut slow, daemon) = slow_push_served_by("nbd-qsd", b"qemu-storage-daemon", &args);
    push_to(&img, &p.source, &p.agent, "t0", &args).expect_json_error("E_BUSY", 3);
    std::thread::sleep(Duration::from_millis(500));
    slow.kill().unwrap();
    slow.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(storage_daemon_of(&img), Some(daemon), "the daemon outlived its push");
    // Its monitor's directory is an orphan now: any push on this host that
    // starts a storage daemon removes it (in the whole suite, another
    // test's may come first), and the next push of this image must.
    let monitor = monitor_dir_of(daemon);

    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(storage_daemon_of(&img), None, "every daemon stopped: {r}");
    assert!(!monitor.exists(), "the leftover's monitor directory {} stayed", monitor.display());
    assert_eq!(r["read_through"], "qemu-storage-daemon", "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
    // The leftover's bitmap did not spoil the chain: the next push is hinted.
    qemu_io(&img, &[(5 * MIB + 3, 10_000, 0x42)]);
    let r = push_to(&img, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "dirty-bitmap", "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
    let gen = r["generation"].as_str().unwrap().to_string();
    assert_eq!(bitmaps(&img), vec![(format!("diskferry-{gen}"), false)]);

    // A qcow2 on a block device (an LV, here a loop device) is served too;
    // the device has room for the clusters its bitmaps take.
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len((len / MIB + 16) * MIB).unwrap();
    let dev = util::Loop::attach(&img);
    let on_dev = ["--format", "qcow2", "--changes", "dirty-bitmap", "--force"];
    let r = push_to(&dev.dev, &p.source, &p.agent, "t0", &on_dev).ok_json();
    assert_eq!(r["read_through"], "qemu-storage-daemon", "{r}");
    qemu_io(&dev.dev, &[(9 * MIB + 1, 3000, 0x43)]);
    let r = push_to(&dev.dev, &p.source, &p.agent, "t0", &args).ok_json();
    assert_eq!(r["change_source"], "dirty-bitmap", "{r}");
    compare(&raw_of(&img), &tgt).unwrap();
}

/// A push killed with -9 while it read an image through its own read-only
/// `qemu-nbd` leaves that `qemu-nbd` running, holding the image's lock (a
/// VM could not start on it); the next push stops it and removes its
/// socket's directory.
#[test]
fn a_killed_pushs_qemu_nbd_is_stopped_by_the_next_push() {
    let (p, img, tgt, mut slow, orphan) = slow_push_served_by("nbd-orphan", b"qemu-nbd", &["--format", "qcow2"]);
    std::thread::sleep(Duration::from_millis(500));
    slow.kill().unwrap();
    slow.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(process_serving(b"qemu-nbd", &img), Some(orphan), "qemu-nbd ended with its push");
    let socket_dir = {
        let cmdline = std::fs::read(format!("/proc/{orphan}/cmdline")).unwrap();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let at = args.iter().position(|a| *a == b"--socket").expect("a --socket argument");
        Path::new(&*String::from_utf8_lossy(args[at + 1])).parent().unwrap().to_path_buf()
    };
    assert!(socket_dir.is_dir());

    push_to(&img, &p.source, &p.agent, "t0", &["--format", "qcow2"]).ok_json();
    assert_eq!(process_serving(b"qemu-nbd", &img), None, "a qemu-nbd still serves the image");
    assert!(!socket_dir.exists(), "the orphan's directory {} stayed", socket_dir.display());
    compare(&p.dir.join("random.raw"), &tgt).unwrap();
    // Nothing holds the image's lock any more.
    qemu_io(&img, &[(0, 4096, 0x17)]);
}
