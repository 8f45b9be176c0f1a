//! Cancellation that wakes whoever waits, instead of being polled.
//!
//! A [`Cancel`] is set once and stays set. Waiting on a condition variable
//! ([`super::Budget`]), a channel (`select!` on [`Cancel::receiver`]) or a
//! timer ([`Cancel::sleep`]) returns as soon as it is set, so a pipeline
//! that fails, or an export the daemon stops, never leaves a thread
//! asleep for the rest of a polling interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// Something that sleeps until woken: woken once when a [`Cancel`] it
/// registered with is set.
pub trait Wake: Send + Sync {
    /// Wake every waiter. Called at most once per registration, after the
    /// flag is set, so a waiter that checks the flag under the same lock
    /// it waits with never misses it.
    fn wake(&self);
}

/// A value that never exists: [`Cancel::receiver`] only ever reports its
/// sender gone.
pub enum Never {}

/// A cancellation flag shared by handle (clones are the same flag).
#[derive(Clone)]
pub struct Cancel(Arc<Inner>);

struct Inner {
    flag: AtomicBool,
    wakers: Mutex<Vec<Weak<dyn Wake>>>,
    /// Dropped when cancelled: every receiver then disconnects at once.
    sender: Mutex<Option<Sender<Never>>>,
    receiver: Receiver<Never>,
}

impl Default for Cancel {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Cancel(Arc::new(Inner {
            flag: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
            sender: Mutex::new(Some(tx)),
            receiver: rx,
        }))
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancel").field(&self.is_cancelled()).finish()
    }
}

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the flag and wake everything that waits on it. Setting it again
    /// does nothing.
    pub fn cancel(&self) {
        self.0.cancel();
    }

    /// Whether the flag is set.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// Call `waker` once the flag is set; at once if it is already set.
    /// Only a weak reference is kept: a waiter that is gone costs nothing.
    pub fn on_cancel(&self, waker: Weak<dyn Wake>) {
        let mut wakers = self.0.wakers.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock `cancel` drains with: either this sees the
        // flag, or `cancel` sees this waker.
        if self.is_cancelled() {
            drop(wakers);
            if let Some(w) = waker.upgrade() {
                w.wake();
            }
            return;
        }
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(waker);
    }

    /// A new flag that is set when this one is (and may also be set on its
    /// own): a pipeline's stop, linked to its caller's cancellation.
    pub fn child(&self) -> Cancel {
        let child = Cancel::new();
        let weak: Weak<Inner> = Arc::downgrade(&child.0);
        self.on_cancel(weak);
        child
    }

    /// A receiver that never yields a value and disconnects when the flag
    /// is set: the arm of a `select!` that ends a wait on cancellation.
    pub fn receiver(&self) -> &Receiver<Never> {
        &self.0.receiver
    }

    /// Sleep for `d`, or less if the flag is set meanwhile. `true` if it is
    /// set.
    pub fn sleep(&self, d: Duration) -> bool {
        match self.0.receiver.recv_timeout(d) {
            Ok(never) => match never {},
            Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => self.is_cancelled(),
        }
    }
}

impl Inner {
    fn cancel(&self) {
        if self.flag.swap(true, Ordering::SeqCst) {
            return;
        }
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in wakers.iter().filter_map(Weak::upgrade) {
            w.wake();
        }
    }
}

impl Wake for Inner {
    fn wake(&self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_sleeper_wakes_at_once() {
        let c = Cancel::new();
        std::thread::scope(|s| {
            let c2 = c.clone();
            let sleeper = s.spawn(move || {
                let t = Instant::now();
                (c2.sleep(Duration::from_secs(30)), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(20));
            c.cancel();
            let (woke, took) = sleeper.join().expect("join");
            assert!(woke);
            assert!(
                took < Duration::from_secs(5),
                "woken, not timed out: {took:?}"
            );
        });
        assert!(c.sleep(Duration::from_secs(30)), "set before the wait");
    }

    #[test]
    fn a_child_follows_its_parent_but_not_the_reverse() {
        let parent = Cancel::new();
        let child = parent.child();
        child.cancel();
        assert!(!parent.is_cancelled());
        let child2 = parent.child();
        parent.cancel();
        assert!(child2.is_cancelled());
        assert!(
            parent.child().is_cancelled(),
            "made after the parent was set"
        );
    }

    #[test]
    fn a_select_ends_on_cancel() {
        let c = Cancel::new();
        let (_tx, rx) = crossbeam_channel::bounded::<u32>(0);
        c.cancel();
        crossbeam_channel::select! {
            recv(rx) -> _ => panic!("nothing was sent"),
            recv(c.receiver()) -> r => assert!(r.is_err()),
        }
    }
}
