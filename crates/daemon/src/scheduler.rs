//! Turning heights into snapshots, one at a time.
//!
//! The rules for *when* a height is due and *whether* it is plausible are
//! pure functions ([`push_due`], [`poll_due`], [`check_height`]).
//! [`Scheduler::take`] does the work: pre-hook, snapshot and prune through
//! [`BtmCfg`] under the volume lock, post-hook. A tokio mutex (FIFO)
//! serialises takes, so pushed and polled heights queue in arrival order
//! and never overlap; holding it is also how shutdown waits for an
//! in-flight snapshot. A take that finds its generation stopping answers
//! [`Taken::Stopping`] so the caller can hand it to the next generation
//! (reload) or fail it (shutdown); it is never reported as done.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::settings::DaemonSettings;
use btm::protocol::{Counters, LastSnapshot, NotifyReply, Outcome};
use btm::volume::Label;
use btm::{BtmCfg, Ops, SnapshotOptions, SnapshotOutcome};

use super::export_scheduler::ExportScheduler;
use super::poll::RateLimit;
use super::state::State;

/// The highest height btm accepts: 2^53 − 1. Many node RPCs carry heights
/// as JSON numbers, which are exact only up to there, and no chain comes
/// near it (a block every 100 ms would take 28 million years).
pub const MAX_HEIGHT: u64 = (1 << 53) - 1;

/// Default most blocks a new height may be ahead of the newest snapshot.
pub const DEFAULT_MAX_HEIGHT_JUMP: u64 = 10_000_000;

/// Whether a pushed height is due: only exact multiples of `itv`.
pub fn push_due(height: u64, itv: u64) -> bool {
    height % itv.max(1) == 0
}

/// Why a height is not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Lower than the newest snapshot on the volume.
    #[error("height {height} is below the newest snapshot ({newest}): the node went backwards. After rolling back or restoring the node outside btm, remove the newer snapshots (btm rollback, or btm clean -k N)")]
    Backwards {
        /// The height given.
        height: u64,
        /// The newest snapshot's height.
        newest: u64,
    },
    /// Too far ahead of the newest snapshot to be a real height.
    #[error("height {height} is {} blocks ahead of the newest snapshot ({newest}), more than max_height_jump ({max}); if the node really jumped (state sync), raise max_height_jump or remove the old snapshots", height - newest)]
    TooFar {
        /// The height given.
        height: u64,
        /// The newest snapshot's height.
        newest: u64,
        /// The limit.
        max: u64,
    },
    /// Above [`MAX_HEIGHT`].
    #[error("height {height} is above {MAX_HEIGHT}, which no chain reaches")]
    Absurd {
        /// The height given.
        height: u64,
    },
}

/// Whether `height` is plausible given the newest snapshot on the volume.
///
/// Rules: never above [`MAX_HEIGHT`]; never below the newest snapshot (a
/// legitimate restart at a lower height follows a rollback, which destroys
/// the newer snapshots, so the volume's newest is then lower too); never
/// more than `max_jump` blocks ahead of it (`0` means no limit). With no
/// snapshot yet, any height up to [`MAX_HEIGHT`] is plausible. Equal to the
/// newest is plausible (it already exists).
pub fn check_height(height: u64, newest: Option<u64>, max_jump: u64) -> Result<(), Refusal> {
    if height > MAX_HEIGHT {
        return Err(Refusal::Absurd { height });
    }
    match newest {
        Some(newest) if height < newest => Err(Refusal::Backwards { height, newest }),
        Some(newest) if max_jump > 0 && height - newest > max_jump => Err(Refusal::TooFar {
            height,
            newest,
            max: max_jump,
        }),
        _ => Ok(()),
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

/// The result of asking for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Done (or skipped, refused, failed): the answer for the client.
    Reply(NotifyReply),
    /// This generation is stopping and took nothing; the height belongs to
    /// the next generation, or fails if the daemon is shutting down.
    Stopping,
}

/// Runs snapshots for one daemon generation.
pub struct Scheduler {
    cfg: BtmCfg,
    /// Opened once per generation: re-opening runs commands at every height.
    ops: Ops,
    settings: DaemonSettings,
    state: Arc<State>,
    /// Serialises takes; holds the newest snapshot height on the volume.
    gate: tokio::sync::Mutex<Option<u64>>,
    stopping: AtomicBool,
    /// Starts exports after snapshots, when exports are configured.
    export_scheduler: Option<Arc<ExportScheduler>>,
    /// Refused heights are logged at most once a minute (a polled source
    /// repeats them every second).
    refusals: Mutex<RateLimit>,
    /// The gate's newest height ([`NO_SNAPSHOT`] for none), readable
    /// without waiting for a snapshot in flight.
    newest_hint: AtomicU64,
}

/// [`Scheduler::newest_hint`] when the volume has no snapshot.
const NO_SNAPSHOT: u64 = u64::MAX;

/// Why the blocking part of a take produced no snapshot.
enum TakeError {
    /// The pre-snapshot hook declined: the snapshot is skipped.
    PreHook(btm::exec::ExecError),
    /// The node could not be made to write its state: the snapshot would
    /// not hold the height it is labelled with, so it is skipped.
    Flush(crate::height::HeightError),
    /// Taking the snapshot failed.
    Snapshot(btm::Error),
    /// The blocking task itself failed (a bug).
    Task(String),
}

impl TakeError {
    fn reason(&self) -> String {
        match self {
            TakeError::PreHook(e) => format!("pre-snapshot hook declined: {e}"),
            TakeError::Flush(e) => format!(
                "the node did not write its state before the snapshot, so the snapshot was skipped: {e}"
            ),
            TakeError::Snapshot(e) => e.to_string(),
            TakeError::Task(e) => format!("snapshot task failed: {e}"),
        }
    }
}

/// Bumps one counter.
type Count = fn(&mut Counters);

/// What the blocking part of a take produced.
/// What the daemon knows of the volume's branches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BranchCensus {
    /// How many.
    pub count: usize,
    /// The bytes they hold, when the file system tells for every one.
    pub bytes: Option<u64>,
    /// The command that finishes a switch left half done.
    pub half_done: Option<String>,
}

impl BranchCensus {
    /// What `branches` and a switch journal say.
    fn of(branches: &[btm::volume::Branch], ops: &Ops) -> Self {
        let half_done = ops.pending_switch().ok().flatten().map(|p| p.command);
        if let Some(c) = &half_done {
            tracing::warn!(
                command = c,
                "a rollback or undo was left half done; run the command again to finish it"
            );
        }
        BranchCensus {
            count: branches.len(),
            bytes: branches.iter().map(|b| b.used).sum(),
            half_done,
        }
    }
}

/// Count the volume's branches; `None` if they could not be listed
/// (logged): the status then keeps the last count rather than say none.
pub fn branch_census(ops: &Ops) -> Option<BranchCensus> {
    match ops.branches() {
        Ok(branches) => Some(BranchCensus::of(&branches, ops)),
        Err(e) => {
            tracing::warn!(error = %e, "could not list branches");
            None
        }
    }
}

struct Took {
    outcome: Result<btm::SnapshotReport, TakeError>,
    heights: Vec<u64>,
    /// The branches after expiry (only after a snapshot).
    branches: Option<BranchCensus>,
    post_hook_error: Option<btm::exec::ExecError>,
    /// The height a forced write made durable right before the snapshot.
    durable: Option<u64>,
}

impl Took {
    fn failed(e: TakeError) -> Self {
        Took {
            outcome: Err(e),
            heights: Vec::new(),
            branches: None,
            post_hook_error: None,
            durable: None,
        }
    }
}

impl Scheduler {
    /// A scheduler for `cfg`, whose volume currently holds `heights`.
    pub fn new(
        cfg: BtmCfg,
        ops: Ops,
        settings: DaemonSettings,
        state: Arc<State>,
        heights: &[u64],
        export_scheduler: Option<Arc<ExportScheduler>>,
    ) -> Self {
        let newest = heights.first().copied();
        state.volume_seen(heights.len(), next_due(&settings, newest));
        Scheduler {
            cfg,
            ops,
            settings,
            state,
            gate: tokio::sync::Mutex::new(newest),
            stopping: AtomicBool::new(false),
            export_scheduler,
            refusals: Mutex::new(RateLimit::default()),
            newest_hint: AtomicU64::new(newest.unwrap_or(NO_SNAPSHOT)),
        }
    }

    /// The volume's configuration.
    pub fn cfg(&self) -> &BtmCfg {
        &self.cfg
    }

    /// The operations handle the snapshots go through.
    pub fn ops(&self) -> &Ops {
        &self.ops
    }

    /// The newest snapshot height (waits for an in-flight take).
    pub async fn newest(&self) -> Option<u64> {
        *self.gate.lock().await
    }

    /// Re-read the newest snapshot from the volume (after the height went
    /// backwards, an operator may have rolled the volume back).
    pub async fn refresh(&self) {
        let mut newest = self.gate.lock().await;
        self.reread(&mut newest).await;
    }

    async fn reread(&self, newest: &mut Option<u64>) {
        let vol = Arc::clone(self.ops.volume());
        if let Ok(Ok(heights)) = tokio::task::spawn_blocking(move || vol.heights()).await {
            self.seen(newest, &heights);
        }
    }

    /// The volume now holds `heights` (newest first).
    fn seen(&self, newest: &mut Option<u64>, heights: &[u64]) {
        *newest = heights.first().copied();
        self.newest_hint
            .store(newest.unwrap_or(NO_SNAPSHOT), Ordering::SeqCst);
        self.state
            .volume_seen(heights.len(), next_due(&self.settings, *newest));
    }

    /// Refuse new takes, then wait for the one in flight to finish.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.gate.lock().await);
    }

    /// A height pushed by the node: snapshot it if it is a multiple of
    /// `itv` and plausible. A height that is not a multiple returns at once
    /// (it never waits for a snapshot in flight) unless it looks
    /// implausible, which is checked under the gate.
    pub async fn push(&self, height: u64) -> Taken {
        self.state.height_seen(height);
        self.state.height_passed(height);
        if push_due(height, self.cfg.itv) {
            return self.take(height).await;
        }
        let hint = match self.newest_hint.load(Ordering::SeqCst) {
            NO_SNAPSHOT => None,
            h => Some(h),
        };
        if check_height(height, hint, self.settings.max_height_jump).is_err() {
            let mut newest = self.gate.lock().await;
            if self.stopping.load(Ordering::SeqCst) {
                return Taken::Stopping;
            }
            if let Err(refused) = self.plausible(height, &mut newest).await {
                return Taken::Reply(refused);
            }
        }
        self.state.count(|c| c.skipped += 1);
        Taken::Reply(reply(
            height,
            Outcome::Skipped,
            format!("{height} is not a multiple of itv {}", self.cfg.itv),
        ))
    }

    /// Snapshot `height` now (the caller decided it is due), then prune.
    #[tracing::instrument(skip_all, fields(height))]
    pub async fn take(&self, height: u64) -> Taken {
        self.take_with(height, None).await
    }

    /// Snapshot `height` now whatever the interval, protected with `label`
    /// (an upgrade's snapshot; an existing snapshot at that height is
    /// protected as it is), then prune.
    #[tracing::instrument(skip_all, fields(height, label = %label))]
    pub async fn take_protected(&self, height: u64, label: Label) -> Taken {
        self.state.height_seen(height);
        self.take_with(height, Some(label)).await
    }

    async fn take_with(&self, height: u64, protect: Option<Label>) -> Taken {
        let mut newest = self.gate.lock().await;
        if self.stopping.load(Ordering::SeqCst) {
            return Taken::Stopping;
        }
        if let Err(refused) = self.plausible(height, &mut newest).await {
            return Taken::Reply(refused);
        }
        Taken::Reply(self.take_plausible(height, protect, &mut newest).await)
    }

    /// Check `height` against the newest snapshot (re-read from the volume
    /// if the height looks backwards: the operator may have rolled back);
    /// a refusal is logged, counted and returned as the answer.
    async fn plausible(&self, height: u64, newest: &mut Option<u64>) -> Result<(), NotifyReply> {
        let max_jump = self.settings.max_height_jump;
        let mut checked = check_height(height, *newest, max_jump);
        if let Err(Refusal::Backwards { .. }) = checked {
            self.reread(newest).await;
            checked = check_height(height, *newest, max_jump);
        }
        let Err(refusal) = checked else {
            return Ok(());
        };
        if let Refusal::Backwards { height, newest } = refusal {
            self.state.below_snapshot(height, newest);
        }
        let reason = refusal.to_string();
        let due = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due();
        if let Some(suppressed) = due {
            tracing::warn!(height, reason = %reason, suppressed, "height refused; no snapshot");
        }
        self.state.error("height", &reason);
        self.state.count(|c| c.refused += 1);
        Err(reply(height, Outcome::Refused, reason))
    }

    /// The reply, log line and counters of a snapshot not taken: skipped by
    /// the pre-snapshot hook or a failed write of the node's state, or
    /// failed.
    fn not_taken(&self, height: u64, e: TakeError, duration_ms: u64) -> NotifyReply {
        let reason = e.reason();
        // A declining hook or a failed write skips the snapshot on purpose.
        let skipped: Option<(&str, Count)> = match e {
            TakeError::PreHook(_) => Some(("hook", |c| c.hook_failures += 1)),
            TakeError::Flush(_) => Some(("flush", |c| c.flush_failures += 1)),
            TakeError::Snapshot(_) | TakeError::Task(_) => None,
        };
        if let Some((kind, count)) = skipped {
            tracing::warn!(height, reason = %reason, "snapshot skipped");
            self.state.error(kind, &reason);
            self.state.count(|c| {
                c.skipped += 1;
                count(c);
            });
            return reply(height, Outcome::Skipped, reason);
        }
        tracing::error!(height, error = %reason, duration_ms, "snapshot failed");
        self.state.error("snapshot", &reason);
        self.state.count(|c| c.snapshot_failures += 1);
        let mut r = reply(height, Outcome::Failed, reason);
        r.duration_ms = Some(duration_ms);
        r
    }

    /// What a snapshot's report and the branch census say of the volume:
    /// protected snapshots, branches, pruning.
    fn record_volume(&self, report: &btm::SnapshotReport, branches: Option<BranchCensus>) {
        self.state.protected_seen(report.protected);
        if let Some(c) = branches {
            self.state.branches_seen(c);
        }
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
    }

    /// Record a snapshot taken (or found) at `height` and what its forced
    /// write made durable.
    fn record_outcome(
        &self,
        report: &btm::SnapshotReport,
        height: u64,
        snapshot: &str,
        durable: Option<u64>,
        duration_ms: u64,
    ) -> Outcome {
        match report.outcome {
            SnapshotOutcome::Created => {
                tracing::info!(height, volume = %self.cfg.volume, snapshot = %snapshot, duration_ms, pruned = ?report.pruned, "snapshot taken");
                self.state.snapshot_taken(LastSnapshot {
                    height,
                    height_after: None,
                    durable_height: durable,
                    at: Utc::now(),
                    duration_ms,
                });
                match durable {
                    Some(d) if d == height => self.state.height_matched(height),
                    Some(d) => self.state.height_mismatch(
                        height,
                        d,
                        "flush",
                        format!(
                            "snapshot {height} holds the node's state at height {d}: the write forced before it made {d} durable, so a rollback to it restarts the node at {d}"
                        ),
                    ),
                    None => {}
                }
                Outcome::Created
            }
            SnapshotOutcome::AlreadyExists => {
                tracing::info!(height, snapshot = %snapshot, "snapshot already exists; left as it is");
                self.state.count(|c| c.skipped += 1);
                Outcome::Exists
            }
        }
    }

    async fn take_plausible(
        &self,
        height: u64,
        protect: Option<Label>,
        newest: &mut Option<u64>,
    ) -> NotifyReply {
        self.state.in_progress(Some(height));
        let started = Instant::now();
        let cfg = self.cfg.clone();
        let ops = self.ops.clone();
        let settings = self.settings.clone();
        let took = tokio::task::spawn_blocking(move || {
            take_blocking(&cfg, &ops, &settings, height, protect)
        })
        .await;
        self.state.in_progress(None);
        let duration_ms = started.elapsed().as_millis() as u64;
        let took = took.unwrap_or_else(|e| Took::failed(TakeError::Task(e.to_string())));
        match &took.outcome {
            Err(TakeError::Snapshot(e)) if e.is_timeout() => {
                self.state.volume_stalled(&e.to_string())
            }
            Ok(_) => self.state.volume_answered(),
            Err(_) => {}
        }
        if !took.heights.is_empty() || took.outcome.is_ok() {
            self.seen(newest, &took.heights);
        }
        if let Some(e) = &took.post_hook_error {
            tracing::warn!(height, error = %e, "post-snapshot hook failed");
            self.state.error("hook", &e.to_string());
            self.state.count(|c| c.hook_failures += 1);
        }
        let report = match took.outcome {
            Ok(r) => r,
            Err(e) => return self.not_taken(height, e, duration_ms),
        };
        self.record_volume(&report, took.branches);
        let snapshot = format!("{}@{height}", self.cfg.volume);
        let outcome = self.record_outcome(&report, height, &snapshot, took.durable, duration_ms);
        super::systemd::status(&self.state.summary());
        if let Some(x) = &self.export_scheduler {
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

fn take_blocking(
    cfg: &BtmCfg,
    ops: &Ops,
    settings: &DaemonSettings,
    height: u64,
    protect: Option<Label>,
) -> Took {
    let env = [
        ("BTM_HEIGHT", height.to_string()),
        ("BTM_VOLUME", cfg.volume.clone()),
    ];
    // The write comes first: a pre-snapshot hook may stop the node.
    let mut durable = None;
    if let Some(node) = settings.node.as_ref().filter(|_| settings.flush) {
        match node.flush(settings.hook_timeout) {
            Ok(d) => durable = d,
            Err(e) => return Took::failed(TakeError::Flush(e)),
        }
    }
    if let Some(argv) = &settings.pre_snapshot {
        if let Err(e) = btm::exec::run(argv, &env, settings.hook_timeout) {
            return Took::failed(TakeError::PreHook(e));
        }
    }
    let outcome = cfg
        .policy()
        .and_then(|policy| {
            let opts = SnapshotOptions {
                prune: Some(policy),
                lock_wait: settings.lock_timeout,
                protect,
            };
            ops.snapshot(height, &opts)
        })
        .map_err(TakeError::Snapshot);
    // On failure the volume may still have changed (e.g. a lock timeout
    // after another process pruned): list it; on success the report has it.
    // A volume whose commands time out is not asked again now.
    let heights = match &outcome {
        Ok(r) => r.heights.clone(),
        Err(TakeError::Snapshot(e)) if e.is_timeout() => Vec::new(),
        Err(_) => ops.volume().heights().unwrap_or_default(),
    };
    if let (Some(d), Ok(r)) = (durable, &outcome) {
        if r.outcome == SnapshotOutcome::Created {
            let vol = ops.volume();
            if let Err(e) = btm::window::record_durable(ops.dirs(), vol.name(), height, d, &heights)
            {
                tracing::warn!(height, durable = d, error = %e, "could not record the snapshot's durable height");
            }
        }
    }
    // Branches expire at the pace of snapshots; the active line is all
    // the daemon snapshots and prunes.
    let branches = outcome.is_ok().then(|| {
        match ops.expire_branches(chrono::Utc::now(), settings.keep_branches, true) {
            Ok(report) => Some(BranchCensus::of(&report.kept, ops)),
            Err(e) => {
                tracing::warn!(error = %e, "could not expire branches");
                branch_census(ops)
            }
        }
    });
    let branches = branches.flatten();
    let post_hook_error = match (&settings.post_snapshot, &outcome) {
        (Some(argv), Ok(_)) => btm::exec::run(argv, &env, settings.hook_timeout).err(),
        _ => None,
    };
    Took {
        outcome,
        heights,
        branches,
        post_hook_error,
        durable,
    }
}

/// An answer without a snapshot.
pub fn reply(height: u64, outcome: Outcome, reason: String) -> NotifyReply {
    NotifyReply {
        height,
        outcome,
        reason: Some(reason),
        snapshot: None,
        duration_ms: None,
        pruned: Vec::new(),
    }
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

    /// The real scheduler on an in-memory volume: no root, no pool.
    mod on_a_fake_volume {
        use super::*;
        use btm::volume::fake::FakeVolume;
        use btm::volume::Volume;

        struct Rig {
            scheduler: Scheduler,
            volume: Arc<FakeVolume>,
            state: Arc<State>,
            _dir: tempfile::TempDir,
        }

        fn rig(extra: &str) -> Rig {
            let dir = tempfile::tempdir().expect("tmp");
            let settings =
                crate::test_support::settings(&format!("itv = 10\ncap = 3\n{extra}"), dir.path());
            let volume = crate::test_support::fake_volume(dir.path());
            let cfg = crate::test_support::cfg(&settings);
            let ops = Ops::new(volume.clone(), settings.dirs.clone());
            let state = Arc::new(State::new(crate::initial_status(&cfg, &settings, 0)));
            let scheduler = Scheduler::new(cfg, ops, settings, Arc::clone(&state), &[], None);
            Rig {
                scheduler,
                volume,
                state,
                _dir: dir,
            }
        }

        fn outcome(t: Taken) -> Outcome {
            match t {
                Taken::Reply(r) => r.outcome,
                Taken::Stopping => panic!("stopping"),
            }
        }

        #[tokio::test]
        async fn pushed_multiples_are_taken_and_pruned_others_skipped() {
            let r = rig("");
            for h in 1..=60 {
                let got = outcome(r.scheduler.push(h).await);
                let want = if h % 10 == 0 {
                    Outcome::Created
                } else {
                    Outcome::Skipped
                };
                assert_eq!(got, want, "height {h}");
            }
            assert_eq!(r.volume.heights().expect("heights"), vec![60, 50, 40]);
            // Again at the newest: left as it is.
            assert_eq!(outcome(r.scheduler.push(60).await), Outcome::Exists);
            // Behind the newest snapshot: refused, nothing taken.
            assert_eq!(outcome(r.scheduler.push(30).await), Outcome::Refused);
            let c = r.state.status().counters;
            assert_eq!((c.snapshots, c.refused), (6, 1));
            assert_eq!(r.volume.snapshots_taken(), 6);
        }

        #[tokio::test]
        async fn a_declining_pre_hook_skips_and_a_failure_is_counted() {
            let r = rig("[hooks]\npre_snapshot = [\"false\"]\n");
            assert_eq!(outcome(r.scheduler.push(10).await), Outcome::Skipped);
            assert!(r.volume.heights().expect("heights").is_empty());
            let r = rig("");
            r.volume.fail_next_snapshots(1);
            assert_eq!(outcome(r.scheduler.push(10).await), Outcome::Failed);
            assert_eq!(outcome(r.scheduler.push(20).await), Outcome::Created);
            let c = r.state.status().counters;
            assert_eq!((c.snapshot_failures, c.snapshots), (1, 1));
        }

        #[tokio::test]
        async fn a_stopped_scheduler_takes_nothing() {
            let r = rig("");
            r.scheduler.stop().await;
            assert!(matches!(r.scheduler.push(10).await, Taken::Stopping));
            assert!(r.volume.heights().expect("heights").is_empty());
        }
    }

    #[test]
    fn push_takes_exact_multiples() {
        assert!(push_due(120, 10));
        assert!(push_due(0, 10));
        assert!(!push_due(125, 10));
        assert!(push_due(7, 1));
    }

    #[test]
    fn implausible_heights_are_refused() {
        assert_eq!(check_height(0, None, 0), Ok(()));
        assert_eq!(check_height(MAX_HEIGHT, None, 0), Ok(()));
        assert_eq!(
            check_height(u64::MAX, None, 0),
            Err(Refusal::Absurd { height: u64::MAX })
        );
        assert_eq!(
            check_height(0, Some(200), 0),
            Err(Refusal::Backwards {
                height: 0,
                newest: 200
            })
        );
        assert_eq!(check_height(200, Some(200), 10), Ok(()));
        assert_eq!(check_height(210, Some(200), 10), Ok(()));
        assert!(matches!(
            check_height(211, Some(200), 10),
            Err(Refusal::TooFar { .. })
        ));
        assert_eq!(check_height(1 << 40, Some(200), 0), Ok(()));
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
        /// An accepted height is never above MAX_HEIGHT, never below the
        /// newest snapshot, and never further ahead than the limit; every
        /// other height is accepted.
        #[test]
        fn check_height_is_exactly_its_rules(
            height in prop_oneof![0u64..1_000_000, any::<u64>()],
            newest in prop::option::of(0u64..1_000_000),
            max_jump in prop_oneof![Just(0u64), 1u64..100_000],
        ) {
            let ok = height <= MAX_HEIGHT
                && newest.is_none_or(|n| height >= n && (max_jump == 0 || height - n <= max_jump));
            prop_assert_eq!(check_height(height, newest, max_jump).is_ok(), ok);
        }

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
