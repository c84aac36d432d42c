//! Where each client is: the rule that turns one gateway's stats into the location's view
//! of a peer (its latest sign of life and endpoint) and decides what is relayed to the
//! other gateways (protocol rule 8, design §12). Pure: no I/O, times passed in.
//!
//! The rules:
//! - the location keeps, per peer, the latest activity any gateway saw and the endpoint
//!   where the client was last seen;
//! - a report that shows the peer active (a newer handshake, rx grew) at a time no older
//!   than the location's latest activity moves the endpoint to the one reported with it;
//! - a report without activity moves the endpoint only when it changed on that gateway
//!   since its previous report: the first report of a stream repeats every peer, and a
//!   gateway that carried the client long ago would otherwise bring its stale endpoint
//!   back;
//! - an endpoint that does not parse as a reachable `ip:port` (the shared rule) is never
//!   kept nor relayed;
//! - whatever changes the location's view is relayed at once, as the whole view (the
//!   latest activity and endpoint), so relays arriving in any order converge.

use std::net::SocketAddr;

use gatehouse_proto::v1 as pb;

/// Most peers in one `PeerActivity`: about 3 MiB at the longest endpoint, well under
/// the 64 MiB limit of a Core message (the same bound as a `Stats` piece).
pub const MAX_ACTIVITY_PEERS: usize = 32_768;

/// The location's view of one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Whereabouts {
    /// Latest sign of life on any gateway (Unix ms; 0 = never).
    pub last_active_ms: i64,
    /// Where the client was last seen; None = unknown.
    pub endpoint: Option<SocketAddr>,
    /// The gateway that reported that endpoint (empty when unknown).
    pub gateway_id: String,
}

/// What one gateway's report says about one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sighting {
    /// The sign of life this report showed (None: no new activity on this gateway).
    pub active_at: Option<i64>,
    /// The endpoint reported (None: empty or unparsable).
    pub endpoint: Option<SocketAddr>,
    /// The endpoint differs from this gateway's previous report of the peer (false for
    /// the first report: it says nothing about a move).
    pub endpoint_moved: bool,
}

/// The location's view after `seen` (reported by `gateway`), or None when nothing
/// changed (nothing to store or relay).
pub fn fold(prev: Option<&Whereabouts>, gateway: &str, seen: &Sighting) -> Option<Whereabouts> {
    let empty = Whereabouts::default();
    let prev = prev.unwrap_or(&empty);
    let mut next = prev.clone();
    let active_at = seen.active_at.filter(|&t| t > 0);
    if let Some(at) = active_at {
        next.last_active_ms = next.last_active_ms.max(at);
    }
    if let Some(endpoint) = seen.endpoint {
        let current = match active_at {
            Some(at) => at >= prev.last_active_ms,
            None => seen.endpoint_moved,
        };
        if current && prev.endpoint != Some(endpoint) {
            next.endpoint = Some(endpoint);
            next.gateway_id = gateway.to_owned();
        }
    }
    (next != *prev).then_some(next)
}

/// A reported endpoint string as an address, when it passes the shared rule (`ip:port` or
/// `[ip6]:port`, unicast, port not 0); empty or anything else: None.
pub fn endpoint(s: &str) -> Option<SocketAddr> {
    gatehouse_validate::net::normalize_endpoint(s)
        .ok()
        .flatten()
}

/// The wire form of a peer's view.
pub fn active_peer(public_key: Vec<u8>, w: &Whereabouts) -> pb::ActivePeer {
    pb::ActivePeer {
        public_key,
        last_active_ms: w.last_active_ms,
        endpoint: w.endpoint.map(|e| e.to_string()).unwrap_or_default(),
    }
}

/// `peers` as `PeerActivity` messages of at most `max` peers each (none when empty).
pub fn pieces(peers: Vec<pb::ActivePeer>, max: usize) -> Vec<pb::CoreMessage> {
    let max = max.max(1);
    let mut out = Vec::with_capacity(peers.len().div_ceil(max));
    let mut rest = peers.into_iter().peekable();
    while rest.peek().is_some() {
        let peers: Vec<pb::ActivePeer> = rest.by_ref().take(max).collect();
        out.push(pb::CoreMessage {
            kind: Some(pb::core_message::Kind::PeerActivity(pb::PeerActivity {
                peers,
            })),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn seen(active_at: Option<i64>, endpoint: &str, moved: bool) -> Sighting {
        Sighting {
            active_at,
            endpoint: super::endpoint(endpoint),
            endpoint_moved: moved,
        }
    }

    fn view(last_active_ms: i64, endpoint: &str, gateway: &str) -> Whereabouts {
        Whereabouts {
            last_active_ms,
            endpoint: super::endpoint(endpoint),
            gateway_id: gateway.into(),
        }
    }

    #[test]
    fn activity_with_an_endpoint_is_the_new_view() {
        let w = fold(None, "a", &seen(Some(1_000), "198.51.100.7:4000", false)).unwrap();
        assert_eq!(w, view(1_000, "198.51.100.7:4000", "a"));
        // The same again: nothing changed, nothing relayed.
        assert_eq!(
            fold(
                Some(&w),
                "a",
                &seen(Some(1_000), "198.51.100.7:4000", false)
            ),
            None
        );
        // Newer activity elsewhere at another endpoint: both move.
        let w2 = fold(Some(&w), "b", &seen(Some(2_000), "203.0.113.9:5000", true)).unwrap();
        assert_eq!(w2, view(2_000, "203.0.113.9:5000", "b"));
    }

    #[test]
    fn an_endpoint_change_alone_is_relayed() {
        let w = view(1_000, "198.51.100.7:4000", "a");
        let next = fold(Some(&w), "a", &seen(None, "198.51.100.7:4001", true)).unwrap();
        assert_eq!(next, view(1_000, "198.51.100.7:4001", "a"), "activity kept");
    }

    #[test]
    fn a_repeated_stale_endpoint_does_not_move_the_client_back() {
        let w = view(5_000, "203.0.113.9:5000", "b");
        // Gateway a reconnects and its first report repeats where it saw the client.
        assert_eq!(
            fold(Some(&w), "a", &seen(None, "198.51.100.7:4000", false)),
            None
        );
        // A late report of older activity on a adds no newer sign of life nor endpoint.
        assert_eq!(
            fold(Some(&w), "a", &seen(Some(4_000), "198.51.100.7:4000", true)),
            None
        );
        // Activity as new as the latest counts.
        assert_eq!(
            fold(
                Some(&w),
                "a",
                &seen(Some(5_000), "198.51.100.7:4000", false)
            ),
            Some(view(5_000, "198.51.100.7:4000", "a"))
        );
    }

    #[test]
    fn bad_or_missing_endpoints_are_never_kept() {
        for bad in [
            "",
            "nonsense",
            "1.2.3.4:0",
            "0.0.0.0:51820",
            "[ff02::1]:1",
            "h:1",
        ] {
            assert_eq!(endpoint(bad), None, "{bad:?}");
            let w = fold(None, "a", &seen(Some(1_000), bad, true)).unwrap();
            assert_eq!(w.endpoint, None, "{bad:?}");
            assert_eq!(w.last_active_ms, 1_000, "the activity still counts");
        }
        // A known endpoint is not forgotten when a report has none.
        let w = view(1_000, "198.51.100.7:4000", "a");
        let next = fold(Some(&w), "b", &seen(Some(2_000), "", false)).unwrap();
        assert_eq!(next.endpoint, at("198.51.100.7:4000"));
        assert_eq!(next.last_active_ms, 2_000);
    }

    #[test]
    fn no_activity_and_no_move_changes_nothing() {
        assert_eq!(
            fold(None, "a", &seen(None, "198.51.100.7:4000", false)),
            None
        );
        assert_eq!(fold(None, "a", &seen(Some(0), "", true)), None);
        // A never-seen peer whose endpoint moved on a gateway (set there): kept.
        assert_eq!(
            fold(None, "a", &seen(None, "[2001:db8::7]:4000", true)),
            Some(view(0, "[2001:db8::7]:4000", "a"))
        );
    }

    #[test]
    fn the_wire_form_is_canonical() {
        let w = view(7, " [2001:DB8::7]:4000 ", "a");
        let p = active_peer(vec![1; 32], &w);
        assert_eq!(p.endpoint, "[2001:db8::7]:4000");
        assert_eq!(p.last_active_ms, 7);
        assert_eq!(active_peer(vec![1; 32], &view(7, "", "")).endpoint, "");
    }

    #[test]
    fn pieces_are_bounded_and_keep_every_peer_in_order() {
        let peers = |n: u8| -> Vec<pb::ActivePeer> {
            (0..n)
                .map(|i| active_peer(vec![i; 32], &view(i64::from(i), "", "")))
                .collect()
        };
        assert!(pieces(Vec::new(), 3).is_empty());
        for n in [1u8, 3, 4, 7] {
            let msgs = pieces(peers(n), 3);
            let sizes: Vec<usize> = msgs
                .iter()
                .map(|m| match &m.kind {
                    Some(pb::core_message::Kind::PeerActivity(a)) => a.peers.len(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert!(sizes.iter().all(|&s| (1..=3).contains(&s)), "{sizes:?}");
            assert_eq!(sizes.iter().sum::<usize>(), usize::from(n));
            let order: Vec<i64> = msgs
                .iter()
                .flat_map(|m| match &m.kind {
                    Some(pb::core_message::Kind::PeerActivity(a)) => a.peers.clone(),
                    _ => vec![],
                })
                .map(|p| p.last_active_ms)
                .collect();
            assert_eq!(order, (0..i64::from(n)).collect::<Vec<_>>());
        }
    }
}
