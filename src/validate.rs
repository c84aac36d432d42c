//! Validation of everything the Core sends: a `Location` (from a snapshot, or the result of
//! a delta) becomes a [`ValidLocation`] or a list of [`Rejection`]s naming each bad item.
//! The rules are the shared crate `gatehouse-validate` (the Core checks admin input with the
//! same code); this module maps its result to the agent's domain types. Nothing of a
//! rejected revision is applied; [`valid_peer_keys`] and [`listed_peer_keys`] tell which
//! peers a rejected revision still lists as valid, and which it lists at all. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gatehouse_proto::v1;
use gatehouse_validate as rules;
use ipnet::IpNet;

use crate::mfa::MfaPolicy;
use crate::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};

/// Rejections listed in one `Applied` (more are summarized by a count).
pub const MAX_REJECTIONS: usize = rules::MAX_REJECTIONS;

/// One rejected item: `item` is a path such as `peers[3].allowed_ips[1]` (the shared rule's).
pub use rules::Rejection;

/// What the Core knows about a peer beyond its WireGuard settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerMeta {
    pub id: u64,
    pub mfa_session: u64,
}

/// A location that passed validation: the one form the agent holds it in. What the state
/// file needs is made from it by [`ValidLocation::to_proto`]; validating that gives this
/// location back.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidLocation {
    /// The Core's id of the location.
    pub id: u64,
    pub name: String,
    pub desired: Desired,
    pub meta: BTreeMap<Key, PeerMeta>,
    /// Whether and after how long inactive peers are removed.
    pub mfa: MfaPolicy,
    /// The firewall policy as sent (checked by the shared rules; small, one per location).
    pub firewall: Option<v1::FirewallPolicy>,
}

impl ValidLocation {
    /// The location as the Core would send it, peers in `order` (keys not held are skipped,
    /// held keys not named are left out). Validating it gives `self` back (a property test).
    pub fn to_proto(&self, order: impl IntoIterator<Item = Key>) -> v1::Location {
        let peers = order
            .into_iter()
            .filter_map(|k| Some(self.peer_proto(self.desired.peers.get(&k)?)))
            .collect();
        v1::Location {
            peers,
            firewall: self.firewall.clone(),
            mfa: self.mfa_proto(),
            ..self.head_proto()
        }
    }

    /// The prost encoding of [`ValidLocation::to_proto`] (the same bytes), handed to `out`
    /// piece by piece: the fields before the peers, each peer, the fields after them. No
    /// copy of the whole location is made (for the state file). The pieces hold the
    /// private and preshared keys: the buffer they pass through is wiped.
    pub fn encode_proto<E>(
        &self,
        order: impl IntoIterator<Item = Key>,
        out: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        use prost::Message as _;
        use zeroize::Zeroize as _;

        let mut buf = zeroize::Zeroizing::new(Vec::new());
        let mut head = self.head_proto();
        head.encode_raw(&mut *buf);
        if let Some(iface) = head.interface.as_mut() {
            iface.private_key.zeroize();
        }
        out(&buf)?;
        for key in order {
            let Some(spec) = self.desired.peers.get(&key) else {
                continue;
            };
            buf.zeroize();
            let mut peer = self.peer_proto(spec);
            // Field 4 of `Location`: `repeated Peer peers`.
            prost::encoding::message::encode(4, &peer, &mut *buf);
            peer.preshared_key.zeroize();
            out(&buf)?;
        }
        buf.zeroize();
        if let Some(firewall) = &self.firewall {
            prost::encoding::message::encode(5, firewall, &mut *buf);
        }
        if let Some(mfa) = &self.mfa_proto() {
            prost::encoding::message::encode(6, mfa, &mut *buf);
        }
        out(&buf)
    }

    /// The location's fields before its peers (its id, name and interface).
    fn head_proto(&self) -> v1::Location {
        let iface = &self.desired.interface;
        v1::Location {
            id: self.id,
            name: self.name.clone(),
            interface: Some(v1::Interface {
                private_key: iface.private_key.expose().to_vec(),
                listen_port: u32::from(iface.listen_port),
                addresses: iface.addresses.iter().map(IpNet::to_string).collect(),
                mtu: iface.mtu.unwrap_or(0),
                fwmark: iface.fwmark,
            }),
            peers: Vec::new(),
            firewall: None,
            mfa: None,
        }
    }

    fn mfa_proto(&self) -> Option<v1::MfaSettings> {
        self.mfa.threshold().map(|t| v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: u32::try_from(t.as_secs()).unwrap_or(u32::MAX),
        })
    }

    fn peer_proto(&self, p: &PeerSpec) -> v1::Peer {
        let meta = self.meta.get(&p.public_key).copied().unwrap_or_default();
        v1::Peer {
            public_key: p.public_key.0.to_vec(),
            preshared_key: p
                .preshared_key
                .as_ref()
                .map_or_else(Vec::new, |k| k.expose().to_vec()),
            allowed_ips: p.allowed_ips.iter().map(IpNet::to_string).collect(),
            persistent_keepalive: u32::from(p.persistent_keepalive),
            endpoint: p.endpoint.map_or_else(String::new, |e| e.to_string()),
            id: meta.id,
            mfa_session: meta.mfa_session,
        }
    }
}

/// Validates a whole location. All problems are reported, not just the first.
pub fn validate_location(loc: &v1::Location) -> Result<ValidLocation, Vec<Rejection>> {
    let checked = rules::validate_location(loc)?;
    let mfa = mfa_policy(checked.mfa_enabled, checked.mfa_threshold_secs)?;
    Ok(ValidLocation::from_checked(
        checked,
        mfa,
        loc.firewall.clone(),
    ))
}

impl ValidLocation {
    /// The agent's form of a checked location (its MFA policy already made of it), taking
    /// the checked peers one at a time.
    pub fn from_checked(
        checked: rules::CheckedLocation,
        mfa: MfaPolicy,
        firewall: Option<v1::FirewallPolicy>,
    ) -> Self {
        let interface = interface_spec(&checked.interface);
        let mut peers = Vec::with_capacity(checked.peers.len());
        let mut meta = Vec::with_capacity(checked.peers.len());
        for p in checked.peers {
            let (spec, m) = peer_spec(&p);
            meta.push((spec.public_key, m));
            peers.push((spec.public_key, Arc::new(spec)));
        }
        // Collected from sorted input, the maps are built with full nodes (inserting one by
        // one leaves them half full: about twice the memory per peer).
        ValidLocation {
            id: checked.id,
            name: checked.name,
            desired: Desired {
                interface,
                peers: peers.into_iter().collect(),
            },
            meta: meta.into_iter().collect(),
            mfa,
            firewall,
        }
    }
}

/// The MFA policy of checked settings.
pub(crate) fn mfa_policy(enabled: bool, threshold_secs: u32) -> Result<MfaPolicy, Vec<Rejection>> {
    MfaPolicy::from_settings(enabled, threshold_secs).map_err(|_| {
        vec![Rejection::new(
            "mfa.disconnect_threshold_secs",
            "must be > 0 when MFA is enabled",
        )]
    })
}

/// A checked interface as the agent's domain type.
pub(crate) fn interface_spec(iface: &rules::location::CheckedInterface) -> InterfaceSpec {
    InterfaceSpec {
        private_key: SecretKey::new(iface.private_key.0),
        listen_port: iface.listen_port,
        addresses: iface.addresses.clone(),
        mtu: iface.mtu,
        fwmark: iface.fwmark,
    }
}

/// A checked peer as the agent's domain types.
pub(crate) fn peer_spec(p: &rules::CheckedPeer) -> (PeerSpec, PeerMeta) {
    let key = Key(p.public_key);
    let spec = PeerSpec {
        public_key: key,
        preshared_key: p.preshared_key.as_ref().map(|k| SecretKey::new(k.0)),
        allowed_ips: p.allowed_ips.iter().copied().collect(),
        persistent_keepalive: p.persistent_keepalive,
        endpoint: p.endpoint,
    };
    let meta = PeerMeta {
        id: p.id,
        mfa_session: p.mfa_session,
    };
    (spec, meta)
}

/// For a revision (valid or not): the peers it lists that pass every rule on their own and
/// against the others. A gateway may keep these as they are when the revision is rejected.
pub fn valid_peer_keys(loc: &v1::Location) -> BTreeSet<Key> {
    rules::valid_peer_keys(loc).into_iter().map(Key).collect()
}

/// For a revision (valid or not): every public key it lists. A peer held but not listed is
/// one the Core removed: it goes also when the revision is rejected.
pub fn listed_peer_keys(loc: &v1::Location) -> BTreeSet<Key> {
    rules::location::listed_peer_keys(loc)
        .into_iter()
        .map(Key)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(seed: u8) -> Key {
        SecretKey::new([seed; 32]).public_key()
    }

    pub(crate) fn location(peers: Vec<v1::Peer>) -> v1::Location {
        v1::Location {
            id: 1,
            name: "test".into(),
            interface: Some(v1::Interface {
                private_key: vec![1; 32],
                listen_port: 51820,
                addresses: vec!["10.0.0.1/24".into(), "fd00::1/64".into()],
                mtu: 1420,
                fwmark: 0,
            }),
            peers,
            firewall: None,
            mfa: None,
        }
    }

    fn peer(k: u8, ips: &[&str]) -> v1::Peer {
        v1::Peer {
            public_key: public(k).0.to_vec(),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn items(loc: &v1::Location) -> Vec<String> {
        validate_location(loc)
            .unwrap_err()
            .into_iter()
            .map(|r| r.item)
            .collect()
    }

    #[test]
    fn valid_location_maps_to_the_domain() {
        let mut p = peer(2, &["10.0.0.2/32", "10.1.0.0/16"]);
        p.preshared_key = vec![9; 32];
        p.endpoint = "192.0.2.1:51820".into();
        p.id = 7;
        p.mfa_session = 3;
        let v = validate_location(&location(vec![p])).unwrap();
        let p = &v.desired.peers[&public(2)];
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(ips, vec!["10.0.0.2/32", "10.1.0.0/16"]);
        assert_eq!(p.preshared_key, Some(SecretKey::new([9; 32])));
        assert_eq!(p.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            v.meta[&public(2)],
            PeerMeta {
                id: 7,
                mfa_session: 3
            }
        );
        assert_eq!(v.desired.interface.addresses.len(), 2);
        assert_eq!(v.desired.interface.mtu, Some(1420));
        assert_eq!(v.mfa, MfaPolicy::Disabled);
    }

    #[test]
    fn only_canonical_input_is_accepted_on_the_wire() {
        let loc = location(vec![peer(2, &["10.0.0.2", "10.1.2.3/16", " 10.2.0.0/16"])]);
        assert_eq!(
            items(&loc),
            vec![
                "peers[0].allowed_ips[0]",
                "peers[0].allowed_ips[1]",
                "peers[0].allowed_ips[2]",
            ]
        );
    }

    #[test]
    fn own_public_key_as_peer_is_rejected() {
        let own = SecretKey::new([1; 32]).public_key();
        let loc = location(vec![v1::Peer {
            public_key: own.0.to_vec(),
            ..Default::default()
        }]);
        assert_eq!(items(&loc), vec!["peers[0].public_key"]);
    }

    #[test]
    fn private_key_is_clamped_like_wireguard_does() {
        let mut loc = location(vec![]);
        loc.interface.as_mut().unwrap().private_key = vec![0xff; 32];
        let v = validate_location(&loc).unwrap();
        let k = v.desired.interface.private_key.expose();
        assert_eq!((k[0], k[31]), (0xf8, 0x7f));
        assert_eq!(
            v.desired.interface.private_key.public_key(),
            SecretKey::new([0xff; 32]).public_key()
        );
    }

    #[test]
    fn mfa_needs_a_threshold() {
        let mut loc = location(vec![]);
        loc.mfa = Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 0,
        });
        assert_eq!(items(&loc), vec!["mfa.disconnect_threshold_secs"]);
        loc.mfa = Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 600,
        });
        assert_eq!(
            validate_location(&loc).unwrap().mfa.threshold(),
            Some(std::time::Duration::from_secs(600))
        );
    }

    #[test]
    fn a_rejected_revision_still_names_its_valid_and_listed_peers() {
        let loc = location(vec![
            peer(2, &["10.0.0.2/32"]),
            peer(3, &["10.0.0.2/32"]),
            v1::Peer {
                endpoint: "1.2.3.4:0".into(),
                ..peer(4, &[])
            },
        ]);
        assert!(validate_location(&loc).is_err());
        assert_eq!(valid_peer_keys(&loc), [public(2)].into_iter().collect());
        assert_eq!(
            listed_peer_keys(&loc),
            [public(2), public(3), public(4)].into_iter().collect()
        );
    }
}
