//! A counting budget shared by pipeline threads: open files, or bytes in
//! flight. Memory and descriptors are bounded by configuration, not by how
//! fast one stage outruns another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Units that can be taken and are given back when the [`Permit`] drops.
pub struct Budget {
    total: u64,
    free: Mutex<u64>,
    freed: Condvar,
}

/// Units taken from a [`Budget`], returned on drop.
pub struct Permit<'a> {
    budget: &'a Budget,
    units: u64,
}

impl Budget {
    /// A budget of `total` units (at least one).
    pub fn new(total: u64) -> Self {
        let total = total.max(1);
        Budget {
            total,
            free: Mutex::new(total),
            freed: Condvar::new(),
        }
    }

    /// Take `units`, waiting until they are free. A request larger than the
    /// whole budget takes all of it, so that it is never refused. `None`
    /// once `abort` is set: a failed pipeline never leaves a taker waiting.
    pub fn take(&self, units: u64, abort: &AtomicBool) -> Option<Permit<'_>> {
        let units = units.clamp(1, self.total);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < units {
            if abort.load(Ordering::Relaxed) {
                return None;
            }
            free = self
                .freed
                .wait_timeout(free, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= units;
        Some(Permit {
            budget: self,
            units,
        })
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.budget.free.lock().unwrap_or_else(|p| p.into_inner()) += self.units;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn never_more_than_the_total_is_out() {
        let budget = Budget::new(10);
        let abort = AtomicBool::new(false);
        let out = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (budget, abort, out, peak) = (&budget, &abort, &out, &peak);
                s.spawn(move || {
                    for i in 0..200u64 {
                        let n = (t + i) % 13 + 1;
                        let p = budget.take(n, abort).expect("not aborted");
                        let now = out.fetch_add(p.units, Ordering::SeqCst) + p.units;
                        peak.fetch_max(now, Ordering::SeqCst);
                        out.fetch_sub(p.units, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 10);
        assert_eq!(*budget.free.lock().expect("lock"), 10);
    }

    #[test]
    fn abort_releases_a_waiting_taker() {
        let budget = Budget::new(1);
        let abort = AtomicBool::new(false);
        let held = budget.take(1, &abort).expect("free");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| budget.take(1, &abort).is_none());
            std::thread::sleep(Duration::from_millis(50));
            abort.store(true, Ordering::Relaxed);
            assert!(waiter.join().expect("join"));
        });
        drop(held);
    }
}
