//! systemd's service notifications (`Type=notify`): ready once the agent
//! listens and every target is recovered, reloading around a `SIGHUP`,
//! stopping at shutdown, and watchdog pings from a task of the server's
//! runtime (a stuck runtime stops pinging, and systemd restarts the
//! agent; a long reload does not). Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("systemd notification failed: {e}");
    }
}

/// The agent serves: `status` says what it does.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (systemd waits for the next [`ready`]).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: sessions end at a safe point")]);
}

/// How often to ping the watchdog (half its timeout), if systemd set one for this process.
pub fn watchdog_every() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec / 2))
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}
