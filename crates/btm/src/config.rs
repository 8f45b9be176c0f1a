//! [`BtmCfg`]: the library's front door, as in the original btm.
//!
//! A Rust node embeds btm by building a `BtmCfg` and calling
//! [`BtmCfg::snapshot`] at its commit boundary; the CLI is built on the same
//! calls. Every mutating call takes the volume's lock first, so a node, the
//! daemon and an operator at the CLI can never interleave on one volume.
//!
//! The daemon's own settings (the TOML file and its flags) are in the
//! `btm-daemon` crate.

use std::time::Duration;

use serde::Serialize;

use crate::error::Error;
use crate::lock::{self, VolumeLock};
use crate::preserve::RelPath;
use crate::retention::{Algo, Plan, Policy};
use crate::volume::{
    self, DestroyReport, RollbackEffects, SnapMode, Snapshot, SnapshotOutcome, Volume,
};
use crate::{pin, pruner};

/// Default snapshot interval in blocks (as the original btm).
pub const DEFAULT_ITV: u64 = 10;
/// Default number of snapshots kept (as the original btm).
pub const DEFAULT_CAP: u64 = 100;

/// Everything btm needs to manage one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtmCfg {
    /// Snapshot interval in blocks; also fade's slot base. At least 1.
    pub itv: u64,
    /// Most snapshots kept by retention. At least 1.
    pub cap: u64,
    /// The volume's filesystem.
    pub mode: SnapMode,
    /// The retention rule.
    pub algo: Algo,
    /// A ZFS dataset (`zroot/data`) or a btrfs subvolume path (`/data`).
    pub volume: String,
}

/// The original btm's defaults: a snapshot every [`DEFAULT_ITV`] blocks,
/// [`DEFAULT_CAP`] kept, fair retention, ZFS. The volume is empty and must
/// be set; an empty volume is refused by every operation.
impl Default for BtmCfg {
    fn default() -> Self {
        BtmCfg {
            itv: DEFAULT_ITV,
            cap: DEFAULT_CAP,
            mode: SnapMode::Zfs,
            algo: Algo::Fair,
            volume: String::new(),
        }
    }
}

/// What [`BtmCfg::snapshot`] did.
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
}

impl BtmCfg {
    /// Build a configuration, detecting the mode when `mode` is `None`.
    /// Detection only reads; it never creates or changes anything.
    pub fn new(
        volume: &str,
        mode: Option<SnapMode>,
        itv: u64,
        cap: u64,
        algo: Algo,
    ) -> Result<Self, Error> {
        Policy::new(algo, itv, cap)?;
        let mode = match mode {
            Some(m) => m,
            None => volume::open(volume, None)?.mode(),
        };
        Ok(BtmCfg {
            itv,
            cap,
            mode,
            algo,
            volume: volume.to_owned(),
        })
    }

    /// The retention policy these settings describe.
    pub fn policy(&self) -> Result<Policy, Error> {
        Ok(Policy::new(self.algo, self.itv, self.cap)?)
    }

    /// Open the volume (reads only).
    pub fn open(&self) -> Result<Box<dyn Volume>, Error> {
        Ok(volume::open(&self.volume, Some(self.mode))?)
    }

    /// Take the volume's lock, waiting up to [`lock::DEFAULT_WAIT`].
    pub fn lock(&self, volume: &dyn Volume) -> Result<VolumeLock, Error> {
        Ok(VolumeLock::acquire(volume.name(), lock::DEFAULT_WAIT)?)
    }

    /// Snapshot at `height`, then prune by the policy: what a node calls at
    /// each multiple of `itv`. A snapshot that already exists is left as it
    /// is and reported. Pruning failures are reported, never raised: losing
    /// a prune must not lose the snapshot.
    pub fn snapshot(&self, height: u64) -> Result<SnapshotReport, Error> {
        self.snapshot_waiting(height, lock::DEFAULT_WAIT)
    }

    /// [`BtmCfg::snapshot`], waiting at most `lock_wait` for the volume lock.
    pub fn snapshot_waiting(
        &self,
        height: u64,
        lock_wait: Duration,
    ) -> Result<SnapshotReport, Error> {
        self.snapshot_on(self.open()?.as_ref(), height, lock_wait)
    }

    /// [`BtmCfg::snapshot_waiting`] on a volume the caller already opened
    /// (the daemon opens it once, not at every height).
    pub fn snapshot_on(
        &self,
        vol: &dyn Volume,
        height: u64,
        lock_wait: Duration,
    ) -> Result<SnapshotReport, Error> {
        let policy = self.policy()?;
        let _lock = VolumeLock::acquire(vol.name(), lock_wait)?;
        let started = std::time::Instant::now();
        let outcome = take(vol, height)?;
        let snapshot_ms = started.elapsed().as_millis() as u64;
        let started = std::time::Instant::now();
        let plan = policy.plan(&vol.heights()?).pin(&pin::pinned(vol.name())?);
        let report = pruner::execute(vol, &plan);
        let mut heights = plan.kept();
        heights.extend(report.failed.iter().map(|(h, _)| *h));
        heights.sort_unstable_by(|a, b| b.cmp(a));
        Ok(SnapshotReport {
            heights,
            height,
            outcome,
            snapshot_ms,
            prune_ms: started.elapsed().as_millis() as u64,
            pruned: report.destroyed,
            prune_failures: report
                .failed
                .into_iter()
                .map(|(h, e)| (h, e.to_string()))
                .collect(),
        })
    }

    /// Snapshot at `height` without pruning.
    pub fn snapshot_only(&self, height: u64) -> Result<SnapshotOutcome, Error> {
        let vol = self.open()?;
        let _lock = self.lock(vol.as_ref())?;
        take(vol.as_ref(), height)
    }

    /// The retention plan for the volume's current snapshots; with
    /// `execute`, also destroy what it marks, under the lock.
    pub fn prune(&self, execute: bool) -> Result<(Plan, Option<DestroyReport>), Error> {
        let policy = self.policy()?;
        let vol = self.open()?;
        if !execute {
            let plan = policy.plan(&vol.heights()?).pin(&pin::pinned(vol.name())?);
            return Ok((plan, None));
        }
        let _lock = self.lock(vol.as_ref())?;
        let plan = policy.plan(&vol.heights()?).pin(&pin::pinned(vol.name())?);
        let report = pruner::execute(vol.as_ref(), &plan);
        Ok((plan, Some(report)))
    }

    /// Heights of btm snapshots, newest first.
    pub fn get_sorted_snapshots(&self) -> Result<Vec<u64>, Error> {
        Ok(self.open()?.heights()?)
    }

    /// btm snapshots with creation time, space used and, for snapshots a
    /// polling daemon took, the recorded height window; newest first.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>, Error> {
        let vol = self.open()?;
        let windows = crate::window::load(vol.name());
        let mut snaps = vol.list()?;
        for s in &mut snaps {
            s.height_after = windows.get(&s.height).copied();
        }
        Ok(snaps)
    }

    /// Roll back to `target` (`None`: the latest snapshot). Non-strict picks
    /// the closest height at or below `target`. No files are preserved; use
    /// [`BtmCfg::prepare_rollback`] for that and to see the effects first.
    pub fn rollback(&self, target: Option<u64>, strict: bool) -> Result<u64, Error> {
        let prepared = self.prepare_rollback(target, strict)?;
        let h = prepared.effects().target;
        prepared.execute(&[])?;
        Ok(h)
    }

    /// Resolve the rollback target and compute what the rollback would do,
    /// holding the volume's lock until the result is executed or dropped,
    /// so nothing changes between showing the effects and acting.
    pub fn prepare_rollback(
        &self,
        target: Option<u64>,
        strict: bool,
    ) -> Result<PreparedRollback, Error> {
        let vol = self.open()?;
        let lock = self.lock(vol.as_ref())?;
        let heights = vol.heights()?;
        let h = resolve_target(&heights, target, strict).map_err(|e| match e {
            Error::NoSnapshots(_) => Error::NoSnapshots(self.volume.clone()),
            e => e,
        })?;
        let effects = vol.rollback_effects(h)?;
        refuse_pinned(vol.name(), &effects.destroys)?;
        if !effects.foreign_blockers.is_empty() {
            return Err(volume::Error::ForeignSnapshots {
                target: h,
                names: effects.foreign_blockers,
            }
            .into());
        }
        Ok(PreparedRollback {
            volume: vol,
            effects,
            _lock: lock,
        })
    }

    /// Destroy every btm snapshot.
    pub fn clean_snapshots(&self) -> Result<DestroyReport, Error> {
        self.clean(0)
    }

    /// Destroy every btm snapshot except the newest `kept`.
    pub fn clean(&self, kept: u64) -> Result<DestroyReport, Error> {
        let vol = self.open()?;
        let _lock = self.lock(vol.as_ref())?;
        let doomed: Vec<u64> = vol
            .heights()?
            .into_iter()
            .skip(usize::try_from(kept).unwrap_or(usize::MAX))
            .collect();
        refuse_pinned(vol.name(), &doomed)?;
        Ok(vol.destroy(&doomed))
    }
}

/// Fail, touching nothing, if any of `doomed` is pinned by an export.
fn refuse_pinned(volume: &str, doomed: &[u64]) -> Result<(), Error> {
    let pinned = pin::pinned(volume)?;
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

/// A rollback whose target and effects are known, waiting to be executed.
/// Holds the volume's lock.
pub struct PreparedRollback {
    volume: Box<dyn Volume>,
    effects: RollbackEffects,
    _lock: VolumeLock,
}

impl PreparedRollback {
    /// What executing will do.
    pub fn effects(&self) -> &RollbackEffects {
        &self.effects
    }

    /// The volume being rolled back.
    pub fn volume(&self) -> &dyn Volume {
        self.volume.as_ref()
    }

    /// Roll back, carrying the current content of `preserve` across.
    pub fn execute(self, preserve: &[RelPath]) -> Result<(), Error> {
        let target = self.effects.target;
        nix::unistd::sync();
        self.volume.rollback(target, preserve)?;
        tracing::info!(volume = self.volume.name(), height = target, "rolled back");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_target_resolution() {
        let hs = [300, 200, 100];
        assert_eq!(resolve_target(&hs, None, false).ok(), Some(300));
        assert_eq!(resolve_target(&hs, Some(250), false).ok(), Some(200));
        assert_eq!(resolve_target(&hs, Some(200), true).ok(), Some(200));
        assert!(matches!(
            resolve_target(&hs, Some(250), true),
            Err(Error::NoExactSnapshot(250))
        ));
        assert!(matches!(
            resolve_target(&hs, Some(99), false),
            Err(Error::NothingAtOrBelow(99))
        ));
        assert!(matches!(
            resolve_target(&[], None, false),
            Err(Error::NoSnapshots(_))
        ));
        assert_eq!(resolve_target(&hs, Some(u64::MAX), false).ok(), Some(300));
    }
}
