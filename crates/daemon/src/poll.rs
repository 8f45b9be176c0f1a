//! The polling loop for `cometbft`, `ethereum`, `file` and `command`
//! sources: read the height, snapshot when it enters a new bucket, read it
//! again to close the snapshot's height window. A failing source is retried
//! with backoff and logged at most once a minute, and the loop never exits
//! on a source error; only shutdown stops it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::height::{HeightError, Poller};
use btm::protocol::Outcome;

use super::scheduler::{backoff, poll_due, PollDecision, Scheduler, Taken};
use super::shutdown::Shutdown;
use super::state::State;

/// How often a persisting problem is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Logs a repeating condition once, then at most every [`LOG_EVERY`], with
/// a count of what was suppressed in between.
#[derive(Debug, Default)]
pub struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(suppressed count)` when it is time to log again.
    pub fn due(&mut self) -> Option<u64> {
        match self.last {
            Some(t) if t.elapsed() < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(Instant::now());
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The condition ended; `true` if it had been logged.
    pub fn reset(&mut self) -> bool {
        let was = self.last.is_some();
        *self = RateLimit::default();
        was
    }
}

/// Read the height once, on a blocking thread.
pub async fn fetch(poller: &Arc<Poller>) -> Result<u64, HeightError> {
    let p = Arc::clone(poller);
    tokio::task::spawn_blocking(move || p.fetch())
        .await
        .unwrap_or_else(|e| {
            Err(HeightError::BadResponse {
                source_name: "poller".into(),
                detail: e.to_string(),
            })
        })
}

/// Poll until `shutdown` fires.
pub async fn run(
    poller: Arc<Poller>,
    scheduler: Arc<Scheduler>,
    state: Arc<State>,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    let itv = scheduler.cfg().itv;
    let source = poller.spec().name();
    let mut failures: u32 = 0;
    let mut errors = RateLimit::default();
    let mut backwards = RateLimit::default();
    let mut delay = Duration::ZERO;
    loop {
        if shutdown.until(tokio::time::sleep(delay)).await.is_none() {
            return;
        }
        // A source that hangs until its timeout must not delay a stop.
        let Some(fetched) = shutdown.until(fetch(&poller)).await else {
            return;
        };
        let height = match fetched {
            Ok(h) => h,
            Err(e) => {
                failures = failures.saturating_add(1);
                state.source_failed(&e.to_string());
                if let Some(suppressed) = errors.due() {
                    tracing::warn!(source, error = %e, kind = e.kind(), suppressed, "cannot read the node's height; retrying with backoff");
                }
                delay = backoff(interval, failures);
                continue;
            }
        };
        if errors.reset() {
            tracing::info!(source, height, "height source is back");
        }
        failures = 0;
        delay = interval;
        state.height_seen(height);
        state.height_passed(height);
        let mut decision = poll_due(height, scheduler.newest().await, itv);
        if let PollDecision::Backwards { .. } = decision {
            scheduler.refresh().await;
            decision = poll_due(height, scheduler.newest().await, itv);
        }
        match decision {
            PollDecision::NotDue { .. } => {
                backwards.reset();
            }
            PollDecision::Backwards { newest } => {
                state.below_snapshot(height, newest);
                if let Some(suppressed) = backwards.due() {
                    tracing::warn!(source, height, newest, suppressed, "height went backwards; no snapshot until it passes the newest snapshot's bucket");
                }
            }
            PollDecision::Take => {
                backwards.reset();
                let Taken::Reply(reply) = scheduler.take(height).await else {
                    return;
                };
                if reply.outcome == Outcome::Created
                    && close_window(&poller, &scheduler, &state, &mut shutdown, height)
                        .await
                        .is_none()
                {
                    return;
                }
            }
        }
    }
}

/// Close a new snapshot's window: its state is somewhere in
/// `[height, after]`, where `after` is the next height read. `None`: a
/// stop came first.
async fn close_window(
    poller: &Arc<Poller>,
    scheduler: &Scheduler,
    state: &State,
    shutdown: &mut Shutdown,
    height: u64,
) -> Option<()> {
    match shutdown.until(fetch(poller)).await? {
        Ok(after) => {
            state.height_seen(after);
            state.window_closed(height, after);
            let ops = scheduler.ops().clone();
            let recorded = tokio::task::spawn_blocking(move || {
                let vol = ops.volume();
                let heights = vol.heights().unwrap_or_default();
                btm::window::record(ops.dirs(), vol.name(), height, after, &heights)
            })
            .await;
            if let Ok(Err(e)) = recorded {
                tracing::warn!(height, error = %e, "could not record the snapshot's height window");
            }
        }
        Err(e) => {
            tracing::warn!(height, error = %e, "could not read the height after the snapshot; its window stays open")
        }
    }
    Some(())
}
