//! B-tree maps with full nodes.
//!
//! Entries inserted in key order (a cold apply, a first read, epochs of a cold apply's
//! peers) leave each node of a `BTreeMap` about half full: about twice the memory of a map
//! collected from sorted input. [`compact`] rebuilds such a map once.

use std::collections::BTreeMap;

/// Rebuilds `map` with full nodes: `append` onto a map that is not empty pushes the merged
/// entries in order, filling each node before the next, and frees the old nodes as it
/// passes them (onto an empty map it would only swap the two). O(N).
pub fn compact<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    let Some((k, v)) = map.pop_first() else {
        return;
    };
    let mut full = BTreeMap::new();
    full.insert(k, v);
    full.append(map);
    *map = full;
}

/// [`compact`] when `added` insertions made at least half of `map`.
pub fn compact_after<K: Ord, V>(map: &mut BTreeMap<K, V>, added: usize) {
    if added > 0 && added * 2 >= map.len() {
        compact(map);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacting_keeps_every_entry() {
        for n in [0u32, 1, 2, 11, 12, 1000] {
            let map: BTreeMap<u32, u32> = (0..n).map(|i| (i, i * 2)).collect();
            let mut compacted = BTreeMap::new();
            for (k, v) in &map {
                compacted.insert(*k, *v);
            }
            compact_after(&mut compacted, n as usize);
            assert_eq!(compacted, map);
        }
    }
}
