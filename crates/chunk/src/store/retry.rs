//! How a store call that failed for a passing reason is tried again: one
//! policy, written once, for every caller.
//!
//! A call is made by one executor, [`RetryPolicy::run`] (or
//! [`RetryPolicy::run_until`] where someone is waiting on it, as a live
//! restore's node is). Nothing below retries: the object stores' HTTP
//! client makes exactly one request per attempt (`object_store`'s own
//! retries are off), and nothing above retries a call again: a caller
//! that outlives a failed call (the daemon's next export, live hydration's
//! next pass) schedules new work, it does not repeat the call. So a call
//! makes at most [`RetryPolicy::ATTEMPTS`] requests, whichever path made
//! it, and no more than [`RetryPolicy::UNANSWERED`] that the store left
//! unanswered (each of those may have waited the whole stall limit). `docs/stores.md` states the numbers for operators.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::StoreError;

/// When and how often a failed store call is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The most attempts one call makes, the first included.
    pub attempts: u32,
    /// The most of them the store may leave unanswered
    /// ([`StoreError::Unreachable`]: no connection, or no progress for the
    /// stall limit) before the call gives up: a store that did not answer
    /// that often is down, not busy.
    pub unanswered: u32,
    /// The wait after the first failed attempt; each later wait doubles.
    pub first_wait: Duration,
    /// The longest wait between two attempts.
    pub max_wait: Duration,
    /// How long one request may go without progress (no byte sent or
    /// received) before it fails as a passing failure: the stall limit of
    /// the object stores' HTTP client (`$BTM_STORE_TIMEOUT`).
    pub stall: Duration,
}

impl RetryPolicy {
    /// The attempts of one call under [`RetryPolicy::standard`].
    pub const ATTEMPTS: u32 = 10;
    /// The unanswered attempts of one call under
    /// [`RetryPolicy::standard`].
    pub const UNANSWERED: u32 = 3;

    /// The policy every store call follows: [`RetryPolicy::ATTEMPTS`]
    /// attempts ([`RetryPolicy::UNANSWERED`] of them unanswered), waits
    /// from 250 ms doubling up to 15 s (about a minute in all), and the
    /// stall limit of `$BTM_STORE_TIMEOUT` (a duration like `30s`; 60 s if
    /// unset). Read once per process.
    pub fn standard() -> &'static RetryPolicy {
        static POLICY: OnceLock<RetryPolicy> = OnceLock::new();
        POLICY.get_or_init(|| RetryPolicy {
            attempts: Self::ATTEMPTS,
            unanswered: Self::UNANSWERED,
            first_wait: Duration::from_millis(250),
            max_wait: Duration::from_secs(15),
            stall: stall_from_env(),
        })
    }

    /// Whether a call that failed with `e` may pass if tried again: the
    /// store answered that it is busy or failing for now (5xx, 429), the
    /// connection broke, or the request made no progress. Everything else
    /// (missing, refused, conflicting, corrupt) fails at once.
    pub fn may_pass(e: &StoreError) -> bool {
        matches!(
            e,
            StoreError::Temporary { .. } | StoreError::Unreachable { .. }
        )
    }

    /// How long to wait after the `failed`th failed attempt (from 1):
    /// `first_wait` doubled `failed - 1` times, at most `max_wait`, and
    /// from half to all of that at random, so that the many calls a store
    /// outage fails together do not come back together.
    pub fn wait(&self, failed: u32) -> Duration {
        let doubled = self
            .first_wait
            .saturating_mul(1 << failed.saturating_sub(1).min(20));
        let full = doubled.min(self.max_wait);
        let half = full / 2;
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        half + half.mul_f64((random % 1024) as f64 / 1024.0)
    }

    /// Make `call` until it succeeds, fails for good, or has made
    /// [`RetryPolicy::attempts`] attempts ([`RetryPolicy::unanswered`]
    /// unanswered ones); the last failure is returned, saying how many
    /// attempts were made.
    pub fn run<T>(&self, call: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.run_until(None, call)
    }

    /// [`RetryPolicy::run`], giving up early rather than wait past
    /// `deadline`.
    pub fn run_until<T>(
        &self,
        deadline: Option<Instant>,
        mut call: impl FnMut() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (mut failed, mut unanswered) = (0, 0);
        loop {
            let e = match call() {
                Err(e) if Self::may_pass(&e) => e,
                other => return other,
            };
            failed += 1;
            unanswered += u32::from(matches!(e, StoreError::Unreachable { .. }));
            let wait = self.wait(failed);
            let late = deadline.is_some_and(|d| Instant::now() + wait >= d);
            if failed >= self.attempts || unanswered >= self.unanswered || late {
                return Err(gave_up(e, failed));
            }
            tracing::warn!(error = %e, attempt = failed, retry_in = ?wait, "store call failed; trying again");
            std::thread::sleep(wait);
        }
    }
}

/// `e`, the last failure of a call that made `attempts` attempts.
fn gave_up(e: StoreError, attempts: u32) -> StoreError {
    let note = |detail: String| match attempts {
        1 => detail,
        n => format!("{detail}; {n} attempts"),
    };
    match e {
        StoreError::Temporary { what, detail } => StoreError::Temporary {
            what,
            detail: note(detail),
        },
        StoreError::Unreachable { what, detail } => StoreError::Unreachable {
            what,
            detail: note(detail),
        },
        e => e,
    }
}

/// `$BTM_STORE_TIMEOUT` as a duration, else 60 s.
fn stall_from_env() -> Duration {
    std::env::var("BTM_STORE_TIMEOUT")
        .ok()
        .and_then(|s| humantime::parse_duration(s.trim()).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            unanswered: 2,
            first_wait: Duration::from_millis(1),
            max_wait: Duration::from_millis(2),
            stall: Duration::from_secs(1),
        }
    }

    fn temporary() -> StoreError {
        StoreError::Temporary {
            what: "GET x".into(),
            detail: "503".into(),
        }
    }

    #[test]
    fn a_failure_that_may_pass_is_tried_up_to_the_attempts_and_says_how_many() {
        let n = Cell::new(0);
        let e = fast(4)
            .run(|| -> Result<(), _> {
                n.set(n.get() + 1);
                Err(temporary())
            })
            .expect_err("must fail");
        assert_eq!(n.get(), 4);
        assert!(e.to_string().ends_with("503; 4 attempts"), "{e}");
    }

    #[test]
    fn a_store_that_does_not_answer_gets_fewer_attempts_than_a_busy_one() {
        let unanswered = || StoreError::Unreachable {
            what: "GET x".into(),
            detail: "no progress".into(),
        };
        let n = Cell::new(0);
        let e = fast(4)
            .run(|| -> Result<(), _> {
                n.set(n.get() + 1);
                Err(unanswered())
            })
            .expect_err("must fail");
        assert_eq!(n.get(), 2);
        assert!(e.to_string().contains("2 attempts"), "{e}");
        // Busy answers between them do not count as unanswered.
        let n = Cell::new(0);
        fast(4)
            .run(|| -> Result<(), _> {
                n.set(n.get() + 1);
                Err(if n.get() == 2 {
                    unanswered()
                } else {
                    temporary()
                })
            })
            .expect_err("must fail");
        assert_eq!(n.get(), 4);
    }

    #[test]
    fn a_lasting_failure_is_tried_once_and_a_success_ends_the_retries() {
        let n = Cell::new(0);
        let e = fast(4)
            .run(|| -> Result<(), _> {
                n.set(n.get() + 1);
                Err(StoreError::NotFound("pack x".into()))
            })
            .expect_err("must fail");
        assert_eq!(n.get(), 1);
        assert_eq!(e.to_string(), "pack x not found in the store");
        let n = Cell::new(0);
        let got = fast(4).run(|| {
            n.set(n.get() + 1);
            if n.get() < 3 {
                Err(temporary())
            } else {
                Ok(7)
            }
        });
        assert_eq!((got.expect("must succeed"), n.get()), (7, 3));
    }

    #[test]
    fn a_deadline_ends_the_retries_before_a_wait_would_pass_it() {
        let policy = RetryPolicy {
            first_wait: Duration::from_secs(5),
            max_wait: Duration::from_secs(5),
            ..fast(10)
        };
        let n = Cell::new(0);
        let started = Instant::now();
        policy
            .run_until(
                Some(started + Duration::from_secs(1)),
                || -> Result<(), _> {
                    n.set(n.get() + 1);
                    Err(temporary())
                },
            )
            .expect_err("must fail");
        assert_eq!(n.get(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn waits_double_up_to_the_longest_with_jitter_below_them() {
        let p = RetryPolicy::standard();
        assert_eq!(p.attempts, RetryPolicy::ATTEMPTS);
        for failed in 1..=12 {
            let full = (p.first_wait * (1 << (failed - 1))).min(p.max_wait);
            let w = p.wait(failed);
            assert!(w >= full / 2 && w <= full, "{failed}: {w:?} of {full:?}");
        }
        // The whole patience of a call: about a minute at most.
        let most: Duration = (1..p.attempts)
            .map(|f| (p.first_wait * (1 << (f - 1))).min(p.max_wait))
            .sum();
        assert!(most <= Duration::from_secs(62), "{most:?}");
    }
}
