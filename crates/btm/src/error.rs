//! The library's top-level error: one enum wrapping each layer's, plus the
//! failures that only make sense at the [`crate::BtmCfg`] level.

use crate::{lock, pin, retention, volume};

/// Anything a [`crate::BtmCfg`] operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the volume drivers.
    #[error(transparent)]
    Volume(#[from] volume::Error),
    /// Taking the per-volume lock.
    #[error(transparent)]
    Lock(#[from] lock::Error),
    /// The retention parameters.
    #[error(transparent)]
    Policy(#[from] retention::PolicyError),
    /// Reading the snapshot pins.
    #[error(transparent)]
    Pin(#[from] pin::Error),
    /// The operation would destroy snapshots that a running export reads.
    #[error("snapshot(s) at height {} are pinned by a running export; try again when it ends", .0.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))]
    Pinned(Vec<u64>),
    /// The volume has no btm snapshot at all.
    #[error("volume '{0}' has no btm snapshots")]
    NoSnapshots(String),
    /// Strict rollback: the exact height is missing.
    #[error("no snapshot at exactly height {0} (strict mode)")]
    NoExactSnapshot(u64),
    /// Non-strict rollback: nothing at or below the target.
    #[error("no snapshot at or below height {0}")]
    NothingAtOrBelow(u64),
}

impl Error {
    /// Whether trying again later may succeed (busy dataset, held lock).
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Volume(e) => e.is_temporary(),
            Error::Lock(e) => e.is_temporary(),
            Error::Pinned(_) => true,
            _ => false,
        }
    }
}
