//! The library's top-level error: one enum wrapping each layer's, plus the
//! failures that only make sense at the [`crate::BtmCfg`] level.
//!
//! # Error policy (every crate of the workspace)
//!
//! - Each layer has its own `thiserror` enum, with variants a caller can act
//!   on (`NotFound`, `Busy`, `Temporary`, …), never a `String` that control
//!   flow has to parse. Free text is only for detail a human reads.
//! - An error **prints its cause and does not return it from `source()`**.
//!   A variant that wraps a lower error either is `#[error(transparent)]`
//!   (it *is* that error) or names the wrapped value in its message and
//!   keeps it in a field called `cause`, never `source` and never
//!   `#[source]`/`#[from]` (thiserror would return it from `source()`, and
//!   a chain printer would print it twice). So a log line with `%e` is
//!   complete, and the binary prints `anyhow`'s chain, whose only links are
//!   the contexts it adds itself, joined with ": ", with no de-duplication.
//! - `anyhow` is used only in the binary; libraries return their enums.
//! - Nothing outside tests unwraps; a bad input is an error value naming the
//!   input, which the binary prints as one line with a non-zero exit.

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
    /// The operation would destroy protected snapshots.
    #[error("this would destroy protected snapshot(s) {}; release them first with `btm release LABEL`", .0.iter().map(|(h, l)| format!("{h} ({l})")).collect::<Vec<_>>().join(", "))]
    Protected(Vec<(u64, String)>),
    /// No snapshot carries this protection label.
    #[error("no snapshot is protected with label '{0}'")]
    NoSuchLabel(String),
    /// The volume has no btm snapshot at all.
    #[error("volume '{0}' has no btm snapshots")]
    NoSnapshots(String),
    /// Strict rollback: the exact height is missing.
    #[error("no snapshot at exactly height {0} (strict mode)")]
    NoExactSnapshot(u64),
    /// Non-strict rollback: nothing at or below the target.
    #[error("no snapshot at or below height {0}")]
    NothingAtOrBelow(u64),
    /// A rollback or undo was left half done: only the same command may
    /// run until it is finished.
    #[error("a switch was left half done on this volume; run `{command}` again to finish it")]
    HalfDone {
        /// The command that started it.
        command: String,
    },
    /// The journal of a switch cannot be read back.
    #[error("{}: unreadable switch journal ({detail}); look at it, and remove it only once the volume is as you want it", path.display())]
    BadJournal {
        /// The journal file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
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

    /// Whether a `zfs` or `btrfs` command ran past its time limit: the
    /// volume is not answering (a suspended pool, a frozen filesystem).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Volume(e) if e.is_timeout())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    /// The policy above: errors carrying a lower error print it and do not
    /// return it from `source()`.
    #[test]
    fn errors_print_their_cause_and_hide_no_source() {
        let io = || io::Error::new(io::ErrorKind::PermissionDenied, "denied by test");
        let samples: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(crate::lock::Error::Io {
                path: PathBuf::from("/l"),
                cause: io(),
            }),
            Box::new(crate::pin::Error::Io {
                path: PathBuf::from("/p"),
                cause: io(),
            }),
            Box::new(crate::dirs::Error {
                path: PathBuf::from("/d"),
                cause: io(),
            }),
            Box::new(crate::volume::Error::io("/v", io())),
            Box::new(super::Error::from(crate::volume::Error::io("/w", io()))),
        ];
        for e in samples {
            assert!(e.to_string().contains("denied by test"), "{e}");
            assert!(e.source().is_none(), "{e} also returns its source");
        }
    }
}
