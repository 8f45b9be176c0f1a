//! The daemon's live state: what `btm status` reports and what systemd's
//! STATUS= line summarises. Everything in it is bounded: the error list
//! keeps the last [`MAX_ERRORS`], counters are plain integers.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use btm::protocol::{
    Counters, ErrorEntry, HeightMismatch, LastExport, LastSnapshot, RunningExport, Status,
};
use btm_chunk::Progress;

/// How many recent errors are kept.
pub const MAX_ERRORS: usize = 20;

/// Shared, internally locked daemon state.
#[derive(Debug)]
pub struct State {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    status: Status,
    errors: VecDeque<ErrorEntry>,
    /// The running export: height, start, live progress.
    export: Option<(u64, DateTime<Utc>, Arc<Progress>)>,
}

impl State {
    /// Fresh state for a daemon about to start.
    pub fn new(status: Status) -> Self {
        State {
            inner: Mutex::new(Inner {
                status,
                errors: VecDeque::with_capacity(MAX_ERRORS),
                export: None,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock cannot leave the status invalid
        // (every update is a plain assignment), so recover from poisoning.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A copy of the current status.
    pub fn status(&self) -> Status {
        self.with(|i| {
            let mut s = i.status.clone();
            s.recent_errors = i.errors.iter().cloned().collect();
            s.export = i.export.as_ref().map(|(height, at, p)| RunningExport {
                height: *height,
                started_at: *at,
                bytes_total: p.total.load(Ordering::Relaxed),
                bytes_read: p.done.load(Ordering::Relaxed),
                bytes_uploaded: p.uploaded.load(Ordering::Relaxed),
            });
            s
        })
    }

    /// The node was seen at `height`.
    pub fn height_seen(&self, height: u64) {
        self.with(|i| {
            i.status.last_height = Some(height);
            i.status.last_height_at = Some(Utc::now());
            i.status.source_failing_since = None;
        });
    }

    /// A snapshot labelled `snapshot` holds the node's state at `holds`,
    /// as `found_by` found (see [`HeightMismatch::found_by`]). Logged,
    /// counted and shown in status once per snapshot and finding: a node
    /// climbing back from below a snapshot keeps the height it restarted
    /// at, and is not a new mismatch at each block.
    pub fn height_mismatch(&self, snapshot: u64, holds: u64, found_by: &str, message: String) {
        let new = self.with(|i| {
            let seen = i
                .status
                .height_mismatch
                .as_ref()
                .is_some_and(|m| m.snapshot == snapshot && m.found_by == found_by);
            if !seen {
                i.status.counters.height_mismatches += 1;
                i.status.height_mismatch = Some(HeightMismatch {
                    at: Utc::now(),
                    snapshot,
                    holds,
                    found_by: found_by.to_owned(),
                    message: message.clone(),
                });
            }
            !seen
        });
        if new {
            tracing::warn!(snapshot, holds, "{message}");
            self.error("height", &message);
        }
    }

    /// The node was seen at `height`, below the newest snapshot `newest`.
    /// After a rollback (which destroys the newer snapshots) that snapshot
    /// is the one the node restarted from, and it held less than its label.
    pub fn below_snapshot(&self, height: u64, newest: u64) {
        self.height_mismatch(
            newest,
            height,
            "restart",
            format!(
                "the node is at height {height}, below the newest snapshot ({newest}): if it was rolled back or restored to that snapshot, the snapshot held the node's state at {height}, not {newest} (see docs/nodes.md on consistency)"
            ),
        );
    }

    /// The node reached `height`: a mismatch found by seeing it below a
    /// snapshot is over once it passes that snapshot.
    pub fn height_passed(&self, height: u64) {
        self.clear_mismatch(|m| m.found_by == "restart" && height >= m.snapshot);
    }

    /// A snapshot at `height` holds exactly its label: an older mismatch
    /// found by a forced write is over.
    pub fn height_matched(&self, height: u64) {
        self.clear_mismatch(|m| m.found_by == "flush" && height > m.snapshot);
    }

    fn clear_mismatch(&self, over: impl Fn(&HeightMismatch) -> bool) {
        self.with(|i| {
            if i.status.height_mismatch.as_ref().is_some_and(over) {
                i.status.height_mismatch = None;
            }
        });
    }

    /// The source failed to give a height.
    pub fn source_failed(&self, message: &str) {
        self.with(|i| {
            i.status.counters.source_errors += 1;
            i.status.source_failing_since.get_or_insert_with(Utc::now);
        });
        self.error("source", message);
    }

    /// Record an error of `kind`.
    pub fn error(&self, kind: &str, message: &str) {
        self.with(|i| {
            if i.errors.len() == MAX_ERRORS {
                i.errors.pop_front();
            }
            i.errors.push_back(ErrorEntry {
                at: Utc::now(),
                kind: kind.to_owned(),
                message: message.to_owned(),
            });
        });
    }

    /// A volume command timed out: the volume is stalled from now (or from
    /// its first timeout) until [`State::volume_answered`].
    pub fn volume_stalled(&self, message: &str) {
        self.with(|i| {
            i.status.counters.volume_timeouts += 1;
            i.status.volume_stalled_since.get_or_insert_with(Utc::now);
        });
        self.error("volume", message);
    }

    /// A volume command succeeded: the volume answers again.
    pub fn volume_answered(&self) {
        self.with(|i| i.status.volume_stalled_since = None);
    }

    /// A snapshot at `height` has started (`Some`) or ended (`None`).
    pub fn in_progress(&self, height: Option<u64>) {
        self.with(|i| i.status.in_progress = height);
    }

    /// The volume now holds `count` snapshots; the next is due at `next_due`.
    pub fn volume_seen(&self, count: usize, next_due: Option<u64>) {
        self.with(|i| {
            i.status.snapshot_count = count;
            i.status.next_due = next_due;
        });
    }

    /// The branches the volume keeps, and a switch left half done.
    pub fn branches_seen(&self, census: crate::scheduler::BranchCensus) {
        self.with(|i| {
            i.status.branch_count = census.count;
            i.status.branch_bytes = census.bytes;
            i.status.half_done = census.half_done;
        });
    }

    /// The volume holds `count` protected snapshots (known at each prune).
    pub fn protected_seen(&self, count: usize) {
        self.with(|i| i.status.protected_count = count);
    }

    /// A snapshot was taken.
    pub fn snapshot_taken(&self, last: LastSnapshot) {
        self.with(|i| {
            i.status.counters.snapshots += 1;
            i.status.last_snapshot = Some(last);
        });
    }

    /// The height read after the last snapshot.
    pub fn window_closed(&self, height: u64, after: u64) {
        self.with(|i| {
            if let Some(last) = i
                .status
                .last_snapshot
                .as_mut()
                .filter(|l| l.height == height)
            {
                last.height_after = Some(after);
            }
        });
    }

    /// An export of `height` started (`Some`) or ended (`None`).
    pub fn export_running(&self, running: Option<(u64, Arc<Progress>)>) {
        self.with(|i| i.export = running.map(|(h, p)| (h, Utc::now(), p)));
    }

    /// An export finished successfully.
    pub fn export_done(&self, last: Option<LastExport>) {
        self.with(|i| {
            i.status.counters.exports += 1;
            if last.is_some() {
                i.status.last_export = last;
            }
        });
    }

    /// Update counters.
    pub fn count(&self, f: impl FnOnce(&mut Counters)) {
        self.with(|i| f(&mut i.status.counters));
    }

    /// One line for systemd's STATUS=.
    pub fn summary(&self) -> String {
        self.with(|i| {
            let s = &i.status;
            let height = s
                .last_height
                .map_or("none yet".to_owned(), |h| h.to_string());
            let snap = s
                .last_snapshot
                .as_ref()
                .map_or("none yet".to_owned(), |l| l.height.to_string());
            let failing = match (s.source_failing_since, s.volume_stalled_since) {
                (_, Some(_)) => "; volume not answering",
                (Some(_), None) => "; source failing",
                (None, None) => "",
            };
            let mismatch = if s.height_mismatch.is_some() {
                "; a snapshot holds another height than its label"
            } else {
                ""
            };
            format!(
                "height {height}; last snapshot {snap}; {} snapshots{failing}{mismatch}",
                s.snapshot_count
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let dir = std::env::temp_dir();
        let settings = crate::test_support::settings("", &dir);
        State::new(crate::initial_status(
            &crate::test_support::cfg(&settings),
            &settings,
            0,
        ))
    }

    #[test]
    fn a_node_below_a_snapshot_is_one_mismatch_until_it_passes() {
        let s = state();
        for h in [0, 1, 2, 3] {
            s.below_snapshot(h, 250);
            s.height_passed(h);
        }
        let st = s.status();
        assert_eq!(st.counters.height_mismatches, 1, "once, not per block");
        let m = st.height_mismatch.expect("standing");
        assert_eq!(
            (m.snapshot, m.holds, m.found_by.as_str()),
            (250, 0, "restart")
        );
        assert!(s.summary().contains("another height than its label"));
        // A flush-found mismatch is not cleared by heights.
        s.height_passed(250);
        assert!(s.status().height_mismatch.is_none());
        s.height_mismatch(260, 262, "flush", "m".into());
        s.height_passed(300);
        assert!(s.status().height_mismatch.is_some());
        s.height_matched(260);
        assert!(s.status().height_mismatch.is_some(), "the same snapshot");
        s.height_matched(270);
        assert!(s.status().height_mismatch.is_none());
        assert_eq!(s.status().counters.height_mismatches, 2);
    }
}
