//! The jobs page in a real browser: Debian's Chromium, headless, loads the
//! agent's page while a push runs (its progress bar advances between two
//! loads) and after a move failed (its error code and hint are shown).
//! Screenshots of both are kept in `target/tmp/artefacts/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::agents::{free_udp_port, push_to, spawn_push, Agent, Identity, TargetSpec};
use crate::util::*;

fn chromium() -> &'static str {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return c;
        }
    }
    panic!("no Chromium: .ci/run installs Debian's `chromium` (apt-get install chromium)");
}

/// Flags for a headless run as root, with a profile of its own.
fn browser(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--hide-scrollbars");
    c
}

/// The page as the browser built it (after parsing, before its refresh).
fn dom(profile: &Path, url: &str) -> String {
    let out = browser(profile).args(["--dump-dom", url]).output().unwrap();
    assert!(out.status.success(), "chromium --dump-dom: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(profile: &Path, url: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    let _ = std::fs::remove_file(&file);
    let out = browser(profile)
        .arg(format!("--screenshot={}", file.display()))
        .args(["--window-size=1600,700", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium --screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&file).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{}: {} bytes", file.display(), png.len());
    eprintln!("screenshot kept: {}", file.display());
    file
}

/// The value of job `id`'s progress bar in the DOM.
fn progress_of(dom: &str, id: u64) -> Option<u64> {
    let row = &dom[dom.find(&format!("id=\"job-{id}\""))?..];
    let row = &row[..row.find("</tr>")?];
    let v = &row[row.find("<progress value=\"")? + "<progress value=\"".len()..];
    v[..v.find('"')?].parse().ok()
}

#[test]
fn the_jobs_page_in_a_headless_browser_shows_progress_and_errors() {
    let mut rng = rng("jobs-page");
    let tmp = tempdir("jobs-page");
    let dir = tmp.path();
    let profile = dir.join("chromium-profile");
    let disk = dir.join("vm.img");
    make_disk(&disk, 32 * MIB, 1.0, &mut rng);
    let source = Identity::init(dir, "source-state");
    let status = free_udp_port();
    let spec = [TargetSpec { name: "vm", path: dir.join("vm.replica"), allowed: &["src"] }];
    let b =
        Agent::start(dir, &[("src", &source.fingerprint)], &spec, &format!("status_listen = \"127.0.0.1:{status}\""));
    let url = format!("http://127.0.0.1:{status}/");

    // A push paced to 1 MiB/s: about 30 s to watch.
    let mut push = KillOnDrop(spawn_push(&disk, &source, &b, "vm", &["--bwlimit", "1M"]));
    let mut id = 0;
    wait_for("the receive job to show progress", Duration::from_secs(30), || {
        let jobs = http_json(status, "/api/jobs", None);
        let running =
            jobs.as_array().unwrap().iter().find(|j| j["kind"] == "receive" && j["result"].is_null()).cloned();
        id = running.as_ref().and_then(|j| j["id"].as_u64()).unwrap_or(0);
        running.is_some_and(|j| j["bytes_done"].as_u64() > Some(0))
    });
    let first = dom(&profile, &url);
    assert!(first.contains("http-equiv=\"refresh\""), "the page refreshes by itself:\n{first}");
    assert!(!first.contains("src=\"http") && !first.contains("href=\"http"), "no external assets:\n{first}");
    let before = progress_of(&first, id).unwrap_or_else(|| panic!("no progress bar for job {id}:\n{first}"));
    std::thread::sleep(Duration::from_secs(3));
    let second = dom(&profile, &url);
    let after = progress_of(&second, id).unwrap_or_else(|| panic!("no progress bar for job {id}:\n{second}"));
    assert!(after > before, "job {id}'s bar did not advance: {before} then {after}");
    assert!(second.contains("running"), "{second}");
    screenshot(&profile, &url, "jobs-page-running.png");
    let out = push.0.wait().unwrap();
    assert!(out.success());
    push_to(&disk, &source, &b, "vm", &[]).ok();

    // A failed move: its code and hint are on the page.
    let bogus = "0123456789abcdef0123456789abcdef";
    df!("failover", "vm", "--config", b.config, "--point", bogus).expect_error("E_NO_SUCH_POINT", 3);
    let page = dom(&profile, &url);
    let row_at = page.find("<td>failover</td>").unwrap_or_else(|| panic!("no failover row:\n{page}"));
    let row = &page[row_at..row_at + page[row_at..].find("</tr>").unwrap()];
    assert!(row.contains("error[E_NO_SUCH_POINT]"), "{row}");
    assert!(row.contains("class=\"hint\"") && row.contains("diskferry points"), "the hint is shown: {row}");
    screenshot(&profile, &url, "jobs-page-failed.png");
}
