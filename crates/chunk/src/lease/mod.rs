//! Leases: how backups, restores and the garbage collector's sweep keep out
//! of each other's way in a store shared by many nodes.
//!
//! A backup trusts a listing of the store's chunks ("known chunks") and
//! never re-uploads those; a sweep deletes chunks. If both ran at once, a
//! backup could write an index pointing at a chunk the sweep had just
//! deleted. So each side first writes its own lease marker under `locks/`,
//! then lists the other side's: a backup waits while a sweep is live, and a
//! sweep gives up while a backup is live. Because each writes before it
//! reads, at least one of two racing parties sees the other (the stores
//! btm supports list with read-after-write consistency).
//!
//! A lease is live while its marker was written less than its TTL
//! ([`LEASE_TTL`]) ago *by the store's clock*: the judge's own marker's
//! listed time is "now", so clocks of different machines never need to
//! agree. Before that, a judge may call it dead only with proof that its
//! holder is gone ([`holder`]). Holders refresh their marker every tenth of
//! the TTL. A holder whose marker may have expired in others' eyes, because
//! its refreshes stopped for half the TTL (a failing store, a process
//! paused or a machine suspended) or because its marker was removed, has
//! **lost** its lease, for good: it must check again whatever it relied on
//! ([`Lease::renew`]) or stop. A crashed holder's marker simply expires.
//! See `docs/format.md`, "Leases".

pub mod holder;
mod judge;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pipeline::Cancel;
use crate::store::{Id, Marker, Store, StoreError};
use crate::with_retry;
use holder::Identity;
use judge::describe;
pub use judge::{dead_holders, judge, Judged, State};

/// How long a lease stays live after its holder's last refresh, by the
/// store's clock, unless the holder records another TTL in its body.
pub const LEASE_TTL: Duration = Duration::from_secs(600);
/// The shortest TTL `$BTM_LEASE_TTL` may set.
const MIN_TTL: Duration = Duration::from_secs(2);
/// How long a backup waits for a live sweep before giving up.
pub const MAX_WAIT: Duration = Duration::from_secs(1200);

/// The TTL of the leases this process takes: [`LEASE_TTL`], or
/// `$BTM_LEASE_TTL` (a duration, at least 2 s) so that tests can let a
/// lease lapse without waiting ten minutes. Every lease records its TTL,
/// and a judge never calls a lease expired before the TTL its holder
/// recorded, so a short setting on one machine never shortens another's
/// leases.
pub fn ttl() -> Duration {
    static TTL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TTL.get_or_init(|| {
        std::env::var("BTM_LEASE_TTL")
            .ok()
            .and_then(|s| humantime::parse_duration(s.trim()).ok())
            .map_or(LEASE_TTL, |d| d.max(MIN_TTL))
    })
}

/// How often a holder rewrites its marker: a tenth of the TTL.
fn refresh_every() -> Duration {
    ttl() / 10
}

/// A holder may act on its lease only while its last successful refresh is
/// younger than this: half the TTL, so clock-rate differences and a slow
/// final request cannot let the lease lapse in another party's eyes first.
fn safe_age() -> Duration {
    ttl() / 2
}

/// Time since boot, suspended time included (`CLOCK_BOOTTIME`): a machine
/// suspended for an hour must see that its lease lapsed.
fn clock() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_else(|_| {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            START.get_or_init(std::time::Instant::now).elapsed()
        })
}

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// A backup writing packs and, at the end, a head.
    Backup,
    /// A restore (or a check) reading packs.
    Restore,
    /// A garbage-collection sweep deleting or moving data.
    Sweep,
}

impl LeaseKind {
    fn prefix(self) -> &'static str {
        match self {
            LeaseKind::Backup => "locks/backup-",
            LeaseKind::Restore => "locks/restore-",
            LeaseKind::Sweep => "locks/sweep-",
        }
    }

    /// The kind of lease marker `name`, if it is one.
    pub fn of(name: &str) -> Option<LeaseKind> {
        [LeaseKind::Backup, LeaseKind::Restore, LeaseKind::Sweep]
            .into_iter()
            .find(|k| name.starts_with(k.prefix()))
    }

    /// Whether a live lease of `other` keeps a lease of this kind waiting
    /// (or, for a sweep, from starting).
    fn blocked_by(self, other: LeaseKind) -> bool {
        match self {
            LeaseKind::Sweep => true,
            LeaseKind::Backup | LeaseKind::Restore => other == LeaseKind::Sweep,
        }
    }
}

/// The body of a lease marker: who holds it, for judges, humans and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// What the lease is for.
    pub kind: LeaseKind,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder, in its PID namespace.
    pub pid: u32,
    /// When the holder took it (holder's clock, informational).
    pub started: DateTime<Utc>,
    /// The backup's tag, for backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Packs written (or being written) that no pack index names yet: if
    /// the holder dies, GC finds them here (`docs/format.md`, "Leases").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Id>,
    /// The holder's TTL in seconds (absent: [`LEASE_TTL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Where the holder runs, so that a judge can prove it gone.
    #[serde(flatten)]
    pub identity: Identity,
}

impl LeaseInfo {
    /// The TTL its holder keeps it by.
    fn ttl(&self) -> Duration {
        self.ttl_secs.map_or(LEASE_TTL, Duration::from_secs)
    }
}

/// Why a lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A store call failed. (Printed, not returned by `source()`: see
    /// the error policy in [`crate::ChunkError`].)
    #[error("lease: {0}")]
    Store(StoreError),
    /// Another party holds a conflicting live lease.
    #[error("{0}")]
    Conflict(String),
    /// Cancelled while waiting for a sweep.
    #[error("cancelled while waiting for a garbage-collection sweep")]
    Cancelled,
    /// Refreshing stopped for too long (a failing store, a paused process,
    /// a suspended machine): other parties may have seen the lease expire.
    #[error("lease {name} went {age:?} without a refresh, so others may have seen it expire")]
    Lapsed {
        /// The marker.
        name: String,
        /// The longest time between two refreshes.
        age: Duration,
    },
    /// The marker was removed from the store by another party, which
    /// therefore judged the holder dead.
    #[error("lease {name} was removed from the store by another party")]
    Taken {
        /// The marker.
        name: String,
    },
}

impl From<StoreError> for LeaseError {
    fn from(e: StoreError) -> Self {
        LeaseError::Store(e)
    }
}

/// How a lease was lost; sticky until [`Lease::renew`].
#[derive(Debug, Clone, Copy)]
enum Lost {
    Lapsed(Duration),
    Taken,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A lease held in a store; refreshed by [`with_lease`] and removed when
/// the closure returns (a crash leaves it to expire).
pub struct Lease<'s> {
    store: &'s dyn Store,
    kind: LeaseKind,
    name: String,
    info: Mutex<Pending>,
    /// Serialises marker writes, so a write never replaces a newer body.
    writing: Mutex<u64>,
    /// Packs written under the lease and since named by a pack index.
    settled: Mutex<std::collections::HashSet<Id>>,
    /// [`clock`] when the last successful write started.
    last_ok: Mutex<Duration>,
    /// Set once the lease may have lapsed or was taken; see [`Lease::check`].
    lost: Mutex<Option<Lost>>,
    /// Store time of our marker at the last check of the other leases.
    store_now: Mutex<Option<DateTime<Utc>>>,
    /// The markers that check listed, so that a caller looking for dead
    /// holders need not list `locks/` again.
    listed: Mutex<Vec<Marker>>,
    /// Given up early ([`Lease::release`]): the marker is gone and is
    /// never written again. Changed only under `writing`.
    released: AtomicBool,
    /// Taking it waited for a sweep: see [`Lease::waited`].
    waited: AtomicBool,
}

/// The lease's body and a generation counter: bumped at each change, so a
/// writer can tell whether a write already covered its change.
struct Pending {
    info: LeaseInfo,
    generation: u64,
}

impl Lease<'_> {
    /// The marker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether taking the lease waited for a sweep: what was read from the
    /// store before then may be out of date.
    pub fn waited(&self) -> bool {
        self.waited.load(Ordering::Relaxed)
    }

    /// "Now" by the store's clock, as of taking the lease: our marker's
    /// listed time.
    pub fn store_now(&self) -> Option<DateTime<Utc>> {
        *self.store_now.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The other markers under `locks/`, as listed when the lease was
    /// taken.
    pub fn others_listed(&self) -> Vec<Marker> {
        self.listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|m| m.name != self.name)
            .cloned()
            .collect()
    }

    fn lose(&self, how: Lost) {
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() {
            tracing::warn!(lease = %self.name, how = ?how, "lost the store lease");
            *lost = Some(how);
        }
    }

    fn since_last_ok(&self) -> Duration {
        clock().saturating_sub(*self.last_ok.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Fails if the lease may have lapsed in other parties' eyes, now or at
    /// any time since it was taken (or last [renewed](Lease::renew)): a
    /// refresh after a long pause does not undo what others did meanwhile.
    pub fn check(&self) -> Result<(), LeaseError> {
        let age = self.since_last_ok();
        if age >= safe_age() {
            self.lose(Lost::Lapsed(age));
        }
        match *self.lost.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(Lost::Lapsed(age)) => Err(LeaseError::Lapsed {
                name: self.name.clone(),
                age,
            }),
            Some(Lost::Taken) => Err(LeaseError::Taken {
                name: self.name.clone(),
            }),
        }
    }

    /// Take the lease again after [`Lease::check`] failed: rewrite the
    /// marker and wait, as taking it does, for any live sweep to end (one
    /// may have started while the lease was lost). Then the lease protects
    /// again from now on; what was relied on while it was lost is the
    /// caller's to check again.
    pub fn renew(&self, cancel: &Cancel) -> Result<(), LeaseError> {
        acquire(self, cancel)?;
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Give the lease up before [`with_lease`] returns: for a holder that
    /// needs the store no more but has local work left (a restore whose
    /// reads are done, while its last sync runs). The marker is deleted,
    /// as `with_lease` would delete it, and never written again. A lease
    /// that lists pending packs is kept: its marker is their only record.
    pub fn release(&self) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.pending().is_empty() || self.released.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Err(e) = with_retry(self.store, || self.store.delete_marker(&self.name)) {
            tracing::warn!(lease = %self.name, error = %e, "could not remove lease marker; it will expire");
        }
    }

    /// Write the marker with the current body; if another write since the
    /// body reached generation `at_least` already did, do nothing. Once the
    /// lease is released, nothing is written.
    fn write_from(&self, at_least: u64) -> Result<(), StoreError> {
        let mut written = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if (*written >= at_least && at_least > 0) || self.released.load(Ordering::Relaxed) {
            return Ok(());
        }
        let started = clock();
        let gap = self.since_last_ok();
        if gap >= safe_age() {
            // This write may come after the marker expired: whatever
            // others did meanwhile stands.
            self.lose(Lost::Lapsed(gap));
        }
        let (body, generation) = {
            let p = self.info.lock().unwrap_or_else(|p| p.into_inner());
            (
                serde_json::to_vec(&p.info).unwrap_or_default(),
                p.generation,
            )
        };
        with_retry(self.store, || self.store.put_marker(&self.name, &body))?;
        *written = generation;
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = started;
        Ok(())
    }

    fn write(&self) -> Result<(), StoreError> {
        self.write_from(0)
    }

    /// The periodic refresh: first make sure the marker is still there
    /// (another party that judged us dead may have removed it), then
    /// rewrite it.
    fn refresh(&self) -> Result<(), StoreError> {
        if self.released.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.note_if_taken();
        self.write()
    }

    /// Read the marker back; if another party removed it, the lease is
    /// lost ([`Lease::check`] says so).
    fn note_if_taken(&self) {
        if let Err(StoreError::NotFound(_)) =
            with_retry(self.store, || self.store.get_marker(&self.name))
        {
            self.lose(Lost::Taken);
        }
    }

    /// [`Lease::check`], after reading the marker back from the store: for
    /// the moment before an act that relies on the whole time the lease
    /// was held (a backup's head).
    pub fn confirm(&self) -> Result<(), LeaseError> {
        self.note_if_taken();
        self.check()
    }

    /// Record that pack `id` is about to be written, durably, before it is:
    /// returns once the marker lists it. Concurrent callers share writes.
    pub fn add_pending(&self, id: Id) -> Result<(), StoreError> {
        let generation = {
            let mut p = self.info.lock().unwrap_or_else(|p| p.into_inner());
            p.info.pending.push(id);
            p.generation += 1;
            p.generation
        };
        self.write_from(generation)
    }

    /// The packs written under this lease that no pack index names yet.
    pub fn pending(&self) -> Vec<Id> {
        self.info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .info
            .pending
            .clone()
    }

    /// Packs that a pack index now names; the next refresh drops them.
    pub fn settle(&self, ids: &[Id]) {
        let mut p = self.info.lock().unwrap_or_else(|p| p.into_inner());
        p.info.pending.retain(|x| !ids.contains(x));
        p.generation += 1;
        self.settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids.iter().copied());
    }

    /// Every pack this lease's holder wrote and indexed.
    pub fn written(&self) -> std::collections::HashSet<Id> {
        self.settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rewrite the marker and list every lease, returning the others that
    /// are live and keep a lease of our kind waiting. "Now" is our own
    /// marker's store time.
    fn blocking_others(&self) -> Result<Vec<Judged>, StoreError> {
        self.write()?;
        let markers = with_retry(self.store, || self.store.list_markers("locks"))?;
        let now = markers
            .iter()
            .find(|m| m.name == self.name)
            .map(|m| m.modified)
            .ok_or_else(|| StoreError::Permanent {
                what: self.name.clone(),
                detail: "the lease marker just written is not listed; the store's listing is not consistent".into(),
            })?;
        *self.store_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = markers;
        let blocking = judge(self.store, &self.others_listed(), Some(now), holder::here())
            .into_iter()
            .filter(|j| j.state == State::Live && self.kind.blocked_by(j.kind))
            .collect();
        Ok(blocking)
    }
}

/// "Now" by the store's clock: write a probe marker under `gc/`, read its
/// listed time, delete it. Three calls made once each: a caller retries
/// the whole probe (a retried put alone would list an older time).
pub fn store_now(store: &dyn Store) -> Result<DateTime<Utc>, StoreError> {
    let name = format!(
        "gc/clock-{}-{}-{}",
        btm::host::name(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    store.put_marker(&name, b"")?;
    let now = store
        .list_markers("gc")?
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.modified);
    let _ = store.delete_marker(&name);
    now.ok_or_else(|| StoreError::Permanent {
        what: name,
        detail: "a marker just written is not listed; the store's listing is not consistent".into(),
    })
}

/// Take a lease of `kind`, run `f` while a background thread refreshes
/// it, and release it.
///
/// - A `Backup` or `Restore` lease waits (up to [`MAX_WAIT`], or until
///   `cancel` is set) while a sweep is live.
/// - A `Sweep` lease fails with [`LeaseError::Conflict`] at once if any
///   other lease is live: garbage collection can wait for a quieter time.
pub fn with_lease<T, E: From<LeaseError>>(
    store: &dyn Store,
    kind: LeaseKind,
    tag: Option<&str>,
    cancel: &Cancel,
    f: impl FnOnce(&Lease<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let info = LeaseInfo {
        kind,
        host: btm::host::name(),
        pid: std::process::id(),
        started: Utc::now(),
        tag: tag.map(str::to_owned),
        pending: Vec::new(),
        ttl_secs: (ttl() != LEASE_TTL).then(|| ttl().as_secs()),
        identity: holder::here().identity.clone(),
    };
    let lease = Lease {
        store,
        kind,
        name: format!(
            "{}{}-{}-{}-{}",
            kind.prefix(),
            info.host,
            info.pid,
            Utc::now().timestamp_nanos_opt().unwrap_or_default(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ),
        info: Mutex::new(Pending {
            info,
            generation: 0,
        }),
        writing: Mutex::new(0),
        settled: Mutex::new(std::collections::HashSet::new()),
        last_ok: Mutex::new(clock()),
        lost: Mutex::new(None),
        store_now: Mutex::new(None),
        listed: Mutex::new(Vec::new()),
        released: AtomicBool::new(false),
        waited: AtomicBool::new(false),
    };
    let result = acquire(&lease, cancel)
        .map_err(E::from)
        .and_then(|()| run_refreshed(&lease, f));
    let unindexed = lease
        .info
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .info
        .pending
        .len();
    if unindexed > 0 {
        // Packs no pack index names: the marker is the only record of
        // them. Left to expire, it tells GC where they are.
        if let Err(e) = lease.write() {
            tracing::warn!(lease = %lease.name, error = %e, "could not record unindexed packs in the lease");
        }
        tracing::warn!(lease = %lease.name, packs = unindexed, "leaving the lease to expire, so that garbage collection finds the packs this run wrote but did not index");
    } else {
        lease.release();
    }
    result
}

fn acquire(lease: &Lease<'_>, cancel: &Cancel) -> Result<(), LeaseError> {
    let started = std::time::Instant::now();
    let mut announced = false;
    loop {
        let blocking = lease.blocking_others()?;
        let Some(first) = blocking.first() else {
            return Ok(());
        };
        let who = describe(first);
        if lease.kind == LeaseKind::Sweep {
            return Err(LeaseError::Conflict(format!(
                "{} other lease(s) live, e.g. {who}",
                blocking.len()
            )));
        }
        if started.elapsed() >= MAX_WAIT {
            return Err(LeaseError::Conflict(format!(
                "a garbage-collection sweep has held the store for {:?}: {who}",
                started.elapsed()
            )));
        }
        if !announced {
            tracing::info!(sweep = %who, "waiting for a garbage-collection sweep to finish");
            announced = true;
            lease.waited.store(true, Ordering::Relaxed);
        }
        if cancel.sleep(Duration::from_secs(2)) {
            return Err(LeaseError::Cancelled);
        }
    }
}

fn run_refreshed<T, E>(
    lease: &Lease<'_>,
    f: impl FnOnce(&Lease<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let stop = (Mutex::new(false), Condvar::new());
    let failing = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let (lock, cv) = &stop;
            let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                // Checked before each wait: a stop signalled before this
                // thread first took the lock must not be missed.
                if *stopped {
                    return;
                }
                let wait = if failing.load(Ordering::Relaxed) {
                    refresh_every() / 6
                } else {
                    refresh_every()
                };
                let (guard, _) = cv
                    .wait_timeout(stopped, wait)
                    .unwrap_or_else(|p| p.into_inner());
                stopped = guard;
                if *stopped {
                    return;
                }
                match lease.refresh() {
                    Ok(()) => failing.store(false, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(lease = %lease.name, error = %e, "could not refresh lease");
                        failing.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
        // Stops the refresher however `f` ends, a panic included: the
        // scope would otherwise wait for it forever.
        struct StopOnDrop<'a>(&'a (Mutex<bool>, Condvar));
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                let (lock, cv) = self.0;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
            }
        }
        let _stop = StopOnDrop(&stop);
        f(lease)
    })
}

#[cfg(test)]
mod tests;
