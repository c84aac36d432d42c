//! A takeover handshake towards one peer (design §12): the peer, where it was last seen,
//! and whether its session must be dropped first. The backends turn a list of kicks into
//! as few device writes as they can; [`kick_keepalive`] is the rule both follow.

/// One peer this gateway initiates the handshake towards on takeover (design §12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kick {
    /// The peer as desired (everything needed to re-create it).
    pub peer: std::sync::Arc<crate::model::PeerSpec>,
    /// Where the client was last seen (relayed by the Core or observed here).
    pub endpoint: std::net::SocketAddr,
    /// Remove and re-add the peer first (in the same write): this gateway may still hold a
    /// session with the client (a handshake here less than 180 s ago, REJECT_AFTER_TIME), and
    /// a keepalive over that old session would not make the client switch to this gateway
    /// (the failback black hole of defguard#1909). A re-created peer's counters restart at 0.
    pub recreate: bool,
}

/// The persistent keepalive a kick sets to make the device send a keepalive now, given the
/// desired one: both WireGuard implementations send one when the interval goes from 0 to
/// nonzero (Linux `set_peer`, wireguard-go `persistent_keepalive_interval`), and with no
/// valid session that keepalive starts a handshake. The desired value when it is nonzero
/// (nothing to restore), else 1 s, set back to 0 in the same write right after.
pub fn kick_keepalive(desired: u16) -> u16 {
    if desired == 0 {
        1
    } else {
        desired
    }
}

/// The peer a re-creating kick writes: the desired peer, at the kick's endpoint, with the
/// keepalive of [`kick_keepalive`] (a new peer's interval starts at 0, so setting it sends).
pub fn recreated_peer(kick: &Kick) -> crate::model::PeerSpec {
    let mut peer = crate::model::PeerSpec::clone(&kick.peer);
    peer.endpoint = Some(kick.endpoint);
    peer.persistent_keepalive = kick_keepalive(kick.peer.persistent_keepalive);
    peer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, PeerSpec};

    #[test]
    fn the_kick_keepalive_is_nonzero_and_keeps_a_desired_one() {
        assert_eq!(kick_keepalive(0), 1);
        assert_eq!(kick_keepalive(25), 25);
        assert_eq!(kick_keepalive(u16::MAX), u16::MAX);
    }

    #[test]
    fn a_recreated_peer_is_the_desired_one_at_the_kick_endpoint() {
        let mut peer = PeerSpec::new(Key([7; 32]), ["10.0.0.2/32".parse().unwrap()]);
        peer.endpoint = Some("192.0.2.1:1".parse().unwrap());
        let kick = Kick {
            peer: std::sync::Arc::new(peer.clone()),
            endpoint: "198.51.100.7:40000".parse().unwrap(),
            recreate: true,
        };
        let r = recreated_peer(&kick);
        assert_eq!(r.endpoint, Some(kick.endpoint));
        assert_eq!(r.persistent_keepalive, 1);
        assert_eq!(r.allowed_ips, peer.allowed_ips);
    }
}
