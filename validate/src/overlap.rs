//! Overlapping prefixes: an allowed IP must not overlap another peer's allowed IP (the peer
//! could then send as, and receive the traffic of, the other) nor contain one of the
//! gateway's own host addresses. A peer's /32 inside the interface's subnet is normal: only
//! the gateway's host addresses are entered, never its subnets.
//!
//! Two prefixes either nest or are disjoint, so after sorting by (network, prefix length) a
//! stack of the enclosing prefixes finds every overlap in O(N log N).

use ipnet::IpNet;

/// Who holds a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder<T> {
    /// The gateway's own host address (an interface address as /32 or /128).
    Gateway,
    Peer(T),
}

/// Two prefixes of different holders where `wide` contains (or equals) `narrow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap<T> {
    pub wide: (IpNet, Holder<T>),
    pub narrow: (IpNet, Holder<T>),
}

/// Who is blamed for an overlap: `peer`'s prefix `net`, against `other`'s `other_net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blame<T> {
    pub peer: T,
    pub net: IpNet,
    pub other: Holder<T>,
    pub other_net: IpNet,
}

impl<T: Copy + Ord> Overlap<T> {
    /// The peer to blame, and the other holder: the peer whose prefix covers the gateway's
    /// address, else the later peer (the greater `T`: the one added last).
    pub fn blame(&self) -> Option<Blame<T>> {
        let blame = |(net, peer): (IpNet, T), (other_net, other): (IpNet, Holder<T>)| Blame {
            peer,
            net,
            other,
            other_net,
        };
        match (self.wide, self.narrow) {
            ((_, Holder::Gateway), (n, Holder::Peer(p))) => Some(blame((n, p), self.wide)),
            ((w, Holder::Peer(p)), (_, Holder::Gateway)) => Some(blame((w, p), self.narrow)),
            ((w, Holder::Peer(a)), (n, Holder::Peer(b))) => Some(if a > b {
                blame((w, a), self.narrow)
            } else {
                blame((n, b), self.wide)
            }),
            _ => None,
        }
    }
}

/// Every prefix that lies inside a prefix of another holder, paired with the innermost such
/// prefix (enough to name each conflict once). Prefixes are used truncated.
pub fn find_overlaps<T: Copy + Ord>(entries: &[(IpNet, Holder<T>)]) -> Vec<Overlap<T>> {
    let mut sorted: Vec<(IpNet, Holder<T>)> =
        entries.iter().map(|(n, h)| (n.trunc(), *h)).collect();
    // Same network: wider first; same prefix: the gateway first, then peers in order.
    sorted.sort_unstable();
    let mut out = Vec::new();
    let mut stack: Vec<(IpNet, Holder<T>)> = Vec::new();
    for e in sorted {
        while let Some(top) = stack.last() {
            if top.0.contains(&e.0) {
                break;
            }
            stack.pop();
        }
        if let Some(top) = stack.last() {
            if top.1 != e.1 {
                out.push(Overlap {
                    wide: *top,
                    narrow: e,
                });
            }
        }
        stack.push(e);
    }
    out
}

/// Host prefixes (/32, /128) of the gateway's own interface addresses.
pub fn gateway_hosts<'a, T>(
    addresses: impl IntoIterator<Item = &'a IpNet>,
) -> Vec<(IpNet, Holder<T>)> {
    addresses
        .into_iter()
        .map(|a| (IpNet::from(a.addr()), Holder::Gateway))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn p(s: &str, i: u32) -> (IpNet, Holder<u32>) {
        (n(s), Holder::Peer(i))
    }

    #[test]
    fn nested_equal_and_disjoint() {
        let gw = gateway_hosts::<u32>(&[n("10.0.0.1/24")]);
        let mut e = gw.clone();
        e.extend([
            p("10.0.0.2/32", 1), // inside the subnet: fine
            p("10.0.0.3/32", 2), // fine
            p("10.9.0.0/16", 3), // fine
            p("10.9.1.0/24", 4), // inside peer 3's
            p("10.0.0.3/32", 5), // equal to peer 2's
            p("10.0.0.0/30", 6), // covers the gateway's address (and peers 1, 2, 5)
            p("fd00::/64", 7),   // other family
            p("fd00::1/128", 7), // same peer: not a conflict here
        ]);
        let blamed: Vec<(u32, String)> = find_overlaps(&e)
            .iter()
            .filter_map(|o| o.blame())
            .map(|b| (b.peer, format!("{} {:?}", b.other_net, b.other)))
            .collect();
        assert!(blamed.contains(&(4, "10.9.0.0/16 Peer(3)".into())));
        assert!(blamed.contains(&(6, "10.0.0.1/32 Gateway".into())));
        assert!(blamed.contains(&(5, "10.0.0.3/32 Peer(2)".into())));
        assert!(!blamed.iter().any(|(p, _)| *p == 2));
        assert!(!blamed.iter().any(|(p, _)| *p == 7 || *p == 3));
    }

    #[test]
    fn a_peer_on_the_gateway_address_is_blamed() {
        let mut e = gateway_hosts::<u32>(&[n("10.0.0.1/24")]);
        e.push(p("10.0.0.1/32", 1));
        let o = find_overlaps(&e);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].blame().unwrap().peer, 1);
    }

    fn brute(e: &[(IpNet, Holder<u32>)]) -> bool {
        e.iter().enumerate().any(|(i, a)| {
            e[i + 1..]
                .iter()
                .any(|b| a.1 != b.1 && (a.0.contains(&b.0) || b.0.contains(&a.0)))
        })
    }

    proptest! {
        /// Some overlap is found exactly when a pairwise check finds one.
        #[test]
        fn agrees_with_the_quadratic_check(
            raw in prop::collection::vec((0u32..64, 26u8..=32, 0u32..6), 0..40)
        ) {
            let e: Vec<(IpNet, Holder<u32>)> = raw
                .iter()
                .map(|(a, len, owner)| {
                    let net = IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 | a).into(), *len)
                        .unwrap()
                        .trunc();
                    (net, Holder::Peer(*owner))
                })
                .collect();
            prop_assert_eq!(!find_overlaps(&e).is_empty(), brute(&e));
        }
    }
}
