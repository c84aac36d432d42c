//! A peer's allowed IPs: a sorted set without duplicates held in one exact-size boxed slice.
//!
//! A peer usually has one or two prefixes; a `BTreeSet` allocates a whole tree node (about
//! 200 bytes) for them, in every form of the location the agent holds (desired, observed,
//! reported). This set costs a 16-byte handle and one allocation of exactly its prefixes.
//! Look-ups are binary searches; an insert or a removal copies the set (O(n)), which is
//! what one or two prefixes want. Build large sets with `collect` (O(n log n)).

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;

/// A set of prefixes, iterated in order (the order of `IpNet`, as a `BTreeSet` would).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedIps(Box<[IpNet]>);

impl AllowedIps {
    /// The empty set (no allocation).
    pub fn new() -> Self {
        AllowedIps::default()
    }

    /// The prefixes, sorted.
    pub fn iter(&self) -> std::slice::Iter<'_, IpNet> {
        self.0.iter()
    }

    /// The prefixes as a sorted slice without duplicates.
    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: &IpNet) -> bool {
        self.0.binary_search(ip).is_ok()
    }

    /// Adds `ip`; false if it was there already.
    pub fn insert(&mut self, ip: IpNet) -> bool {
        match self.0.binary_search(&ip) {
            Ok(_) => false,
            Err(at) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(at, ip);
                self.0 = v.into_boxed_slice();
                true
            }
        }
    }

    /// Removes `ip`; false if it was not there.
    pub fn remove(&mut self, ip: &IpNet) -> bool {
        match self.0.binary_search(ip) {
            Ok(at) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.remove(at);
                self.0 = v.into_boxed_slice();
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps the prefixes `keep` accepts (one copy, only when something goes).
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet) -> bool) {
        if self.0.iter().all(&mut keep) {
            return;
        }
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.retain(keep);
        self.0 = v.into_boxed_slice();
    }

    /// The prefixes of `self` not in `other`, in order.
    pub fn difference<'a>(&'a self, other: &'a AllowedIps) -> impl Iterator<Item = &'a IpNet> {
        self.0.iter().filter(move |ip| !other.contains(ip))
    }
}

impl FromIterator<IpNet> for AllowedIps {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        let mut v: Vec<IpNet> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        AllowedIps(v.into_boxed_slice())
    }
}

impl Extend<IpNet> for AllowedIps {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, iter: I) {
        let old = std::mem::take(&mut self.0).into_vec();
        *self = old.into_iter().chain(iter).collect();
    }
}

impl<'a> IntoIterator for &'a AllowedIps {
    type Item = &'a IpNet;
    type IntoIter = std::slice::Iter<'a, IpNet>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for AllowedIps {
    type Item = IpNet;
    type IntoIter = std::vec::IntoIter<IpNet>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<const N: usize> From<[IpNet; N]> for AllowedIps {
    fn from(ips: [IpNet; N]) -> Self {
        ips.into_iter().collect()
    }
}

impl From<BTreeSet<IpNet>> for AllowedIps {
    fn from(ips: BTreeSet<IpNet>) -> Self {
        // Already sorted and unique.
        AllowedIps(ips.into_iter().collect())
    }
}

impl From<&AllowedIps> for BTreeSet<IpNet> {
    fn from(ips: &AllowedIps) -> Self {
        ips.iter().copied().collect()
    }
}

/// Shown as a set: `{10.0.0.2/32, fd00::2/128}`.
impl fmt::Debug for AllowedIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn collected_prefixes_are_sorted_and_unique() {
        let set: AllowedIps = [
            net("fd00::2/128"),
            net("10.0.0.3/32"),
            net("10.0.0.2/32"),
            net("10.0.0.3/32"),
        ]
        .into();
        assert_eq!(
            set.as_slice(),
            [net("10.0.0.2/32"), net("10.0.0.3/32"), net("fd00::2/128")]
        );
        assert_eq!(
            format!("{set:?}"),
            "{10.0.0.2/32, 10.0.0.3/32, fd00::2/128}"
        );
    }

    #[test]
    fn one_or_two_prefixes_take_one_exact_allocation() {
        assert_eq!(std::mem::size_of::<AllowedIps>(), 16);
        let mut set = AllowedIps::new();
        set.insert(net("10.0.0.2/32"));
        set.insert(net("fd00::2/128"));
        // A boxed slice has no spare capacity: its length is its allocation.
        assert_eq!(
            std::mem::size_of_val(&*set.0),
            2 * std::mem::size_of::<IpNet>()
        );
    }

    #[derive(Clone, Debug)]
    enum SetOp {
        Insert(IpNet),
        Remove(IpNet),
        /// Keeps the prefixes whose length is not this one.
        RetainNotLen(u8),
        Extend(Vec<IpNet>),
        Clear,
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u8..3, 30u8..=32).prop_map(|(a, len)| {
                IpNet::new(std::net::Ipv4Addr::new(10, 0, 0, a).into(), len).unwrap()
            }),
            (0u16..3, 126u8..=128).prop_map(|(a, len)| {
                IpNet::new(
                    std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, a).into(),
                    len,
                )
                .unwrap()
            }),
        ]
    }

    fn arb_op() -> impl Strategy<Value = SetOp> {
        prop_oneof![
            4 => arb_net().prop_map(SetOp::Insert),
            3 => arb_net().prop_map(SetOp::Remove),
            1 => (30u8..=32).prop_map(SetOp::RetainNotLen),
            1 => proptest::collection::vec(arb_net(), 0..4).prop_map(SetOp::Extend),
            1 => Just(SetOp::Clear),
        ]
    }

    proptest! {
        /// Under any sequence of operations the set answers as a `BTreeSet` does.
        #[test]
        fn behaves_as_a_btree_set(
            start in proptest::collection::vec(arb_net(), 0..5),
            ops in proptest::collection::vec(arb_op(), 0..24),
            probes in proptest::collection::vec(arb_net(), 0..6),
        ) {
            let mut set: AllowedIps = start.iter().copied().collect();
            let mut model: BTreeSet<IpNet> = start.iter().copied().collect();
            for op in ops {
                match op {
                    SetOp::Insert(ip) => prop_assert_eq!(set.insert(ip), model.insert(ip)),
                    SetOp::Remove(ip) => prop_assert_eq!(set.remove(&ip), model.remove(&ip)),
                    SetOp::RetainNotLen(len) => {
                        set.retain(|ip| ip.prefix_len() != len);
                        model.retain(|ip| ip.prefix_len() != len);
                    }
                    SetOp::Extend(ips) => {
                        set.extend(ips.iter().copied());
                        model.extend(ips.iter().copied());
                    }
                    SetOp::Clear => {
                        set = AllowedIps::new();
                        model.clear();
                    }
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.is_empty(), model.is_empty());
                prop_assert!(set.iter().eq(model.iter()));
                prop_assert_eq!(&BTreeSet::from(&set), &model);
                prop_assert_eq!(&AllowedIps::from(model.clone()), &set);
                for p in &probes {
                    prop_assert_eq!(set.contains(p), model.contains(p));
                }
                let other: AllowedIps = probes.iter().copied().collect();
                let other_model: BTreeSet<IpNet> = probes.iter().copied().collect();
                prop_assert!(set.difference(&other).eq(model.difference(&other_model)));
                prop_assert_eq!(set == other, model == other_model);
            }
        }
    }
}
