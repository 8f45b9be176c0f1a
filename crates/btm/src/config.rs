//! [`BtmCfg`]: the library's front door, as in the original btm.
//!
//! A Rust node embeds btm by building a `BtmCfg` and calling
//! [`BtmCfg::snapshot`] at its commit boundary. Each call opens the volume
//! by name and runs the matching [`Ops`] operation, which takes the
//! volume's lock before changing anything, so a node, the daemon and an
//! operator at the CLI can never interleave on one volume. Code that keeps
//! a volume open (the daemon, the CLI) uses [`BtmCfg::ops`] directly.
//!
//! The daemon's own settings (the TOML file and its flags) are in the
//! `btm-daemon` crate.

use std::sync::Arc;

use crate::dirs::Dirs;
use crate::error::Error;
use crate::ops::{Ops, SnapshotOptions, SnapshotReport};
use crate::retention::{Algo, Plan, Policy};
use crate::volume::{self, DestroyReport, SnapMode, Snapshot};

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
            None => volume::open(volume, None, &Dirs::from_env())?.mode(),
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

    /// Open the volume (reads only) with the directories of
    /// [`Dirs::from_env`], as an [`Ops`] handle.
    pub fn ops(&self) -> Result<Ops, Error> {
        self.ops_in(Dirs::from_env())
    }

    /// [`BtmCfg::ops`] with locks, pins and windows in `dirs`.
    pub fn ops_in(&self, dirs: Dirs) -> Result<Ops, Error> {
        let volume = volume::open(&self.volume, Some(self.mode), &dirs)?;
        Ok(Ops::new(Arc::from(volume), dirs))
    }

    /// Snapshot at `height`, then prune by the policy: what a node calls at
    /// each multiple of `itv`. A snapshot that already exists is left as it
    /// is and reported. Pruning failures are reported, never raised: losing
    /// a prune must not lose the snapshot. Other options: [`Ops::snapshot`].
    pub fn snapshot(&self, height: u64) -> Result<SnapshotReport, Error> {
        let policy = self.policy()?;
        self.ops()?
            .snapshot(height, &SnapshotOptions::pruning(policy))
    }

    /// The retention plan for the volume's current snapshots; with
    /// `execute`, also destroy what it marks, under the lock.
    pub fn prune(&self, execute: bool) -> Result<(Plan, Option<DestroyReport>), Error> {
        let policy = self.policy()?;
        let ops = self.ops()?;
        if !execute {
            return Ok((ops.plan(&policy)?, None));
        }
        let (plan, report) = ops.prune(&policy)?;
        Ok((plan, Some(report)))
    }

    /// Heights of btm snapshots, newest first.
    pub fn get_sorted_snapshots(&self) -> Result<Vec<u64>, Error> {
        Ok(self.ops()?.volume().heights()?)
    }

    /// btm snapshots with creation time, space used and, for snapshots a
    /// polling daemon took, the recorded height window; newest first.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>, Error> {
        self.ops()?.list()
    }

    /// Roll back to `target` (`None`: the latest snapshot). Non-strict picks
    /// the closest height at or below `target`. Destroys nothing: the line
    /// left is kept as a branch (`btm rollback --undo`). No files are
    /// carried across; use [`Ops::prepare_switch`] for that and to see the
    /// effects first.
    pub fn rollback(&self, target: Option<u64>, strict: bool) -> Result<u64, Error> {
        let ask = crate::rollback::Ask::Rollback { target, strict };
        let prepared = self
            .ops()?
            .prepare_switch(&ask, None, Vec::new(), chrono::Utc::now())?;
        let h = prepared.switch().fork;
        prepared.execute(None)?;
        Ok(h)
    }

    /// Destroy every btm snapshot except the newest `kept` (`0`: all) and
    /// the protected ones.
    pub fn clean(&self, kept: u64) -> Result<DestroyReport, Error> {
        self.ops()?.clean(kept, &[])
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::resolve_target;
    use crate::Error;

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
