//! The control socket's wire protocol, shared by the daemon and clients.
//!
//! One JSON object per line each way over a Unix stream socket; the daemon
//! answers one request per connection and closes it:
//!
//! ```text
//! → {"cmd":"notify","height":120}
//! ← {"ok":true,"result":{"height":120,"outcome":"created","snapshot":"tank/data@120","duration_ms":14,"pruned":[20]}}
//! → {"cmd":"status"}
//! ← {"ok":true,"result":{"volume":"tank/data", …}}
//! ← {"ok":false,"error":"bad request: …"}
//! ```
//!
//! A `notify` answer is sent only after the snapshot exists (or was skipped,
//! with the reason), so a node that notifies at its commit boundary gets a
//! snapshot of exactly that height.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::retention::Algo;
use crate::volume::SnapMode;

/// The longest request line the daemon reads.
pub const MAX_LINE: usize = 4096;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// The node reached `height`; snapshot it if it is due. With
    /// `protect`, snapshot it whatever the interval (and whether or not the
    /// daemon polls), protected with that label: an upgrade's snapshot.
    Notify {
        /// The block height just committed.
        height: u64,
        /// A protection label (see `btm::volume::Label`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protect: Option<String>,
    },
    /// Report the daemon's state.
    Status,
}

/// The envelope of every answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply<T> {
    /// Success, with the result.
    Ok {
        /// Always `true`.
        ok: bool,
        /// The answer.
        result: T,
    },
    /// Failure, with a one-line reason.
    Err {
        /// Always `false`.
        ok: bool,
        /// Why.
        error: String,
    },
}

impl<T: Serialize> Reply<T> {
    /// The reply as one JSON line (without the newline).
    pub fn to_line(&self) -> Option<String> {
        serde_json::to_string(self).ok()
    }
}

impl<T> Reply<T> {
    /// A successful reply.
    pub fn ok(result: T) -> Self {
        Reply::Ok { ok: true, result }
    }
    /// A failed reply.
    pub fn err(error: impl Into<String>) -> Self {
        Reply::Err {
            ok: false,
            error: error.into(),
        }
    }
}

/// What became of a notified height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A snapshot was taken.
    Created,
    /// A snapshot at that height already existed; nothing was changed.
    Exists,
    /// No snapshot was due, or a pre-hook declined; see the reason.
    Skipped,
    /// The height was not believed (it went backwards, or jumped too far
    /// ahead); no snapshot. See the reason.
    Refused,
    /// No snapshot: the attempt failed, or the daemon shut down first.
    /// See the reason.
    Failed,
}

impl Outcome {
    /// Whether the notified height has its snapshot, or needed none.
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Created | Outcome::Exists | Outcome::Skipped)
    }
}

/// The answer to `notify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyReply {
    /// The height notified.
    pub height: u64,
    /// What happened.
    pub outcome: Outcome,
    /// Why it was skipped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The snapshot's name, when one exists now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// How long the snapshot (with pruning and hooks) took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Heights pruned afterwards.
    #[serde(default)]
    pub pruned: Vec<u64>,
}

/// The most recent snapshot the daemon took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSnapshot {
    /// Its height (name).
    pub height: u64,
    /// The height read just after it, for polled sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height_after: Option<u64>,
    /// The height the node's durable state held, when a forced write said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable_height: Option<u64>,
    /// When it finished.
    pub at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: u64,
}

/// The last export that finished successfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExport {
    /// The exported snapshot's height.
    pub height: u64,
    /// The backup's name in the store.
    pub backup: String,
    /// When it finished.
    pub at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: u64,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Compressed bytes uploaded.
    pub bytes_uploaded: u64,
    /// Files reused from the previous backup without reading.
    pub files_unchanged: u64,
    /// The chain and node it was exported from, in one line (`block hash
    /// 0x…, chain 1, client Geth/v1.14.0…`), when the node said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
}

/// An export in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningExport {
    /// The snapshot's height.
    pub height: u64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Bytes to read (grows while files are planned).
    pub bytes_total: u64,
    /// Bytes read so far.
    pub bytes_read: u64,
    /// Compressed bytes uploaded so far.
    pub bytes_uploaded: u64,
}

/// One recent error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// A stable label: `source`, `snapshot`, `prune`, `hook`, …
    pub kind: String,
    /// The one-line message.
    pub message: String,
}

/// Counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Snapshots created.
    pub snapshots: u64,
    /// Heights skipped (not due, existing, pre-hook).
    pub skipped: u64,
    /// Snapshot attempts that failed.
    pub snapshot_failures: u64,
    /// Snapshots retention failed to destroy.
    pub prune_failures: u64,
    /// Failed height reads.
    pub source_errors: u64,
    /// Failed or timed-out hooks.
    #[serde(default)]
    pub hook_failures: u64,
    /// Total time spent taking snapshots, in milliseconds.
    #[serde(default)]
    pub snapshot_ms_total: u64,
    /// Total time spent pruning, in milliseconds.
    #[serde(default)]
    pub prune_ms_total: u64,
    /// Prune runs.
    #[serde(default)]
    pub prunes: u64,
    /// Exports finished (including "already exported").
    #[serde(default)]
    pub exports: u64,
    /// Exports that failed.
    #[serde(default)]
    pub export_failures: u64,
    /// Due exports skipped because one was still running.
    #[serde(default)]
    pub exports_skipped: u64,
    /// Heights refused as implausible (backwards, or too far ahead).
    #[serde(default)]
    pub refused: u64,
    /// Garbage collections after an export that failed.
    #[serde(default)]
    pub gc_failures: u64,
    /// `zfs` or `btrfs` commands killed for running past
    /// `command_timeout` (a suspended pool, a frozen filesystem).
    #[serde(default)]
    pub volume_timeouts: u64,
    /// Snapshots whose label differs from the height the node's state
    /// held (see [`HeightMismatch`]).
    #[serde(default)]
    pub height_mismatches: u64,
    /// Forced writes of the node's state before a snapshot that failed (the
    /// snapshot was skipped).
    #[serde(default)]
    pub flush_failures: u64,
}

/// A snapshot whose label is not the height the node's state holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeightMismatch {
    /// When it was found.
    pub at: DateTime<Utc>,
    /// The snapshot's label.
    pub snapshot: u64,
    /// The height the node's state held, or restarted at.
    pub holds: u64,
    /// How it was found: `flush` (the write forced before the snapshot
    /// made another height durable; stands until a snapshot's write
    /// matches its label) or `restart` (the node ran below the newest
    /// snapshot; stands until it passes it).
    pub found_by: String,
    /// The one-line explanation.
    pub message: String,
}

/// The daemon's state, as `btm status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// btm version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// When the daemon started.
    pub started_at: DateTime<Utc>,
    /// The volume.
    pub volume: String,
    /// Its filesystem.
    pub mode: SnapMode,
    /// The height source (`push`, `cometbft`, …).
    pub source: String,
    /// Snapshot interval.
    pub itv: u64,
    /// Retention cap.
    pub cap: u64,
    /// Retention rule.
    pub algo: Algo,
    /// The last height seen (pushed or polled).
    pub last_height: Option<u64>,
    /// When it was seen.
    pub last_height_at: Option<DateTime<Utc>>,
    /// Since when the source has been failing, if it is.
    pub source_failing_since: Option<DateTime<Utc>>,
    /// The last snapshot taken.
    pub last_snapshot: Option<LastSnapshot>,
    /// A snapshot being taken right now, by height.
    pub in_progress: Option<u64>,
    /// Since when the volume's commands have been timing out (a suspended
    /// pool, a frozen filesystem), until one succeeds again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_stalled_since: Option<DateTime<Utc>>,
    /// The latest snapshot found to hold another height than its label: a
    /// forced write made another height durable, or the node ran below
    /// the newest snapshot (it restarted from a snapshot below its label).
    /// Cleared when the node passes the newest snapshot again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height_mismatch: Option<HeightMismatch>,
    /// btm snapshots on the volume.
    pub snapshot_count: usize,
    /// Of those, the protected ones (outside retention).
    #[serde(default)]
    pub protected_count: usize,
    /// Branches kept by rollbacks, apart from the active line (known at
    /// start and after each snapshot).
    #[serde(default)]
    pub branch_count: usize,
    /// The bytes they hold, where the file system tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_bytes: Option<u64>,
    /// A rollback or undo left half done: the command that finishes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_done: Option<String>,
    /// The next height at which a snapshot is due.
    pub next_due: Option<u64>,
    /// The export store, when exports are configured.
    #[serde(default)]
    pub export_store: Option<String>,
    /// Blocks between exports, when exports are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_every: Option<u64>,
    /// The last successful export.
    #[serde(default)]
    pub last_export: Option<LastExport>,
    /// The export running now.
    #[serde(default)]
    pub export: Option<RunningExport>,
    /// The most recent errors, newest last (at most 20).
    pub recent_errors: Vec<ErrorEntry>,
    /// Counters since start.
    pub counters: Counters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_junk() {
        let r: Request = serde_json::from_str(r#"{"cmd":"notify","height":120}"#).expect("parse");
        assert_eq!(
            r,
            Request::Notify {
                height: 120,
                protect: None
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).expect("parse");
        assert_eq!(r, Request::Status);
        for junk in [
            r#"{"cmd":"notify"}"#,
            r#"{"cmd":"notify","height":-1}"#,
            r#"{"cmd":"notify","height":"12"}"#,
            r#"{"cmd":"rm -rf"}"#,
            r#"{"cmd":"notify","height":1,"extra":2}"#,
            "120",
            "",
        ] {
            assert!(serde_json::from_str::<Request>(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn replies_are_distinguishable() {
        let ok: Reply<NotifyReply> = serde_json::from_str(
            r#"{"ok":true,"result":{"height":5,"outcome":"skipped","reason":"not due"}}"#,
        )
        .expect("parse");
        assert!(matches!(ok, Reply::Ok { result, .. } if result.outcome == Outcome::Skipped));
        let err: Reply<NotifyReply> =
            serde_json::from_str(r#"{"ok":false,"error":"bad request"}"#).expect("parse");
        assert!(matches!(err, Reply::Err { error, .. } if error == "bad request"));
    }
}
