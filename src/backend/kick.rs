//! The takeover handshake request (design §12): which peer a gateway that just became
//! active initiates the handshake towards, where, and whether to re-create it first.

/// One peer this gateway initiates the handshake towards on takeover (design §12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kick {
    /// The peer as desired (everything needed to re-create it).
    pub peer: crate::model::PeerSpec,
    /// Where the client was last seen (relayed by the Core or observed here).
    pub endpoint: std::net::SocketAddr,
    /// Remove and re-add the peer first (in the same write): this gateway may still hold a
    /// session with the client (a handshake here less than 180 s ago, REJECT_AFTER_TIME), and
    /// a keepalive over that old session would not make the client switch to this gateway
    /// (the failback black hole of defguard#1909). A re-created peer's counters restart at 0.
    pub recreate: bool,
}
