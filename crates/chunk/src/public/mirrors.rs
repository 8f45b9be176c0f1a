//! One published store read from several places at once (`-s URL`,
//! `--mirror URL`, and the mirrors its catalog lists): a [`Store`] that
//! spreads reads over the places in proportion to the speed each
//! delivers, and sets aside a place that fails, stalls, lacks what the
//! others serve, or serves bytes that fail their hash (`docs/format.md`,
//! "Several mirrors").
//!
//! Trust does not change: each place is read through its own checked
//! catalog ([`CatalogStore`]), and must be signed by the same key as the
//! others and share backups with them; every byte below a head is bound
//! to it by hash, and the caller checks ranges it reads with
//! [`Store::get_range_checked`], which here reads a range that fails from
//! another place. Which place goes next is [`order`], a pure rule.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

use super::{Access, CatalogStore};
use crate::store::{Bytes, Id, Kind, Location, Marker, Open, Store, StoreError};

/// Opens the store at a place (before its catalog is read).
pub type Opener<'a> = dyn Fn(&Location) -> Result<Arc<dyn Store>, StoreError> + 'a;

/// Consecutive temporary failures that set a place aside.
pub const STRIKES: u32 = 3;

/// What [`order`] knows of a place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Set aside: never chosen.
    pub aside: bool,
    /// Requests in flight to it now.
    pub in_flight: u32,
    /// Bytes per second its reads delivered, on average; `None` before
    /// its first.
    pub rate: Option<f64>,
}

/// The places not set aside, best first: the one expected to answer a
/// new read first, which is the one with the fewest requests in flight
/// per byte per second it delivers (so reads spread in proportion to
/// speed). A place not measured yet counts as fast as the fastest, and
/// goes first among equals, so it gets measured; other ties go to the
/// fewer in flight, then to the earlier place.
pub fn order(places: &[Load]) -> Vec<usize> {
    let fastest = places
        .iter()
        .filter(|p| !p.aside)
        .filter_map(|p| p.rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let cost = |p: &Load| {
        let rate = p.rate.or(fastest).unwrap_or(1.0).max(1e-9);
        f64::from(p.in_flight + 1) / rate
    };
    let mut healthy: Vec<usize> = (0..places.len()).filter(|&i| !places[i].aside).collect();
    healthy.sort_by(|&a, &b| {
        cost(&places[a])
            .total_cmp(&cost(&places[b]))
            .then(places[a].rate.is_some().cmp(&places[b].rate.is_some()))
            .then(places[a].in_flight.cmp(&places[b].in_flight))
            .then(a.cmp(&b))
    });
    healthy
}

/// What one place did in a run, for the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlaceReport {
    /// Its URL.
    pub url: String,
    /// Reads it answered.
    pub requests: u64,
    /// Bytes it delivered.
    pub bytes: u64,
    /// Why it was set aside, if it was.
    pub set_aside: Option<String>,
}

#[derive(Default)]
struct Health {
    aside: Option<String>,
    in_flight: u32,
    rate: Option<f64>,
    strikes: u32,
    requests: u64,
    bytes: u64,
}

struct Place {
    url: String,
    /// `None`: it could not be opened (and is set aside).
    store: Option<Arc<CatalogStore>>,
    health: Mutex<Health>,
}

impl Place {
    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A published store read from several places (see the module).
pub struct Mirrors {
    places: Vec<Place>,
    /// The place whose catalog is the newest: listings come from it first.
    reference: usize,
}

impl std::fmt::Debug for Mirrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirrors")
            .field(
                "places",
                &self.places.iter().map(|p| &p.url).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a place's catalog says it is not the same store as the reference's,
/// if it does: signed by another key, or sharing no backup with it.
fn other_store(
    reference: &CatalogStore,
    place: &CatalogStore,
) -> Result<Option<String>, StoreError> {
    let (signer, theirs) = (reference.signer(), place.signer());
    if signer != theirs {
        return Ok(Some(format!(
            "its catalog is signed by {theirs}, not {signer}: another store"
        )));
    }
    let (a, b) = (reference.catalog()?, place.catalog()?);
    let shared = a
        .heads
        .iter()
        .any(|h| b.head(&h.name).is_some_and(|o| o.blake3 == h.blake3));
    let both_empty = a.heads.is_empty() && b.heads.is_empty();
    if !(shared || both_empty) {
        return Ok(Some(
            "its catalog names other backups: another store".into(),
        ));
    }
    Ok(None)
}

/// Open `location` as a place, unless it is one already; the error that
/// set it aside at once, if any.
fn add_place(
    places: &mut Vec<Place>,
    location: &Location,
    access: &Access,
    open: &Opener<'_>,
) -> Option<StoreError> {
    let url = location.to_string();
    if places.iter().any(|p| p.url == url) {
        return None;
    }
    let opened = open(location)
        .and_then(|inner| CatalogStore::open(inner, access))
        .map_err(|e| super::explain_first_read(e, access));
    let (store, aside, error) = match opened {
        Ok(s) => (Some(Arc::new(s)), None, None),
        Err(e) => (None, Some(e.to_string()), Some(e)),
    };
    let health = Mutex::new(Health {
        aside,
        ..Health::default()
    });
    places.push(Place { url, store, health });
    error
}

impl Mirrors {
    /// Open every place in `locations` (the first is `-s`), and, with
    /// `listed`, the mirrors the newest catalog lists too. A place that
    /// cannot be opened, or is another store, is set aside with the
    /// reason; an error only if none can be opened (the first place's).
    pub fn open(locations: &[Location], access: &Access, listed: bool) -> Result<Self, StoreError> {
        let how = Open::Read {
            anonymous: access.anonymous,
        };
        Self::open_with(locations, access, listed, &|l| crate::store::open(l, how))
    }

    /// [`Mirrors::open`], each place's store opened by `open`.
    pub fn open_with(
        locations: &[Location],
        access: &Access,
        listed: bool,
        open: &Opener<'_>,
    ) -> Result<Self, StoreError> {
        let mut places: Vec<Place> = Vec::new();
        let mut first_error = None;
        for l in locations {
            if let Some(e) = add_place(&mut places, l, access, open) {
                first_error.get_or_insert(e);
            }
        }
        let mut mirrors = Mirrors {
            places,
            reference: 0,
        };
        // The first place that opened (`-s` unless it failed) says which
        // store this is: the others must be signed by the same key.
        mirrors.reference = (0..mirrors.places.len())
            .find(|&i| mirrors.store(i).is_some())
            .ok_or_else(|| {
                first_error
                    .take()
                    .unwrap_or_else(|| StoreError::InvalidUrl {
                        url: String::new(),
                        detail: "no store given".into(),
                    })
            })?;
        if listed {
            let reference = mirrors.store(mirrors.reference).map(|s| s.catalog());
            if let Some(Ok(catalog)) = reference {
                for url in &catalog.mirrors {
                    match url.parse::<Location>() {
                        Ok(l) => {
                            add_place(&mut mirrors.places, &l, access, open);
                        }
                        Err(e) => {
                            tracing::warn!(mirror = %url, error = %e, "the catalog lists a mirror that is not a store URL; ignored")
                        }
                    }
                }
            }
        }
        mirrors.set_aside_other_stores()?;
        // Listings come from the newest catalog of the same store.
        mirrors.reference = mirrors.newest().unwrap_or(mirrors.reference);
        Ok(mirrors)
    }

    fn store(&self, i: usize) -> Option<&Arc<CatalogStore>> {
        self.places[i].store.as_ref()
    }

    /// The open place with the newest catalog.
    fn newest(&self) -> Option<usize> {
        (0..self.places.len())
            .filter_map(|i| {
                if self.places[i].health().aside.is_some() {
                    return None;
                }
                let published = self.store(i)?.catalog().ok()?.published;
                Some((published, std::cmp::Reverse(i)))
            })
            .max()
            .map(|(_, std::cmp::Reverse(i))| i)
    }

    fn set_aside_other_stores(&self) -> Result<(), StoreError> {
        let Some(reference) = self.store(self.reference) else {
            return Ok(());
        };
        for (i, place) in self.places.iter().enumerate() {
            let Some(store) = place.store.as_ref().filter(|_| i != self.reference) else {
                continue;
            };
            if let Some(why) = other_store(reference, store)? {
                place.health().aside = Some(why);
            }
        }
        Ok(())
    }

    /// What each place did so far, in the order given.
    pub fn report(&self) -> Vec<PlaceReport> {
        self.places
            .iter()
            .map(|p| {
                let h = p.health();
                PlaceReport {
                    url: p.url.clone(),
                    requests: h.requests,
                    bytes: h.bytes,
                    set_aside: h.aside.clone(),
                }
            })
            .collect()
    }

    fn healthy(&self) -> usize {
        self.places
            .iter()
            .filter(|p| p.health().aside.is_none())
            .count()
    }

    /// The next place to try, not among `tried`, and whether it is the
    /// reference.
    fn next(&self, tried: &[usize], reference_first: bool) -> Option<usize> {
        if reference_first
            && tried.is_empty()
            && self.places[self.reference].health().aside.is_none()
        {
            return Some(self.reference);
        }
        let loads: Vec<Load> = self
            .places
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let h = p.health();
                Load {
                    aside: h.aside.is_some() || tried.contains(&i),
                    in_flight: h.in_flight,
                    rate: h.rate,
                }
            })
            .collect();
        order(&loads).first().copied()
    }

    /// Set place `i` aside for `why`, unless it is the last one left.
    fn set_aside(&self, i: usize, why: String) {
        if self.healthy() <= 1 {
            return;
        }
        let url = &self.places[i].url;
        let mut h = self.places[i].health();
        if h.aside.is_none() {
            tracing::warn!(mirror = %url, reason = %why, "mirror set aside for the rest of this run");
            h.aside = Some(why);
        }
    }

    /// A failed call to place `i`: set aside at once for what cannot
    /// pass, after [`STRIKES`] in a row for what may.
    fn failed(&self, i: usize, e: &StoreError) {
        let strikes = {
            let mut h = self.places[i].health();
            h.strikes += 1;
            h.strikes
        };
        match e {
            StoreError::Temporary { .. } if strikes < STRIKES => {}
            StoreError::Temporary { .. } => {
                self.set_aside(i, format!("{strikes} failures in a row, the last: {e}"))
            }
            StoreError::NotFound(_) => {}
            e => self.set_aside(i, e.to_string()),
        }
    }

    /// Call `f` on the best place, then on the next after each failure,
    /// until one answers: the bytes it delivered count towards its speed.
    /// A place that lacks what another serves is set aside. `NotFound` if
    /// every place lacks it; else the last error.
    fn each<T>(
        &self,
        reference_first: bool,
        mut f: impl FnMut(&CatalogStore) -> Result<(T, u64), StoreError>,
    ) -> Result<T, StoreError> {
        let mut tried = Vec::new();
        let mut lacking = Vec::new();
        let mut last: Option<StoreError> = None;
        while let Some(i) = self.next(&tried, reference_first) {
            tried.push(i);
            let Some(store) = self.store(i) else { continue };
            self.places[i].health().in_flight += 1;
            let start = Instant::now();
            let r = f(store);
            let secs = start.elapsed().as_secs_f64().max(1e-6);
            {
                let mut h = self.places[i].health();
                h.in_flight -= 1;
                if let Ok((_, bytes)) = &r {
                    h.strikes = 0;
                    h.requests += 1;
                    h.bytes += bytes;
                    // Only reads of data measure speed: a listing or a
                    // head says nothing of it (and would read as 0 B/s).
                    if *bytes > 0 {
                        let rate = *bytes as f64 / secs;
                        h.rate = Some(h.rate.map_or(rate, |r| 0.8 * r + 0.2 * rate));
                    }
                }
            }
            match r {
                Ok((v, _)) => {
                    for j in lacking {
                        self.set_aside(j, format!("it lacks what {} serves", self.places[i].url));
                    }
                    return Ok(v);
                }
                Err(e) => {
                    if matches!(e, StoreError::NotFound(_)) {
                        lacking.push(i);
                    }
                    self.failed(i, &e);
                    // Prefer a failure that says more than "not found".
                    if !matches!((&last, &e), (Some(_), StoreError::NotFound(_))) {
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Unreachable {
            what: "reading".into(),
            detail: format!("every mirror is set aside: {}", self.aside_summary()),
        }))
    }

    fn aside_summary(&self) -> String {
        self.report()
            .into_iter()
            .filter_map(|p| Some(format!("{} ({})", p.url, p.set_aside?)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn read_only<T>(&self, what: String) -> Result<T, StoreError> {
        Err(StoreError::ReadOnly {
            store: self.describe(),
            what,
        })
    }
}

impl Store for Mirrors {
    /// The first place's URL: the store as the operator named it (the
    /// metadata cache is kept under it).
    fn describe(&self) -> String {
        self.places[0].url.clone()
    }

    fn put(&self, kind: Kind, id: &Id, _data: Bytes) -> Result<(), StoreError> {
        self.read_only(format!("writing {}", kind.describe(id)))
    }

    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.each(false, |s| {
            s.get(kind, id).map(|b| {
                let n = b.len() as u64;
                (b, n)
            })
        })
    }

    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.each(false, |s| {
            s.get_range_into(kind, id, offset, len, buf)
                .map(|()| ((), len))
        })
    }

    /// Bytes that fail `check` set their place aside, and are read again
    /// from the next.
    fn get_range_checked(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        check: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        self.each(false, |s| {
            s.get_range_into(kind, id, offset, len, buf)?;
            let mut blamed = |data: &[u8]| {
                check(data)
                    .map_err(|d| format!("{d}: it served bytes that do not match their hash"))
            };
            crate::store::checked(kind, id, &s.describe(), buf, &mut blamed)?;
            Ok(((), len))
        })
    }

    fn sources(&self) -> usize {
        self.healthy()
    }

    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        self.each(false, |s| s.size(kind, id).map(|n| (n, 0)))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        self.each(true, |s| s.list(kind).map(|l| (l, 0)))
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.read_only(format!("deleting {}", kind.describe(id)))
    }

    fn create_index(&self, name: &str, _data: &[u8]) -> Result<bool, StoreError> {
        self.read_only(format!("writing backup {name}"))
    }

    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.each(true, |s| s.get_index(name).map(|d| (d, 0)))
    }

    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.each(true, |s| s.list_indexes().map(|l| (l, 0)))
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.read_only(format!("deleting backup {name}"))
    }

    fn put_marker(&self, name: &str, _data: &[u8]) -> Result<(), StoreError> {
        self.read_only(format!("writing {name}"))
    }

    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.each(true, |s| s.get_marker(name).map(|d| (d, 0)))
    }

    fn replace_marker_if(
        &self,
        name: &str,
        _expected: Option<&[u8]>,
        _data: &[u8],
    ) -> Result<bool, StoreError> {
        self.read_only(format!("writing {name}"))
    }

    /// Nothing, as for any published store read by a stranger.
    fn list_markers(&self, _dir: &str) -> Result<Vec<Marker>, StoreError> {
        Ok(Vec::new())
    }

    fn delete_marker(&self, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn retry_policy(&self) -> crate::store::RetryPolicy {
        self.store(self.reference)
            .map_or(*crate::store::RetryPolicy::standard(), |s| s.retry_policy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::BackupOptions;
    use crate::public::SigningKey;
    use crate::restore::RestoreOptions;
    use crate::store::{Layer, MemStore};
    use crate::{Policy, Repo};
    use proptest::prelude::*;

    proptest! {
        /// Only places not set aside are chosen, each once, and the first
        /// is one of the cheapest.
        #[test]
        fn order_offers_every_healthy_place_cheapest_first(
            loads in prop::collection::vec((any::<bool>(), 0u32..20, prop::option::of(1.0f64..1e9)), 0..8),
        ) {
            let loads: Vec<Load> = loads.into_iter().map(|(aside, in_flight, rate)| Load { aside, in_flight, rate }).collect();
            let got = order(&loads);
            let mut healthy: Vec<usize> = (0..loads.len()).filter(|&i| !loads[i].aside).collect();
            let mut sorted = got.clone();
            sorted.sort_unstable();
            healthy.sort_unstable();
            prop_assert_eq!(sorted, healthy);
            if let Some(&first) = got.first() {
                let fastest = loads.iter().filter(|l| !l.aside).filter_map(|l| l.rate).fold(0.0f64, f64::max);
                let cost = |l: &Load| f64::from(l.in_flight + 1) / l.rate.unwrap_or(if fastest > 0.0 { fastest } else { 1.0 });
                prop_assert!(got.iter().all(|&i| cost(&loads[first]) <= cost(&loads[i])));
            }
        }

        /// Requests handed out one after another, none finishing, load
        /// the places in proportion to their speeds (within one request).
        #[test]
        fn reads_spread_in_proportion_to_speed(a in 1u32..10, b in 1u32..10, n in 20u32..200) {
            let mut loads = [
                Load { aside: false, in_flight: 0, rate: Some(f64::from(a)) },
                Load { aside: false, in_flight: 0, rate: Some(f64::from(b)) },
            ];
            for _ in 0..n {
                let i = order(&loads)[0];
                loads[i].in_flight += 1;
            }
            let share = f64::from(loads[0].in_flight) / f64::from(n);
            let want = f64::from(a) / f64::from(a + b);
            prop_assert!((share - want).abs() <= 1.0 / f64::from(n) + 1e-9, "{share} vs {want}");
        }
    }

    /// A place that serves packs with every byte flipped.
    struct Flipping(MemStore);

    impl Layer for Flipping {
        fn inner(&self) -> &dyn Store {
            &self.0
        }
        fn get_range_into(
            &self,
            kind: Kind,
            id: &Id,
            offset: u64,
            len: u64,
            buf: &mut Vec<u8>,
        ) -> Result<(), StoreError> {
            self.0.get_range_into(kind, id, offset, len, buf)?;
            if kind == Kind::Pack {
                buf.iter_mut().for_each(|b| *b ^= 0xff);
            }
            Ok(())
        }
    }

    /// A place that serves its catalog, then never answers a pack read.
    struct Stalled(MemStore);

    impl Layer for Stalled {
        fn inner(&self) -> &dyn Store {
            &self.0
        }
        fn get_range_into(
            &self,
            kind: Kind,
            id: &Id,
            offset: u64,
            len: u64,
            buf: &mut Vec<u8>,
        ) -> Result<(), StoreError> {
            if kind == Kind::Pack {
                return Err(StoreError::Unreachable {
                    what: "reading".into(),
                    detail: "no answer for 60s".into(),
                });
            }
            self.0.get_range_into(kind, id, offset, len, buf)
        }
    }

    fn url(name: &str) -> Location {
        format!("https://{name}.example/snap").parse().expect("url")
    }

    /// A published store of a small tree of several packs.
    fn published(key: &SigningKey, src: &std::path::Path) -> MemStore {
        std::fs::create_dir_all(src).expect("mkdir");
        for i in 0..12u8 {
            // Incompressible: every chunk its own frame, several packs.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(i);
            let data: Vec<u8> = (0..300_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(src.join(format!("f{i}")), data).expect("write");
        }
        let store = MemStore::new();
        let repo = Repo::new(Arc::new(store.clone()));
        let mut opts = BackupOptions::new("t", Policy::NONE);
        opts.chunk_size = 64 << 10;
        opts.pack_size = 256 << 10;
        repo.backup(src, &opts).expect("backup");
        crate::public::publish(&store, key, chrono::Utc::now(), None, None).expect("publish");
        store
    }

    #[test]
    fn a_restore_sets_aside_the_damaged_and_the_stalled_and_is_exact() {
        let t = tempfile::tempdir().expect("tmp");
        let key = SigningKey::from_seed([3; 32]);
        let store = published(&key, &t.path().join("src"));
        let other = published(&SigningKey::from_seed([4; 32]), &t.path().join("other"));
        let access = Access {
            trust: vec![key.public(), SigningKey::from_seed([4; 32]).public()],
            ..Access::default()
        };
        let places = [url("flip"), url("stall"), url("other"), url("good")];
        let open = |l: &Location| -> Result<Arc<dyn Store>, StoreError> {
            Ok(match l.to_string().as_str() {
                u if u.contains("flip") => Arc::new(Flipping(store.clone())),
                u if u.contains("stall") => Arc::new(Stalled(store.clone())),
                u if u.contains("other") => Arc::new(other.clone()),
                _ => Arc::new(store.clone()),
            })
        };
        let mirrors = Arc::new(Mirrors::open_with(&places, &access, false, &open).expect("open"));
        assert_eq!(
            Store::sources(mirrors.as_ref()),
            3,
            "{:?}",
            mirrors.report()
        );
        let repo = Repo::new(Arc::clone(&mirrors) as Arc<dyn Store>).with_connections(Some(4));
        let (name, idx) = crate::inventory::latest(repo.store(), "t", None)
            .expect("latest")
            .expect("a backup");
        let dst = t.path().join("dst");
        repo.restore(&name, &idx, &dst, &RestoreOptions::new(Policy::NONE))
            .expect("restore");
        for i in 0..12u8 {
            let f = format!("f{i}");
            assert_eq!(
                std::fs::read(dst.join(&f)).expect("r"),
                std::fs::read(t.path().join("src").join(&f)).expect("r"),
                "{f}"
            );
        }
        let report = mirrors.report();
        let why = |i: usize| report[i].set_aside.clone().unwrap_or_default();
        assert!(why(0).contains("do not match their hash"), "{report:?}");
        assert!(why(1).contains("did not answer"), "{report:?}");
        assert!(why(2).contains("another store"), "{report:?}");
        assert!(
            report[3].set_aside.is_none() && report[3].bytes > 0,
            "{report:?}"
        );
        assert_eq!(Store::sources(mirrors.as_ref()), 1);
    }

    /// Two good places share the reads, even one read at a time: the
    /// second is tried as soon as the first is measured.
    #[test]
    fn two_good_places_both_serve() {
        let t = tempfile::tempdir().expect("tmp");
        let key = SigningKey::from_seed([3; 32]);
        let store = published(&key, &t.path().join("src"));
        let access = Access {
            trust: vec![key.public()],
            ..Access::default()
        };
        let open =
            |_: &Location| -> Result<Arc<dyn Store>, StoreError> { Ok(Arc::new(store.clone())) };
        let mirrors = Arc::new(
            Mirrors::open_with(&[url("a"), url("b")], &access, false, &open).expect("open"),
        );
        let repo = Repo::new(Arc::clone(&mirrors) as Arc<dyn Store>).with_connections(Some(1));
        let (name, idx) = crate::inventory::latest(repo.store(), "t", None)
            .expect("latest")
            .expect("a backup");
        repo.restore(
            &name,
            &idx,
            &t.path().join("dst"),
            &RestoreOptions::new(Policy::NONE),
        )
        .expect("restore");
        let report = mirrors.report();
        assert!(
            report.iter().all(|p| p.bytes > 0 && p.set_aside.is_none()),
            "{report:?}"
        );
    }

    /// The last place left is never set aside: its failure is the read's.
    #[test]
    fn the_last_place_is_retried_not_set_aside() {
        let t = tempfile::tempdir().expect("tmp");
        let key = SigningKey::from_seed([3; 32]);
        let store = published(&key, &t.path().join("src"));
        let access = Access {
            trust: vec![key.public()],
            ..Access::default()
        };
        let open = |_: &Location| -> Result<Arc<dyn Store>, StoreError> {
            Ok(Arc::new(Flipping(store.clone())))
        };
        let mirrors = Mirrors::open_with(&[url("only")], &access, false, &open).expect("open");
        let pack = store.list(Kind::Pack).expect("list")[0].0;
        let mut buf = Vec::new();
        let e = mirrors
            .get_range_checked(Kind::Pack, &pack, 0, 10, &mut buf, &mut |_| {
                Err("bad".into())
            })
            .expect_err("refused");
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
        assert!(mirrors.report()[0].set_aside.is_none());
        // Missing everywhere: not found, and nobody set aside.
        let missing = Id::of(b"nothing");
        assert!(matches!(
            mirrors.get(Kind::Pack, &missing),
            Err(StoreError::NotFound(_))
        ));
    }
}
