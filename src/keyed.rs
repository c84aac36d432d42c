//! [`KeyedVec`]: per-peer records of a fixed size in one `Vec` sorted by key, for the
//! trackers that hold one small record for every peer of the interface (the MFA timers;
//! notes without a timer go on the model's entries, [`crate::model::Marks`]).
//!
//! Why not a `BTreeMap`: a map filled by inserts in key order leaves its nodes about half
//! full, and each node has room for eleven entries: at 50,000 peers a 120-byte record cost
//! about 220 bytes. Here a record costs its size.
//!
//! Costs: a lookup is a binary search (O(log N)). A removal only marks the record (O(log
//! N)); marked records are dropped at the next [`KeyedVec::merge`] or
//! [`KeyedVec::retain`], or when they are half of the vector, so a change that removes one
//! peer stays O(log N) amortized. New keys come in batches ([`KeyedVec::merge`]: O(N + k
//! log k), no copy of the vector): the trackers learn new peers from a read of the whole
//! interface, which is O(N) anyway.

use crate::model::Key;

/// Records by key, sorted (see the module doc).
#[derive(Clone, Debug)]
pub struct KeyedVec<V> {
    /// Sorted by key, keys unique; `None`: removed, dropped at the next compaction.
    items: Vec<(Key, Option<V>)>,
    /// How many of `items` are `None`.
    removed: usize,
}

impl<V> Default for KeyedVec<V> {
    fn default() -> Self {
        KeyedVec {
            items: Vec::new(),
            removed: 0,
        }
    }
}

impl<V: Copy> KeyedVec<V> {
    pub fn new() -> Self {
        KeyedVec {
            items: Vec::new(),
            removed: 0,
        }
    }

    /// Records in any order (a key given twice: the last wins), in a vector of exactly
    /// their number.
    pub fn from_sorted(records: impl IntoIterator<Item = (Key, V)>) -> Self {
        let mut items: Vec<(Key, Option<V>)> =
            records.into_iter().map(|(k, v)| (k, Some(v))).collect();
        items.sort_by_key(|(k, _)| *k);
        // Stable sort: among equal keys the last given is last; keep it.
        items.reverse();
        items.dedup_by_key(|(k, _)| *k);
        items.reverse();
        items.shrink_to_fit();
        KeyedVec { items, removed: 0 }
    }

    /// Records held (removed ones not counted).
    pub fn len(&self) -> usize {
        self.items.len() - self.removed
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find(&self, key: &Key) -> Result<usize, usize> {
        self.items.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub fn get(&self, key: &Key) -> Option<&V> {
        let at = self.find(key).ok()?;
        self.items[at].1.as_ref()
    }

    pub fn get_mut(&mut self, key: &Key) -> Option<&mut V> {
        let at = self.find(key).ok()?;
        self.items[at].1.as_mut()
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// Sets the record of a key that is held or was removed since the last compaction (in
    /// place, O(log N)); gives the record back when the key has no place (use
    /// [`KeyedVec::merge`] for those).
    pub fn set(&mut self, key: Key, value: V) -> Result<Option<V>, V> {
        let Ok(at) = self.find(&key) else {
            return Err(value);
        };
        let slot = &mut self.items[at].1;
        if slot.is_none() {
            self.removed -= 1;
        }
        Ok(slot.replace(value))
    }

    /// Removes a record (marked; see the module doc).
    pub fn remove(&mut self, key: &Key) -> Option<V> {
        let at = self.find(key).ok()?;
        let old = self.items[at].1.take();
        if old.is_some() {
            self.removed += 1;
            if self.removed * 2 > self.items.len() {
                self.compact();
            }
        }
        old
    }

    /// Keeps the records for which `keep` is true (and drops the removed ones).
    pub fn retain(&mut self, mut keep: impl FnMut(&Key, &mut V) -> bool) {
        self.items.retain_mut(|(k, v)| match v {
            Some(v) => keep(k, v),
            None => false,
        });
        self.removed = 0;
    }

    /// The records in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &V)> + '_ {
        self.items
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }

    /// The records in key order, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Key, &mut V)> + '_ {
        self.items
            .iter_mut()
            .filter_map(|(k, v)| v.as_mut().map(|v| (&*k, v)))
    }

    /// The records of keys not held yet (sorted or not; none held, none twice; `None`s
    /// are skipped), merged in place with what is held; removed records are dropped.
    /// O(N + k log k).
    ///
    /// The vector keeps room for an eighth more records: the peers added between two
    /// reads join without moving every record (a reallocation holds the old and the new
    /// vector at once). The first batch's own allocation becomes the vector: give it its
    /// room ([`KeyedVec::room_for`]).
    pub fn merge(&mut self, mut new: Vec<(Key, Option<V>)>) {
        self.compact();
        new.retain(|(_, v)| v.is_some());
        if new.is_empty() {
            return;
        }
        new.sort_unstable_by_key(|(k, _)| *k);
        debug_assert!(new.windows(2).all(|w| w[0].0 != w[1].0), "new keys twice");
        if self.items.is_empty() {
            // The batch's allocation becomes the vector.
            let room = Self::room_for(new.len());
            self.items = new;
            self.items.reserve_exact(room - self.items.len());
            return;
        }
        let held = self.items.len();
        if self.items.capacity() - held < new.len() {
            self.items
                .reserve_exact(Self::room_for(held + new.len()) - held);
        }
        let filler = (new[0].0, None);
        self.items.resize(held + new.len(), filler);
        // From the back: the larger of the two next keys goes to the last free place.
        let (mut i, mut j, mut w) = (held, new.len(), held + new.len());
        while j > 0 {
            w -= 1;
            if i > 0 && self.items[i - 1].0 > new[j - 1].0 {
                self.items[w] = self.items[i - 1];
                i -= 1;
            } else {
                debug_assert!(i == 0 || self.items[i - 1].0 != new[j - 1].0, "key held");
                self.items[w] = new[j - 1];
                j -= 1;
            }
        }
    }

    /// The capacity kept for `n` records: an eighth more.
    pub fn room_for(n: usize) -> usize {
        n + n / 8
    }

    /// Drops the removed records.
    fn compact(&mut self) {
        if self.removed > 0 {
            self.items.retain(|(_, v)| v.is_some());
            self.removed = 0;
        }
    }
}

impl<V: Copy + PartialEq> PartialEq for KeyedVec<V> {
    /// The same records (removed ones do not count).
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<V: Copy + Eq> Eq for KeyedVec<V> {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Remove(u8),
        RetainEven,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..40, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (0u8..40).prop_map(Op::Remove),
            Just(Op::RetainEven),
        ]
    }

    proptest! {
        /// Behaves as a `BTreeMap` for every run of inserts (batched through `set` and
        /// `merge`, as the trackers do), removals and retains.
        #[test]
        fn behaves_as_a_map(runs in prop::collection::vec(prop::collection::vec(op(), 0..12), 0..12)) {
            let mut map = BTreeMap::new();
            let mut v = KeyedVec::new();
            for run in runs {
                let mut new: Vec<(Key, u32)> = Vec::new();
                for op in run {
                    match op {
                        Op::Insert(k, x) => {
                            map.insert(key(k), x);
                            if let Some(n) = new.iter_mut().find(|(nk, _)| *nk == key(k)) {
                                n.1 = x;
                            } else if let Err(x) = v.set(key(k), x) {
                                new.push((key(k), x));
                            }
                        }
                        Op::Remove(k) => {
                            let was = map.remove(&key(k));
                            let pos = new.iter().position(|(nk, _)| *nk == key(k));
                            let got = match pos {
                                Some(at) => Some(new.remove(at).1),
                                None => v.remove(&key(k)),
                            };
                            prop_assert_eq!(was, got);
                        }
                        Op::RetainEven => {
                            map.retain(|k, _| k.0[0] % 2 == 0);
                            new.retain(|(k, _)| k.0[0] % 2 == 0);
                            v.retain(|k, _| k.0[0] % 2 == 0);
                        }
                    }
                }
                v.merge(new.into_iter().map(|(k, x)| (k, Some(x))).collect());
                prop_assert_eq!(v.len(), map.len());
                let got: Vec<(Key, u32)> = v.iter().map(|(k, x)| (*k, *x)).collect();
                let want: Vec<(Key, u32)> = map.iter().map(|(k, x)| (*k, *x)).collect();
                prop_assert_eq!(got, want);
                for n in 0..40 {
                    prop_assert_eq!(v.get(&key(n)), map.get(&key(n)));
                }
            }
        }
    }

    #[test]
    fn built_at_its_size_the_last_record_of_a_key_wins() {
        let v = KeyedVec::from_sorted((0..=255u8).rev().map(|n| (key(n), u64::from(n))));
        assert_eq!(v.items.capacity(), 256);
        assert_eq!(v.get(&key(7)), Some(&7));
        let v = KeyedVec::from_sorted([(key(1), 1), (key(0), 0), (key(1), 2)]);
        let got: Vec<_> = v.iter().map(|(k, x)| (*k, *x)).collect();
        assert_eq!(got, vec![(key(0), 0), (key(1), 2)]);
    }
}
