//! Retention policies as pure functions: which snapshots to keep, and why.
//!
//! Nothing here reads the clock, lists a volume or destroys anything. A
//! [`Policy`] turns a set of heights into a [`Plan`] holding a [`Decision`]
//! with its reason for every height; [`crate::pruner`] acts on the plan.
//! Keeping this pure is what lets `btm simulate`, `prune --dry-run` and the
//! daemon agree exactly, and what lets the rules be property-tested.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The largest number of tiers fade uses.
pub const MAX_TIERS: u64 = 10;
/// The most heights `simulate` replays, so a typo cannot hang the CLI.
pub const MAX_SIMULATE_STEPS: u64 = 10_000_000;

/// Which retention rule to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Keep the newest `cap` snapshots.
    Fair,
    /// Keep snapshots at a density that decreases with age.
    Fade,
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algo::Fair => "fair",
            Algo::Fade => "fade",
        })
    }
}

impl FromStr for Algo {
    type Err = String;
    /// Case-insensitive `fair` or `fade`, as the original btm accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fair" => Ok(Algo::Fair),
            "fade" => Ok(Algo::Fade),
            _ => Err(format!("unknown algo '{s}' (expected fair or fade)")),
        }
    }
}

/// A policy's parameters are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `itv` must be at least 1.
    #[error("itv must be at least 1")]
    ZeroItv,
    /// `cap` must be at least 1.
    #[error("cap must be at least 1")]
    ZeroCap,
    /// `simulate` was asked to replay too many heights.
    #[error("--blocks {blocks} with --itv {itv} is {steps} snapshots to replay; the limit is {MAX_SIMULATE_STEPS}")]
    TooManySteps {
        /// Requested blocks.
        blocks: u64,
        /// Requested interval.
        itv: u64,
        /// `blocks / itv`.
        steps: u64,
    },
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum KeepReason {
    /// fair: among the newest `cap`; `rank` 1 is the newest.
    Newest {
        /// 1-based position, newest first.
        rank: u64,
    },
    /// fade: in tier 1, which keeps all its snapshots.
    Tier1 {
        /// 1-based position, newest first.
        rank: u64,
    },
    /// fade: the oldest snapshot of its slot `height / itv^tier` in its tier.
    Slot {
        /// Tier number, 2..=T.
        tier: u64,
        /// `floor(height / itv^tier)`.
        slot: u64,
    },
    /// The policy would delete it, but it is pinned (an export is reading
    /// it); it goes at the first prune after the pin is released.
    Pinned,
    /// Protected with a label (see [`Plan::protected`]): outside retention
    /// altogether, until released.
    Protected,
}

/// Why a snapshot is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum DeleteReason {
    /// Past the last kept position (`cap` for fair, `T·q` for fade).
    BeyondCap {
        /// 1-based position, newest first, when it was dropped.
        rank: u64,
        /// The number of positions kept.
        limit: u64,
    },
    /// fade: an older snapshot of the same tier and slot is kept instead.
    SlotTaken {
        /// Tier number.
        tier: u64,
        /// The shared slot.
        slot: u64,
        /// The older snapshot that keeps the slot.
        kept: u64,
    },
}

/// Keep or delete, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "reason", rename_all = "snake_case")]
pub enum Decision {
    /// The snapshot stays.
    Keep(KeepReason),
    /// The snapshot should be destroyed.
    Delete(DeleteReason),
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Keep(KeepReason::Newest { rank }) => write!(f, "keep: newest #{rank}"),
            Decision::Keep(KeepReason::Tier1 { rank }) => write!(f, "keep: tier 1, newest #{rank}"),
            Decision::Keep(KeepReason::Slot { tier, slot }) => {
                write!(f, "keep: tier {tier}, slot {slot}")
            }
            Decision::Keep(KeepReason::Pinned) => write!(f, "keep: pinned by a running export"),
            Decision::Keep(KeepReason::Protected) => write!(f, "keep: protected"),
            Decision::Delete(DeleteReason::BeyondCap { rank, limit }) => {
                write!(f, "delete: position {rank} is past the {limit} kept")
            }
            Decision::Delete(DeleteReason::SlotTaken { tier, slot, kept }) => {
                write!(
                    f,
                    "delete: tier {tier}, slot {slot} is kept by older {kept}"
                )
            }
        }
    }
}

/// The decision for one height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The snapshot's height.
    pub height: u64,
    /// What to do with it.
    #[serde(flatten)]
    pub decision: Decision,
}

/// Decisions for a set of heights, newest first, one per distinct height.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    /// One verdict per height, highest height first.
    pub verdicts: Vec<Verdict>,
    /// The labels of the protected heights among them.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub protected: std::collections::BTreeMap<u64, String>,
}

impl Plan {
    /// Heights to keep, newest first.
    pub fn kept(&self) -> Vec<u64> {
        self.select(|d| matches!(d, Decision::Keep(_)))
    }

    /// Heights to delete, newest first.
    pub fn deleted(&self) -> Vec<u64> {
        self.select(|d| matches!(d, Decision::Delete(_)))
    }

    /// This plan with every deletion of a `pinned` height turned into
    /// [`KeepReason::Pinned`].
    pub fn pin(mut self, pinned: &std::collections::BTreeSet<u64>) -> Plan {
        for v in &mut self.verdicts {
            if matches!(v.decision, Decision::Delete(_)) && pinned.contains(&v.height) {
                v.decision = Decision::Keep(KeepReason::Pinned);
            }
        }
        self
    }

    /// Add the `protected` snapshots, kept with their labels. They were
    /// left out of the policy's input: they take no position under `cap`
    /// and no fade slot, so protecting one changes nothing else.
    pub fn protect(mut self, protected: std::collections::BTreeMap<u64, String>) -> Plan {
        for &height in protected.keys() {
            if !self.verdicts.iter().any(|v| v.height == height) {
                self.verdicts.push(Verdict {
                    height,
                    decision: Decision::Keep(KeepReason::Protected),
                });
            }
        }
        self.verdicts
            .sort_unstable_by_key(|v| std::cmp::Reverse(v.height));
        self.protected = protected;
        self
    }

    /// The decision for `v`, as a person reads it (with the protection's
    /// label).
    pub fn describe(&self, v: &Verdict) -> String {
        match (&v.decision, self.protected.get(&v.height)) {
            (Decision::Keep(KeepReason::Protected), Some(label)) => {
                format!("keep: protected ({label})")
            }
            (d, _) => d.to_string(),
        }
    }

    fn select(&self, f: impl Fn(&Decision) -> bool) -> Vec<u64> {
        self.verdicts
            .iter()
            .filter(|v| f(&v.decision))
            .map(|v| v.height)
            .collect()
    }
}

/// A validated retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    algo: Algo,
    itv: u64,
    cap: u64,
}

impl Policy {
    /// A policy keeping at most `cap` snapshots. `itv` is the snapshot
    /// interval in blocks, which fade uses as the base of its slot widths.
    pub fn new(algo: Algo, itv: u64, cap: u64) -> Result<Self, PolicyError> {
        if itv == 0 {
            return Err(PolicyError::ZeroItv);
        }
        if cap == 0 {
            return Err(PolicyError::ZeroCap);
        }
        Ok(Policy { algo, itv, cap })
    }

    /// The rule.
    pub fn algo(&self) -> Algo {
        self.algo
    }
    /// The interval in blocks.
    pub fn itv(&self) -> u64 {
        self.itv
    }
    /// The most snapshots kept.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// fade's tier count `T = min(10, cap)` and tier size `q = cap / T`.
    pub fn tiers(&self) -> (u64, u64) {
        let t = self.cap.min(MAX_TIERS);
        (t, self.cap / t)
    }

    /// Decide, for every distinct height in `heights`, whether to keep it.
    ///
    /// Contract (checked by property tests):
    /// - the result depends only on the *set* of heights (order and
    ///   duplicates do not matter) and on the policy, nothing else;
    /// - at most `cap` heights are kept, and the highest is always kept;
    /// - idempotent: planning the kept set again keeps all of it.
    ///
    /// **fair** keeps the `cap` highest heights.
    ///
    /// **fade** sorts newest first and sets `T = min(10, cap)` tiers of
    /// `q = cap / T` positions. Tier 1 (positions `1..=q`) is kept whole.
    /// Tier `k` (positions `(k-1)q+1 ..= kq`, for `k = 2..=T`) keeps only the
    /// oldest snapshot of each slot `floor(h / itv^k)` (`itv^k` saturating
    /// at `u64::MAX`). Positions past `T·q` are deleted. That pass is
    /// repeated on the survivors until nothing changes: on the sets a daemon
    /// produces (one new height, then prune) the first pass is already the
    /// fixed point, and on arbitrary sets the repetition is what makes the
    /// rule idempotent.
    pub fn plan(&self, heights: &[u64]) -> Plan {
        let mut hs = heights.to_vec();
        hs.sort_unstable_by(|a, b| b.cmp(a));
        hs.dedup();
        let mut verdicts = match self.algo {
            Algo::Fair => self.fair(&hs),
            Algo::Fade => self.fade(hs),
        };
        verdicts.sort_unstable_by_key(|v| std::cmp::Reverse(v.height));
        Plan {
            verdicts,
            protected: Default::default(),
        }
    }

    fn fair(&self, hs: &[u64]) -> Vec<Verdict> {
        hs.iter()
            .zip(1u64..)
            .map(|(&height, rank)| Verdict {
                height,
                decision: if rank <= self.cap {
                    Decision::Keep(KeepReason::Newest { rank })
                } else {
                    Decision::Delete(DeleteReason::BeyondCap {
                        rank,
                        limit: self.cap,
                    })
                },
            })
            .collect()
    }

    fn fade(&self, mut alive: Vec<u64>) -> Vec<Verdict> {
        let mut out = Vec::with_capacity(alive.len());
        loop {
            let pass = self.fade_pass(&alive);
            let before = alive.len();
            alive.clear();
            let mut kept = Vec::new();
            for v in pass {
                match v.decision {
                    Decision::Keep(_) => {
                        alive.push(v.height);
                        kept.push(v);
                    }
                    Decision::Delete(_) => out.push(v),
                }
            }
            if alive.len() == before {
                out.extend(kept);
                return out;
            }
        }
    }

    /// One application of the fade rule to `hs` (sorted newest first,
    /// distinct). Slots are contiguous runs in a sorted list, so "oldest of
    /// its slot within its tier" is "last of its run within its tier".
    fn fade_pass(&self, hs: &[u64]) -> Vec<Verdict> {
        let (t, q) = self.tiers();
        let limit = t * q;
        let slot_of = |tier: u64, h: u64| h / self.itv.saturating_pow(tier as u32);
        let mut out = Vec::with_capacity(hs.len());
        for (i, &height) in hs.iter().enumerate() {
            let pos = i as u64;
            let tier = pos / q + 1;
            let decision = if pos >= limit {
                Decision::Delete(DeleteReason::BeyondCap {
                    rank: pos + 1,
                    limit,
                })
            } else if tier == 1 {
                Decision::Keep(KeepReason::Tier1 { rank: pos + 1 })
            } else {
                let slot = slot_of(tier, height);
                let tier_end = (tier * q).min(hs.len() as u64) as usize;
                // The oldest member of this slot within the tier.
                let oldest = hs[i..tier_end]
                    .iter()
                    .take_while(|&&h| slot_of(tier, h) == slot)
                    .last()
                    .copied()
                    .unwrap_or(height);
                if oldest == height {
                    Decision::Keep(KeepReason::Slot { tier, slot })
                } else {
                    Decision::Delete(DeleteReason::SlotTaken {
                        tier,
                        slot,
                        kept: oldest,
                    })
                }
            };
            out.push(Verdict { height, decision });
        }
        out
    }

    /// Replay heights `itv, 2·itv, …, ≤ blocks` exactly as the daemon does
    /// (take a snapshot, then prune, after each) and return the final plan,
    /// whose verdicts are all `Keep` with the reason each survivor stands.
    pub fn simulate(&self, blocks: u64) -> Result<Plan, PolicyError> {
        self.simulate_protected(blocks, &std::collections::BTreeMap::new())
    }

    /// [`Policy::simulate`] with the heights of `protected` protected as
    /// they are taken: they never enter the policy, and the result keeps
    /// them with their labels (those at most `blocks`).
    pub fn simulate_protected(
        &self,
        blocks: u64,
        protected: &std::collections::BTreeMap<u64, String>,
    ) -> Result<Plan, PolicyError> {
        let steps = blocks / self.itv;
        if steps > MAX_SIMULATE_STEPS {
            return Err(PolicyError::TooManySteps {
                blocks,
                itv: self.itv,
                steps,
            });
        }
        let free = |h: &u64| !protected.contains_key(h);
        let mine: std::collections::BTreeMap<u64, String> = protected
            .range(..=blocks)
            .map(|(h, l)| (*h, l.clone()))
            .collect();
        if self.algo == Algo::Fair {
            // Replaying fair keeps exactly the newest `cap` free heights.
            let mut heights: Vec<u64> = (1..=steps)
                .rev()
                .map(|s| s * self.itv)
                .filter(free)
                .take(usize::try_from(self.cap).unwrap_or(usize::MAX))
                .collect();
            heights.reverse();
            return Ok(self.plan(&heights).protect(mine));
        }
        let mut alive: Vec<u64> = Vec::new();
        for h in (1..=steps).map(|s| s * self.itv).filter(free) {
            // Newest first, so planning sorts an already sorted list.
            alive.insert(0, h);
            alive = self.plan(&alive).kept();
        }
        Ok(self.plan(&alive).protect(mine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(algo: Algo, itv: u64, cap: u64) -> Policy {
        Policy::new(algo, itv, cap).expect("valid policy")
    }

    /// The fade rule applied exactly once, as the issue words it.
    fn one_pass(p: &Policy, hs: &[u64]) -> Vec<u64> {
        let mut hs = hs.to_vec();
        hs.sort_unstable_by(|a, b| b.cmp(a));
        hs.dedup();
        p.fade_pass(&hs)
            .into_iter()
            .filter(|v| matches!(v.decision, Decision::Keep(_)))
            .map(|v| v.height)
            .collect()
    }

    #[test]
    fn zero_parameters_are_rejected() {
        assert_eq!(Policy::new(Algo::Fair, 0, 5), Err(PolicyError::ZeroItv));
        assert_eq!(Policy::new(Algo::Fade, 5, 0), Err(PolicyError::ZeroCap));
    }

    #[test]
    fn fair_keeps_newest_cap() {
        let p = policy(Algo::Fair, 10, 3);
        let plan = p.plan(&[10, 50, 20, 40, 30, 30]);
        assert_eq!(plan.kept(), vec![50, 40, 30]);
        assert_eq!(plan.deleted(), vec![20, 10]);
        assert_eq!(
            plan.verdicts[3].decision,
            Decision::Delete(DeleteReason::BeyondCap { rank: 4, limit: 3 })
        );
    }

    #[test]
    fn fade_worked_example_matches_definition() {
        // itv 10, cap 20: T = 10 tiers of q = 2.
        let p = policy(Algo::Fade, 10, 20);
        let plan = p.simulate(2000).expect("simulate");
        assert_eq!(plan.kept(), vec![2000, 1990, 1900, 1000, 10]);
        assert_eq!(
            plan.verdicts[2].decision,
            Decision::Keep(KeepReason::Slot { tier: 2, slot: 19 })
        );
        assert_eq!(
            plan.verdicts[4].decision,
            Decision::Keep(KeepReason::Slot { tier: 3, slot: 0 })
        );
    }

    #[test]
    fn fade_one_pass_is_not_idempotent_on_arbitrary_sets_but_plan_is() {
        let p = policy(Algo::Fade, 10, 20);
        let all: Vec<u64> = (1..=100).map(|i| i * 10).collect();
        let once = one_pass(&p, &all);
        assert_ne!(
            one_pass(&p, &once),
            once,
            "the literal rule needs iteration"
        );
        let kept = p.plan(&all).kept();
        assert_eq!(p.plan(&kept).kept(), kept);
    }

    #[test]
    fn huge_itv_saturates() {
        let p = policy(Algo::Fade, u64::MAX, 100);
        let hs = [
            u64::MAX,
            u64::MAX - 1,
            0,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            10,
            11,
            12,
        ];
        let kept = p.plan(&hs).kept();
        assert_eq!(kept[0], u64::MAX);
        assert!(kept.len() <= 100);
    }

    #[test]
    fn simulate_refuses_absurd_replays() {
        let p = policy(Algo::Fair, 1, 10);
        assert!(matches!(
            p.simulate(u64::MAX),
            Err(PolicyError::TooManySteps { .. })
        ));
    }

    fn any_policy() -> impl Strategy<Value = Policy> {
        (
            prop_oneof![Just(Algo::Fair), Just(Algo::Fade)],
            1u64..=20,
            1u64..=130,
        )
            .prop_map(|(a, i, c)| policy(a, i, c))
    }

    fn gaps_non_decreasing(kept: &[u64]) -> bool {
        let gaps: Vec<u64> = kept.windows(2).map(|w| w[0] - w[1]).collect();
        gaps.windows(2).all(|g| g[0] <= g[1])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// A protected height is kept with its label, and the others stay
        /// within the cap.
        #[test]
        fn simulate_keeps_a_protected_height_and_the_cap_for_the_rest(
            p in any_policy(),
            blocks in 0u64..3_000,
            pick in 0u64..300,
        ) {
            let h = pick * p.itv();
            let protected: std::collections::BTreeMap<u64, String> =
                [(h, "up".to_owned())].into_iter().collect();
            let with = p.simulate_protected(blocks, &protected).expect("simulate");
            let kept = with.kept();
            if h <= blocks {
                prop_assert!(kept.contains(&h));
                prop_assert_eq!(with.protected.get(&h).map(String::as_str), Some("up"));
            }
            let others: Vec<u64> = kept.iter().copied().filter(|&k| k != h).collect();
            prop_assert!(others.len() as u64 <= p.cap());
        }

        /// Protecting heights keeps them and changes no other decision:
        /// they are outside the policy's input.
        #[test]
        fn protection_keeps_and_changes_nothing_else(
            p in any_policy(),
            hs in prop::collection::vec(0u64..100_000, 0..200),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let protected: std::collections::BTreeMap<u64, String> = picks
                .iter()
                .filter(|_| !hs.is_empty())
                .map(|i| (hs[i.index(hs.len())], "label".to_owned()))
                .collect();
            let free: Vec<u64> = hs.iter().copied().filter(|h| !protected.contains_key(h)).collect();
            let alone = p.plan(&free);
            let plan = alone.clone().protect(protected.clone());
            for h in protected.keys() {
                prop_assert!(plan.kept().contains(h));
            }
            for v in &alone.verdicts {
                let same = plan.verdicts.iter().find(|w| w.height == v.height);
                prop_assert_eq!(same.map(|w| w.decision), Some(v.decision));
            }
            prop_assert!(plan.verdicts.windows(2).all(|w| w[0].height > w[1].height));
        }

        #[test]
        fn never_more_than_cap(p in any_policy(), hs in prop::collection::vec(any::<u64>(), 0..300)) {
            prop_assert!(p.plan(&hs).kept().len() as u64 <= p.cap());
        }

        #[test]
        fn newest_always_kept(p in any_policy(), hs in prop::collection::vec(0u64..100_000, 1..300)) {
            let newest = *hs.iter().max().expect("non-empty");
            prop_assert_eq!(p.plan(&hs).kept().first().copied(), Some(newest));
        }

        #[test]
        fn idempotent(p in any_policy(), hs in prop::collection::vec(0u64..50_000, 0..300)) {
            let kept = p.plan(&hs).kept();
            let again = p.plan(&kept);
            prop_assert_eq!(again.kept(), kept);
            prop_assert!(again.deleted().is_empty());
        }

        #[test]
        fn depends_only_on_the_set(
            p in any_policy(),
            hs in prop::collection::vec(0u64..10_000, 0..200),
            seed in any::<u64>(),
        ) {
            let mut shuffled = hs.clone();
            // A deterministic shuffle plus duplicates.
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.wrapping_mul(i as u64 + 1) % n as u64) as usize;
                shuffled.swap(i, j);
            }
            shuffled.extend(hs.iter().take(5));
            prop_assert_eq!(p.plan(&hs), p.plan(&shuffled));
        }

        #[test]
        fn every_height_gets_one_verdict(p in any_policy(), hs in prop::collection::vec(0u64..1000, 0..300)) {
            let plan = p.plan(&hs);
            let mut distinct = hs.clone();
            distinct.sort_unstable_by(|a, b| b.cmp(a));
            distinct.dedup();
            let heights: Vec<u64> = plan.verdicts.iter().map(|v| v.height).collect();
            prop_assert_eq!(heights, distinct);
        }

        #[test]
        fn fair_keeps_exactly_the_newest(itv in 1u64..50, cap in 1u64..200, hs in prop::collection::vec(any::<u64>(), 0..400)) {
            let p = policy(Algo::Fair, itv, cap);
            let mut distinct = hs.clone();
            distinct.sort_unstable_by(|a, b| b.cmp(a));
            distinct.dedup();
            distinct.truncate(cap as usize);
            prop_assert_eq!(p.plan(&hs).kept(), distinct);
        }

        /// On the sets the daemon produces, the literal one-pass rule is
        /// already at its fixed point, so `simulate` matches the definition.
        #[test]
        fn daemon_replay_matches_one_pass_rule(itv in 1u64..=12, cap in 1u64..=120, steps in 1u64..600) {
            let p = policy(Algo::Fade, itv, cap);
            let mut literal: Vec<u64> = Vec::new();
            for s in 1..=steps {
                literal.push(s * itv);
                literal = one_pass(&p, &literal);
            }
            prop_assert_eq!(p.simulate(steps * itv).expect("simulate").kept(), literal);
        }

        /// The fair shortcut in `simulate` equals stepping snapshot by snapshot.
        #[test]
        fn fair_replay_shortcut_is_exact(itv in 1u64..=12, cap in 1u64..=120, steps in 0u64..400) {
            let p = policy(Algo::Fair, itv, cap);
            let mut alive: Vec<u64> = Vec::new();
            for s in 1..=steps {
                alive.push(s * itv);
                alive = p.plan(&alive).kept();
            }
            prop_assert_eq!(p.simulate(steps * itv).expect("simulate").kept(), alive);
        }

        /// fade: spacing between kept snapshots never decreases with age.
        /// The gap down to the oldest survivor is exempt: that snapshot
        /// holds slot 0, which starts at height 0 rather than at `itv`.
        #[test]
        fn fade_spacing_never_decreases_with_age(itv in 1u64..=12, cap in 1u64..=120, steps in 1u64..800) {
            let p = policy(Algo::Fade, itv, cap);
            let kept = p.simulate(steps * itv).expect("simulate").kept();
            let without_oldest = &kept[..kept.len().saturating_sub(1)];
            prop_assert!(gaps_non_decreasing(without_oldest), "{:?}", kept);
        }

        /// fade with missed heights (daemon down): survivors of each tier
        /// beyond the first sit in distinct slots of that tier's width.
        #[test]
        fn fade_slots_distinct_with_gaps(itv in 2u64..=10, cap in 1u64..=100, present in prop::collection::vec(any::<bool>(), 1..500)) {
            let p = policy(Algo::Fade, itv, cap);
            let mut alive = Vec::new();
            for (i, &here) in present.iter().enumerate() {
                if here {
                    alive.push((i as u64 + 1) * itv);
                    alive = p.plan(&alive).kept();
                }
            }
            let plan = p.plan(&alive);
            let mut seen = std::collections::HashSet::new();
            for v in &plan.verdicts {
                if let Decision::Keep(KeepReason::Slot { tier, slot }) = v.decision {
                    prop_assert!(seen.insert((tier, slot)), "tier {} slot {} twice", tier, slot);
                }
            }
        }
    }
}
