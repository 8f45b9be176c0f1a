//! Rollback, undo and branches: deciding a switch between lines of
//! history, writing it down, and running it through the volume's driver.
//!
//! A switch is decided under the volume's lock ([`Ops::prepare_switch`]),
//! shown to the operator, then written to a journal in the state directory
//! before its first step ([`PreparedSwitch::execute`]). The journal goes
//! only when the driver reports the switch done. While it exists, the
//! switch is *half done*: `list` and `status` say so, the same command
//! finishes it from where it stopped, and any other switch is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::lock::{self, VolumeLock};
use crate::ops::{resolve_target, Ops};
use crate::volume::branch::{self, Carry, Expiry};
use crate::volume::{self, Branch, BranchName, Enter, Progress, Switch, SwitchEffects, Volume};

/// What [`Ops::expire_branches`] decided and did.
#[derive(Debug, Default)]
pub struct ExpiryReport {
    /// Each branch's verdict, and why dropping it failed if it did.
    pub verdicts: Vec<(BranchName, Expiry, Option<String>)>,
    /// The branches still there afterwards.
    pub kept: Vec<Branch>,
}

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// `btm rollback [-s H] [-S]`: back to a snapshot of the active line.
    Rollback {
        /// The height (`None`: the latest snapshot).
        target: Option<u64>,
        /// Exactly that height, or fail.
        strict: bool,
    },
    /// `btm rollback --undo`: the newest branch.
    Undo,
    /// `btm rollback --branch NAME`.
    Branch(BranchName),
}

impl Ask {
    /// The command that asked, as the operator would type it again.
    pub fn command(&self) -> String {
        match self {
            Ask::Rollback { target: None, .. } => "btm rollback".into(),
            Ask::Rollback {
                target: Some(t), ..
            } => format!("btm rollback -s {t}"),
            Ask::Undo => "btm rollback --undo".into(),
            Ask::Branch(b) => format!("btm rollback --branch {b}"),
        }
    }
}

/// A switch decided and waiting to run (or to be finished), holding the
/// volume's lock.
pub struct PreparedSwitch {
    volume: Arc<dyn Volume>,
    switch: Switch,
    effects: Option<SwitchEffects>,
    journal: PathBuf,
    _lock: VolumeLock,
}

impl std::fmt::Debug for PreparedSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSwitch")
            .field("volume", &self.volume.name())
            .field("switch", &self.switch)
            .finish()
    }
}

impl PreparedSwitch {
    /// The switch as it will be written down.
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// What it does; `None` when it finishes a half-done switch (whose
    /// effects were shown when it started).
    pub fn effects(&self) -> Option<&SwitchEffects> {
        self.effects.as_ref()
    }

    /// The volume.
    pub fn volume(&self) -> &dyn Volume {
        self.volume.as_ref()
    }

    /// Run the switch, or finish it. `crash_after` names a step after
    /// which to stop as a crash would (tests; `BTM_CRASH_AFTER` in the
    /// binary): the journal stays and the same command finishes.
    pub fn execute(mut self, crash_after: Option<&str>) -> Result<(), Error> {
        nix::unistd::sync();
        let mut progress = Journal {
            path: &self.journal,
            crash_after,
        };
        progress.record(&self.switch)?;
        self.volume.switch(&mut self.switch, &mut progress)?;
        nix::unistd::sync();
        remove_journal(&self.journal)?;
        tracing::info!(
            volume = self.volume.name(),
            command = self.switch.command,
            kept = %self.switch.keep_as,
            "switched"
        );
        Ok(())
    }
}

/// The journal of a switch: the [`Switch`] as JSON, written whole and
/// renamed into place at each record.
struct Journal<'a> {
    path: &'a Path,
    crash_after: Option<&'a str>,
}

impl Progress for Journal<'_> {
    fn record(&mut self, sw: &Switch) -> Result<(), volume::Error> {
        let io = |e: std::io::Error| volume::Error::io(self.path, e);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(sw).map_err(|e| io(e.into()))?;
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, self.path))
            .map_err(io)
    }

    fn step(&mut self, step: &'static str) -> Result<(), volume::Error> {
        tracing::debug!(step, "switch step done");
        match self.crash_after {
            Some(s) if s == step => Err(volume::Error::Interrupted(step)),
            _ => Ok(()),
        }
    }
}

fn remove_journal(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(volume::Error::io(path, e).into())
        }
        _ => Ok(()),
    }
}

/// Read a journal; a missing one is no pending switch.
fn read_journal(path: &Path) -> Result<Option<Switch>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::BadJournal {
                path: path.to_owned(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(volume::Error::io(path, e).into()),
    }
}

/// Carried files are written into the line entered once the switch has
/// begun: check now, in the target snapshot, that no symlink would take
/// them elsewhere, so a refusal changes nothing.
fn check_destinations(vol: &dyn Volume, enter: &Enter, carry: &[Carry]) -> Result<(), Error> {
    let Enter::Snapshot { height } = enter else {
        return Ok(());
    };
    let paths = carry
        .iter()
        .map(|c| c.path.parse())
        .collect::<Result<Vec<crate::preserve::RelPath>, _>>()
        .map_err(volume::Error::from)?;
    if paths.is_empty() {
        return Ok(());
    }
    let view = vol.view(*height)?;
    let checked = crate::preserve::check_destination(view.path(), &paths);
    view.close()?;
    Ok(checked.map_err(volume::Error::from)?)
}

/// The name of the branch a switch keeps: `asked` unless taken, else the
/// time, numbered if a branch of the same second exists.
fn branch_name(
    asked: Option<BranchName>,
    branches: &[Branch],
    now: DateTime<Utc>,
) -> Result<BranchName, Error> {
    let taken = |n: &BranchName| branches.iter().any(|b| &b.name == n);
    match asked {
        Some(n) if taken(&n) => Err(volume::Error::BranchExists(n).into()),
        Some(n) => Ok(n),
        None => {
            let base = BranchName::stamped(now);
            let mut name = base.clone();
            let mut n = 2;
            while taken(&name) {
                name = base.numbered(n);
                n += 1;
            }
            Ok(name)
        }
    }
}

impl Ops {
    fn journal_path(&self) -> PathBuf {
        self.dirs().switch_journal(self.volume().name())
    }

    /// The switch left half done on this volume, if one was.
    pub fn pending_switch(&self) -> Result<Option<Switch>, Error> {
        read_journal(&self.journal_path())
    }

    /// Decide the switch `ask` asks for, holding the volume's lock until it
    /// is executed or dropped. The leaving line is kept as `keep_as`
    /// (default: the time, `now`). If a switch was left half done, the
    /// same command resumes it and any other is refused.
    pub fn prepare_switch(
        &self,
        ask: &Ask,
        keep_as: Option<BranchName>,
        carry: Vec<Carry>,
        now: DateTime<Utc>,
    ) -> Result<PreparedSwitch, Error> {
        let vol = self.volume();
        let lock = self.lock(lock::DEFAULT_WAIT)?;
        let journal = self.journal_path();
        if let Some(pending) = read_journal(&journal)? {
            if pending.command != ask.command() {
                return Err(Error::HalfDone {
                    command: pending.command,
                });
            }
            return Ok(PreparedSwitch {
                volume: Arc::clone(vol),
                switch: pending,
                effects: None,
                journal,
                _lock: lock,
            });
        }
        let branches = vol.branches()?;
        let enter = self.resolve(ask, &branches)?;
        let effects = vol.switch_effects(&enter)?;
        if !effects.foreign_blockers.is_empty() {
            return Err(volume::Error::ForeignSnapshots {
                target: effects.fork,
                names: effects.foreign_blockers,
            }
            .into());
        }
        self.refuse_pinned(&effects.moves_out)?;
        check_destinations(vol.as_ref(), &enter, &carry)?;
        let keep_as = branch_name(keep_as, &branches, now)?;
        let reason = match &enter {
            Enter::Snapshot { height } => format!("rollback to {height}"),
            Enter::Branch { name } if *ask == Ask::Undo => format!("undo (back to branch {name})"),
            Enter::Branch { name } => format!("switch to branch {name}"),
        };
        let switch = Switch {
            volume: vol.name().to_owned(),
            command: ask.command(),
            fork: effects.fork,
            moves_out: effects.moves_out.clone(),
            enter,
            keep_as,
            made: now,
            reason,
            carry,
            stash: None,
            notes: Default::default(),
        };
        Ok(PreparedSwitch {
            volume: Arc::clone(vol),
            switch,
            effects: Some(effects),
            journal,
            _lock: lock,
        })
    }

    /// Where `ask` goes: the snapshot it resolves to, or an intact branch.
    fn resolve(&self, ask: &Ask, branches: &[Branch]) -> Result<Enter, Error> {
        let vol = self.volume();
        let name = match ask {
            Ask::Rollback { target, strict } => {
                let heights = vol.heights()?;
                let h = resolve_target(&heights, *target, *strict).map_err(|e| match e {
                    Error::NoSnapshots(_) => Error::NoSnapshots(vol.name().to_owned()),
                    e => e,
                })?;
                return Ok(Enter::Snapshot { height: h });
            }
            Ask::Undo => branches
                .iter()
                .max_by_key(|b| b.made)
                .ok_or(volume::Error::NoBranches)?
                .name
                .clone(),
            Ask::Branch(name) => name.clone(),
        };
        match branches.iter().find(|b| b.name == name) {
            None => Err(volume::Error::NoSuchBranch(name).into()),
            Some(b) if !b.intact => Err(volume::Error::BranchDamaged {
                name,
                location: b.location.clone(),
            }
            .into()),
            Some(_) => Ok(Enter::Branch { name }),
        }
    }

    /// The kept branches, oldest first.
    pub fn branches(&self) -> Result<Vec<Branch>, Error> {
        Ok(self.volume().branches()?)
    }

    /// Destroy branch `name`, under the lock.
    pub fn drop_branch(&self, name: &BranchName) -> Result<(), Error> {
        let _lock = self.lock(lock::DEFAULT_WAIT)?;
        self.refuse_half_done()?;
        self.volume().drop_branch(name)?;
        tracing::info!(volume = self.volume().name(), branch = %name, "branch dropped");
        Ok(())
    }

    /// Which branches expire at `now` when each is kept for `keep` (see
    /// [`branch::expiry`]); with `act`, drop them (not while a switch is
    /// half done). A failure to drop one is reported, never raised, like a
    /// failed prune. The report also holds the branches left, so a caller
    /// need not list them again.
    pub fn expire_branches(
        &self,
        now: DateTime<Utc>,
        keep: Duration,
        act: bool,
    ) -> Result<ExpiryReport, Error> {
        let _lock = self.lock(lock::DEFAULT_WAIT)?;
        let act = act && self.pending_switch()?.is_none();
        let branches = self.volume().branches()?;
        let plan = branch::expiry(&branches, now, keep);
        let mut report = ExpiryReport::default();
        for (b, (name, e)) in branches.into_iter().zip(plan) {
            let failed = if act && e.drops() {
                match self.volume().drop_branch(&name) {
                    Ok(()) => {
                        tracing::info!(volume = self.volume().name(), branch = %name, "expired branch dropped");
                        None
                    }
                    Err(err) => {
                        tracing::warn!(volume = self.volume().name(), branch = %name, error = %err, "could not drop an expired branch");
                        Some(err.to_string())
                    }
                }
            } else {
                None
            };
            if !(act && e.drops() && failed.is_none()) {
                report.kept.push(b);
            }
            report.verdicts.push((name, e, failed));
        }
        Ok(report)
    }

    fn refuse_half_done(&self) -> Result<(), Error> {
        match self.pending_switch()? {
            Some(p) => Err(Error::HalfDone { command: p.command }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::SnapshotOptions;
    use crate::volume::fake::FakeVolume;
    use crate::volume::SnapMode;
    use crate::Dirs;

    fn setup(dir: &tempfile::TempDir) -> (Ops, Arc<FakeVolume>) {
        let vol = Arc::new(
            FakeVolume::new("tank/chain", SnapMode::Zfs, &dir.path().join("vol")).expect("fake"),
        );
        (Ops::new(vol.clone(), Dirs::under(dir.path())), vol)
    }

    fn write(vol: &FakeVolume, rel: &str, body: &str) {
        let p = vol.root().expect("root").join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, body).expect("write");
    }

    fn read(vol: &FakeVolume, rel: &str) -> String {
        std::fs::read_to_string(vol.root().expect("root").join(rel)).expect("read")
    }

    const STATE: &str = "data/priv_validator_state.json";

    fn carry() -> Vec<Carry> {
        vec![Carry {
            path: STATE.into(),
            newest_wins: true,
        }]
    }

    /// Snapshots at 10 … 100 with content and signing state per height,
    /// then writes after 100.
    fn history(ops: &Ops, vol: &FakeVolume) {
        let only = SnapshotOptions::unpruned(Duration::ZERO);
        for h in (10..=100).step_by(10) {
            write(vol, "db", &format!("db at {h}"));
            write(vol, STATE, &format!("{{\"height\":\"{h}\"}}"));
            ops.snapshot(h, &only).expect("snapshot");
        }
        write(vol, "db", "db after 100");
        write(vol, STATE, "{\"height\":\"105\"}");
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("t")
    }

    fn switch(ops: &Ops, ask: &Ask, now: DateTime<Utc>, crash: Option<&str>) -> Result<(), Error> {
        ops.prepare_switch(ask, None, carry(), now)?.execute(crash)
    }

    /// Roll back to 50, snapshot at 60 on the new line, undo: the plan of
    /// the issue, on the fake volume.
    fn roll_back_advance_undo(ops: &Ops, vol: &FakeVolume, crash: Option<&str>) {
        let back = Ask::Rollback {
            target: Some(50),
            strict: true,
        };
        let mut tries = 0;
        while let Err(e) = switch(ops, &back, at(0), crash.filter(|_| tries == 0)) {
            assert!(
                matches!(e, Error::Volume(volume::Error::Interrupted(_))),
                "{e}"
            );
            assert!(ops.pending_switch().expect("journal").is_some());
            // Anything else is refused while it is half done.
            let other = switch(ops, &Ask::Undo, at(1), None).expect_err("refused");
            assert!(matches!(other, Error::HalfDone { .. }), "{other}");
            tries += 1;
        }
        assert!(ops.pending_switch().expect("journal").is_none());
        assert_eq!(read(vol, "db"), "db at 50");
        assert_eq!(
            read(vol, STATE),
            "{\"height\":\"105\"}",
            "signing state kept"
        );
        assert_eq!(vol.heights().expect("h"), vec![50, 40, 30, 20, 10]);
        let bs = ops.branches().expect("branches");
        assert_eq!(bs.len(), 1);
        assert_eq!(bs[0].heights, vec![100, 90, 80, 70, 60]);
        assert_eq!(bs[0].fork, Some(50));
        assert_eq!(bs[0].reason.as_deref(), Some("rollback to 50"));

        write(vol, "db", "new line at 60");
        write(vol, STATE, "{\"height\":\"110\"}");
        ops.snapshot(60, &SnapshotOptions::unpruned(Duration::ZERO))
            .expect("a 60 on the new line");
        write(vol, "db", "new line after 60");

        let mut tries = 0;
        while let Err(e) = switch(ops, &Ask::Undo, at(60), crash.filter(|_| tries == 0)) {
            assert!(
                matches!(e, Error::Volume(volume::Error::Interrupted(_))),
                "{e}"
            );
            tries += 1;
        }
        assert_eq!(
            read(vol, "db"),
            "db after 100",
            "the exact pre-rollback state"
        );
        assert_eq!(read(vol, STATE), "{\"height\":\"110\"}", "never lowered");
        assert_eq!(
            vol.heights().expect("h"),
            vec![100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
        );
        let v = vol.view(60).expect("view");
        assert_eq!(
            std::fs::read_to_string(v.path().join("db")).expect("db"),
            "db at 60",
            "60 is the old line's again"
        );
        let bs = ops.branches().expect("branches");
        assert_eq!(bs.len(), 1, "{bs:?}");
        assert_eq!(bs[0].heights, vec![60]);
        assert_eq!(bs[0].fork, Some(50));
    }

    #[test]
    fn a_rollback_keeps_a_branch_and_undo_returns_to_it_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = setup(&dir);
        history(&ops, &vol);
        roll_back_advance_undo(&ops, &vol, None);
        // Undo of the undo: the new line, with its own 60.
        switch(&ops, &Ask::Undo, at(120), None).expect("undo again");
        assert_eq!(read(&vol, "db"), "new line after 60");
        assert_eq!(vol.heights().expect("h"), vec![60, 50, 40, 30, 20, 10]);
    }

    #[test]
    fn a_switch_stopped_after_any_step_is_finished_by_the_same_command() {
        let steps = {
            let dir = tempfile::tempdir().expect("tmp");
            setup(&dir).1.switch_steps()
        };
        for step in steps {
            let dir = tempfile::tempdir().expect("tmp");
            let (ops, vol) = setup(&dir);
            history(&ops, &vol);
            roll_back_advance_undo(&ops, &vol, Some(step));
        }
    }

    #[test]
    fn bad_switches_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = setup(&dir);
        history(&ops, &vol);
        let e = switch(&ops, &Ask::Undo, at(0), None).expect_err("no branch");
        assert!(e.to_string().contains("no branch to go back to"), "{e}");
        let ghost: BranchName = "nope".parse().expect("name");
        let e = switch(&ops, &Ask::Branch(ghost), at(0), None).expect_err("none");
        assert!(e.to_string().contains("no branch named 'nope'"), "{e}");
        let strict = Ask::Rollback {
            target: Some(55),
            strict: true,
        };
        assert!(matches!(
            switch(&ops, &strict, at(0), None),
            Err(Error::NoExactSnapshot(55))
        ));
        let back = Ask::Rollback {
            target: Some(50),
            strict: false,
        };
        let name: BranchName = "mine".parse().expect("name");
        ops.prepare_switch(&back, Some(name.clone()), carry(), at(0))
            .expect("plan")
            .execute(None)
            .expect("rollback");
        let e = ops
            .prepare_switch(&back, Some(name.clone()), carry(), at(1))
            .expect_err("clash");
        assert!(e.to_string().contains("'mine' already exists"), "{e}");
        // A branch whose live state was removed by hand cannot be entered.
        std::fs::remove_dir_all(dir.path().join("vol/live.btm-branch.mine")).expect("rm");
        let e = switch(&ops, &Ask::Undo, at(2), None).expect_err("damaged");
        assert!(e.to_string().contains("removed by hand"), "{e}");
        assert_eq!(read(&vol, "db"), "db at 50");
        ops.drop_branch(&name).expect("drop");
        assert!(ops.branches().expect("b").is_empty());
    }

    #[test]
    fn expiry_drops_old_branches_but_not_the_only_way_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = setup(&dir);
        history(&ops, &vol);
        let back = |t| Ask::Rollback {
            target: Some(t),
            strict: true,
        };
        switch(&ops, &back(90), at(0), None).expect("first");
        switch(&ops, &back(80), at(10), None).expect("second");
        let week = Duration::from_secs(7 * 86_400);
        let report = ops
            .expire_branches(at(20), Duration::ZERO, true)
            .expect("expire");
        assert_eq!(report.kept, ops.branches().expect("b"), "what is left");
        let plan = report.verdicts;
        let dropped: Vec<_> = plan.iter().filter(|p| p.1.drops()).collect();
        assert_eq!(
            dropped.len(),
            1,
            "the older goes, the newest is the way back: {plan:?}"
        );
        assert_eq!(ops.branches().expect("b").len(), 1);
        assert!(ops
            .expire_branches(at(600), week, true)
            .expect("expire")
            .verdicts
            .iter()
            .all(|p| !p.1.drops()));
        ops.expire_branches(at(10 + 3_600), Duration::ZERO, true)
            .expect("expire");
        assert!(ops.branches().expect("b").is_empty());
        assert_eq!(
            vol.heights().expect("h"),
            vec![80, 70, 60, 50, 40, 30, 20, 10]
        );
    }

    #[test]
    fn a_protected_snapshot_keeps_its_branch_until_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ops, vol) = setup(&dir);
        history(&ops, &vol);
        let upgrade: crate::volume::Label = "v2-upgrade".parse().expect("label");
        ops.protect(80, &upgrade).expect("protect");
        let back = Ask::Rollback {
            target: Some(50),
            strict: true,
        };
        switch(&ops, &back, at(0), None).expect("rollback");
        let bs = ops.branches().expect("branches");
        assert_eq!(
            bs[0].protected.get(&80).map(String::as_str),
            Some("v2-upgrade")
        );
        let later = at(30 * 86_400);
        let plan = ops
            .expire_branches(later, Duration::ZERO, true)
            .expect("expire")
            .verdicts;
        assert!(matches!(plan[0].1, Expiry::Protected { .. }), "{plan:?}");
        assert_eq!(ops.branches().expect("b").len(), 1);
        let released = ops.release(&upgrade).expect("release");
        assert_eq!(released, vec![(Some(bs[0].name.clone()), 80)]);
        ops.expire_branches(later, Duration::ZERO, true)
            .expect("expire");
        assert!(ops.branches().expect("b").is_empty());
    }
}
