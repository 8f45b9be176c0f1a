//! Judging the other leases in a store: live, expired, or held by a
//! process proven gone ([`super::holder`]). What a lease waits for, what a
//! sweep defers to, and whose pending packs a backup may adopt.

use chrono::{DateTime, Utc};

use super::holder::{self, Here, Holder};
use super::{ttl, LeaseInfo, LeaseKind};
use crate::store::{Marker, Store};
use crate::with_retry;

/// Whether a lease marker still protects what its holder relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Unexpired, and its holder not proven gone.
    Live,
    /// Older than its holder's TTL by the store's clock.
    Expired,
    /// Unexpired, but its holder is proven gone; why.
    Gone(&'static str),
}

/// A lease marker, judged.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The marker as listed.
    pub marker: Marker,
    /// Its kind.
    pub kind: LeaseKind,
    /// Its state.
    pub state: State,
    /// Its body, when it was read (every lease that is not live has it
    /// read, if it still can be).
    pub info: Option<LeaseInfo>,
}

/// Judge the leases among `markers` (a listing of `locks/`) at store time
/// `now` (without it, only proof can make a lease dead), from `here`.
///
/// A marker is expired once it is older than both this process's TTL
/// ([`ttl`]) and the TTL its holder recorded; it is gone when its holder
/// is proven gone ([`holder::judge`]). Bodies are read only where needed:
/// for markers past this process's TTL, and for those of this host name
/// (the only ones whose holder can be proven gone from here).
pub fn judge(
    store: &dyn Store,
    markers: &[Marker],
    now: Option<DateTime<Utc>>,
    here: &Here,
) -> Vec<Judged> {
    let host = btm::host::name();
    markers
        .iter()
        .filter_map(|m| {
            let kind = LeaseKind::of(&m.name)?;
            let age = now.map(|now| (now - m.modified).to_std().unwrap_or_default());
            let mut info = None;
            if let Some(age) = age.filter(|&a| a >= ttl()) {
                info = body(store, m);
                if info.as_ref().is_none_or(|i| age >= i.ttl()) {
                    return Some(Judged {
                        marker: m.clone(),
                        kind,
                        state: State::Expired,
                        info,
                    });
                }
            }
            let maybe_here = holder_of(&m.name).is_none_or(|(h, _)| h == host);
            if maybe_here {
                if info.is_none() {
                    info = body(store, m);
                }
                if let Some(i) = &info {
                    if let Holder::Gone(why) =
                        holder::judge(i.pid, &i.identity, here, holder::probe)
                    {
                        return Some(Judged {
                            marker: m.clone(),
                            kind,
                            state: State::Gone(why),
                            info,
                        });
                    }
                }
            }
            Some(Judged {
                marker: m.clone(),
                kind,
                state: State::Live,
                info,
            })
        })
        .collect()
}

/// Backup and sweep leases among `markers` whose holders are dead (expired
/// at store time `now`, or proven gone) and left packs pending, with their
/// bodies.
pub fn dead_holders(
    store: &dyn Store,
    markers: &[Marker],
    now: Option<DateTime<Utc>>,
) -> Vec<(String, LeaseInfo)> {
    judge(store, markers, now, holder::here())
        .into_iter()
        .filter(|j| j.state != State::Live)
        .filter_map(|j| {
            let info = j.info?;
            (!info.pending.is_empty()).then_some((j.marker.name, info))
        })
        .collect()
}

/// The host and pid in a lease marker's name,
/// `locks/<kind>-<host>-<pid>-<ns>-<seq>` (a host name may hold `-`).
pub(super) fn holder_of(name: &str) -> Option<(&str, u32)> {
    let kind = LeaseKind::of(name)?;
    let rest = &name[kind.prefix().len()..];
    let mut parts = rest.rsplitn(4, '-');
    let (_seq, _ns) = (parts.next()?, parts.next()?);
    let pid = parts.next()?.parse().ok()?;
    Some((parts.next()?, pid))
}

/// A lease marker's body, if it can be read.
fn body(store: &dyn Store, m: &Marker) -> Option<LeaseInfo> {
    serde_json::from_slice(&with_retry(store, || store.get_marker(&m.name)).ok()?).ok()
}

pub(super) fn describe(j: &Judged) -> String {
    match &j.info {
        Some(i) => format!("{} on {} (pid {})", j.marker.name, i.host, i.pid),
        None => j.marker.name.clone(),
    }
}
