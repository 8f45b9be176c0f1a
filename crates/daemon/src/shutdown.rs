//! The daemon's stop signal.
//!
//! A broadcast message is seen only by receivers that exist when it is
//! sent: a task that subscribes a moment later misses it and never stops.
//! A stop is a *state*, not a message, so it lives in a `watch` channel:
//! every [`Shutdown`], whenever it was cloned and whenever it first looks,
//! sees a stop that was fired before it, and dropping the [`Trigger`]
//! counts as firing it.

use tokio::sync::watch;

/// Fires the stop. Dropping it fires it too.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Observes the stop; cheap to clone, one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new stop signal, not yet fired.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Stop everything observing this signal. Idempotent.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Another observer.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether the stop has fired.
    pub fn is_set(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Wait until the stop fires; returns at once if it already has.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which counts as fired.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// Run `fut` unless the stop fires first; `None` if it did.
    pub async fn until<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.wait() => None,
            out = fut => Some(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_fired_before_subscribing_is_seen() {
        let (trigger, first) = channel();
        trigger.fire();
        let mut late = trigger.subscribe();
        let mut early = first.clone();
        assert!(late.is_set() && early.is_set());
        late.wait().await;
        early.wait().await;
        assert_eq!(early.until(std::future::pending::<()>()).await, None);
    }

    #[tokio::test]
    async fn dropping_the_trigger_stops() {
        let (trigger, mut s) = channel();
        assert!(!s.is_set());
        drop(trigger);
        assert!(s.is_set());
        s.wait().await;
    }
}
