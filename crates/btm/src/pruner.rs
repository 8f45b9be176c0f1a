//! Acts on a retention [`Plan`]: the only place where a plan's deletions
//! turn into destroyed snapshots. Kept apart from [`crate::retention`] so
//! the rules stay pure and this stays small enough to audit.

use crate::retention::{Decision, Plan};
use crate::volume::{DestroyReport, Volume};

/// Destroy the snapshots `plan` marks for deletion, in one batch where the
/// filesystem allows. Failures are logged and returned per height; they
/// never stop the caller (a failed prune must not stop snapshotting).
pub fn execute(volume: &dyn Volume, plan: &Plan) -> DestroyReport {
    let doomed = plan.deleted();
    if doomed.is_empty() {
        return DestroyReport::default();
    }
    for v in plan
        .verdicts
        .iter()
        .filter(|v| matches!(v.decision, Decision::Delete(_)))
    {
        tracing::info!(volume = volume.name(), height = v.height, reason = %v.decision, "pruning snapshot");
    }
    let report = volume.destroy(&doomed);
    for (height, error) in &report.failed {
        tracing::error!(volume = volume.name(), height, %error, "could not prune snapshot");
    }
    report
}
