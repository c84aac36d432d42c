//! Domain types the agent decides with: the desired location (what the Core asked for,
//! validated) and the observed interface (what the backend read). They are free of proto
//! and netlink types so that the deciding code is plain data in, plain data out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ipnet::IpNet;
use zeroize::Zeroize;

mod allowed_ips;
pub use allowed_ips::AllowedIps;

/// A WireGuard public key. Shown in base64 (public keys are not secret).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Parses 32 raw bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Key)
    }

    /// Parses base64 (the `wg` notation).
    pub fn from_base64(s: &str) -> Option<Self> {
        let bytes = B64.decode(s.trim()).ok()?;
        Self::from_slice(&bytes)
    }

    /// The base64 notation.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.to_base64())
    }
}

/// A private or preshared key: zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// Wraps 32 raw bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }

    /// Parses 32 raw bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(SecretKey)
    }

    /// Parses base64.
    pub fn from_base64(s: &str) -> Option<Self> {
        let mut bytes = B64.decode(s.trim()).ok()?;
        let key = Self::from_slice(&bytes);
        bytes.zeroize();
        key
    }

    /// The raw bytes (for the backend and the state file only).
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// The base64 notation (for the state file and UAPI only; never log it).
    pub fn expose_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// This key clamped as a Curve25519 private key, the form WireGuard stores and reports
    /// (so a key from the Core compares equal to what the kernel reads back).
    pub fn clamped(&self) -> Self {
        let mut bytes = self.0;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        SecretKey(bytes)
    }

    /// The public key of this private key (Curve25519, clamped as WireGuard does).
    pub fn public_key(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// A fresh random key.
    #[allow(clippy::disallowed_methods)] // draws from the OS; called by tests only
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut bytes);
        SecretKey(bytes)
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// The interface settings the Core asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub private_key: SecretKey,
    /// 0 lets the kernel choose (and is then never compared).
    pub listen_port: u16,
    /// Host bits kept: these are the interface's own addresses.
    pub addresses: BTreeSet<IpNet>,
    /// None: leave the MTU as the kernel set it.
    pub mtu: Option<u32>,
    /// 0 = none.
    pub fwmark: u32,
}

/// One peer as the Core asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: Key,
    pub preshared_key: Option<SecretKey>,
    /// Normalized (host bits cleared), as the kernel stores them.
    pub allowed_ips: AllowedIps,
    /// Seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// None: learned from the peer's packets (roaming); Some: enforced.
    pub endpoint: Option<SocketAddr>,
}

impl PeerSpec {
    /// A peer with no optional settings.
    pub fn new(public_key: Key, allowed_ips: impl IntoIterator<Item = IpNet>) -> Self {
        PeerSpec {
            public_key,
            preshared_key: None,
            allowed_ips: allowed_ips.into_iter().map(|n| n.trunc()).collect(),
            persistent_keepalive: 0,
            endpoint: None,
        }
    }
}

/// The whole desired state of one WireGuard interface.
///
/// Each peer is shared ([`Arc`]), never copied: a plan's addition and the model of the
/// interface after the apply hold the desired peer itself, so an interface that matches
/// its location holds each peer's settings once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub interface: InterfaceSpec,
    pub peers: BTreeMap<Key, Arc<PeerSpec>>,
}

/// The link as rtnetlink (or the userspace backend) sees it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LinkState {
    pub mtu: u32,
    pub up: bool,
    pub addresses: BTreeSet<IpNet>,
}

/// A peer as the backend reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    /// `endpoint` here is the current endpoint, configured or learned. Shared with the
    /// desired peer while the two are equal (see [`Desired`]); changed with
    /// [`Arc::make_mut`].
    pub config: Arc<PeerSpec>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_handshake: Option<SystemTime>,
    /// The agent's notes on this entry of its model (not the interface's state).
    pub marks: Marks,
}

impl PeerState {
    /// A freshly configured peer: no traffic yet.
    pub fn fresh(config: impl Into<Arc<PeerSpec>>) -> Self {
        PeerState {
            config: config.into(),
            rx_bytes: 0,
            tx_bytes: 0,
            last_handshake: None,
            marks: Marks::default(),
        }
    }
}

/// What the readers of the agent's model note on a peer's entry, so that none of them
/// keeps a record, and a copy of the key, for every peer: the read that last saw the peer
/// (the model's refresh), whether its received bytes grew at that read (the HA book), and
/// the fingerprint of what was last reported of it to the Core (the stats tracker).
///
/// Not the interface's state: comparisons ignore it (two entries that differ only here
/// are equal), and an entry made anew (a peer added, re-created, or read with other
/// settings) starts with none.
#[derive(Clone, Copy, Debug, Default)]
pub struct Marks {
    /// The number of the model's refresh that last saw the peer; 0: none did.
    pub read: u32,
    /// Its received bytes grew between the last two reads that saw it.
    pub rx_grew: bool,
    /// Fingerprint of the peer as last reported on the current stream; 0: not reported.
    pub reported: u64,
}

impl PartialEq for Marks {
    /// Always: notes are not state (see the type).
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Marks {}

/// WireGuard device settings and peers as read from the backend.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceState {
    pub private_key: Option<SecretKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<Key, PeerState>,
}

/// Everything observed about the interface. `link: None` means it does not exist.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Observed {
    pub link: Option<LinkState>,
    pub device: DeviceState,
}

/// Where a backend's read of the WireGuard device goes as it is parsed, so that the read
/// is never held whole beside what it fills: the device's settings once a read completes
/// them, and each peer whole (its pieces merged), in the order read.
pub trait DeviceSink {
    /// The device's own settings (a read that has none says `None`, 0, 0).
    fn settings(&mut self, private_key: Option<SecretKey>, listen_port: u16, fwmark: u32);
    /// One peer as read; a key read again replaces the first.
    fn peer(&mut self, peer: PeerState);
}

/// A read collected whole.
impl DeviceSink for DeviceState {
    fn settings(&mut self, private_key: Option<SecretKey>, listen_port: u16, fwmark: u32) {
        self.private_key = private_key;
        self.listen_port = listen_port;
        self.fwmark = fwmark;
    }

    fn peer(&mut self, peer: PeerState) {
        self.peers.insert(peer.config.public_key, peer);
    }
}
