//! The agent's jobs: every push it runs for a protected disk and every
//! session it receives, running or finished, with phase, progress, rate
//! and result. Finished jobs are kept (the newest [`KEEP`]) and persisted
//! in the state directory (`jobs.json`), so a restart keeps them. The
//! status endpoint and the metrics read them.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use diskferry_sync_engine::Progress;
use serde::{Deserialize, Serialize};

/// Finished jobs kept.
pub const KEEP: usize = 200;

/// One job as the status endpoint shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: u64,
    /// `push` (scheduled or run by hand), `receive`, `push-group`,
    /// `failover-sync`, `failover`, `commit`, `abort`, `sync`, `plan` ….
    pub kind: String,
    /// The disk: a push's source, a receive's target path.
    pub disk: String,
    pub peer: String,
    pub target: String,
    pub started_unix_ns: i64,
    pub ended_unix_ns: Option<i64>,
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub result: Option<JobResult>,
}

/// How a job ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    pub ok: bool,
    pub generation: Option<String>,
    pub consistency: Option<String>,
    /// Block payload sent (push) or received (receive).
    pub payload_bytes: u64,
    /// Bytes written to the target disk (receive).
    pub written_bytes: u64,
    pub wire_bytes: u64,
    /// The target already held this content: no new point.
    #[serde(default)]
    pub unchanged: bool,
    pub code: Option<String>,
    pub message: Option<String>,
    pub hint: Option<String>,
}

impl JobResult {
    /// A job that ended with `e`.
    pub fn failed(e: &diskferry_sync_engine::Error) -> JobResult {
        JobResult {
            ok: false,
            generation: None,
            consistency: None,
            payload_bytes: 0,
            written_bytes: 0,
            wire_bytes: 0,
            unchanged: false,
            code: Some(e.code.as_str().to_string()),
            message: Some(e.message.clone()),
            hint: e.hint.clone(),
        }
    }

    /// A job that ended well, with the point it made (if any).
    pub fn ok(generation: Option<String>, consistency: Option<String>) -> JobResult {
        JobResult {
            ok: true,
            generation,
            consistency,
            payload_bytes: 0,
            written_bytes: 0,
            wire_bytes: 0,
            unchanged: false,
            code: None,
            message: None,
            hint: None,
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Saved {
    next_id: u64,
    done: VecDeque<Job>,
}

struct Inner {
    next_id: u64,
    running: BTreeMap<u64, Arc<Running>>,
    done: VecDeque<Job>,
    /// Bumped at every change worth saving; the file has `saved`.
    version: u64,
}

/// A running job: its fixed fields, and progress updated without a lock.
pub struct Running {
    job: Mutex<Job>,
    done: AtomicU64,
    total: AtomicU64,
}

/// Every job of this agent.
pub struct Jobs {
    inner: Mutex<Inner>,
    file: Option<PathBuf>,
    /// One writer of the file at a time; the version it last wrote.
    saved: Mutex<u64>,
    /// Counted as each job ends.
    pub metrics: crate::metrics::Metrics,
}

impl Jobs {
    /// The jobs kept in `state_root` (none if it has none, or they cannot be read).
    pub fn load(state_root: Option<&Path>) -> Jobs {
        let file = state_root.map(|r| r.join("jobs.json"));
        let bytes = file.as_ref().and_then(|f| std::fs::read(f).ok());
        let saved: Saved = match bytes.map(|b| serde_json::from_slice::<Saved>(&b)) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // Kept aside for a look, not silently replaced.
                if let Some(f) = &file {
                    let _ = std::fs::rename(f, f.with_extension("json.bad"));
                    tracing::warn!("{} was not a job list ({e}); kept as jobs.json.bad", f.display());
                }
                Saved::default()
            }
            None => Saved::default(),
        };
        Jobs {
            inner: Mutex::new(Inner {
                next_id: saved.next_id.max(1),
                running: BTreeMap::new(),
                done: saved.done,
                version: 0,
            }),
            file,
            saved: Mutex::new(0),
            metrics: crate::metrics::Metrics::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a job.
    pub fn start(&self, kind: &str, disk: &str, peer: &str, target: &str) -> Arc<Running> {
        let mut i = self.lock();
        let id = i.next_id;
        i.next_id += 1;
        let job = Job {
            id,
            kind: kind.into(),
            disk: disk.into(),
            peer: peer.into(),
            target: target.into(),
            started_unix_ns: crate::ids::now_unix_ns(),
            ended_unix_ns: None,
            phase: "starting".into(),
            bytes_done: 0,
            bytes_total: 0,
            result: None,
        };
        let r = Arc::new(Running { job: Mutex::new(job), done: AtomicU64::new(0), total: AtomicU64::new(0) });
        i.running.insert(id, r.clone());
        i.version += 1;
        drop(i);
        // The id is used: saved now, so a crash never hands it out again.
        self.save();
        r
    }

    /// Writes the kept jobs and the next id, if newer than what the file has.
    fn save(&self) {
        let Some(f) = &self.file else { return };
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        let (version, bytes) = {
            let i = self.lock();
            (i.version, serde_json::to_vec(&Saved { next_id: i.next_id, done: i.done.clone() }).unwrap_or_default())
        };
        if version <= *saved {
            return;
        }
        let tmp = f.with_extension("tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut t| {
                std::io::Write::write_all(&mut t, &bytes)?;
                t.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, f));
        match written {
            Ok(()) => *saved = version,
            Err(e) => tracing::warn!("the job list was not saved: {e}"),
        }
    }

    /// Ends a running job with `result`, keeps it, and saves the kept ones.
    pub fn finish(&self, running: &Running, result: JobResult) {
        let mut job = running.snapshot();
        job.ended_unix_ns = Some(crate::ids::now_unix_ns());
        job.phase = if result.ok { "done".into() } else { "failed".into() };
        job.result = Some(result);
        if let Some(r) = &job.result {
            self.metrics.job_ended(&crate::metrics::Ended {
                kind: &job.kind,
                target: &job.target,
                ok: r.ok,
                seconds: (job.ended_unix_ns.unwrap_or(job.started_unix_ns) - job.started_unix_ns).max(0) as f64 / 1e9,
                payload_bytes: r.payload_bytes,
                written_bytes: r.written_bytes,
                wire_bytes: r.wire_bytes,
                code: r.code.as_deref(),
                new_point: r.ok && r.generation.is_some() && !r.unchanged,
            });
        }
        {
            let mut i = self.lock();
            i.running.remove(&job.id);
            i.done.push_front(job);
            i.done.truncate(KEEP);
            i.version += 1;
        }
        // Written whole and renamed: a crash leaves the old list or the new one.
        self.save();
    }

    /// Running jobs first (newest first), then finished ones.
    pub fn list(&self) -> Vec<Job> {
        let i = self.lock();
        let mut out: Vec<Job> = i.running.values().rev().map(|r| r.snapshot()).collect();
        out.extend(i.done.iter().cloned());
        out
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        self.list().into_iter().find(|j| j.id == id)
    }
}

impl Running {
    /// The job as it stands.
    pub fn snapshot(&self) -> Job {
        let mut j = self.job.lock().unwrap_or_else(|p| p.into_inner()).clone();
        j.bytes_done = self.done.load(Ordering::Relaxed);
        j.bytes_total = self.total.load(Ordering::Relaxed);
        j
    }

    /// Names the phase, keeping the counts (a session's commit).
    pub fn set_phase(&self, name: &str) {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).phase = name.into();
    }

    /// Progress as a local command reports it.
    pub fn set_progress(&self, phase: &str, done: u64, total: u64) {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).phase = phase.into();
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    pub fn id(&self) -> u64 {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).id
    }
}

impl Progress for Running {
    fn phase(&self, name: &'static str, total: u64) {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).phase = name.into();
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_kept_across_a_restart_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(Some(dir.path()));
        for n in 0..(KEEP + 5) {
            let r = jobs.start("push", "/d", "p", "t");
            r.phase("pushing", 100);
            r.advance(40);
            assert_eq!(jobs.get(r.id()).unwrap().bytes_done, 40);
            let ok = JobResult { ok: n % 2 == 0, payload_bytes: n as u64, ..JobResult::ok(None, None) };
            jobs.finish(&r, ok);
        }
        let again = Jobs::load(Some(dir.path()));
        let list = again.list();
        assert_eq!(list.len(), KEEP);
        assert_eq!(list[0].result.as_ref().unwrap().payload_bytes, (KEEP + 4) as u64, "newest first");
        assert!(again.start("push", "/d", "p", "t").id() > list[0].id, "ids are not reused");
    }
}
