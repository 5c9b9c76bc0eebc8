//! A received session as one of the agent's jobs: started when its target
//! is granted, its block payload counted as it arrives, ended with the
//! commit or the failure.

use std::sync::Arc;

use diskferry_protocol::message::Committed;
use diskferry_protocol::{Consistency, ErrorCode};
use diskferry_sync_engine::Progress;

use crate::jobs::{JobResult, Jobs, Running};

pub struct ReceiveJob {
    jobs: Arc<Jobs>,
    running: Arc<Running>,
    committing: Option<Consistency>,
    committed: Option<(Committed, Consistency)>,
    failed: Option<(ErrorCode, String)>,
}

impl ReceiveJob {
    pub fn start(jobs: &Arc<Jobs>, path: &std::path::Path, peer: &str, target: &str, disk_bytes: u64) -> ReceiveJob {
        let running = jobs.start("receive", &path.display().to_string(), peer, target);
        running.phase("receiving", disk_bytes);
        ReceiveJob { jobs: jobs.clone(), running, committing: None, committed: None, failed: None }
    }

    /// What the data streams count each block's payload into (as the
    /// source counts what it sent).
    pub fn progress(&self) -> Arc<Running> {
        self.running.clone()
    }

    /// The source asked for the commit, with this label.
    pub fn committing(&mut self, consistency: Consistency) {
        self.committing = Some(consistency);
        self.running.set_phase("committing");
    }

    pub fn committed(&mut self, c: &Committed) {
        self.committed = Some((*c, self.committing.unwrap_or(Consistency::Fuzzy)));
    }

    pub fn failed(&mut self, code: ErrorCode, message: &str) {
        self.failed.get_or_insert((code, message.to_string()));
    }

    /// Ends the job: committed, or failed (a session that ended without
    /// either was cut: the connection was lost).
    pub fn end(self) {
        let received = self.running.snapshot().bytes_done;
        let result = match (self.committed, self.failed) {
            (Some((c, consistency)), _) => JobResult {
                ok: true,
                generation: Some(c.generation.to_hex()),
                consistency: Some(consistency.as_str().to_string()),
                payload_bytes: received,
                written_bytes: c.bytes_written,
                wire_bytes: 0,
                unchanged: c.unchanged,
                code: None,
                message: None,
                hint: None,
            },
            (None, failed) => {
                let (code, message) =
                    failed.unwrap_or((ErrorCode::Connection, "the session ended before its commit".into()));
                let (message, hint) = match message.split_once(" — ") {
                    Some((m, h)) => (m.to_string(), Some(h.to_string())),
                    None => (message, None),
                };
                JobResult {
                    ok: false,
                    generation: None,
                    consistency: None,
                    payload_bytes: received,
                    written_bytes: 0,
                    wire_bytes: 0,
                    unchanged: false,
                    code: Some(code.as_str().to_string()),
                    message: Some(message),
                    hint,
                }
            }
        };
        self.jobs.finish(&self.running, result);
    }
}
