//! A byte-rate limit shared by all workers, so a background export never
//! starves the node's disk or network.
//!
//! A virtual clock: each `take(n)` books `n / rate` seconds after the later
//! of "now" and the previous booking, then sleeps until its slot ends.
//! Idle time is not saved up beyond [`BURST`], so a pause is not followed
//! by a flood. [`book`] is the pure rule; [`Throttle`] adds the clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Idle time that may be spent at once after a pause.
pub const BURST: Duration = Duration::from_millis(250);

/// Book `n` bytes at `rate` bytes/s: given the end of the last booking
/// (`next`) and `now`, returns when this transfer may start (possibly a
/// little in the past, spending saved-up burst) and the new end of the
/// bookings.
pub fn book(next: Instant, now: Instant, n: u64, rate: u64) -> (Instant, Instant) {
    let earliest = now.checked_sub(BURST).unwrap_or(now);
    let start = next.max(earliest);
    let cost = Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
    (start, start + cost)
}

/// Limits the bytes per second passing through [`Throttle::take`].
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    next: Mutex<Instant>,
}

impl Throttle {
    /// At most `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> Self {
        Throttle {
            rate: rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Wait until `n` more bytes fit in the rate: until the end of their
    /// booked slot, so even the first transfer is paid for (a single
    /// 4 MiB chunk at 1 MiB/s waits 4 s, less any saved-up burst).
    pub fn take(&self, n: u64) {
        let now = Instant::now();
        let end = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let (_, end) = book(*next, now, n, self.rate);
            *next = end;
            end
        };
        if end > now {
            std::thread::sleep(end - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However the transfers are sized and spaced, the bytes started
        /// by any moment never exceed rate × elapsed plus one burst and one
        /// transfer.
        #[test]
        fn never_exceeds_the_rate(
            rate in 1_000u64..10_000_000,
            steps in prop::collection::vec((1u64..2_000_000, 0u64..500), 1..100),
        ) {
            let t0 = Instant::now() + Duration::from_secs(1);
            let mut next = t0;
            let mut now = t0;
            let mut sent = 0u64;
            let max_n = steps.iter().map(|s| s.0).max().unwrap_or(0);
            for (n, gap_ms) in steps {
                now += Duration::from_millis(gap_ms);
                let (start, end) = book(next, now, n, rate);
                prop_assert!(start >= now.checked_sub(BURST).unwrap_or(now));
                next = end;
                now = now.max(start);
                sent += n;
                let elapsed = (now - t0 + BURST).as_secs_f64();
                prop_assert!(sent as f64 <= rate as f64 * elapsed + max_n as f64 + 1.0,
                    "sent {sent} in {elapsed}s at {rate}/s");
            }
        }
    }
}
