//! Progress of long commands on stderr (`--progress`): a bar on a
//! terminal (`auto`, `bar`), JSON lines for orchestrators (`json`: one
//! object per phase change and about once a second, with `phase`,
//! `bytes_done`, `bytes_total`, `rate` and `eta_seconds`), or nothing.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use diskferry_sync_engine::local::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// `--progress`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else nothing.
    #[default]
    Auto,
    /// A bar.
    Bar,
    /// JSON lines.
    Json,
    /// Nothing.
    None,
}

static MODE: OnceLock<ProgressMode> = OnceLock::new();

/// Sets the process's mode (once, from the command line).
pub fn set_mode(m: ProgressMode) {
    let _ = MODE.set(m);
}

pub fn mode() -> ProgressMode {
    MODE.get().copied().unwrap_or_default()
}

/// How often a JSON line is written while a phase runs.
const JSON_EVERY: Duration = Duration::from_secs(1);

struct JsonState {
    phase: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
}

/// Progress in the process's mode.
pub struct Bar {
    bar: Option<ProgressBar>,
    json: Option<Arc<Mutex<JsonState>>>,
    /// Stops the thread that writes a JSON line every second.
    ticking: Arc<AtomicBool>,
    /// The command's job on the local agent's page.
    job: Option<Arc<crate::local_agent::AgentJob>>,
}

impl Bar {
    pub fn new() -> Bar {
        let m = mode();
        if m == ProgressMode::Json {
            let now = Instant::now();
            let s = Arc::new(Mutex::new(JsonState { phase: "starting", total: 0, done: 0, started: now, last: now }));
            let ticking = Arc::new(AtomicBool::new(true));
            // A line about once a second even while nothing advances (a
            // paced push sends long after it hashed).
            let (state, on) = (s.clone(), ticking.clone());
            let _ = std::thread::Builder::new().name("df-progress".into()).spawn(move || {
                while on.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    if on.load(Ordering::Relaxed) && s.last.elapsed() >= JSON_EVERY {
                        s.last = Instant::now();
                        emit(&s, false);
                    }
                }
            });
            return Bar { bar: None, json: Some(s), ticking, job: None };
        }
        let wanted = match m {
            ProgressMode::Bar => true,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            _ => false,
        };
        if !wanted {
            return Bar { bar: None, json: None, ticking: Arc::default(), job: None };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Bar { bar: Some(bar), json: None, ticking: Arc::default(), job: None }
    }

    /// Also reports the progress to the command's job on the local agent.
    pub fn reporting(mut self, job: Arc<crate::local_agent::AgentJob>) -> Bar {
        self.job = Some(job);
        self
    }

    /// Clears the bar (a JSON line says the last phase is done).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(j) = &self.json {
            let s = j.lock().unwrap_or_else(|p| p.into_inner());
            if self.ticking.swap(false, Ordering::Relaxed) {
                emit(&s, true);
            }
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

fn emit(s: &JsonState, done: bool) {
    let secs = s.started.elapsed().as_secs_f64().max(1e-3);
    let rate = s.done as f64 / secs;
    let eta = (rate > 0.0 && s.total > s.done).then(|| ((s.total - s.done) as f64 / rate * 10.0).round() / 10.0);
    let mut v = json!({
        "phase": s.phase,
        "bytes_done": s.done,
        "bytes_total": s.total,
        "rate": rate.round() as u64,
        "eta_seconds": eta,
    });
    if done {
        v["done"] = json!(true);
    }
    let _ = writeln!(std::io::stderr().lock(), "{v}");
}

impl Progress for Bar {
    fn phase(&self, name: &'static str, total: u64) {
        if let Some(j) = &self.job {
            j.phase(name, total);
        }
        if let Some(b) = &self.bar {
            b.set_message(name);
            b.set_length(total);
            b.set_position(0);
            b.reset_eta();
        }
        if let Some(j) = &self.json {
            let mut s = j.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            *s = JsonState { phase: name, total, done: 0, started: now, last: now };
            emit(&s, false);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(j) = &self.job {
            j.advance(bytes);
        }
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
        if let Some(j) = &self.json {
            let mut s = j.lock().unwrap_or_else(|p| p.into_inner());
            s.done += bytes;
            if s.last.elapsed() >= JSON_EVERY {
                s.last = Instant::now();
                emit(&s, false);
            }
        }
    }
}
