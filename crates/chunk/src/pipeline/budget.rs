//! A counting budget shared by pipeline threads: open files, or bytes in
//! flight. Memory and descriptors are bounded by configuration, not by how
//! fast one stage outruns another.

use std::sync::{Arc, Condvar, Mutex, Weak};

use super::cancel::{Cancel, Wake};

/// Units that can be taken and are given back when the [`Permit`] drops.
pub struct Budget {
    total: u64,
    free: Mutex<Free>,
    freed: Condvar,
    stop: Cancel,
}

/// The units free, and how many takers wait for more. A permit given back
/// wakes the waiters only if there are any: a notify is a system call
/// whether or not anyone sleeps, and a restore gives back a permit per
/// file (150,000 `futex` calls for as many small files).
struct Free {
    units: u64,
    waiters: usize,
}

/// Units taken from a [`Budget`], returned on drop.
pub struct Permit<'a> {
    budget: &'a Budget,
    units: u64,
}

impl Budget {
    /// A budget of `total` units (at least one) whose waiters give up as
    /// soon as `stop` is set.
    pub fn new(total: u64, stop: &Cancel) -> Arc<Self> {
        let total = total.max(1);
        let budget = Arc::new(Budget {
            total,
            free: Mutex::new(Free {
                units: total,
                waiters: 0,
            }),
            freed: Condvar::new(),
            stop: stop.clone(),
        });
        let weak: Weak<Budget> = Arc::downgrade(&budget);
        stop.on_cancel(weak);
        budget
    }

    /// Take `units`, waiting until they are free. A request larger than the
    /// whole budget takes all of it, so that it is never refused. `None`
    /// once the stop is set: a failed pipeline never leaves a taker
    /// waiting.
    pub fn take(&self, units: u64) -> Option<Permit<'_>> {
        let units = units.clamp(1, self.total);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while free.units < units {
            // Checked under the lock `wake` takes: no stop is missed.
            if self.stop.is_cancelled() {
                return None;
            }
            // Counted under the lock a giver takes before it looks: no
            // wake-up is missed either.
            free.waiters += 1;
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
            free.waiters -= 1;
        }
        free.units -= units;
        Some(Permit {
            budget: self,
            units,
        })
    }
}

impl Wake for Budget {
    fn wake(&self) {
        let _free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        self.freed.notify_all();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut free = self.budget.free.lock().unwrap_or_else(|p| p.into_inner());
            free.units += self.units;
            free.waiters
        };
        if waiters > 0 {
            self.budget.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn never_more_than_the_total_is_out() {
        let budget = Budget::new(10, &Cancel::new());
        let out = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (budget, out, peak) = (&budget, &out, &peak);
                s.spawn(move || {
                    for i in 0..200u64 {
                        let n = (t + i) % 13 + 1;
                        let p = budget.take(n).expect("not stopped");
                        let now = out.fetch_add(p.units, Ordering::SeqCst) + p.units;
                        peak.fetch_max(now, Ordering::SeqCst);
                        out.fetch_sub(p.units, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 10);
        let free = budget.free.lock().expect("lock");
        assert_eq!((free.units, free.waiters), (10, 0));
    }

    #[test]
    fn a_permit_given_back_wakes_a_waiting_taker() {
        let budget = Budget::new(2, &Cancel::new());
        let held = budget.take(2).expect("free");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| budget.take(1).map(|p| p.units));
            while budget.free.lock().expect("lock").waiters == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(held);
            assert_eq!(waiter.join().expect("join"), Some(1));
        });
        let free = budget.free.lock().expect("lock");
        assert_eq!((free.units, free.waiters), (2, 0));
    }

    #[test]
    fn a_stop_wakes_a_waiting_taker_at_once() {
        let stop = Cancel::new();
        let budget = Budget::new(1, &stop);
        let held = budget.take(1).expect("free");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let t = Instant::now();
                (budget.take(1).is_none(), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(30));
            stop.cancel();
            let (refused, took) = waiter.join().expect("join");
            assert!(refused);
            assert!(took < Duration::from_secs(5), "{took:?}");
        });
        drop(held);
    }
}
