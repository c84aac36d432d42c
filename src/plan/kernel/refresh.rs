//! A read of the interface applied to a [`KernelModel`] in place, so that the agent holds
//! one copy of the interface also while it reads it (not the last read beside the new one).
//!
//! The rule: each peer read replaces the model's entry of its key (its allowed IPs claimed
//! by the kernel's rule, the index kept in step); the device's settings and the link are
//! set as read; when the read completes ([`Refresh::finish`]), the peers it did not see are
//! dropped; each entry it saw carries its number and whether its received bytes grew since
//! the read before ([`crate::model::Marks`]), so no list of the keys read is kept. A
//! refresh that is dropped unfinished (a read that failed midway) drops nobody:
//! every entry is the interface's as of the last read or of this one, and the index holds
//! exactly the entries' allowed IPs. A complete refresh gives the model of the read, as
//! [`KernelModel::new`] would.

use crate::model::{DeviceSink, Key, LinkState, Observed, PeerState, SecretKey};

use super::{claim, release, KernelModel};

/// A read being applied to a model (see the module doc).
#[must_use = "a refresh that is not finished drops no vanished peer"]
pub struct Refresh<'a> {
    model: &'a mut KernelModel,
    /// This refresh's number (never 0), the mark of the entries it saw.
    read: u32,
    /// How many entries it saw (each counted once).
    seen: usize,
    /// Peers the read added to the model.
    added: usize,
}

impl KernelModel {
    /// Starts applying a read to this model in place.
    pub fn refresh(&mut self) -> Refresh<'_> {
        // 0 marks an entry no refresh saw; after 2^32 refreshes the numbers come round,
        // and an entry that no complete refresh saw since is long gone.
        self.reads = self.reads.wrapping_add(1).max(1);
        Refresh {
            read: self.reads,
            model: self,
            seen: 0,
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
    pub fn finish(self) {
        let peers = &mut self.model.observed.device.peers;
        // Every key seen is in the model (a peer read is inserted, and nothing but this
        // drops one): as many seen as held means none vanished, the usual case.
        if self.seen == peers.len() {
            self.model.compact_after(self.added);
            return;
        }
        let gone: Vec<Key> = peers
            .iter()
            .filter(|(_, p)| p.marks.read != self.read)
            .map(|(k, _)| *k)
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

    fn peer(&mut self, mut peer: PeerState) {
        let key = peer.config.public_key;
        let read = self.read;
        let model = &mut *self.model;
        let device = &mut model.observed.device;
        let mut grew = false;
        if let Some(held) = device.peers.get_mut(&key) {
            // A key read twice in one read (the sink's rule: the second replaces the
            // first) is seen once, and grew if it did at its first sighting.
            let again = held.marks.read == read;
            self.seen += usize::from(!again);
            grew = if again {
                held.marks.rx_grew
            } else {
                held.rx_bytes < peer.rx_bytes
            };
            if held.config == peer.config {
                // The usual case: counters and handshake. The settings stay the ones the
                // model holds (shared with the desired peer, not a copy per read).
                held.rx_bytes = peer.rx_bytes;
                held.tx_bytes = peer.tx_bytes;
                held.last_handshake = peer.last_handshake;
                held.marks.read = read;
                held.marks.rx_grew = grew;
                return;
            }
            peer.marks.read = read;
            peer.marks.rx_grew = grew;
            if held.config.allowed_ips == peer.config.allowed_ips {
                // The endpoint or another setting moved; the index is unchanged.
                *held = peer;
                return;
            }
        } else {
            self.seen += 1;
        }
        peer.marks.read = read;
        peer.marks.rx_grew = grew;
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

    /// A key read twice counts once: the peer the read did not see is still dropped, and
    /// the growth is the first sighting's. An unfinished refresh's marks do not count as
    /// seen by the next one.
    #[test]
    fn marks_count_each_peer_once_per_read() {
        let mut model = KernelModel::new(read(&[(1, 1, 0), (2, 2, 0), (3, 4, 0)]));
        let mut refresh = model.refresh();
        refresh.peer(peer(1, 1, 5));
        refresh.peer(peer(1, 1, 5));
        refresh.peer(peer(2, 2, 0));
        refresh.finish();
        assert_eq!(
            model.device.peers.keys().collect::<Vec<_>>(),
            [&key(1), &key(2)]
        );
        assert!(model.device.peers[&key(1)].marks.rx_grew);
        assert!(!model.device.peers[&key(2)].marks.rx_grew);

        let mut refresh = model.refresh();
        refresh.peer(peer(2, 2, 0));
        drop(refresh);
        let mut refresh = model.refresh();
        refresh.peer(peer(1, 1, 5));
        refresh.finish();
        assert_eq!(model.device.peers.keys().collect::<Vec<_>>(), [&key(1)]);
        assert!(!model.device.peers[&key(1)].marks.rx_grew);
    }
}
