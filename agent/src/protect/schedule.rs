//! Running the `[[protect]]` entries inside `serve`: one task per disk (or
//! per replication group of entries), each pushing on its schedule, never
//! two pushes of one disk at once. A failed push is retried after a
//! capped exponential backoff with jitter (1 s, 2 s, 4 s … up to the
//! schedule, at most 5 min); a cut push resumes where it stopped (the
//! target keeps what it staged). Each push is a job; each disk's status
//! holds its RPO: the age of the newest consistent point its peer committed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskferry_protocol::message::SyncMode;
use diskferry_protocol::{BlockSize, Consistency, ErrorCode};
use diskferry_sync_engine::changes::SpotCheck;
use diskferry_sync_engine::Error;
use serde::Serialize;
use tokio::sync::watch;

use super::Protect;
use crate::identity::Identity;
use crate::jobs::{JobResult, Jobs};
use crate::push::{self, PushOptions, PushReport};

/// The longest wait between two tries of a failing disk.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One protected disk's state, as status and metrics show it.
#[derive(Clone, Debug, Serialize)]
pub struct Protected {
    pub disk: String,
    pub peer: String,
    pub target: String,
    pub group: Option<String>,
    pub every_seconds: f64,
    pub rpo_target_seconds: f64,
    /// The newest consistent point the peer committed, and when its data was read.
    pub last_point: Option<String>,
    pub last_point_unix_ns: Option<i64>,
    pub last_consistency: Option<String>,
    pub last_error: Option<String>,
    pub failures_in_a_row: u32,
    pub next_unix_ns: Option<i64>,
    pub running: bool,
}

impl Protected {
    /// The RPO now: the age of the newest consistent point (or of the
    /// agent's start, if none yet).
    pub fn rpo_seconds(&self, since_start_ns: i64) -> f64 {
        let now = crate::ids::now_unix_ns();
        let from = self.last_point_unix_ns.unwrap_or(since_start_ns);
        (now - from).max(0) as f64 / 1e9
    }

    pub fn over_rpo(&self, since_start_ns: i64) -> bool {
        self.rpo_seconds(since_start_ns) > self.rpo_target_seconds
    }
}

/// Every protected disk's status, by disk.
pub struct ProtectStatus {
    pub started_unix_ns: i64,
    disks: Mutex<BTreeMap<String, Protected>>,
}

impl ProtectStatus {
    pub fn list(&self) -> Vec<Protected> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    fn update(&self, disk: &str, f: impl FnOnce(&mut Protected)) {
        if let Some(p) = self.disks.lock().unwrap_or_else(|p| p.into_inner()).get_mut(disk) {
            f(p);
        }
    }
}

/// The running `[[protect]]` entries: one task per disk (per group of
/// entries), started, replaced and stopped as the config changes.
pub struct Protector {
    status: Arc<ProtectStatus>,
    units: BTreeMap<String, UnitTask>,
    /// Tasks told to stop, by the disks they push, until they ended.
    stopping: BTreeMap<String, Vec<watch::Receiver<()>>>,
    /// The daemon-wide limit and the one pacer every push shares.
    daemon_limit: Option<u64>,
    daemon_pace: Option<Arc<crate::pace::Pacer>>,
    id: Arc<Identity>,
    state_root: PathBuf,
    jobs: Arc<Jobs>,
    last_points: Arc<LastPoints>,
    /// The agent's shutdown.
    stop: watch::Receiver<bool>,
    tasks: tokio::task::JoinSet<()>,
}

/// A unit's task: what it runs, how to stop it, and how to know it stopped.
struct UnitTask {
    entries: Vec<Protect>,
    daemon_limit: Option<u64>,
    stop: watch::Sender<bool>,
    /// Its sender is dropped when the task ends.
    done: watch::Receiver<()>,
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Changed {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub replaced: Vec<String>,
    pub kept: usize,
}

/// Entries of one group go together (keyed by the group); the others alone (by disk).
fn units_of(entries: &[Protect]) -> BTreeMap<String, Vec<Protect>> {
    let mut units: BTreeMap<String, Vec<Protect>> = BTreeMap::new();
    for e in entries {
        let key = match &e.group {
            Some(g) => format!("group {g}"),
            None => format!("disk {}", e.disk()),
        };
        units.entry(key).or_default().push(e.clone());
    }
    units
}

impl Protector {
    /// Starts a task per protected disk (per group of entries) on the
    /// current runtime; they stop at a safe point when `stop` turns true.
    pub fn start(
        entries: &[Protect],
        id: Arc<Identity>,
        state_root: PathBuf,
        jobs: Arc<Jobs>,
        daemon_limit: Option<u64>,
        stop: watch::Receiver<bool>,
    ) -> Protector {
        let status =
            Arc::new(ProtectStatus { started_unix_ns: crate::ids::now_unix_ns(), disks: Mutex::new(BTreeMap::new()) });
        let last_points = Arc::new(LastPoints { file: state_root.join("protect.json"), write: Mutex::new(()) });
        let mut p = Protector {
            status,
            units: BTreeMap::new(),
            stopping: BTreeMap::new(),
            daemon_limit: None,
            daemon_pace: None,
            id,
            state_root,
            jobs,
            last_points,
            stop,
            tasks: tokio::task::JoinSet::new(),
        };
        p.apply(entries, daemon_limit);
        p
    }

    pub fn status(&self) -> Arc<ProtectStatus> {
        self.status.clone()
    }

    /// Runs `entries` from now on: new units start, removed ones stop at
    /// a safe point (after the push they are in, if any), changed ones are
    /// replaced once the old task stopped (never two pushes of one disk at
    /// once), and unchanged ones run on untouched.
    pub fn apply(&mut self, entries: &[Protect], daemon_limit: Option<u64>) -> Changed {
        if daemon_limit != self.daemon_limit || (self.daemon_pace.is_none() && daemon_limit.is_some()) {
            // One limit every push of the daemon shares, first come, first served.
            self.daemon_pace = daemon_limit.map(|r| Arc::new(crate::pace::Pacer::new(r)));
            self.daemon_limit = daemon_limit;
        }
        let wanted = units_of(entries);
        let mut changed = Changed::default();
        let stop = |old: UnitTask, stopping: &mut BTreeMap<String, Vec<watch::Receiver<()>>>| {
            let _ = old.stop.send(true);
            // Whatever unit pushes these disks next waits for this one.
            for e in &old.entries {
                stopping.entry(e.disk()).or_default().push(old.done.clone());
            }
        };
        let gone: Vec<String> = self.units.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(old) = self.units.remove(&key) {
                stop(old, &mut self.stopping);
                changed.stopped.push(key);
            }
        }
        let mut start = Vec::new();
        for (key, unit) in wanted {
            match self.units.remove(&key) {
                Some(old) if old.entries == unit && old.daemon_limit == daemon_limit => {
                    self.units.insert(key, old);
                    changed.kept += 1;
                }
                Some(old) => {
                    stop(old, &mut self.stopping);
                    changed.replaced.push(key.clone());
                    start.push((key, unit));
                }
                None => {
                    changed.started.push(key.clone());
                    start.push((key, unit));
                }
            }
        }
        // Rows of disks no entry names any more go; the others stay.
        self.status
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, _| entries.iter().any(|e| &e.disk() == d));
        for (key, unit) in start {
            // Never two pushes of one disk: wait for every stopping task that
            // pushed one of its disks, whatever unit it was in.
            let previous: Vec<watch::Receiver<()>> =
                unit.iter().filter_map(|e| self.stopping.get(&e.disk())).flatten().cloned().collect();
            let task = self.spawn_unit(unit, previous);
            self.units.insert(key, task);
        }
        changed
    }

    fn spawn_unit(&mut self, entries: Vec<Protect>, previous: Vec<watch::Receiver<()>>) -> UnitTask {
        // The last consistent point survives a restart (and a reload).
        let kept = self.last_points.load();
        {
            let mut disks = self.status.disks.lock().unwrap_or_else(|p| p.into_inner());
            for e in &entries {
                let last = kept.get(&e.disk());
                let row = disks.entry(e.disk()).or_insert_with(|| Protected {
                    disk: e.disk(),
                    peer: e.peer.clone(),
                    target: e.target.to_string(),
                    group: None,
                    every_seconds: 0.0,
                    rpo_target_seconds: 0.0,
                    last_point: last.map(|l| l.generation.clone()),
                    last_point_unix_ns: last.map(|l| l.unix_ns),
                    last_consistency: last.map(|l| l.consistency.clone()),
                    last_error: None,
                    failures_in_a_row: 0,
                    next_unix_ns: None,
                    running: false,
                });
                row.peer = e.peer.clone();
                row.target = e.target.to_string();
                row.group = e.group.as_ref().map(|g| g.to_string());
                row.every_seconds = e.every.as_secs_f64();
                row.rpo_target_seconds = e.rpo.as_secs_f64();
            }
        }
        let pace = entries
            .iter()
            .map(|e| e.bandwidth_limit.map(|r| Arc::new(crate::pace::Pacer::new(r))))
            .map(|own| own.into_iter().chain(self.daemon_pace.clone()).collect())
            .collect();
        let unit = Unit {
            entries: entries.clone(),
            id: self.id.clone(),
            state_root: self.state_root.clone(),
            jobs: self.jobs.clone(),
            pace,
            last_points: Some(self.last_points.clone()),
        };
        let (stop_tx, own_stop) = watch::channel(false);
        let (done_tx, done) = watch::channel(());
        let agent_stop = self.stop.clone();
        let status = self.status.clone();
        self.tasks.spawn(async move {
            let _done = done_tx;
            for mut previous in previous {
                // A stopping task ends its push first.
                while previous.changed().await.is_ok() {}
            }
            run_unit(unit, status, agent_stop, own_stop).await;
        });
        UnitTask { entries, daemon_limit: self.daemon_limit, stop: stop_tx, done }
    }

    /// At the agent's shutdown (once `stop` turned true): waits a moment
    /// for pushes in flight, then cuts them — their targets keep what
    /// they staged, and the next start resumes them.
    pub async fn drain(mut self) {
        let drained =
            tokio::time::timeout(Duration::from_secs(5), async { while self.tasks.join_next().await.is_some() {} });
        if drained.await.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    /// Reaps the tasks that ended (stopped units), and forgets them.
    pub fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
        for waits in self.stopping.values_mut() {
            waits.retain(|done| done.has_changed().is_ok());
        }
        self.stopping.retain(|_, waits| !waits.is_empty());
    }
}

struct Unit {
    entries: Vec<Protect>,
    id: Arc<Identity>,
    state_root: PathBuf,
    jobs: Arc<Jobs>,
    /// Each entry's pacers: its own limit, then the daemon's.
    pace: Vec<Vec<Arc<crate::pace::Pacer>>>,
    /// Where each disk's last consistent point is kept across restarts.
    last_points: Option<Arc<LastPoints>>,
}

async fn run_unit(
    u: Unit,
    status: Arc<ProtectStatus>,
    mut agent_stop: watch::Receiver<bool>,
    mut own_stop: watch::Receiver<bool>,
) {
    let every = u.entries[0].every;
    let mut failures: u32 = 0;
    let mut next = tokio::time::Instant::now();
    loop {
        let wall_next =
            crate::ids::now_unix_ns() + next.saturating_duration_since(tokio::time::Instant::now()).as_nanos() as i64;
        for e in &u.entries {
            status.update(&e.disk(), |p| p.next_unix_ns = Some(wall_next));
        }
        // A stop wins over a due push (both are ready after a long push).
        tokio::select! {
            biased;
            _ = agent_stop.wait_for(|s| *s) => return,
            _ = own_stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        if *agent_stop.borrow() || *own_stop.borrow() {
            return;
        }
        let began = tokio::time::Instant::now();
        let began_ns = crate::ids::now_unix_ns();
        for e in &u.entries {
            status.update(&e.disk(), |p| p.running = true);
        }
        // A push is not stopped halfway by a shutdown: it ends at its
        // commit or at a failure, and the next start resumes it.
        let results = push_unit(&u, failures > 0).await;
        let took = began.elapsed();
        let mut all_ok = true;
        for (e, r) in u.entries.iter().zip(&results) {
            status.update(&e.disk(), |p| {
                p.running = false;
                match r {
                    Ok(rep) if rep.consistency != Consistency::Fuzzy => {
                        p.last_point = Some(rep.committed.generation.to_hex());
                        p.last_point_unix_ns = Some(began_ns);
                        p.last_consistency = Some(rep.consistency.as_str().to_string());
                        p.last_error = None;
                    }
                    Ok(_) => p.last_error = None,
                    Err(err) => p.last_error = Some(format!("error[{}]: {}", err.code, err.message)),
                }
            });
            all_ok &= r.is_ok();
        }
        if all_ok {
            failures = 0;
            // Started early by about the push's duration, so that the next
            // point is committed by the time this one is `every` old.
            next = began + every.saturating_sub(took.mul_f64(1.2).min(every / 2));
            if let Some(f) = &u.last_points {
                f.save(&status);
            }
        } else {
            failures = failures.saturating_add(1);
            next = tokio::time::Instant::now() + backoff(failures, every);
        }
        for e in &u.entries {
            status.update(&e.disk(), |p| p.failures_in_a_row = failures);
        }
    }
}

/// A disk's last consistent point, as kept in `STATE/protect.json`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
struct Last {
    generation: String,
    unix_ns: i64,
    consistency: String,
}

/// The last consistent point of every protected disk, kept across restarts.
struct LastPoints {
    file: PathBuf,
    write: Mutex<()>,
}

impl LastPoints {
    fn load(&self) -> BTreeMap<String, Last> {
        std::fs::read(&self.file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Saves every disk's last point (one writer at a time, renamed into place).
    fn save(&self, status: &ProtectStatus) {
        let all: BTreeMap<String, Last> = status
            .list()
            .into_iter()
            .filter_map(|p| {
                Some((
                    p.disk.clone(),
                    Last {
                        generation: p.last_point?,
                        unix_ns: p.last_point_unix_ns?,
                        consistency: p.last_consistency?,
                    },
                ))
            })
            .collect();
        let _one = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = self.file.with_extension("tmp");
        let written = serde_json::to_vec(&all)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = written {
            tracing::warn!("the protected disks' last points were not saved: {e}");
        }
    }
}

/// The wait before try `n + 1` after `n` failures in a row: 1 s doubling,
/// capped at the schedule (and 5 min), ±20 % so that disks failing
/// together do not retry together.
pub fn backoff(failures: u32, every: Duration) -> Duration {
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(16));
    let cap = every.min(MAX_BACKOFF).max(Duration::from_secs(1));
    let d = base.min(cap);
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    d.mul_f64(jitter)
}

/// One push of a unit (one disk, or a group's disks as one group point);
/// each disk's result, each recorded as a job.
async fn push_unit(u: &Unit, after_failure: bool) -> Vec<Result<PushReport, Error>> {
    let running: Vec<_> =
        u.entries.iter().map(|e| u.jobs.start("push", &e.disk(), &e.peer, e.target.as_str())).collect();
    // A push cut here (the agent shutting down) still ends its jobs.
    let guard = Unfinished { jobs: &u.jobs, running: &running, armed: true };
    let mut opts = Vec::new();
    for (e, pace) in u.entries.iter().zip(&u.pace) {
        match options(e, &u.state_root).await {
            Ok(o) => opts.push(PushOptions { pace: pace.clone(), ..o }),
            Err(err) => return guard.fail_all(&err, u.entries.len()),
        }
    }
    // After a failure, the peer is reached before anything is read or
    // snapshotted (the hooks would freeze a guest at every retry).
    if after_failure {
        if let Some(first) = opts.first() {
            match push::connect(&u.id, first).await {
                Ok((endpoint, conn)) => {
                    conn.close(0u32.into(), b"probe");
                    drop(endpoint);
                }
                Err(err) => return guard.fail_all(&err, u.entries.len()),
            }
        }
    }
    let results: Vec<Result<PushReport, Error>> = match (&u.entries[0].group, opts.as_slice()) {
        (None, [one]) => {
            let progress: Arc<dyn diskferry_sync_engine::Progress + Send + Sync> = running[0].clone();
            vec![push::push(&u.id, one.clone(), progress).await]
        }
        (Some(g), all) => {
            let progress =
                running.iter().map(|r| r.clone() as Arc<dyn diskferry_sync_engine::Progress + Send + Sync>).collect();
            match push::group::push_members_async(&u.id, g, all, progress, &mut false).await {
                Ok(reports) => reports.into_iter().map(Ok).collect(),
                Err(e) => all.iter().map(|_| Err(copy(&e))).collect(),
            }
        }
        (None, _) => Vec::new(),
    };
    guard.disarm();
    for (i, (r, res)) in running.iter().zip(&results).enumerate() {
        match res {
            Ok(rep) => u.jobs.finish(
                r,
                // A group's members share one connection: its bytes once.
                JobResult { wire_bytes: if i == 0 { rep.wire_bytes } else { 0 }, ..rep.job_result() },
            ),
            Err(e) => u.jobs.finish(r, JobResult::failed(e)),
        }
    }
    results
}

/// Ends a unit's jobs if its push is dropped before it ended them.
struct Unfinished<'a> {
    jobs: &'a Jobs,
    running: &'a [Arc<crate::jobs::Running>],
    armed: bool,
}

impl Unfinished<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }

    /// Ends every job with `err`; the same error for each disk.
    fn fail_all(mut self, err: &Error, n: usize) -> Vec<Result<PushReport, Error>> {
        self.armed = false;
        for r in self.running {
            self.jobs.finish(r, JobResult::failed(err));
        }
        (0..n).map(|_| Err(copy(err))).collect()
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            let e =
                Error::new(ErrorCode::Cancelled, "the agent stopped during the push").hint("the next start resumes it");
            for r in self.running {
                self.jobs.finish(r, JobResult::failed(&e));
            }
        }
    }
}

/// The same error again, for each disk of a group (the I/O source stays with the first).
fn copy(e: &Error) -> Error {
    Error { code: e.code, message: e.message.clone(), hint: e.hint.clone(), source: None }
}

/// The push options of an entry (the peer resolved now: it may move).
async fn options(e: &Protect, state_root: &std::path::Path) -> Result<PushOptions, Error> {
    let peer = tokio::net::lookup_host(&e.peer)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::new(ErrorCode::Connection, format!("{} does not resolve", e.peer)))?;
    let source = std::fs::canonicalize(&e.source).unwrap_or_else(|_| e.source.clone());
    Ok(PushOptions {
        source,
        peer,
        peer_fingerprint: e.peer_fingerprint.clone(),
        target: e.target.clone(),
        mode: SyncMode::Auto,
        block_size: BlockSize::default(),
        compress: e.compress,
        force: false,
        discard_target_changes: false,
        snapshot: crate::snapshot::SnapshotOptions {
            kind: e.snapshot,
            cmd: None,
            cleanup_cmd: None,
            pre: e.pre_snapshot.clone(),
            post: e.post_snapshot.clone(),
            hook_timeout: Duration::from_secs(60),
            keep: e.changes == crate::changes::Changes::ExtentMap,
            pause_qmp: None,
        },
        promote: false,
        fuzzy: false,
        threads: None,
        max_mtu: None,
        state_root: Some(state_root.to_path_buf()),
        format: e.format,
        changes: e.changes.clone(),
        qmp: None,
        spot_check: SpotCheck::with_seed(rand::random()),
        idle_timeout: crate::transport::DEFAULT_IDLE_TIMEOUT,
        group: None,
        cancel: None,
        shared: None,
        pace: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_schedule() {
        let every = Duration::from_secs(30);
        for (n, want) in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0)] {
            let d = backoff(n, every).as_secs_f64();
            assert!(d >= want * 0.8 - 1e-9 && d <= want * 1.2 + 1e-9, "{n}: {d} vs {want}");
        }
        assert!(backoff(30, Duration::from_secs(3600)) <= MAX_BACKOFF.mul_f64(1.2));
    }
}
