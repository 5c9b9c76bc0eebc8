//! Operator commands run around a push: snapshot hooks, snapshot and
//! cleanup commands (and the quiesce command of `failover-sync`). Each runs
//! under `sh -c` in its own process group, with a timeout after which the
//! whole group is killed; a failure or a timeout is `E_HOOK`, naming the
//! hook and its exit status.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;

/// What a hook printed on stdout (trimmed), once it exited 0.
pub fn run(name: &str, cmd: &str, args: &[&OsStr], env: &[(&str, &OsStr)], timeout: Duration) -> Result<String, Error> {
    run_timed(name, cmd, args, env, timeout).map(|(out, _)| out)
}

/// [`run`], also telling when the command exited.
pub fn run_timed(
    name: &str,
    cmd: &str,
    args: &[&OsStr],
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> Result<(String, Instant), Error> {
    let failed = |why: String| {
        Error::new(ErrorCode::Hook, format!("the {name} hook `{cmd}` {why}"))
            .hint(format!("fix the {name} command (it runs under `sh -c`), or raise --hook-timeout"))
    };
    // `$@` lets the command take its arguments (a snapshot path) last.
    let script = if args.is_empty() { cmd.to_string() } else { format!("{cmd} \"$@\"") };
    let mut c = Command::new("sh");
    c.arg("-c").arg(&script).arg(name).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).process_group(0);
    let mut child = c.spawn().map_err(|e| failed(format!("could not start: {e}")))?;
    // Read stdout on a thread, so a chatty hook cannot block on a full pipe;
    // what it printed is kept as it arrives (up to 1 MiB, the rest drained).
    let out = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut stdout = child.stdout.take();
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Some(Ok(n @ 1..)) = stdout.as_mut().map(|s| s.read(&mut buf)) {
            let mut o = sink.lock().unwrap_or_else(|p| p.into_inner());
            let room = (1usize << 20).saturating_sub(o.len());
            o.extend_from_slice(&buf[..n.min(room)]);
        }
        let _ = done_tx.send(());
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(failed(format!("did not finish within {} s and was killed", timeout.as_secs())));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(failed(format!("could not be waited for: {e}")));
            }
        }
    };
    let exited = Instant::now();
    // What it started in the background may hold the pipe open past its
    // exit (and may be meant to keep running): take what came meanwhile.
    let _ = done_rx.recv_timeout(Duration::from_secs(2));
    let out = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    if !status.success() {
        let why = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "failed".to_string(),
        };
        return Err(failed(why));
    }
    Ok((String::from_utf8_lossy(&out).trim().to_string(), exited))
}

fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn output_status_and_timeout() {
        assert_eq!(run("x", "echo hi; echo there", &[], &[], T).unwrap(), "hi\nthere");
        assert_eq!(run("x", "echo", &[OsStr::new("a b")], &[], T).unwrap(), "a b");
        assert_eq!(run("x", "echo $V", &[], &[("V", OsStr::new("v1"))], T).unwrap(), "v1");
        let e = run("pre-snapshot", "exit 3", &[], &[], T).unwrap_err();
        assert_eq!(e.code, ErrorCode::Hook);
        assert!(e.message.contains("pre-snapshot") && e.message.contains("status 3"), "{}", e.message);
        let start = Instant::now();
        let e = run("post-snapshot", "sleep 30 & sleep 30", &[], &[], Duration::from_millis(300)).unwrap_err();
        assert!(e.message.contains("did not finish within"), "{}", e.message);
        assert!(start.elapsed() < Duration::from_secs(5), "the whole group was killed");
        let e = run("x", "kill -9 $$", &[], &[], T).unwrap_err();
        assert!(e.message.contains("signal 9"), "{}", e.message);
        // A helper left running in the background with the pipe: the path
        // printed before still counts, at once.
        let start = Instant::now();
        assert_eq!(run("x", "echo /snap; (sleep 5 &)", &[], &[], T).unwrap(), "/snap");
        assert!(start.elapsed() < Duration::from_secs(4));
        // Output past 1 MiB is drained, not a broken pipe.
        assert_eq!(
            run("x", "head -c 3000000 /dev/zero | tr '\\0' a; echo", &[], &[], T).map(|s| s.len()).ok(),
            Some(1 << 20)
        );
    }
}
