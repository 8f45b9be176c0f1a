//! Branches: what a rollback keeps instead of destroying.
//!
//! A rollback (or an undo) switches the volume's name from one *line* of
//! history to another. The line it leaves, its live state with every
//! snapshot newer than the point the lines part (the *fork*), is kept as a
//! branch, so the switch can be taken back. This module holds the pieces
//! every driver shares: branch names, what a switch is (its journal,
//! written before the first step so a rerun finishes it), how validator
//! signing state crosses a switch, and the pure expiry plan.
//!
//! How a driver moves lines is its own business (ZFS clones and promotes,
//! btrfs swaps subvolumes); the contract is in [`super::Volume::switch`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::preserve::{self, RelPath};

/// A branch's name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// or `-`, so it is the same word in a dataset name, a directory and a
/// command line. By default the UTC time the branch was made
/// (`20261206T120000Z`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BranchName(String);

impl BranchName {
    /// The name for a branch made at `at`.
    pub fn stamped(at: DateTime<Utc>) -> Self {
        BranchName(at.format("%Y%m%dT%H%M%SZ").to_string())
    }

    /// `self` with `-n` appended (a second branch made in the same second).
    pub fn numbered(&self, n: u32) -> Self {
        BranchName(format!("{}-{n}", self.0))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BranchName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BranchName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(BranchName(s.to_owned()))
        } else {
            Err(format!(
                "'{s}' is not a branch name (1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-')"
            ))
        }
    }
}

impl TryFrom<String> for BranchName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<BranchName> for String {
    fn from(b: BranchName) -> String {
        b.0
    }
}

/// A kept line of history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Branch {
    /// Its name.
    pub name: BranchName,
    /// When the switch that kept it was made.
    pub made: Option<DateTime<Utc>>,
    /// The switch that kept it ("rollback to 50", "undo").
    pub reason: Option<String>,
    /// The height its line parted from the other one's (the rollback's
    /// target); its snapshots are all newer.
    pub fork: Option<u64>,
    /// Heights of its snapshots, newest first.
    pub heights: Vec<u64>,
    /// Protection labels of its snapshots: they keep it from expiring.
    pub protected: BTreeMap<u64, String>,
    /// Bytes only it holds (its live state and its snapshots), where the
    /// file system tells cheaply.
    pub used: Option<u64>,
    /// Where it lives: a dataset or a directory.
    pub location: String,
    /// Whether its live state is there; `false` when it was removed by
    /// hand, so it cannot be entered.
    pub intact: bool,
}

/// Where a switch takes the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Enter {
    /// The snapshot at this height on the active line (a rollback).
    Snapshot {
        /// Its height.
        height: u64,
    },
    /// A kept branch (undo, `--branch`).
    Branch {
        /// Its name.
        name: BranchName,
    },
}

/// A file carried from the line being left into the one being entered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Carry {
    /// Relative to the volume root.
    pub path: String,
    /// Signing state: carried only when the leaving copy is at least as
    /// new as the entering one, so it is never lowered. Otherwise (a
    /// `--preserve` path) the leaving copy always wins.
    pub newest_wins: bool,
}

/// A switch of the volume from one line to another: decided, then written
/// down before the first step (the journal), so a rerun after a crash
/// finishes the same switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    /// The volume, as its driver names it.
    pub volume: String,
    /// The command that asked for it ("rollback 50", "undo", "branch X"):
    /// the same command again finishes it.
    pub command: String,
    /// Where the volume goes.
    pub enter: Enter,
    /// The height the lines part: snapshots of the leaving line newer than
    /// it go to the kept branch.
    pub fork: u64,
    /// The branch the leaving line becomes.
    pub keep_as: BranchName,
    /// When it was decided.
    pub made: DateTime<Utc>,
    /// What the kept branch says about where it came from.
    pub reason: String,
    /// Files carried across.
    pub carry: Vec<Carry>,
    /// Heights of the leaving line that go to the kept branch.
    pub moves_out: Vec<u64>,
    /// Where carried files wait while neither line is mounted (drivers
    /// that cannot reach both at once).
    pub stash: Option<PathBuf>,
    /// What a driver learnt on the way (identities of the two lines), so a
    /// rerun tells done steps from pending ones.
    pub notes: BTreeMap<String, String>,
}

impl Switch {
    /// The carried paths, checked.
    pub fn carried(&self) -> Result<Vec<(RelPath, bool)>, Error> {
        self.carry
            .iter()
            .map(|c| Ok((c.path.parse::<RelPath>()?, c.newest_wins)))
            .collect()
    }
}

/// The executor's side of a switch: where a driver records what it learnt
/// and reports each step done.
pub trait Progress {
    /// Write `sw` down again (its notes or stash changed) before going on.
    fn record(&mut self, sw: &Switch) -> Result<(), Error>;
    /// `step` is done. An error here stops the switch where it is, as a
    /// crash would: tests inject failures through it.
    fn step(&mut self, step: &'static str) -> Result<(), Error>;
}

/// A [`Progress`] that records nothing and never stops (tests of drivers).
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn record(&mut self, _: &Switch) -> Result<(), Error> {
        Ok(())
    }
    fn step(&mut self, _: &'static str) -> Result<(), Error> {
        Ok(())
    }
}

/// What a switch would do, computed before acting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwitchEffects {
    /// Where the volume goes.
    pub enter: Enter,
    /// The height the lines part.
    pub fork: u64,
    /// Heights of the leaving line kept in the new branch, newest first.
    pub moves_out: Vec<u64>,
    /// Heights the entered branch brings onto the active line.
    pub moves_in: Vec<u64>,
    /// Bytes the kept branch will hold, where the file system tells.
    pub kept_bytes: Option<u64>,
    /// Snapshots not made by btm that would move with the kept line; a
    /// switch is refused while this is non-empty.
    pub foreign_blockers: Vec<String>,
}

/// Carry `carry` from `leaving` (a root or a stash) into `entering`. A
/// signing-state file goes across unless the entering copy is newer by its
/// own height (or, for formats without one, its modification time), so the
/// state is never lowered; a `--preserve` path always goes across. Files
/// the leaving side lacks are left as the entering side has them.
pub fn carry_across(
    leaving: &Path,
    entering: &Path,
    carry: &[(RelPath, bool)],
) -> Result<Vec<RelPath>, Error> {
    let mut go = Vec::new();
    for (path, newest_wins) in carry {
        let from = leaving.join(path.as_path());
        let Ok(from_meta) = std::fs::symlink_metadata(&from) else {
            continue;
        };
        if *newest_wins {
            let to = entering.join(path.as_path());
            if let Ok(to_meta) = std::fs::symlink_metadata(&to) {
                if entering_is_newer(&from, &from_meta, &to, &to_meta) {
                    continue;
                }
            }
        }
        go.push(path.clone());
    }
    preserve::check_destination(entering, &go)?;
    preserve::copy_into(leaving, entering, &go)?;
    Ok(go)
}

fn entering_is_newer(
    from: &Path,
    from_meta: &std::fs::Metadata,
    to: &Path,
    to_meta: &std::fs::Metadata,
) -> bool {
    let read = |p: &Path| std::fs::read(p).ok().and_then(|b| signing_position(&b));
    match (read(from), read(to)) {
        (Some(a), Some(b)) => b > a,
        _ => match (from_meta.modified(), to_meta.modified()) {
            (Ok(a), Ok(b)) => b > a,
            _ => false,
        },
    }
}

/// The (height, round, step) a CometBFT-style signing state file records,
/// numbers or numeric strings alike; `None` for any other format.
pub fn signing_position(bytes: &[u8]) -> Option<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let num = |k: &str| -> Option<u64> {
        match v.get(k)? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
    };
    Some((
        num("height")?,
        num("round").unwrap_or(0),
        num("step").unwrap_or(0),
    ))
}

/// The least time a rollback's branch is kept whatever `keep_branches`
/// says: the only way back from a rollback made minutes ago never expires.
pub const GRACE: Duration = Duration::from_secs(3600);

/// Why a branch stays or goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Expiry {
    /// Younger than `keep_branches`.
    Young,
    /// The newest branch, made less than [`GRACE`] ago: the only way back.
    OnlyWayBack,
    /// It holds protected snapshots (an upgrade's): kept until released.
    Protected {
        /// Their labels.
        labels: Vec<String>,
    },
    /// When it was made is unknown: kept, never guessed away.
    Undated,
    /// Older than `keep_branches`: dropped.
    Expired,
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expiry::Young => f.write_str("younger than keep_branches"),
            Expiry::OnlyWayBack => {
                f.write_str("the only way back from a rollback less than an hour old")
            }
            Expiry::Protected { labels } => {
                write!(f, "holds protected snapshots ({})", labels.join(", "))
            }
            Expiry::Undated => f.write_str("made at an unknown time"),
            Expiry::Expired => f.write_str("expired"),
        }
    }
}

impl Expiry {
    /// Whether the branch is dropped.
    pub fn drops(&self) -> bool {
        matches!(self, Expiry::Expired)
    }
}

/// Which branches expire at `now` when each is kept for `keep`. Pure: the
/// caller reads the clock and acts.
pub fn expiry(
    branches: &[Branch],
    now: DateTime<Utc>,
    keep: Duration,
) -> Vec<(BranchName, Expiry)> {
    let newest = branches.iter().filter_map(|b| b.made).max();
    branches
        .iter()
        .map(|b| {
            let decision = match b.made {
                _ if !b.protected.is_empty() => Expiry::Protected {
                    labels: b.protected.values().cloned().collect(),
                },
                None => Expiry::Undated,
                Some(made) => {
                    let age = now.signed_duration_since(made).to_std().unwrap_or_default();
                    if Some(made) == newest && age < GRACE {
                        Expiry::OnlyWayBack
                    } else if age < keep {
                        Expiry::Young
                    } else {
                        Expiry::Expired
                    }
                }
            };
            (b.name.clone(), decision)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn branch(name: &str, made: Option<i64>, protected: bool) -> Branch {
        Branch {
            name: name.parse().expect("name"),
            made: made.and_then(|s| DateTime::from_timestamp(s, 0)),
            reason: None,
            fork: Some(1),
            heights: vec![],
            protected: if protected {
                BTreeMap::from([(5, "up".to_owned())])
            } else {
                BTreeMap::new()
            },
            used: None,
            location: String::new(),
            intact: true,
        }
    }

    #[test]
    fn names_are_checked_and_stamped() {
        for bad in ["", ".x", "-x", "a/b", "a b", "a@1", &"x".repeat(65)] {
            assert!(bad.parse::<BranchName>().is_err(), "{bad:?}");
        }
        let t = DateTime::from_timestamp(1_796_558_400, 0).expect("t");
        assert_eq!(BranchName::stamped(t).as_str(), "20261206T120000Z");
        assert_eq!(
            BranchName::stamped(t).numbered(2).as_str(),
            "20261206T120000Z-2"
        );
    }

    #[test]
    fn signing_positions_read_numbers_and_strings() {
        assert_eq!(
            signing_position(br#"{"height":"31","round":2,"step":3}"#),
            Some((31, 2, 3))
        );
        assert_eq!(signing_position(br#"{"height":7}"#), Some((7, 0, 0)));
        assert_eq!(signing_position(b"\x00binary"), None);
    }

    #[test]
    fn signing_state_is_never_lowered_and_preserve_always_crosses() {
        let (a, b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        std::fs::write(a.path().join("s.json"), r#"{"height":"90"}"#).expect("w");
        std::fs::write(b.path().join("s.json"), r#"{"height":"110"}"#).expect("w");
        std::fs::write(a.path().join("p"), "leaving").expect("w");
        std::fs::write(b.path().join("p"), "entering").expect("w");
        let carry = vec![
            ("s.json".parse().expect("rel"), true),
            ("p".parse().expect("rel"), false),
            ("missing".parse().expect("rel"), true),
        ];
        let went = carry_across(a.path(), b.path(), &carry).expect("carry");
        assert_eq!(went, vec!["p".parse::<RelPath>().expect("rel")]);
        let read = |p: &str| std::fs::read_to_string(b.path().join(p)).expect("r");
        assert_eq!(read("s.json"), r#"{"height":"110"}"#, "entering was newer");
        assert_eq!(read("p"), "leaving");
        // The other way round, the leaving state is newer and goes across.
        carry_across(b.path(), a.path(), &carry).expect("carry");
        assert_eq!(
            std::fs::read_to_string(a.path().join("s.json")).expect("r"),
            r#"{"height":"110"}"#
        );
    }

    #[test]
    fn expiry_keeps_the_only_way_back_protected_and_undated() {
        let now = DateTime::from_timestamp(100_000, 0).expect("now");
        let bs = vec![
            branch("old", Some(1_000), false),
            branch("held", Some(1_000), true),
            branch("undated", None, false),
            branch("fresh", Some(99_000), false),
        ];
        let plan = expiry(&bs, now, Duration::ZERO);
        let by: BTreeMap<String, Expiry> =
            plan.into_iter().map(|(n, e)| (n.to_string(), e)).collect();
        assert_eq!(by["old"], Expiry::Expired);
        assert!(matches!(by["held"], Expiry::Protected { .. }));
        assert_eq!(by["undated"], Expiry::Undated);
        assert_eq!(by["fresh"], Expiry::OnlyWayBack);
        let later = DateTime::from_timestamp(99_000 + 3_600, 0).expect("t");
        assert!(expiry(&bs[3..], later, Duration::ZERO)[0].1.drops());
    }

    proptest! {
        /// Whatever the ages and the setting: a protected or undated
        /// branch is never dropped, one younger than `keep` is never
        /// dropped, and the newest is never dropped within the grace hour.
        #[test]
        fn expiry_never_drops_what_it_must_keep(
            ages in proptest::collection::vec((0i64..30 * 86_400, any::<bool>(), any::<bool>()), 0..12),
            keep_s in 0u64..20 * 86_400,
        ) {
            let now = DateTime::from_timestamp(10_000_000, 0).expect("now");
            let bs: Vec<Branch> = ages.iter().enumerate().map(|(i, (age, p, dated))| {
                branch(&format!("b{i}"), dated.then_some(10_000_000 - age), *p)
            }).collect();
            let keep = Duration::from_secs(keep_s);
            let newest = bs.iter().filter_map(|b| b.made).max();
            for (b, (name, e)) in bs.iter().zip(expiry(&bs, now, keep)) {
                prop_assert_eq!(&b.name, &name);
                if !e.drops() { continue; }
                prop_assert!(b.protected.is_empty());
                let made = b.made.expect("dated");
                let age = (now - made).to_std().expect("age");
                prop_assert!(age >= keep);
                prop_assert!(Some(made) != newest || age >= GRACE);
            }
        }
    }
}
