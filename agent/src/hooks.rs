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
    // What it printed first (a path, an id) is what it answers.
    let out = Drained::start(child.stdout.take(), Keep::Head(1 << 20));
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
    let out = out.take(Duration::from_secs(2));
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

/// Which bytes of a pipe's output are kept.
#[derive(Clone, Copy)]
pub enum Keep {
    /// The first n bytes.
    Head(usize),
    /// The last n bytes (about: whole reads of up to 8 KiB).
    Tail(usize),
}

/// A child's pipe read to its end on a thread, so a chatty child cannot
/// block on a full pipe, keeping a bounded part of what came.
pub struct Drained {
    kept: Arc<Mutex<Vec<u8>>>,
    ended: std::sync::mpsc::Receiver<()>,
}

impl Drained {
    pub fn start(pipe: Option<impl Read + Send + 'static>, keep: Keep) -> Drained {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let (tx, ended) = std::sync::mpsc::channel();
        let sink = kept.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut pipe = pipe;
            while let Some(Ok(n @ 1..)) = pipe.as_mut().map(|p| p.read(&mut buf)) {
                let mut k = sink.lock().unwrap_or_else(|p| p.into_inner());
                match keep {
                    Keep::Head(max) => {
                        let room = max.saturating_sub(k.len());
                        k.extend_from_slice(&buf[..n.min(room)]);
                    }
                    Keep::Tail(max) => {
                        k.extend_from_slice(&buf[..n]);
                        // Cut in halves: each byte is moved about once.
                        if k.len() > 2 * max {
                            let cut = k.len() - max;
                            k.drain(..cut);
                        }
                    }
                }
            }
            let _ = tx.send(());
        });
        Drained { kept, ended }
    }

    /// What was kept, once the pipe ended or `linger` passed: what the
    /// child started in the background may hold the pipe open past its
    /// exit (and may be meant to keep running).
    pub fn take(self, linger: Duration) -> Vec<u8> {
        let _ = self.ended.recv_timeout(linger);
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(|p| p.into_inner()))
    }
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

    #[test]
    fn a_drained_tail_is_bounded_and_ends_with_the_last_line() {
        // 40 MB in 8 KiB reads: every read kept whole (or copied whole)
        // would take gigabytes.
        let mut c = Command::new("sh");
        c.arg("-c").arg("head -c 40000000 /dev/zero | tr '\\0' a; echo; echo '{\"ok\":true}'");
        let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
        let out = Drained::start(child.stdout.take(), Keep::Tail(64 << 10));
        child.wait().unwrap();
        let kept = out.take(Duration::from_secs(10));
        assert!(kept.len() >= 64 << 10 && kept.len() <= 128 << 10, "{} bytes kept", kept.len());
        assert!(kept.ends_with(b"a\n{\"ok\":true}\n"));
    }
}
