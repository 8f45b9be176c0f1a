//! Telling systemd the truth (`Type=notify`): READY=1 only after the volume
//! and the source were checked, STATUS= with the last height and snapshot,
//! WATCHDOG=1 at half of WATCHDOG_USEC while snapshots are not stuck,
//! RELOADING=1 and STOPPING=1. Outside systemd (no NOTIFY_SOCKET) every
//! call is a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shutdown::Shutdown;
use super::Current;
use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// READY=1 with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS=…
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// RELOADING=1 before a configuration reload.
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading configuration"),
    ]);
}

/// STOPPING=1 on SIGTERM/SIGINT.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping after the snapshot in flight"),
    ]);
}

/// The watchdog period systemd asked for, if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Send WATCHDOG=1 every `period / 2` and refresh STATUS= from the
/// current generation, unless one
/// snapshot has been in progress for longer than `period`: then the pings
/// stop and systemd restarts the daemon instead of trusting a hung `zfs`.
pub async fn watchdog(period: Duration, current: Current, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(period / 2);
    let mut stuck_since: Option<(u64, Instant)> = None;
    loop {
        if shutdown.until(tick.tick()).await.is_none() {
            return;
        }
        // systemd arms the watchdog at READY=1, which the first
        // generation sends; until then there is nothing to ping. A reload
        // keeps the previous generation current until the next is ready.
        let state = current.borrow().as_ref().map(|g| Arc::clone(&g.state));
        let Some(state) = state else {
            continue;
        };
        let in_progress = state.status().in_progress;
        stuck_since = match (in_progress, stuck_since) {
            (None, _) => None,
            (Some(h), Some((prev, since))) if prev == h => Some((h, since)),
            (Some(h), _) => Some((h, Instant::now())),
        };
        if let Some((h, since)) = stuck_since {
            if since.elapsed() > period {
                tracing::error!(
                    height = h,
                    "snapshot stuck for longer than the watchdog period; withholding WATCHDOG=1"
                );
                continue;
            }
        }
        send(&[NotifyState::Watchdog, NotifyState::Status(&state.summary())]);
    }
}
