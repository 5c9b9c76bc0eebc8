//! What a package ships and systemd relies on: the unit verifies clean,
//! the man pages render and name every command, bash loads the
//! completions, `--version` says what was built, the example config
//! parses, and `serve` speaks systemd's notify protocol (ready only once it
//! listens, watchdog pings, reloading, stopping).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agents::{free_udp_port, Identity};
use crate::util::*;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `systemd-analyze verify` on `unit`: its whole output (clean is empty).
fn verify(unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(unit).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.trim().to_string())
}

#[test]
fn the_systemd_unit_verifies_clean() {
    let dir = tempdir("unit");
    let unit = std::fs::read_to_string(repo().join("packaging/diskferry.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/diskferry serve"), "{unit}");
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/usr/bin/diskferry reload",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.contains(key), "the unit sets {key}");
    }
    // Verified against the binary just built (verify checks it exists).
    let here = dir.path().join("diskferry.service");
    std::fs::write(&here, unit.replace("/usr/bin/diskferry", &bin().display().to_string())).unwrap();
    let (ok, text) = verify(&here);
    assert!(ok && text.is_empty(), "systemd-analyze verify: {text}");
    // The check can fail: a mistyped key is reported.
    let bad = dir.path().join("bad.service");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&here).unwrap().replace("ProtectSystem=strict", "ProtectSystem=sideways"),
    )
    .unwrap();
    let (_, text) = verify(&bad);
    assert!(text.contains("sideways"), "{text}");
}

#[test]
fn man_pages_render_and_name_every_command() {
    let dir = tempdir("man");
    let out = dir.path().join("man1");
    let listed = df!("man", "--out", out, "--json").ok_json();
    let pages: Vec<String> =
        listed["pages"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let help = df!("--help").ok().stdout;
    // Every command in --help has a page, and the main page names it.
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // Wrapped descriptions are indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 20, "{help}");
    let render = |page: &Path| {
        let o = Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        assert!(o.status.success(), "man -l {}: {}", page.display(), String::from_utf8_lossy(&o.stderr));
        // Without a terminal, man still overstrikes bold (`N\bN`): plain text.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&o.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        text
    };
    let main = render(&out.join("diskferry.1"));
    for c in &commands {
        let page = out.join(format!("diskferry-{c}.1"));
        assert!(pages.iter().any(|p| Path::new(p) == page), "no page for {c}: {pages:?}");
        assert!(main.contains(c), "diskferry(1) does not name {c}");
        let text = render(&page);
        // A command with subcommands (plan) lists them instead of options.
        let body =
            if *c == "plan" { text.contains("run") && text.contains("cleanup") } else { text.contains("--json") };
        assert!(text.contains("SYNOPSIS") && body, "{c}:\n{text}");
    }
    // Nested commands too.
    assert!(render(&out.join("diskferry-plan-run.1")).contains("--planned"));
}

#[test]
fn bash_loads_the_completions_and_version_says_what_was_built() {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <({} completions bash) && complete -p diskferry && COMP_WORDS=(diskferry fail) COMP_CWORD=1 && _diskferry diskferry fail diskferry && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bin().display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("complete") && text.contains("diskferry"), "{text}");
    assert!(text.lines().any(|l| l == "failover") && text.lines().any(|l| l == "failover-sync"), "{text}");
    for shell in ["zsh", "fish"] {
        assert!(!df!("completions", shell).ok().stdout.is_empty());
    }
    let v = df!("--version").ok().stdout;
    assert!(v.starts_with(&format!("diskferry {}", env!("CARGO_PKG_VERSION"))), "{v}");
    assert!(v.contains("commit ") && v.contains("protocol ") && v.contains("features: "), "{v}");
    // The commit, from this checkout.
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(repo()).output().unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(head.is_empty() || v.contains(&head), "{v} (HEAD {head})");
}

#[test]
fn the_example_config_parses() {
    let dir = tempdir("example");
    let state = dir.path().join("state");
    let text = std::fs::read_to_string(repo().join("packaging/diskferry.toml")).unwrap();
    let port = free_udp_port();
    let file = dir.path().join("diskferry.toml");
    std::fs::write(&file, text.replace("0.0.0.0:7400", &format!("127.0.0.1:{port}"))).unwrap();
    Identity::init(dir.path(), "state");
    let mut child = KillOnDrop(spawn(&[
        "serve".as_ref(),
        "--config".as_ref(),
        file.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ]));
    std::thread::sleep(Duration::from_secs(1));
    assert!(child.0.try_wait().unwrap().is_none(), "serve stopped on the example config");
}

#[test]
fn serve_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let dir = tempdir("notify");
    let id = Identity::init(dir.path(), "state");
    let port = free_udp_port();
    let config = dir.path().join("serve.toml");
    let text = format!("listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n", id.state.display());
    std::fs::write(&config, &text).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // As systemd starts it: NOTIFY_SOCKET, and a watchdog for this very pid.
    let mut child = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "WATCHDOG_PID=$$ WATCHDOG_USEC=400000 exec {} serve --config {}",
                bin().display(),
                config.display()
            ))
            .env("NOTIFY_SOCKET", &socket_path)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = recv();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains(&format!("STATUS=serving on 127.0.0.1:{port}")), "{ready}");
    // Ready means it answers.
    df!("status", "--state-dir", id.state).ok();
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        if recv().lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3), "3 watchdog pings took {:?}", started.elapsed());
    let pid = child.0.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let mut seen = String::new();
    while !seen.contains("READY=1") {
        let m = recv();
        if !m.contains("WATCHDOG=1") || m.contains('\n') {
            seen += &m;
            seen.push('\n');
        }
    }
    assert!(seen.contains("RELOADING=1") && seen.contains("MONOTONIC_USEC="), "{seen}");
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut stopping = false;
    for _ in 0..20 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping);
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn the_deb_installs_into_a_fresh_root() {
    let dir = tempdir("deb");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // The binary the tests run, packaged as it is (no second build).
    let built = Command::new("bash")
        .arg(repo().join("packaging/build-deb.sh"))
        .env("PROFILE", "dev")
        .env("NO_BUILD", "1")
        .env("DEB_OUT", &out)
        .env("CARGO_TARGET_DIR", bin().parent().unwrap().parent().unwrap())
        .output()
        .unwrap();
    assert!(built.status.success(), "build-deb.sh: {}", String::from_utf8_lossy(&built.stderr));
    let deb = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    let deb = deb.unwrap_or_else(|| panic!("no .deb in {}", out.display()));

    // A fresh root with an empty dpkg database; libc is the host's.
    let root = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    let installed = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-script-chrootless", "--log=/dev/null", "-i"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(installed.status.success(), "dpkg -i: {}", String::from_utf8_lossy(&installed.stderr));

    let v = Command::new(root.join("usr/bin/diskferry")).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(v.starts_with("diskferry ") && v.contains("protocol "), "{v}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("var/lib/diskferry"), 0o700, "the state directory holds the private key");
    assert_eq!(mode("etc/diskferry/diskferry.toml"), 0o600);
    let conffiles = std::fs::read_to_string(root.join("var/lib/dpkg/info/diskferry.conffiles")).unwrap();
    assert!(conffiles.contains("/etc/diskferry/diskferry.toml"), "{conffiles}");
    let pages = std::fs::read_dir(root.join("usr/share/man/man1")).unwrap().count();
    assert!(pages >= 20, "{pages} man pages");
    for f in [
        "usr/share/bash-completion/completions/diskferry",
        "usr/share/zsh/vendor-completions/_diskferry",
        "usr/share/fish/vendor_completions.d/diskferry.fish",
        "usr/share/doc/diskferry/status.md",
    ] {
        assert!(root.join(f).is_file(), "{f} is installed");
    }
    // The installed unit verifies clean, run against the installed binary.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/diskferry.service")).unwrap();
    let here = dir.path().join("diskferry.service");
    std::fs::write(&here, unit.replace("/usr/bin/diskferry", &root.join("usr/bin/diskferry").display().to_string()))
        .unwrap();
    let (ok, text) = verify(&here);
    assert!(ok && text.is_empty(), "systemd-analyze verify: {text}");
}
