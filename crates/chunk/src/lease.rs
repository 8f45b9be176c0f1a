//! Leases: how backups and the garbage collector's sweep keep out of each
//! other's way in a store shared by many nodes.
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
//! A lease is live while its marker was written less than [`LEASE_TTL`] ago
//! *by the store's clock*: the holder's own marker's listed time is "now",
//! so clocks of different machines never need to agree. Holders refresh
//! their marker every [`REFRESH`]; a holder whose refreshes failed for
//! longer than [`SAFE_AGE`] must not act on the lease any more (a backup
//! then fails without writing its index). A crashed holder's marker simply
//! expires. See `docs/format.md`, "Garbage collection".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{Id, Marker, Store, StoreError};

/// A marker older than this (store time) belongs to a dead holder.
pub const LEASE_TTL: Duration = Duration::from_secs(600);
/// How often a holder rewrites its marker.
pub const REFRESH: Duration = Duration::from_secs(60);
/// A holder may act on its lease only while its last successful refresh is
/// younger than this: half the TTL, so clock-rate differences and a slow
/// final request cannot let the lease lapse in another party's eyes first.
pub const SAFE_AGE: Duration = Duration::from_secs(300);
/// How long a backup waits for a live sweep before giving up.
pub const MAX_WAIT: Duration = Duration::from_secs(1200);

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

/// The body of a lease marker: who holds it, for humans and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// What the lease is for.
    pub kind: LeaseKind,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
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
    /// Refreshing failed for too long; the lease can no longer be trusted.
    #[error("lease {name} could not be refreshed for {age:?}; giving up")]
    Lapsed {
        /// The marker.
        name: String,
        /// Time since the last successful refresh.
        age: Duration,
    },
}

impl From<StoreError> for LeaseError {
    fn from(e: StoreError) -> Self {
        LeaseError::Store(e)
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A lease held in a store; refreshed by [`with_lease`] and removed when
/// the closure returns (a crash leaves it to expire).
pub struct Lease<'s> {
    store: &'s dyn Store,
    name: String,
    info: Mutex<Pending>,
    /// Serialises marker writes, so a write never replaces a newer body.
    writing: Mutex<u64>,
    /// Packs written under the lease and since named by a pack index.
    settled: Mutex<std::collections::HashSet<Id>>,
    last_ok: Mutex<Instant>,
    /// Store time of our marker at the last check of the other leases.
    store_now: Mutex<Option<DateTime<Utc>>>,
    /// The markers that check listed, so that a caller looking for dead
    /// holders need not list `locks/` again.
    listed: Mutex<Vec<Marker>>,
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

    /// "Now" by the store's clock, as of taking the lease: our marker's
    /// listed time.
    pub fn store_now(&self) -> Option<DateTime<Utc>> {
        *self.store_now.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every marker under `locks/` as listed when the lease was taken (its
    /// own included).
    pub fn listed(&self) -> Vec<Marker> {
        self.listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fails if the lease may have lapsed in other parties' eyes.
    pub fn check(&self) -> Result<(), LeaseError> {
        let age = self
            .last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if age >= SAFE_AGE {
            return Err(LeaseError::Lapsed {
                name: self.name.clone(),
                age,
            });
        }
        Ok(())
    }

    /// Write the marker with the current body; if another write since the
    /// body reached generation `at_least` already did, do nothing.
    fn write_from(&self, at_least: u64) -> Result<(), StoreError> {
        let mut written = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if *written >= at_least && at_least > 0 {
            return Ok(());
        }
        let (body, generation) = {
            let p = self.info.lock().unwrap_or_else(|p| p.into_inner());
            (
                serde_json::to_vec(&p.info).unwrap_or_default(),
                p.generation,
            )
        };
        let started = Instant::now();
        self.store.put_marker(&self.name, &body)?;
        *written = generation;
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = started;
        Ok(())
    }

    fn write(&self) -> Result<(), StoreError> {
        self.write_from(0)
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

    /// Rewrite the marker and list every lease, returning the live ones
    /// other than ours. "Now" is our own marker's store time.
    fn live_others(&self) -> Result<Vec<(LeaseKind, Marker)>, StoreError> {
        self.write()?;
        let markers = self.store.list_markers("locks")?;
        let now = markers
            .iter()
            .find(|m| m.name == self.name)
            .map(|m| m.modified)
            .ok_or_else(|| StoreError::Permanent {
                what: self.name.clone(),
                detail: "the lease marker just written is not listed; the store's listing is not consistent".into(),
            })?;
        *self.store_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        let others = live(&markers, now)
            .filter(|(_, m)| m.name != self.name)
            .collect();
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = markers;
        Ok(others)
    }
}

/// Markers in `markers` that are live leases at store time `now`.
pub fn live(
    markers: &[Marker],
    now: DateTime<Utc>,
) -> impl Iterator<Item = (LeaseKind, Marker)> + '_ {
    markers.iter().filter_map(move |m| {
        let kind = LeaseKind::of(&m.name)?;
        let age = (now - m.modified).to_std().unwrap_or_default();
        (age < LEASE_TTL).then(|| (kind, m.clone()))
    })
}

/// Backup leases among `markers` (a listing of `locks/`) whose holders
/// are dead, with their bodies: expired by the store's clock (`now`;
/// without it, only the next rule applies), or taken on `host` by a
/// process that no longer exists. Only the dead holders' bodies are read.
pub fn dead_holders(
    store: &dyn Store,
    markers: &[Marker],
    now: Option<DateTime<Utc>>,
    host: &str,
) -> Vec<(String, LeaseInfo)> {
    let live: Vec<String> = match now {
        Some(now) => live(markers, now).map(|(_, m)| m.name).collect(),
        None => markers.iter().map(|m| m.name.clone()).collect(),
    };
    markers
        .iter()
        .filter(|m| LeaseKind::of(&m.name).is_some())
        .filter(|m| !live.contains(&m.name) || gone_here(store, m, host))
        .filter_map(|m| {
            let info = body(store, m)?;
            (!info.pending.is_empty()).then(|| (m.name.clone(), info))
        })
        .collect()
}

/// The host and pid in a lease marker's name,
/// `locks/<kind>-<host>-<pid>-<ns>-<seq>` (a host name may hold `-`).
fn holder(name: &str) -> Option<(&str, u32)> {
    let kind = LeaseKind::of(name)?;
    let rest = &name[kind.prefix().len()..];
    let mut parts = rest.rsplitn(4, '-');
    let (_seq, _ns) = (parts.next()?, parts.next()?);
    let pid = parts.next()?.parse().ok()?;
    Some((parts.next()?, pid))
}

/// Whether process `pid` of this host is gone (and is not us).
fn pid_gone(pid: u32) -> bool {
    pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A lease marker's body, if it can be read.
fn body(store: &dyn Store, m: &Marker) -> Option<LeaseInfo> {
    serde_json::from_slice(&store.get_marker(&m.name).ok()?).ok()
}

/// Whether lease `m` was taken on `host` by a process that is gone: told
/// by its name, or by its body for a name btm did not write.
fn gone_here(store: &dyn Store, m: &Marker, host: &str) -> bool {
    match holder(&m.name) {
        Some((h, pid)) => h == host && pid_gone(pid),
        None => body(store, m).is_some_and(|i| i.host == host && pid_gone(i.pid)),
    }
}

/// "Now" by the store's clock: write a probe marker under `gc/`, read its
/// listed time, delete it.
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

fn describe(store: &dyn Store, m: &Marker) -> String {
    match body(store, m) {
        Some(i) => format!("{} on {} (pid {})", m.name, i.host, i.pid),
        None => m.name.clone(),
    }
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
    cancel: &AtomicBool,
    f: impl FnOnce(&Lease<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let info = LeaseInfo {
        kind,
        host: btm::host::name(),
        pid: std::process::id(),
        started: Utc::now(),
        tag: tag.map(str::to_owned),
        pending: Vec::new(),
    };
    let lease = Lease {
        store,
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
        last_ok: Mutex::new(Instant::now()),
        store_now: Mutex::new(None),
        listed: Mutex::new(Vec::new()),
    };
    let result = acquire(&lease, kind, cancel)
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
    } else if let Err(e) = store.delete_marker(&lease.name) {
        tracing::warn!(lease = %lease.name, error = %e, "could not remove lease marker; it will expire");
    }
    result
}

fn acquire(lease: &Lease<'_>, kind: LeaseKind, cancel: &AtomicBool) -> Result<(), LeaseError> {
    let started = Instant::now();
    let mut announced = false;
    loop {
        let others = lease.live_others()?;
        let blocking: Vec<&Marker> = others
            .iter()
            .filter(|(k, _)| kind.blocked_by(*k))
            .map(|(_, m)| m)
            .collect();
        // A holder on this host whose process is gone is dead, whatever
        // its marker's age says.
        let host = btm::host::name();
        let blocking: Vec<&Marker> = blocking
            .into_iter()
            .filter(|m| !gone_here(lease.store, m, &host))
            .collect();
        let Some(first) = blocking.first() else {
            return Ok(());
        };
        let who = describe(lease.store, first);
        if kind == LeaseKind::Sweep {
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
        }
        for _ in 0..20 {
            if cancel.load(Ordering::Relaxed) {
                return Err(LeaseError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(100));
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
                    REFRESH / 6
                } else {
                    REFRESH
                };
                let (guard, _) = cv
                    .wait_timeout(stopped, wait)
                    .unwrap_or_else(|p| p.into_inner());
                stopped = guard;
                if *stopped {
                    return;
                }
                match lease.write() {
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
mod tests {
    use super::*;

    fn marker(name: &str, secs_ago: i64, now: DateTime<Utc>) -> Marker {
        Marker {
            name: name.into(),
            modified: now - chrono::Duration::seconds(secs_ago),
        }
    }

    #[test]
    fn liveness_is_judged_on_the_store_clock() {
        let now = Utc::now();
        let markers = [
            marker("locks/backup-a", 10, now),
            marker("locks/backup-b", 601, now),
            marker("locks/sweep-c", 599, now),
            marker("locks/other", 0, now),
        ];
        let names: Vec<String> = live(&markers, now).map(|(_, m)| m.name).collect();
        assert_eq!(names, ["locks/backup-a", "locks/sweep-c"]);
        // A marker "from the future" (store clocks differ per object on
        // some services) counts as live, never as expired.
        let future = [marker("locks/backup-f", -30, now)];
        assert_eq!(live(&future, now).count(), 1);
    }

    #[test]
    fn a_markers_name_gives_its_holder() {
        assert_eq!(
            holder("locks/backup-my-host-123-1795979739333253790-0"),
            Some(("my-host", 123))
        );
        assert_eq!(holder("locks/sweep-h-7-1-2"), Some(("h", 7)));
        assert_eq!(holder("locks/backup-h-notapid-1-2"), None);
        assert_eq!(holder("locks/backup-1-2"), None);
        assert_eq!(holder("gc/clock-h-1-2"), None);
    }

    #[test]
    fn dead_holders_reads_only_the_bodies_of_dead_ones() {
        let store = crate::store::MemStore::new();
        let now = Utc::now();
        let (me, gone) = (std::process::id(), u32::MAX - 1);
        let pending = vec![Id::of(b"pack")];
        let body = |host: &str, pid: u32| {
            serde_json::to_vec(&LeaseInfo {
                kind: LeaseKind::Backup,
                host: host.into(),
                pid,
                started: now,
                tag: None,
                pending: pending.clone(),
            })
            .expect("a lease body encodes")
        };
        let expired = "locks/backup-far-1-1-0".to_string();
        let mine = format!("locks/backup-here-{me}-1-0");
        let dead_here = format!("locks/backup-here-{gone}-1-0");
        // Live, of another host by its name; its body (which would say
        // "a dead process of this host") is not read.
        let other = "locks/backup-far-2-1-0".to_string();
        for (name, b) in [
            (&expired, body("far", 1)),
            (&mine, body("here", me)),
            (&dead_here, body("here", gone)),
            (&other, body("here", gone)),
        ] {
            store.put_marker(name, &b).expect("put");
        }
        let markers = [
            marker(&expired, 601, now),
            marker(&mine, 1, now),
            marker(&dead_here, 1, now),
            marker(&other, 1, now),
        ];
        let mut dead: Vec<String> = dead_holders(&store, &markers, Some(now), "here")
            .into_iter()
            .map(|(n, info)| {
                assert_eq!(info.pending, pending);
                n
            })
            .collect();
        dead.sort();
        let mut want = vec![dead_here, expired];
        want.sort();
        assert_eq!(dead, want);
    }
}
