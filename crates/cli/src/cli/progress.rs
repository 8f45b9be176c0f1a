//! Progress of a long store operation on stderr: a bar on a terminal, a
//! plain line every 10 s otherwise. When nothing moves for 10 s while
//! requests are in flight, it says so ("waiting for the store: 3 requests
//! in flight, nothing for 40 s") instead of showing a full bar that never
//! ends.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use btm_chunk::Progress;

use super::human_bytes;

/// Shows `progress` until dropped.
pub struct Reporter {
    /// Dropped to stop the thread: its wait between updates ends at once,
    /// so a command does not end up to one interval late (an average
    /// 50 ms on every backup and restore, 7 % of a remote incremental).
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the bar is redrawn.
const TICK: Duration = Duration::from_millis(100);

/// How long without progress before the store is said to be slow.
const STALL: Duration = Duration::from_secs(10);

impl Reporter {
    /// Start showing `progress`, described as `what`.
    pub fn start(what: String, progress: Arc<Progress>) -> Self {
        let (stop, stopped) = channel::<()>();
        let thread = std::thread::spawn(move || {
            let tty = std::io::stderr().is_terminal();
            let bar = if tty {
                let bar = indicatif::ProgressBar::new(0);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(what.clone());
                bar
            } else {
                indicatif::ProgressBar::hidden()
            };
            let mut last_line = Instant::now();
            let (mut last_done, mut moved) = (0, Instant::now());
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                let done = progress.done.load(Ordering::Relaxed)
                    + progress.uploaded.load(Ordering::Relaxed);
                let total = progress.total.load(Ordering::Relaxed);
                if done != last_done {
                    (last_done, moved) = (done, Instant::now());
                }
                let requests = progress.requests.load(Ordering::Relaxed);
                let stalled = (moved.elapsed() >= STALL && requests > 0).then(|| {
                    format!(
                        "waiting for the store: {requests} request(s) in flight, nothing for {} s",
                        moved.elapsed().as_secs()
                    )
                });
                bar.set_length(total);
                bar.set_position(progress.done.load(Ordering::Relaxed));
                if tty {
                    bar.set_message(stalled.clone().unwrap_or_else(|| what.clone()));
                } else if last_line.elapsed() >= Duration::from_secs(10) {
                    match &stalled {
                        Some(s) => eprintln!("{what}: {s}"),
                        None => eprintln!(
                            "{what}: {} of {} processed",
                            human_bytes(progress.done.load(Ordering::Relaxed)),
                            human_bytes(total)
                        ),
                    }
                    last_line = Instant::now();
                }
            }
            bar.finish_and_clear();
        });
        Reporter {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
