//! Which session holds which target: a new push from the same peer takes
//! over its stale session at once, and a local command (`failover`,
//! `commit`, `abort` …) can ask for a target to be released: its session
//! is cancelled at a safe point and new ones are refused while the command
//! holds it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use tokio::sync::{watch, Mutex};

/// The longest a local command may hold a target without ending its hold
/// (a command killed before it ended it).
pub const MAX_HOLD: Duration = Duration::from_secs(600);

/// What a command asks for beyond its `--wait`.
pub const HOLD_MARGIN: Duration = Duration::from_secs(120);

/// Which session holds which target, so a new push from the same peer can
/// take over a stale one at once.
#[derive(Default)]
pub struct Registry {
    active: Mutex<HashMap<String, Active>>,
    /// Targets a local command holds: who, and until when at the latest.
    holds: Mutex<HashMap<String, (String, Instant)>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Active {
    id: u64,
    ticket: u64,
    peer: String,
    /// Why the session must stop (`None`: it need not).
    cancel: watch::Sender<Option<String>>,
    done: watch::Receiver<bool>,
}

/// A session's hold on a target.
pub struct Registration {
    id: u64,
    pub cancel: watch::Receiver<Option<String>>,
    done: watch::Sender<bool>,
}

impl Registry {
    /// A ticket for a session about to register: later sessions get larger
    /// ones, so a stale session can never take over a newer one.
    pub fn ticket(&self) -> u64 {
        self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Claims `target` for `peer`, cancelling that peer's older session on it.
    pub async fn register(&self, target: &str, peer: &str, ticket: u64) -> Result<Registration, Error> {
        for _ in 0..8 {
            let waiting = {
                // `active` first, then `holds` (as a release takes them): a
                // hold set before this registers is always seen.
                let mut active = self.active.lock().await;
                if let Some(by) = self.held_by(target).await {
                    return Err(Error::new(
                        ErrorCode::Busy,
                        format!("target {target:?} is held by a local command ({by})"),
                    )
                    .hint("push again once that command is done"));
                }
                match active.get(target) {
                    Some(a) if a.peer != peer => {
                        return Err(Error::new(
                            ErrorCode::PeerBusy,
                            format!("target {target:?} is being written by another peer ({})", a.peer),
                        ))
                    }
                    Some(a) if a.ticket > ticket => {
                        return Err(Error::new(
                            ErrorCode::Cancelled,
                            format!("a newer push from the same peer took over target {target:?}"),
                        ))
                    }
                    Some(a) => {
                        let _ = a.cancel.send(Some("a newer push from the same peer took over this target".into()));
                        Some(a.done.clone())
                    }
                    None => {
                        let id = ticket;
                        let (cancel_tx, cancel_rx) = watch::channel(None);
                        let (done_tx, done_rx) = watch::channel(false);
                        active.insert(
                            target.to_string(),
                            Active { id, ticket, peer: peer.to_string(), cancel: cancel_tx, done: done_rx },
                        );
                        return Ok(Registration { id, cancel: cancel_rx, done: done_tx });
                    }
                }
            };
            if let Some(mut done) = waiting {
                tracing::info!(target = %target, peer = %peer, "taking over the peer's previous session");
                let waited = tokio::time::timeout(Duration::from_secs(60), done.wait_for(|d| *d)).await;
                if waited.is_err() {
                    return Err(Error::new(
                        ErrorCode::Busy,
                        format!("the previous session on {target:?} did not stop"),
                    ));
                }
            }
        }
        Err(Error::new(ErrorCode::Busy, format!("target {target:?} is busy")))
    }

    /// Releases a target once its session stopped.
    pub async fn release(&self, target: &str, r: Registration) {
        let mut active = self.active.lock().await;
        if active.get(target).is_some_and(|a| a.id == r.id) {
            active.remove(target);
        }
        let _ = r.done.send(true);
    }
}

impl Registry {
    async fn held_by(&self, target: &str) -> Option<String> {
        let mut holds = self.holds.lock().await;
        match holds.get(target) {
            Some((by, until)) if Instant::now() < *until => Some(by.clone()),
            Some(_) => {
                holds.remove(target);
                None
            }
            None => None,
        }
    }

    /// For a local command (`by`): refuses new sessions on `target` for up
    /// to `hold`, cancels the one in progress (it stops at a safe point:
    /// before its commit the target stays at its last point with what it
    /// staged kept; a commit under way completes) and waits until it
    /// stopped. Whether a session was cancelled.
    pub async fn release_for_command(&self, target: &str, by: &str, hold: Duration) -> Result<bool, Error> {
        let until = Instant::now() + hold.min(MAX_HOLD);
        let waiting = {
            let active = self.active.lock().await;
            self.holds.lock().await.insert(target.to_string(), (by.to_string(), until));
            active.get(target).map(|a| {
                let _ =
                    a.cancel.send(Some(format!("the target agent released this target for a local command ({by})")));
                a.done.clone()
            })
        };
        let Some(mut done) = waiting else { return Ok(false) };
        tracing::info!(target = %target, by = %by, "releasing the target: cancelling its session");
        let stopped = tokio::time::timeout(Duration::from_secs(60), async { done.wait_for(|d| *d).await.is_ok() });
        match stopped.await {
            Ok(_) => Ok(true),
            Err(_) => {
                self.unhold(target).await;
                Err(Error::new(ErrorCode::Busy, format!("the session on {target:?} did not stop within 60 s")))
            }
        }
    }

    /// Ends a local command's hold on `target`.
    pub async fn unhold(&self, target: &str) {
        self.holds.lock().await.remove(target);
    }
}

/// Why the session is cancelled, once it is.
pub async fn wait_cancel(rx: &mut Option<watch::Receiver<Option<String>>>) -> String {
    match rx {
        Some(rx) => loop {
            if let Some(why) = rx.borrow().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        },
        None => std::future::pending().await,
    }
}
