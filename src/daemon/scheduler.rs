//! Turning heights into snapshots, one at a time.
//!
//! The rules for *when* a height is due are pure functions ([`push_due`],
//! [`poll_due`]). [`Scheduler::take`] does the work: pre-hook, snapshot and
//! prune through [`BtmCfg`] under the volume lock, post-hook. A tokio mutex
//! (FIFO) serialises takes, so pushed and polled heights queue in arrival
//! order and never overlap; holding it is also how shutdown waits for an
//! in-flight snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::config::daemon::DaemonSettings;
use crate::protocol::{LastSnapshot, NotifyReply, Outcome};
use crate::volume::Volume;
use crate::{BtmCfg, SnapshotOutcome};

use super::exporter::Exporter;
use super::state::State;

/// Whether a pushed height is due: only exact multiples of `itv`.
pub fn push_due(height: u64, itv: u64) -> Result<(), String> {
    if height % itv == 0 {
        Ok(())
    } else {
        Err(format!("{height} is not a multiple of itv {itv}"))
    }
}

/// What a polled height means for snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollDecision {
    /// The height entered a new multiple-of-itv bucket: snapshot now.
    Take,
    /// Still in the bucket of the newest snapshot; due at `next`.
    NotDue {
        /// First height of the next bucket.
        next: u64,
    },
    /// Lower than the newest snapshot: the node went backwards.
    Backwards {
        /// The newest snapshot's height.
        newest: u64,
    },
}

/// Whether a polled `height` is due, given the newest snapshot on the
/// volume. Buckets are `floor(h / itv)`; a snapshot is due when the height
/// is in a later bucket than the newest snapshot. Because the state is read
/// from the volume, a restart or a rollback (which destroys newer
/// snapshots) never causes duplicates or a stall.
pub fn poll_due(height: u64, newest: Option<u64>, itv: u64) -> PollDecision {
    match newest {
        None => PollDecision::Take,
        Some(n) if height < n => PollDecision::Backwards { newest: n },
        Some(n) if height / itv > n / itv => PollDecision::Take,
        Some(n) => PollDecision::NotDue {
            next: (n / itv).saturating_add(1).saturating_mul(itv),
        },
    }
}

/// Runs snapshots for one daemon generation.
pub struct Scheduler {
    cfg: BtmCfg,
    /// Opened once per generation: re-opening runs commands at every height.
    volume: Arc<dyn Volume>,
    settings: DaemonSettings,
    state: Arc<State>,
    /// Serialises takes; holds the newest snapshot height on the volume.
    gate: tokio::sync::Mutex<Option<u64>>,
    stopping: AtomicBool,
    /// Starts exports after snapshots, when exports are configured.
    exporter: Option<Arc<Exporter>>,
}

/// What the blocking part of a take produced.
struct Took {
    outcome: Result<crate::SnapshotReport, String>,
    heights: Vec<u64>,
    post_hook_error: Option<String>,
}

impl Scheduler {
    /// A scheduler for `cfg`, whose volume currently holds `heights`.
    pub fn new(
        cfg: BtmCfg,
        volume: Arc<dyn Volume>,
        settings: DaemonSettings,
        state: Arc<State>,
        heights: &[u64],
        exporter: Option<Arc<Exporter>>,
    ) -> Self {
        let newest = heights.first().copied();
        state.volume_seen(heights.len(), next_due(&settings, newest));
        Scheduler {
            cfg,
            volume,
            settings,
            state,
            gate: tokio::sync::Mutex::new(newest),
            stopping: AtomicBool::new(false),
            exporter,
        }
    }

    /// The volume's configuration.
    pub fn cfg(&self) -> &BtmCfg {
        &self.cfg
    }

    /// The opened volume.
    pub fn volume(&self) -> &Arc<dyn Volume> {
        &self.volume
    }

    /// The newest snapshot height (waits for an in-flight take).
    pub async fn newest(&self) -> Option<u64> {
        *self.gate.lock().await
    }

    /// Re-read the newest snapshot from the volume (after the height went
    /// backwards, an operator may have rolled the volume back).
    pub async fn refresh(&self) {
        let mut newest = self.gate.lock().await;
        let cfg = self.cfg.clone();
        if let Ok(Ok(heights)) =
            tokio::task::spawn_blocking(move || cfg.get_sorted_snapshots()).await
        {
            *newest = heights.first().copied();
            self.state
                .volume_seen(heights.len(), next_due(&self.settings, *newest));
        }
    }

    /// Refuse new takes, then wait for the one in flight to finish.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.gate.lock().await);
    }

    /// Snapshot `height` now (the caller decided it is due), then prune.
    #[tracing::instrument(skip_all, fields(height))]
    pub async fn take(&self, height: u64) -> NotifyReply {
        let mut newest = self.gate.lock().await;
        if self.stopping.load(Ordering::SeqCst) {
            return skipped(height, "the daemon is shutting down");
        }
        self.state.in_progress(Some(height));
        let started = Instant::now();
        let cfg = self.cfg.clone();
        let vol = Arc::clone(&self.volume);
        let settings = self.settings.clone();
        let took = tokio::task::spawn_blocking(move || {
            take_blocking(&cfg, vol.as_ref(), &settings, height)
        })
        .await;
        self.state.in_progress(None);
        let duration_ms = started.elapsed().as_millis() as u64;
        let took = match took {
            Ok(t) => t,
            Err(e) => Took {
                outcome: Err(format!("snapshot task failed: {e}")),
                heights: Vec::new(),
                post_hook_error: None,
            },
        };
        if !took.heights.is_empty() || took.outcome.is_ok() {
            *newest = took.heights.first().copied();
            self.state
                .volume_seen(took.heights.len(), next_due(&self.settings, *newest));
        }
        if let Some(e) = &took.post_hook_error {
            tracing::warn!(height, error = %e, "post-snapshot hook failed");
            self.state.error("hook", e);
            self.state.count(|c| c.hook_failures += 1);
        }
        let report = match took.outcome {
            Ok(r) => r,
            Err(reason) if reason.starts_with(PRE_HOOK) => {
                tracing::warn!(height, reason = %reason, "snapshot skipped");
                self.state.error("hook", &reason);
                self.state.count(|c| {
                    c.skipped += 1;
                    c.hook_failures += 1;
                });
                return skipped(height, &reason);
            }
            Err(reason) => {
                tracing::error!(height, error = %reason, duration_ms, "snapshot failed");
                self.state.error("snapshot", &reason);
                self.state.count(|c| c.snapshot_failures += 1);
                return NotifyReply {
                    height,
                    outcome: Outcome::Failed,
                    reason: Some(reason),
                    snapshot: None,
                    duration_ms: Some(duration_ms),
                    pruned: Vec::new(),
                };
            }
        };
        self.state.count(|c| {
            c.snapshot_ms_total += report.snapshot_ms;
            c.prune_ms_total += report.prune_ms;
            c.prunes += 1;
        });
        for (h, e) in &report.prune_failures {
            self.state
                .error("prune", &format!("could not prune {h}: {e}"));
            self.state.count(|c| c.prune_failures += 1);
        }
        let snapshot = snapshot_name(&self.cfg, height);
        let outcome = match report.outcome {
            SnapshotOutcome::Created => {
                tracing::info!(height, volume = %self.cfg.volume, snapshot = %snapshot, duration_ms, pruned = ?report.pruned, "snapshot taken");
                self.state.snapshot_taken(LastSnapshot {
                    height,
                    height_after: None,
                    at: Utc::now(),
                    duration_ms,
                });
                Outcome::Created
            }
            SnapshotOutcome::AlreadyExists => {
                tracing::info!(height, snapshot = %snapshot, "snapshot already exists; left as it is");
                self.state.count(|c| c.skipped += 1);
                Outcome::Exists
            }
        };
        super::systemd::status(&self.state.summary());
        if let Some(x) = &self.exporter {
            x.consider(height);
        }
        NotifyReply {
            height,
            outcome,
            reason: None,
            snapshot: Some(snapshot),
            duration_ms: Some(duration_ms),
            pruned: report.pruned,
        }
    }
}

const PRE_HOOK: &str = "pre-snapshot hook";

fn take_blocking(cfg: &BtmCfg, vol: &dyn Volume, settings: &DaemonSettings, height: u64) -> Took {
    let env = [
        ("BTM_HEIGHT", height.to_string()),
        ("BTM_VOLUME", cfg.volume.clone()),
    ];
    if let Some(argv) = &settings.pre_snapshot {
        if let Err(e) = crate::exec::run(argv, &env, settings.hook_timeout) {
            return Took {
                outcome: Err(format!("{PRE_HOOK} declined: {e}")),
                heights: Vec::new(),
                post_hook_error: None,
            };
        }
    }
    let outcome = cfg
        .snapshot_on(vol, height, settings.lock_timeout)
        .map_err(|e| e.to_string());
    // On failure the volume may still have changed (e.g. a lock timeout
    // after another process pruned): list it; on success the report has it.
    let heights = match &outcome {
        Ok(r) => r.heights.clone(),
        Err(_) => vol.heights().unwrap_or_default(),
    };
    let post_hook_error = match (&settings.post_snapshot, &outcome) {
        (Some(argv), Ok(_)) => crate::exec::run(argv, &env, settings.hook_timeout)
            .err()
            .map(|e| e.to_string()),
        _ => None,
    };
    Took {
        outcome,
        heights,
        post_hook_error,
    }
}

fn skipped(height: u64, reason: &str) -> NotifyReply {
    NotifyReply {
        height,
        outcome: Outcome::Skipped,
        reason: Some(reason.to_owned()),
        snapshot: None,
        duration_ms: None,
        pruned: Vec::new(),
    }
}

fn snapshot_name(cfg: &BtmCfg, height: u64) -> String {
    format!("{}@{height}", cfg.volume)
}

fn next_due(settings: &DaemonSettings, newest: Option<u64>) -> Option<u64> {
    let itv = settings.itv;
    Some(match newest {
        None if settings.source.is_polled() => return None,
        None => itv,
        Some(n) => (n / itv).saturating_add(1).saturating_mul(itv),
    })
}

/// Exponential backoff for a failing source: `interval · 2^failures`,
/// capped at `max(interval, 30 s)`.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let cap = interval.max(Duration::from_secs(30));
    interval
        .checked_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn push_takes_exact_multiples() {
        assert!(push_due(120, 10).is_ok());
        assert!(push_due(0, 10).is_ok());
        assert_eq!(
            push_due(125, 10),
            Err("125 is not a multiple of itv 10".into())
        );
        assert!(push_due(7, 1).is_ok());
    }

    #[test]
    fn poll_buckets() {
        assert_eq!(poll_due(5, None, 10), PollDecision::Take);
        assert_eq!(
            poll_due(19, Some(12), 10),
            PollDecision::NotDue { next: 20 }
        );
        assert_eq!(poll_due(21, Some(12), 10), PollDecision::Take);
        assert_eq!(
            poll_due(11, Some(12), 10),
            PollDecision::Backwards { newest: 12 }
        );
        assert_eq!(
            poll_due(u64::MAX, Some(u64::MAX - 1), 10),
            PollDecision::NotDue { next: u64::MAX }
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 0), s);
        assert_eq!(backoff(s, 3), Duration::from_secs(8));
        assert_eq!(backoff(s, 40), Duration::from_secs(30));
        assert_eq!(backoff(Duration::from_secs(60), 5), Duration::from_secs(60));
    }

    proptest! {
        /// Replaying any sequence of polled heights (forwards, stalls,
        /// backwards) never takes two snapshots in one bucket.
        #[test]
        fn polling_never_duplicates_a_bucket(itv in 1u64..50, steps in prop::collection::vec(-20i64..60, 1..200)) {
            let mut height: i64 = 0;
            let mut taken: Vec<u64> = Vec::new();
            for step in steps {
                height = (height + step).max(0);
                let h = height as u64;
                if poll_due(h, taken.iter().copied().max(), itv) == PollDecision::Take {
                    prop_assert!(!taken.iter().any(|t| t / itv == h / itv), "bucket {} twice", h / itv);
                    taken.push(h);
                }
            }
        }
    }
}
