//! The operations handle: everything btm does to one volume, with its
//! dependencies passed in. An [`Ops`] owns a [`Volume`] (a trait object: a
//! real driver, or an in-memory fake in tests) and the [`Dirs`] where
//! locks, pins and windows live. It never looks anything up by name, so the
//! daemon opens a volume once and a unit test runs every operation without
//! root in milliseconds.
//!
//! [`crate::BtmCfg`] is the façade compatible with the original btm's
//! library API (the README btm grew from): it opens the volume by name
//! with [`Dirs::from_env`] and calls these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::dirs::Dirs;
use crate::error::Error;
use crate::lock::{self, VolumeLock};
use crate::retention::{Plan, Policy};
use crate::volume::{BranchName, DestroyReport, Label, Snapshot, SnapshotOutcome, Volume};
use crate::{pin, pruner};

/// Operations on one opened volume.
#[derive(Clone)]
pub struct Ops {
    volume: Arc<dyn Volume>,
    dirs: Dirs,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("volume", &self.volume.name())
            .field("dirs", &self.dirs)
            .finish()
    }
}

/// How [`Ops::snapshot`] runs.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Prune by this policy after the snapshot (`None`: only snapshot).
    pub prune: Option<Policy>,
    /// The longest wait for the volume's lock.
    pub lock_wait: Duration,
    /// Protect the snapshot with this label before pruning (an upgrade's
    /// snapshot): no retention policy prunes it until it is released.
    pub protect: Option<Label>,
}

impl SnapshotOptions {
    /// Snapshot only: no pruning, no protection.
    pub fn unpruned(lock_wait: Duration) -> Self {
        SnapshotOptions {
            prune: None,
            lock_wait,
            protect: None,
        }
    }

    /// Snapshot, then prune by `policy`, waiting the default time for the
    /// lock: what a node does at each multiple of `itv`.
    pub fn pruning(policy: Policy) -> Self {
        SnapshotOptions {
            prune: Some(policy),
            lock_wait: lock::DEFAULT_WAIT,
            protect: None,
        }
    }
}

/// What [`Ops::snapshot`] did.
#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    /// The height asked for.
    pub height: u64,
    /// Created, or already there.
    pub outcome: SnapshotOutcome,
    /// Heights pruned afterwards.
    pub pruned: Vec<u64>,
    /// Heights retention wanted gone but could not destroy, with why.
    pub prune_failures: Vec<(u64, String)>,
    /// How long taking the snapshot took (lock wait excluded).
    pub snapshot_ms: u64,
    /// How long pruning took.
    pub prune_ms: u64,
    /// btm snapshot heights on the volume afterwards, newest first.
    pub heights: Vec<u64>,
    /// How many of them are protected (known when pruning; 0 otherwise).
    pub protected: usize,
}

impl Ops {
    /// Operations on `volume`, keeping locks, pins and windows in `dirs`.
    pub fn new(volume: Arc<dyn Volume>, dirs: Dirs) -> Self {
        Ops { volume, dirs }
    }

    /// The volume.
    pub fn volume(&self) -> &Arc<dyn Volume> {
        &self.volume
    }

    /// Where locks, pins and windows live.
    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    /// Take the volume's lock, waiting up to `wait`.
    pub fn lock(&self, wait: Duration) -> Result<VolumeLock, Error> {
        Ok(VolumeLock::acquire(&self.dirs, self.volume.name(), wait)?)
    }

    /// Snapshot at `height` under the volume's lock, then prune if asked.
    /// A snapshot that already exists is left as it is and reported.
    /// Pruning failures are reported, never raised: losing a prune must not
    /// lose the snapshot.
    pub fn snapshot(&self, height: u64, opts: &SnapshotOptions) -> Result<SnapshotReport, Error> {
        let vol = self.volume.as_ref();
        let _lock = self.lock(opts.lock_wait)?;
        let started = Instant::now();
        let outcome = take(vol, height)?;
        if let Some(label) = &opts.protect {
            vol.set_protection(height, Some(label))?;
            tracing::info!(volume = vol.name(), height, label = %label, "snapshot protected");
        }
        let snapshot_ms = started.elapsed().as_millis() as u64;
        let mut report = SnapshotReport {
            height,
            outcome,
            pruned: Vec::new(),
            prune_failures: Vec::new(),
            snapshot_ms,
            prune_ms: 0,
            heights: Vec::new(),
            protected: 0,
        };
        let Some(policy) = &opts.prune else {
            report.heights = vol.heights()?;
            return Ok(report);
        };
        let started = Instant::now();
        let plan = self.plan(policy)?;
        let destroyed = pruner::execute(vol, &plan);
        let mut heights = plan.kept();
        heights.extend(destroyed.failed.iter().map(|(h, _)| *h));
        heights.sort_unstable_by(|a, b| b.cmp(a));
        report.heights = heights;
        report.protected = plan.protected.len();
        report.prune_ms = started.elapsed().as_millis() as u64;
        report.pruned = destroyed.destroyed;
        report.prune_failures = destroyed
            .failed
            .into_iter()
            .map(|(h, e)| (h, e.to_string()))
            .collect();
        Ok(report)
    }

    /// What `policy` decides for the current snapshots: pinned ones kept,
    /// protected ones outside the policy and kept. Only reads.
    pub fn plan(&self, policy: &Policy) -> Result<Plan, Error> {
        let vol = self.volume.as_ref();
        let (heights, protected) = vol.heights_and_protections()?;
        let free: Vec<u64> = heights
            .into_iter()
            .filter(|h| !protected.contains_key(h))
            .collect();
        Ok(policy
            .plan(&free)
            .pin(&pin::pinned(&self.dirs, vol.name())?)
            .protect(protected))
    }

    /// Protect the snapshot at `height` with `label` (under the lock).
    pub fn protect(&self, height: u64, label: &Label) -> Result<(), Error> {
        let _lock = self.lock(lock::DEFAULT_WAIT)?;
        self.volume.set_protection(height, Some(label))?;
        tracing::info!(volume = self.volume.name(), height, label = %label, "snapshot protected");
        Ok(())
    }

    /// The heights of the snapshots protected with `label`, newest first;
    /// none is an error.
    pub fn protected_with(&self, label: &Label) -> Result<Vec<u64>, Error> {
        let heights: Vec<u64> = self
            .volume
            .protections()?
            .into_iter()
            .rev()
            .filter(|(_, l)| l == label.as_str())
            .map(|(h, _)| h)
            .collect();
        if heights.is_empty() {
            return Err(Error::NoSuchLabel(label.to_string()));
        }
        Ok(heights)
    }

    /// Return every snapshot protected with `label` to normal retention,
    /// on the active line and in the branches rollbacks kept (where it
    /// held the branch from expiring): each released snapshot, with the
    /// branch it is in.
    pub fn release(&self, label: &Label) -> Result<Vec<(Option<BranchName>, u64)>, Error> {
        let _lock = self.lock(lock::DEFAULT_WAIT)?;
        let mut released = Vec::new();
        match self.protected_with(label) {
            Ok(heights) => {
                for h in heights {
                    self.volume.set_protection(h, None)?;
                    released.push((None, h));
                }
            }
            Err(Error::NoSuchLabel(_)) => {}
            Err(e) => return Err(e),
        }
        for b in self.volume.branches()? {
            for (&h, l) in &b.protected {
                if l == label.as_str() {
                    self.volume.release_in_branch(&b.name, h)?;
                    released.push((Some(b.name.clone()), h));
                }
            }
        }
        if released.is_empty() {
            return Err(Error::NoSuchLabel(label.to_string()));
        }
        Ok(released)
    }

    /// Apply `policy` under the lock: the plan and what was destroyed.
    pub fn prune(&self, policy: &Policy) -> Result<(Plan, DestroyReport), Error> {
        let _lock = self.lock(lock::DEFAULT_WAIT)?;
        let plan = self.plan(policy)?;
        let report = pruner::execute(self.volume.as_ref(), &plan);
        Ok((plan, report))
    }

    /// btm snapshots with details, protection labels and, for snapshots a
    /// daemon took, the recorded height window and durable height; newest
    /// first.
    pub fn list(&self) -> Result<Vec<Snapshot>, Error> {
        let records = crate::window::records(&self.dirs, self.volume.name());
        let mut protected = self.volume.protections()?;
        let mut snaps = self.volume.list()?;
        for s in &mut snaps {
            let r = records.get(&s.height).copied().unwrap_or_default();
            s.height_after = r.after;
            s.durable_height = r.durable;
            s.protected = protected.remove(&s.height);
        }
        Ok(snaps)
    }

    /// What [`Ops::clean`] would destroy (newest first): every btm snapshot
    /// but the newest `kept`, protected ones left out unless their label is
    /// in `labels`. Only reads.
    pub fn clean_candidates(&self, kept: u64, labels: &[Label]) -> Result<Vec<u64>, Error> {
        let protected = self.volume.protections()?;
        let named = |l: &String| labels.iter().any(|x| x.as_str() == l);
        Ok(self
            .volume
            .heights()?
            .into_iter()
            .filter(|h| protected.get(h).is_none_or(named))
            .skip(usize::try_from(kept).unwrap_or(usize::MAX))
            .collect())
    }

    /// Destroy [`Ops::clean_candidates`] under the lock. Refuses, touching
    /// nothing, if one of them is pinned.
    pub fn clean(&self, kept: u64, labels: &[Label]) -> Result<DestroyReport, Error> {
        let _lock = self.lock(lock::DEFAULT_WAIT)?;
        let doomed = self.clean_candidates(kept, labels)?;
        self.refuse_pinned(&doomed)?;
        Ok(self.volume.destroy(&doomed))
    }

    /// Fail, touching nothing, if any of `doomed` is pinned by an export.
    pub(crate) fn refuse_pinned(&self, doomed: &[u64]) -> Result<(), Error> {
        let pinned = pin::pinned(&self.dirs, self.volume.name())?;
        let hit: Vec<u64> = doomed
            .iter()
            .copied()
            .filter(|h| pinned.contains(h))
            .collect();
        if hit.is_empty() {
            Ok(())
        } else {
            Err(Error::Pinned(hit))
        }
    }
}

fn take(vol: &dyn Volume, height: u64) -> Result<SnapshotOutcome, Error> {
    // Flush dirty pages so the snapshot holds what the node has written.
    nix::unistd::sync();
    let outcome = vol.snapshot(height)?;
    match outcome {
        SnapshotOutcome::Created => tracing::debug!(volume = vol.name(), height, "snapshot taken"),
        SnapshotOutcome::AlreadyExists => {
            tracing::debug!(
                volume = vol.name(),
                height,
                "snapshot already exists; left as it is"
            )
        }
    }
    Ok(outcome)
}

/// Pick the rollback height from `heights` (newest first).
///
/// `None` is the latest. Strict requires the exact height. Otherwise the
/// closest existing height at or below the target is chosen.
pub fn resolve_target(heights: &[u64], target: Option<u64>, strict: bool) -> Result<u64, Error> {
    let Some(&latest) = heights.first() else {
        return Err(Error::NoSnapshots(String::new()));
    };
    match target {
        None => Ok(latest),
        Some(t) if strict => heights
            .contains(&t)
            .then_some(t)
            .ok_or(Error::NoExactSnapshot(t)),
        Some(t) => heights
            .iter()
            .copied()
            .filter(|&h| h <= t)
            .max()
            .ok_or(Error::NothingAtOrBelow(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::Algo;
    use crate::volume::fake::FakeVolume;
    use crate::volume::SnapMode;

    pub(super) fn fake(dir: &tempfile::TempDir) -> (Ops, Arc<FakeVolume>) {
        let vol = Arc::new(
            FakeVolume::new("tank/chain", SnapMode::Zfs, &dir.path().join("vol")).expect("fake"),
        );
        let ops = Ops::new(vol.clone(), Dirs::under(dir.path()));
        (ops, vol)
    }

    fn policy(algo: Algo, itv: u64, cap: u64) -> Policy {
        Policy::new(algo, itv, cap).expect("policy")
    }

    #[test]
    fn snapshots_prune_by_the_policy_and_report_what_they_did() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = fake(&dir);
        let opts = SnapshotOptions::pruning(policy(Algo::Fair, 10, 3));
        for h in (10..=50).step_by(10) {
            ops.snapshot(h, &opts).expect("snapshot");
        }
        assert_eq!(vol.heights().expect("heights"), vec![50, 40, 30]);
        let again = ops.snapshot(50, &opts).expect("again");
        assert_eq!(again.outcome, SnapshotOutcome::AlreadyExists);
        assert_eq!(vol.snapshots_taken(), 5);
        // A snapshot without pruning keeps everything.
        let only = SnapshotOptions::unpruned(Duration::ZERO);
        let r = ops.snapshot(60, &only).expect("snapshot");
        assert_eq!(r.heights, vec![60, 50, 40, 30]);
        assert!(r.pruned.is_empty());
    }

    #[test]
    fn a_failed_prune_is_reported_and_the_snapshot_is_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = fake(&dir);
        let opts = SnapshotOptions::pruning(policy(Algo::Fair, 10, 1));
        ops.snapshot(10, &opts).expect("first");
        vol.make_undestroyable(10);
        let r = ops.snapshot(20, &opts).expect("the snapshot stands");
        assert_eq!(r.outcome, SnapshotOutcome::Created);
        assert_eq!(r.prune_failures.len(), 1, "{r:?}");
        assert_eq!(r.heights, vec![20, 10]);
        vol.fail_next_snapshots(1);
        assert!(ops.snapshot(30, &opts).is_err());
        assert_eq!(vol.heights().expect("heights"), vec![20, 10]);
    }

    #[test]
    fn pinned_snapshots_survive_pruning_and_block_clean_and_rollback() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = fake(&dir);
        let keep_one = policy(Algo::Fair, 10, 1);
        for h in [10, 20, 30] {
            ops.snapshot(h, &SnapshotOptions::unpruned(Duration::ZERO))
                .expect("snapshot");
        }
        let pin = pin::Pin::acquire(ops.dirs(), vol.name(), 10).expect("pin");
        let (plan, report) = ops.prune(&keep_one).expect("prune");
        assert_eq!(report.destroyed, vec![20]);
        assert_eq!(plan.kept(), vec![30, 10]);
        assert!(matches!(ops.clean(0, &[]), Err(Error::Pinned(h)) if h == vec![10]));
        drop(pin);
        assert_eq!(ops.clean(0, &[]).expect("clean").destroyed, vec![30, 10]);
    }
}

#[cfg(test)]
mod protection_tests {
    use super::*;
    use crate::retention::{Algo, Decision, KeepReason};

    fn label(s: &str) -> Label {
        s.parse().expect("label")
    }

    #[test]
    fn protected_snapshots_are_outside_fair_and_fade_until_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = super::tests::fake(&dir);
        let only = SnapshotOptions::unpruned(Duration::ZERO);
        for h in (10..=100).step_by(10) {
            ops.snapshot(h, &only).expect("snapshot");
        }
        ops.protect(20, &label("v2-upgrade")).expect("protect");
        for algo in [Algo::Fair, Algo::Fade] {
            let policy = Policy::new(algo, 10, 3).expect("policy");
            let plan = ops.plan(&policy).expect("plan");
            let v = plan.verdicts.iter().find(|v| v.height == 20).expect("20");
            assert_eq!(v.decision, Decision::Keep(KeepReason::Protected));
            assert_eq!(plan.describe(v), "keep: protected (v2-upgrade)");
            // It takes no place under the cap.
            assert_eq!(plan.kept().len(), 4, "{algo:?}: {:?}", plan.kept());
        }
        let fair = Policy::new(Algo::Fair, 10, 2).expect("policy");
        ops.prune(&fair).expect("prune");
        assert_eq!(vol.heights().expect("heights"), vec![100, 90, 20]);
        // clean keeps it unless asked by label.
        assert_eq!(ops.clean(0, &[]).expect("clean").destroyed, vec![100, 90]);
        assert_eq!(vol.heights().expect("heights"), vec![20]);
        assert!(matches!(
            ops.release(&label("other")),
            Err(Error::NoSuchLabel(_))
        ));
        assert_eq!(
            ops.release(&label("v2-upgrade")).expect("release"),
            vec![(None, 20)]
        );
        assert!(vol.protections().expect("protections").is_empty());
        assert_eq!(ops.clean(0, &[]).expect("clean").destroyed, vec![20]);
    }

    #[test]
    fn labels_are_plain_words() {
        for good in ["v2.0-upgrade", "A_1"] {
            assert!(good.parse::<Label>().is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "x=y", &"a".repeat(65)] {
            assert!(bad.parse::<Label>().is_err(), "{bad}");
        }
    }
}
