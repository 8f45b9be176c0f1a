//! A small least-recently-used cache: what keeps the descriptors the
//! server holds bounded, whatever the size of the tree.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Mutex;

/// At most `cap` values by key; inserting past that drops the least
/// recently used. Values are cheap clones (`Arc`s): one taken out stays
/// usable after it is dropped from the cache.
#[derive(Debug)]
pub struct Lru<K, V> {
    cap: usize,
    inner: Mutex<Inner<K, V>>,
}

#[derive(Debug)]
struct Inner<K, V> {
    map: HashMap<K, (V, u64)>,
    ages: BTreeMap<u64, K>,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// An empty cache of `cap` values (at least one).
    pub fn new(cap: usize) -> Self {
        Lru {
            cap: cap.max(1),
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                ages: BTreeMap::new(),
                tick: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `k`, now the most recently used.
    pub fn get(&self, k: &K) -> Option<V> {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        let (v, age) = inner.map.get_mut(k)?;
        inner.ages.remove(age);
        *age = tick;
        inner.ages.insert(tick, k.clone());
        Some(v.clone())
    }

    /// Keep `v` as `k`'s value, dropping the least recently used value if
    /// the cache is full.
    pub fn insert(&self, k: K, v: V) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, old)) = inner.map.insert(k.clone(), (v, tick)) {
            inner.ages.remove(&old);
        }
        inner.ages.insert(tick, k);
        while inner.map.len() > self.cap {
            let Some((_, oldest)) = inner.ages.pop_first() else {
                break;
            };
            inner.map.remove(&oldest);
        }
    }

    /// Drop `k`'s value.
    pub fn remove(&self, k: &K) {
        let mut g = self.lock();
        if let Some((_, age)) = g.map.remove(k) {
            g.ages.remove(&age);
        }
    }

    /// Drop every value for which `f` holds.
    pub fn remove_where(&self, f: impl Fn(&K, &V) -> bool) {
        let mut g = self.lock();
        let inner = &mut *g;
        let gone: Vec<(K, u64)> = inner
            .map
            .iter()
            .filter(|(k, (v, _))| f(k, v))
            .map(|(k, (_, age))| (k.clone(), *age))
            .collect();
        for (k, age) in gone {
            inner.map.remove(&k);
            inner.ages.remove(&age);
        }
    }

    /// Drop every value.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.ages.clear();
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_least_recently_used_goes_first() {
        let c = Lru::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        assert_eq!(c.get(&1), Some("a"));
        c.insert(3, "c");
        assert_eq!(c.get(&2), None, "2 was used least recently");
        assert_eq!((c.get(&1), c.get(&3)), (Some("a"), Some("c")));
        c.remove_where(|k, _| *k == 1);
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.is_empty());
    }

    proptest! {
        /// Whatever is done to it, the cache never holds more than its
        /// capacity, and what it holds is what was last inserted.
        #[test]
        fn never_over_capacity(ops in prop::collection::vec((0u8..4, 0u8..12), 0..200), cap in 1usize..6) {
            let c = Lru::new(cap);
            let mut model: HashMap<u8, u32> = HashMap::new();
            for (n, (op, k)) in ops.into_iter().enumerate() {
                match op {
                    0 | 1 => { c.insert(k, n as u32); model.insert(k, n as u32); }
                    2 => { if let Some(v) = c.get(&k) { prop_assert_eq!(Some(&v), model.get(&k)); } }
                    _ => { c.remove(&k); model.remove(&k); }
                }
                prop_assert!(c.len() <= cap);
            }
        }
    }
}
