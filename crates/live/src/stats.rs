//! The figures a live restore reports: how much is local, how fast it
//! arrives in the background and on demand, and why it waits if it waits.
//! `btm live status` prints them; the daemon's metrics endpoint exports
//! them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Counters, updated by whoever fetches.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes of the backup's chunks, all of them.
    pub total_bytes: AtomicU64,
    demand_fetches: AtomicU64,
    demand_bytes: AtomicU64,
    demand_failures: AtomicU64,
    demand_latency_us: AtomicU64,
    demand_latency_max_us: AtomicU64,
    background_bytes: AtomicU64,
    background_requests: AtomicU64,
    background_inflight: AtomicU64,
    opens_served: AtomicU64,
    opens_passed_through: AtomicU64,
    /// When hydration last heard from the store (or started waiting).
    background_answer: Mutex<Option<Instant>>,
    rates: Mutex<Rates>,
    waiting: Mutex<Option<String>>,
}

/// Hydration has not heard from the store for this long: say so.
const SILENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Rates {
    at: Option<Instant>,
    demand_bytes: u64,
    background_bytes: u64,
    demand_rate: f64,
    background_rate: f64,
}

/// What `btm live status` shows, as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The directory served.
    #[serde(default)]
    pub dir: String,
    /// The backup served.
    pub backup: String,
    /// `hydrating`, `hydrated` or `finishing`.
    pub state: String,
    /// Bytes of the backup's data local now.
    pub present_bytes: u64,
    /// Bytes of the backup's data.
    pub total_bytes: u64,
    /// Files not wholly local yet.
    pub files_left: u64,
    /// Reads through the mount that had to fetch.
    pub demand_fetches: u64,
    /// Bytes they downloaded.
    pub demand_bytes: u64,
    /// On-demand bytes per second, over the last second or so.
    pub demand_rate: f64,
    /// Mean time an on-demand fetch took, in milliseconds.
    pub demand_latency_ms: f64,
    /// The longest, in milliseconds.
    pub demand_latency_max_ms: f64,
    /// On-demand fetches that failed (the reader got EIO).
    pub demand_failures: u64,
    /// Bytes hydration downloaded.
    pub background_bytes: u64,
    /// Its requests.
    pub background_requests: u64,
    /// Hydration bytes per second, over the last second or so.
    pub background_rate: f64,
    /// Why hydration waits, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The server's resident memory.
    pub rss_bytes: u64,
    /// Descriptors the server holds.
    #[serde(default)]
    pub open_files: u64,
    /// Opens of files whose reads and writes go through the server (not
    /// local yet, or opened before they were).
    #[serde(default)]
    pub opens_served: u64,
    /// Opens passed through to the kernel (FUSE passthrough).
    #[serde(default)]
    pub opens_passed_through: u64,
}

impl Stats {
    /// An on-demand fetch of `bytes` took `took`.
    pub fn demand(&self, bytes: u64, took: Duration) {
        let us = took.as_micros() as u64;
        self.demand_fetches.fetch_add(1, Ordering::Relaxed);
        self.demand_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.demand_latency_us.fetch_add(us, Ordering::Relaxed);
        self.demand_latency_max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// An on-demand fetch failed.
    pub fn demand_failed(&self, e: &dyn std::fmt::Display) {
        self.demand_failures.fetch_add(1, Ordering::Relaxed);
        self.set_waiting(Some(format!("a read through the mount failed: {e}")));
    }

    /// The node opened a file: served by this process, or passed through.
    pub fn opened(&self, passed_through: bool) {
        let c = if passed_through {
            &self.opens_passed_through
        } else {
            &self.opens_served
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A hydration request starts.
    pub fn background_start(&self) {
        if self.background_inflight.fetch_add(1, Ordering::Relaxed) == 0 {
            *self
                .background_answer
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    /// A hydration request ended; `bytes` read if it succeeded.
    pub fn background_end(&self, bytes: Option<u64>) {
        self.background_inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(b) = bytes {
            self.background_bytes.fetch_add(b, Ordering::Relaxed);
            self.background_requests.fetch_add(1, Ordering::Relaxed);
            *self
                .background_answer
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    /// Why hydration waits: what it was told, or a store silent too long.
    fn waiting(&self) -> Option<String> {
        if let Some(w) = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(w);
        }
        let last = *self
            .background_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let silent = last.map(|t| t.elapsed()).filter(|d| *d >= SILENCE)?;
        (self.background_inflight.load(Ordering::Relaxed) > 0).then(|| {
            format!(
                "the store has not answered hydration for {}s",
                silent.as_secs()
            )
        })
    }

    /// Say why hydration waits (`None`: it does not).
    pub fn set_waiting(&self, why: Option<String>) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Update the rates; called about once a second.
    pub fn tick(&self, now: Instant) {
        let mut r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let (d, b) = (
            self.demand_bytes.load(Ordering::Relaxed),
            self.background_bytes.load(Ordering::Relaxed),
        );
        if let Some(at) = r.at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 {
                r.demand_rate = (d - r.demand_bytes) as f64 / dt;
                r.background_rate = (b - r.background_bytes) as f64 / dt;
            }
        }
        *r = Rates {
            at: Some(now),
            demand_bytes: d,
            background_bytes: b,
            ..*r
        };
    }

    /// The figures now, `absent` bytes and `files_left` files still to
    /// fetch.
    pub fn status(
        &self,
        dir: &str,
        backup: &str,
        state: &str,
        files_left: u64,
        absent: u64,
    ) -> Status {
        let r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let fetches = self.demand_fetches.load(Ordering::Relaxed);
        let total = self.total_bytes.load(Ordering::Relaxed);
        Status {
            dir: dir.to_owned(),
            backup: backup.to_owned(),
            state: state.to_owned(),
            present_bytes: total.saturating_sub(absent),
            total_bytes: total,
            files_left,
            demand_fetches: fetches,
            demand_bytes: self.demand_bytes.load(Ordering::Relaxed),
            demand_rate: r.demand_rate,
            demand_latency_ms: if fetches == 0 {
                0.0
            } else {
                self.demand_latency_us.load(Ordering::Relaxed) as f64 / fetches as f64 / 1000.0
            },
            demand_latency_max_ms: self.demand_latency_max_us.load(Ordering::Relaxed) as f64
                / 1000.0,
            demand_failures: self.demand_failures.load(Ordering::Relaxed),
            background_bytes: self.background_bytes.load(Ordering::Relaxed),
            background_requests: self.background_requests.load(Ordering::Relaxed),
            background_rate: r.background_rate,
            waiting: self.waiting(),
            rss_bytes: rss_bytes(),
            open_files: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
            opens_served: self.opens_served.load(Ordering::Relaxed),
            opens_passed_through: self.opens_passed_through.load(Ordering::Relaxed),
        }
    }
}

/// This process's resident memory, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .unwrap_or(0);
    pages * 4096
}
