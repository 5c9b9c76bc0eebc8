//! Replication group pushes on the target (`push-group`): each member disk
//! comes in a session of its own, tagged with the group push it belongs to;
//! the members' apply workers meet here and commit as one point
//! (`docs/design.md` §4.6): each prepares and seals its member, the last to
//! seal writes the group record, then each finishes. A member that stops
//! without committing fails the whole push: every member stays at its old
//! point (a sealed one is taken back by recovery when its target is next
//! opened).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use diskferry_protocol::message::GroupTag;
use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::apply::group;
use diskferry_sync_engine::store::Vfs;
use diskferry_sync_engine::Error;

/// How long the members of a push may take to all open their sessions
/// (they are opened together; a missing one is a source that gave up).
const JOIN_WITHIN: Duration = Duration::from_secs(120);

/// The group pushes in progress, by peer and push id.
#[derive(Default)]
pub struct Groups {
    runs: Mutex<HashMap<(String, u128), Arc<Run>>>,
}

/// One group push on this agent.
pub struct Run {
    pub name: String,
    /// The generation every member commits (the group point's id).
    pub generation: Generation,
    members: u16,
    started: Instant,
    key: (String, u128),
    state: Mutex<State>,
    changed: Condvar,
    /// The one share of the memory budget the members use together.
    pub admission: Arc<tokio::sync::Mutex<Option<Arc<super::budget::Admission>>>>,
}

#[derive(Default)]
struct State {
    /// `(target name, path)` of the members that opened their sessions.
    joined: Vec<(String, std::path::PathBuf)>,
    sealed: u16,
    failed: Option<String>,
    recorded: bool,
    finished: u16,
}

impl Groups {
    /// Adds `target` (at `path`) to the push `tag` from `peer` (the first
    /// member starts it), if the group the agent knows has it.
    pub fn join(
        &self,
        state_root: &Path,
        peer: &str,
        tag: &GroupTag,
        target: &str,
        path: &Path,
    ) -> Result<Arc<Run>, Error> {
        crate::groups::check_member(state_root, tag.name.as_str(), target, usize::from(tag.members))?;
        let key = (peer.to_string(), tag.push);
        // The map's lock is never held while a run's is taken (a member
        // holds its run's across fsyncs): taken and let go here.
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let run = runs
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Run {
                    name: tag.name.as_str().to_string(),
                    generation: crate::ids::new_generation(),
                    members: tag.members,
                    started: Instant::now(),
                    key,
                    state: Mutex::new(State::default()),
                    changed: Condvar::new(),
                    admission: Arc::default(),
                })
            })
            .clone();
        drop(runs);
        let mut s = run.lock();
        let refuse = |why: String| Error::new(ErrorCode::Protocol, why);
        if run.name != tag.name.as_str() || run.members != tag.members {
            return Err(refuse(format!("group push {:x} changed its group or size", tag.push)));
        }
        if s.joined.iter().any(|(t, _)| t == target) {
            return Err(refuse(format!("target {target:?} is in group push {:x} twice", tag.push)));
        }
        if s.joined.len() >= usize::from(run.members) || s.failed.is_some() {
            return Err(refuse(format!("group push {:x} is full or already failed", tag.push)));
        }
        s.joined.push((target.to_string(), path.to_path_buf()));
        Ok(run.clone())
    }

    /// Forgets a push that ended (committed or failed).
    fn remove(&self, key: &(String, u128)) {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

impl Run {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A member stopped without committing: the push fails for every member.
    pub fn fail(&self, groups: &Groups, why: &str) {
        let mut s = self.lock();
        if !s.recorded && s.failed.is_none() {
            s.failed = Some(why.to_string());
        }
        drop(s);
        self.changed.notify_all();
        groups.remove(&self.key);
    }

    /// This member is sealed: waits for every other one, then for the group
    /// record (written by the last to seal). `Err` when a member failed or
    /// never joined: this member must not finish.
    pub fn sealed(&self, vfs: &dyn Vfs, state_root: &Path) -> Result<(), Error> {
        let mut s = self.lock();
        s.sealed += 1;
        if s.sealed == self.members && s.failed.is_none() {
            let membership = crate::groups::Membership { name: self.name.clone(), members: s.joined.clone() };
            let names: Vec<&str> = s.joined.iter().map(|(n, _)| n.as_str()).collect();
            let text = format!("group {}\nmembers {}\n", self.name, names.join(" "));
            // The group's members are known before its first point is.
            let recorded = crate::groups::learn(state_root, &membership)
                .and_then(|()| group::write_record(vfs, state_root, self.generation, &text));
            if let Err(e) = recorded {
                s.failed = Some(e.message.clone());
                self.changed.notify_all();
                return Err(e);
            }
            s.recorded = true;
            self.changed.notify_all();
        }
        loop {
            if s.recorded {
                return Ok(());
            }
            if let Some(why) = &s.failed {
                return Err(Error::new(ErrorCode::Cancelled, format!("group {} did not commit: {why}", self.name)));
            }
            if s.joined.len() < usize::from(self.members) && self.started.elapsed() > JOIN_WITHIN {
                s.failed = Some(format!("only {} of its {} members came", s.joined.len(), self.members));
                self.changed.notify_all();
                continue;
            }
            s = self.changed.wait_timeout(s, Duration::from_secs(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// This member finished; the last one removes the group record.
    pub fn finished(&self, groups: &Groups, vfs: &dyn Vfs, state_root: &Path) {
        let mut s = self.lock();
        s.finished += 1;
        let last = s.finished == self.members;
        drop(s);
        if last {
            if let Err(e) = group::forget_record(vfs, state_root, self.generation) {
                tracing::warn!(group = %self.name, "the group record stays: {}", e.message);
            }
            groups.remove(&self.key);
        }
    }
}
