//! A read of the interface applied to a [`KernelModel`] in place, so that the agent holds
//! one copy of the interface also while it reads it (not the last read beside the new one).
//!
//! The rule: each peer read replaces the model's entry of its key (its allowed IPs claimed
//! by the kernel's rule, the index kept in step); the device's settings and the link are
//! set as read; when the read completes ([`Refresh::finish`]), the peers it did not see are
//! dropped. A refresh that is dropped unfinished (a read that failed midway) drops nobody:
//! every entry is the interface's as of the last read or of this one, and the index holds
//! exactly the entries' allowed IPs. A complete refresh gives the model of the read, as
//! [`KernelModel::new`] would.

use crate::model::{DeviceSink, Key, LinkState, Observed, PeerState, SecretKey};

use super::{claim, release, KernelModel};

/// A read being applied to a model (see the module doc).
#[must_use = "a refresh that is not finished drops no vanished peer"]
pub struct Refresh<'a> {
    model: &'a mut KernelModel,
    /// The keys read so far.
    seen: Vec<Key>,
    /// Peers the read added to the model.
    added: usize,
}

impl KernelModel {
    /// Starts applying a read to this model in place.
    pub fn refresh(&mut self) -> Refresh<'_> {
        let expected = self.observed.device.peers.len();
        Refresh {
            model: self,
            seen: Vec::with_capacity(expected),
            added: 0,
        }
    }

    /// Applies a whole read (a backend that does not stream, a test's scripted interface)
    /// by the same rule as a streamed one.
    pub fn refresh_with(&mut self, observed: Observed) {
        let mut refresh = self.refresh();
        refresh.link(observed.link);
        let device = observed.device;
        refresh.settings(device.private_key, device.listen_port, device.fwmark);
        for peer in device.peers.into_values() {
            refresh.peer(peer);
        }
        refresh.finish();
    }
}

impl Refresh<'_> {
    /// The link as read (None: the interface does not exist).
    pub fn link(&mut self, link: Option<LinkState>) {
        self.model.observed.link = link;
    }

    /// The read is complete: the peers it did not see are dropped.
    pub fn finish(mut self) {
        let peers = &mut self.model.observed.device.peers;
        // Every key seen is in the model (a peer read is inserted, and nothing but this
        // drops one): as many seen as held means none vanished, the usual case.
        self.seen.sort_unstable();
        self.seen.dedup();
        if self.seen.len() == peers.len() {
            self.model.compact_after(self.added);
            return;
        }
        let gone: Vec<Key> = peers
            .keys()
            .filter(|k| self.seen.binary_search(k).is_err())
            .copied()
            .collect();
        for key in gone {
            if let Some(old) = peers.remove(&key) {
                release(&mut self.model.owners, &key, &old.config.allowed_ips);
            }
        }
        self.model.compact_after(self.added);
    }

    /// The interface does not exist: the model is empty.
    pub fn missing(self) {
        *self.model = KernelModel::default();
    }
}

impl DeviceSink for Refresh<'_> {
    fn settings(&mut self, private_key: Option<SecretKey>, listen_port: u16, fwmark: u32) {
        self.model
            .observed
            .device
            .settings(private_key, listen_port, fwmark);
    }

    fn peer(&mut self, peer: PeerState) {
        let key = peer.config.public_key;
        self.seen.push(key);
        let model = &mut *self.model;
        let device = &mut model.observed.device;
        if let Some(held) = device.peers.get_mut(&key) {
            if held.config == peer.config {
                // The usual case: counters and handshake. The settings stay the ones the
                // model holds (shared with the desired peer, not a copy per read).
                held.rx_bytes = peer.rx_bytes;
                held.tx_bytes = peer.tx_bytes;
                held.last_handshake = peer.last_handshake;
                return;
            }
            if held.config.allowed_ips == peer.config.allowed_ips {
                // The endpoint or another setting moved; the index is unchanged.
                *held = peer;
                return;
            }
        }
        match device.peers.remove(&key) {
            Some(old) => release(&mut model.owners, &key, &old.config.allowed_ips),
            None => self.added += 1,
        }
        claim(
            &mut model.owners,
            device,
            Some(&key),
            &peer.config.allowed_ips,
        );
        device.peers.insert(key, peer);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ipnet::IpNet;
    use proptest::prelude::*;

    use super::*;
    use crate::model::{DeviceState, PeerSpec};

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    /// Peer `n` with the prefixes `10.0.0.<i>/32` for each bit `i` of `mask`, and traffic.
    fn peer(n: u8, mask: u8, rx: u64) -> PeerState {
        let ips = (0..8u8)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| format!("10.0.0.{i}/32").parse::<IpNet>().unwrap());
        PeerState {
            rx_bytes: rx,
            ..PeerState::fresh(PeerSpec::new(key(n), ips))
        }
    }

    /// A read as the kernel gives it: each prefix on at most one peer (the last named).
    fn read(peers: &[(u8, u8, u64)]) -> Observed {
        let mut taken = 0u8;
        let mut device = DeviceState::default();
        for &(n, mask, rx) in peers.iter().rev() {
            if device.peers.contains_key(&key(n)) {
                continue;
            }
            device.peer(peer(n, mask & !taken, rx));
            taken |= mask;
        }
        device.settings(None, 51820, 0);
        Observed {
            link: Some(LinkState {
                mtu: 1420,
                up: true,
                addresses: BTreeSet::new(),
            }),
            device,
        }
    }

    fn reads() -> impl Strategy<Value = Vec<(u8, u8, u64)>> {
        proptest::collection::vec((0u8..12, any::<u8>(), 0u64..3), 0..12)
    }

    proptest! {
        /// A complete refresh of any model by any read is the model of that read.
        #[test]
        fn a_complete_refresh_is_the_model_of_the_read(before in reads(), after in reads()) {
            let mut model = KernelModel::new(read(&before));
            model.refresh_with(read(&after));
            prop_assert_eq!(model, KernelModel::new(read(&after)));
        }

        /// A refresh stopped after any number of peers drops nobody, and its index is the
        /// index of what it holds.
        #[test]
        fn an_unfinished_refresh_keeps_every_peer_and_its_index(
            before in reads(),
            after in reads(),
            cut in 0usize..12,
        ) {
            let mut model = KernelModel::new(read(&before));
            let old: BTreeSet<Key> = model.device.peers.keys().copied().collect();
            let next = read(&after);
            let mut refresh = model.refresh();
            for p in next.device.peers.into_values().take(cut) {
                refresh.peer(p);
            }
            drop(refresh);
            let now: BTreeSet<Key> = model.device.peers.keys().copied().collect();
            prop_assert!(now.is_superset(&old));
            prop_assert_eq!(&model, &KernelModel::new(Observed::clone(&model)));
        }
    }

    #[test]
    fn only_a_finished_refresh_drops_the_peers_it_did_not_see() {
        let mut model = KernelModel::new(read(&[(1, 1, 0), (2, 2, 0)]));
        let mut refresh = model.refresh();
        refresh.peer(peer(1, 1, 5));
        drop(refresh);
        assert_eq!(model.device.peers.len(), 2);
        assert_eq!(model.device.peers[&key(1)].rx_bytes, 5);
        let mut refresh = model.refresh();
        refresh.peer(peer(1, 1, 6));
        refresh.finish();
        assert_eq!(model.device.peers.keys().collect::<Vec<_>>(), [&key(1)]);
        assert_eq!(model, KernelModel::new(read(&[(1, 1, 6)])));
    }

    #[test]
    fn a_missing_interface_empties_the_model() {
        let mut model = KernelModel::new(read(&[(1, 1, 0)]));
        model.refresh().missing();
        assert_eq!(model, KernelModel::default());
    }
}
