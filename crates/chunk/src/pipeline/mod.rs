//! What every pipeline of the engine (backup, restore) shares, in one
//! place: the stop with its first error, the worker pool, the budgets that
//! bound memory and descriptors, and the counters.
//!
//! A pipeline is a few stages on scoped threads joined by bounded
//! channels. Any stage that fails calls [`Pipeline::fail`]: the first real
//! error is kept, the stop is set, every waiter wakes (budgets, `select!`
//! on the stop's receiver), and the stages drain their channels without
//! working so that nobody blocks on a full one. The caller's cancellation
//! ([`crate::Progress::cancel`]) sets the same stop.

pub mod budget;
pub mod cancel;
pub mod pool;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Scope;

use crossbeam_channel::Receiver;

pub use budget::{Budget, Permit};
pub use cancel::Cancel;

use crate::ChunkError;

/// One pipeline run's stop and first error.
pub struct Pipeline {
    outer: Cancel,
    stop: Cancel,
    first_error: Mutex<Option<ChunkError>>,
}

impl Pipeline {
    /// A pipeline stopped by its own failures and by `outer` (the
    /// caller's cancellation).
    pub fn new(outer: &Cancel) -> Self {
        Pipeline {
            outer: outer.clone(),
            stop: outer.child(),
            first_error: Mutex::new(None),
        }
    }

    /// The stop: set on the first failure or on cancellation.
    pub fn stop(&self) -> &Cancel {
        &self.stop
    }

    /// Whether the pipeline is stopping.
    pub fn aborted(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Record `e` if it is the first real error, and stop everything.
    /// [`ChunkError::Aborted`] only stops: it says a stage saw the stop.
    pub fn fail(&self, e: ChunkError) {
        if !matches!(e, ChunkError::Aborted) {
            self.first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
        self.stop.cancel();
    }

    /// A budget of `total` units whose waiters wake on the stop.
    pub fn budget(&self, total: u64) -> Arc<Budget> {
        Budget::new(total, &self.stop)
    }

    /// How the run ended once every stage is joined: its first error,
    /// else [`ChunkError::Cancelled`] if the caller cancelled it, else
    /// [`ChunkError::Aborted`] if a stage stopped without saying why.
    pub fn outcome(&self) -> Result<(), ChunkError> {
        let first = self
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match first {
            Some(e) => Err(e),
            None if self.outer.is_cancelled() => Err(ChunkError::Cancelled),
            None if self.aborted() => Err(ChunkError::Aborted),
            None => Ok(()),
        }
    }

    /// Start `n` workers on scope `s`, each taking items from `rx` until
    /// every sender is gone. Each builds its own state with `init` (a
    /// failure stops the pipeline) and hands every item to `work`; once the
    /// pipeline stops, items are drained unworked so that no sender blocks.
    pub fn spawn_workers<'scope, 'env, T, S, I, W>(
        &'env self,
        s: &'scope Scope<'scope, 'env>,
        n: usize,
        rx: &Receiver<T>,
        init: I,
        work: W,
    ) where
        T: Send + 'scope,
        I: Fn() -> Result<S, ChunkError> + Send + Clone + 'scope,
        W: Fn(&mut S, T) + Send + Clone + 'scope,
    {
        self.spawn_workers_urgent(s, n, &crossbeam_channel::never(), rx, init, work);
    }

    /// [`Pipeline::spawn_workers`], where an item waiting in `urgent` is
    /// always taken before one in `rx`: work that must not queue behind
    /// the rest (a backup's second read of a file that changed while
    /// read). Both channels' senders must be dropped together: a worker
    /// ends once `rx` is disconnected and `urgent` empty.
    pub fn spawn_workers_urgent<'scope, 'env, T, S, I, W>(
        &'env self,
        s: &'scope Scope<'scope, 'env>,
        n: usize,
        urgent: &Receiver<T>,
        rx: &Receiver<T>,
        init: I,
        work: W,
    ) where
        T: Send + 'scope,
        I: Fn() -> Result<S, ChunkError> + Send + Clone + 'scope,
        W: Fn(&mut S, T) + Send + Clone + 'scope,
    {
        for _ in 0..n.max(1) {
            let (urgent, rx, init, work) = (urgent.clone(), rx.clone(), init.clone(), work.clone());
            s.spawn(move || {
                let mut state = match init() {
                    Ok(state) => state,
                    Err(e) => return self.fail(e),
                };
                while let Some(item) = next_item(&urgent, &rx) {
                    if !self.aborted() {
                        work(&mut state, item);
                    }
                }
            });
        }
    }
}

/// The next item, from `urgent` if it has one; `None` once `rx` is
/// disconnected and `urgent` empty.
fn next_item<T>(urgent: &Receiver<T>, rx: &Receiver<T>) -> Option<T> {
    if let Ok(item) = urgent.try_recv() {
        return Some(item);
    }
    crossbeam_channel::select! {
        recv(urgent) -> item => match item {
            Ok(item) => Some(item),
            // Its senders are gone: only `rx` is left.
            Err(_) => rx.recv().ok(),
        },
        recv(rx) -> item => match item {
            Ok(item) => Some(item),
            Err(_) => urgent.try_recv().ok(),
        },
    }
}

/// Declare a pipeline's counters: one [`Counter`] per field of its
/// summary, named as the field, and `fill` to copy them into it.
macro_rules! counters {
    ($(#[$m:meta])* struct $name:ident for $summary:ty { $($field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Default)]
        struct $name {
            $($field: $crate::pipeline::Counter,)*
        }

        impl $name {
            /// Copy the counts into the summary.
            fn fill(&self, summary: &mut $summary) {
                $(summary.$field = self.$field.get();)*
            }
        }
    };
}
pub(crate) use counters;

/// A count shared by a pipeline's threads.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_real_error_wins_and_workers_drain() {
        let outer = Cancel::new();
        let p = Pipeline::new(&outer);
        let worked = Counter::default();
        let (tx, rx) = crossbeam_channel::bounded::<u32>(1);
        std::thread::scope(|s| {
            p.spawn_workers(
                s,
                3,
                &rx,
                || Ok(()),
                |_: &mut (), i| {
                    worked.add(1);
                    if i == 5 {
                        p.fail(ChunkError::Invalid("five".into()));
                    }
                },
            );
            drop(rx);
            for i in 0..100 {
                // Never blocks for good: stopped workers still drain.
                tx.send(i).expect("workers receive");
            }
            drop(tx);
        });
        assert!(
            !outer.is_cancelled(),
            "a failure does not cancel the caller"
        );
        assert!(worked.get() < 100, "stopped workers drain without working");
        assert!(matches!(p.outcome(), Err(ChunkError::Invalid(m)) if m == "five"));
    }

    #[test]
    fn cancellation_is_reported_as_such() {
        let outer = Cancel::new();
        let p = Pipeline::new(&outer);
        assert!(p.outcome().is_ok());
        outer.cancel();
        assert!(p.aborted());
        assert!(matches!(p.outcome(), Err(ChunkError::Cancelled)));
        let p = Pipeline::new(&Cancel::new());
        p.fail(ChunkError::Invalid("x".into()));
        p.fail(ChunkError::Invalid("y".into()));
        assert!(matches!(p.outcome(), Err(ChunkError::Invalid(m)) if m == "x"));
    }

    #[test]
    fn urgent_items_go_first_and_workers_end_with_both_channels() {
        let (utx, urx) = crossbeam_channel::unbounded::<u32>();
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        for i in 0..3 {
            tx.send(i).expect("send");
        }
        utx.send(100).expect("send");
        assert_eq!(next_item(&urx, &rx), Some(100));
        assert_eq!(next_item(&urx, &rx), Some(0));
        utx.send(101).expect("send");
        assert_eq!(next_item(&urx, &rx), Some(101));
        // Disconnected together: what is left is still handed out, urgent
        // first, then the end.
        utx.send(102).expect("send");
        drop((utx, tx));
        let rest: Vec<u32> = std::iter::from_fn(|| next_item(&urx, &rx)).collect();
        assert_eq!(rest, vec![102, 1, 2]);
        // Without urgent work (`never`), the end of `rx` ends the worker.
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        tx.send(7).expect("send");
        drop(tx);
        let never = crossbeam_channel::never();
        assert_eq!(next_item(&never, &rx), Some(7));
        assert_eq!(next_item(&never, &rx), None);
    }
}
