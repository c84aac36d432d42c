//! JSON shapes of the admin HTTP API: requests the server accepts and answers it gives.
//! Shared by the server (`http`) and the typed client (`client`) so both agree.
//!
//! Keys travel in base64 (the `wg` notation). Private keys are only ever accepted, never
//! returned; a preshared key is returned once, by the call that starts an MFA session.

use serde::{Deserialize, Serialize};

/// `POST /api/v1/locations`. An absent `listen_port` is WireGuard's usual 51820 (the port is
/// 1..=65535: gateways behind one floating address share it).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLocation {
    pub name: String,
    #[serde(default = "default_listen_port")]
    pub listen_port: u64,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub mtu: u64,
    #[serde(default)]
    pub fwmark: u64,
    #[serde(default)]
    pub mfa: bool,
    #[serde(default)]
    pub disconnect_threshold_secs: u64,
    /// Base64; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

/// The listen port of a location created without one.
pub const DEFAULT_LISTEN_PORT: u64 = 51820;

fn default_listen_port() -> u64 {
    DEFAULT_LISTEN_PORT
}

impl Default for NewLocation {
    fn default() -> Self {
        NewLocation {
            name: String::new(),
            listen_port: DEFAULT_LISTEN_PORT,
            addresses: Vec::new(),
            mtu: 0,
            fwmark: 0,
            mfa: false,
            disconnect_threshold_secs: 0,
            private_key: None,
        }
    }
}

/// `PATCH /api/v1/locations/{id}`: absent fields stay as they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfa: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_threshold_secs: Option<u64>,
    /// Base64: rotates the interface key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

/// A location as the API shows it (no private key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationView {
    pub id: u64,
    pub name: String,
    pub public_key: String,
    pub listen_port: u16,
    pub addresses: Vec<String>,
    pub mtu: u32,
    pub fwmark: u32,
    pub mfa: bool,
    pub disconnect_threshold_secs: u32,
    pub revision: u64,
    pub firewall: Option<FirewallPolicy>,
}

/// `POST /api/v1/locations/{id}/tokens` body (optional: empty means all defaults).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// The gateway id the token is bound to; absent: the first id that uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
    /// Absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// `POST /api/v1/locations/{id}/tokens` answer: the only place the secret is shown.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub id: u64,
    pub token: String,
}

impl std::fmt::Debug for TokenView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenView")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// `GET /api/v1/locations/{id}/tokens`: a token without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: u64,
    /// Null until the token is bound (at creation or by its first use).
    pub gateway_id: Option<String>,
    /// Unix ms.
    pub created: i64,
    /// Unix ms; null = never.
    pub expires: Option<i64>,
    /// Unix ms of the last stream it opened; null = never used.
    pub last_used: Option<i64>,
}

/// One peer of `POST /api/v1/locations/{id}/peers`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPeer {
    pub public_key: String,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
    #[serde(default)]
    pub persistent_keepalive: u64,
    /// "ip:port" / "[ip6]:port"; absent: learned from the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// The body of `POST .../peers`: one object or an array (one revision either way).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NewPeers {
    One(NewPeer),
    Many(Vec<NewPeer>),
}

/// `PATCH /api/v1/locations/{id}/peers/{peer_id}`: absent fields stay as they are.
/// `preshared_key: ""` and `endpoint: ""` clear the value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A peer as the API shows it (never its preshared key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub id: u64,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub has_preshared_key: bool,
    pub persistent_keepalive: u16,
    pub endpoint: Option<String>,
    /// The active MFA session, if any.
    pub mfa_session: Option<MfaSessionView>,
    /// Whether the peer is in the location's desired state now (MFA: only with a session).
    pub active: bool,
}

/// An active MFA session (as listed with its peer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MfaSessionView {
    pub id: u64,
    pub started_at: i64,
}

/// `POST .../mfa-session` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMfaSession {
    /// Base64; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
}

/// `POST .../mfa-session` answer: the only place a preshared key is shown.
#[derive(Clone, Serialize, Deserialize)]
pub struct MfaSessionStarted {
    pub session_id: u64,
    pub preshared_key: String,
    pub revision: u64,
}

impl std::fmt::Debug for MfaSessionStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MfaSessionStarted")
            .field("session_id", &self.session_id)
            .field("preshared_key", &"<redacted>")
            .field("revision", &self.revision)
            .finish()
    }
}

/// The answer to changes that have no other content to return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionView {
    pub revision: u64,
}

/// `GET /api/v1/locations/{id}/gateways`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayView {
    pub gateway_id: String,
    pub name: String,
    pub version: String,
    pub connected: bool,
    pub applied_revision: u64,
    pub last_error: Option<ApplyErrorView>,
    /// Unix ms.
    pub last_seen: i64,
    /// Where the gateway's latest stream came from (`ip:port` as the Core saw it, behind
    /// any NAT); empty when unknown.
    #[serde(default)]
    pub remote_addr: String,
    /// `Stats` messages received from the gateway (all its streams, since it first came).
    #[serde(default)]
    pub stats_messages: u64,
    /// Peer entries in those messages (a cycle sends only the peers that changed).
    #[serde(default)]
    pub stats_entries: u64,
}

/// The last failed `Applied` of a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyErrorView {
    pub attempted_revision: u64,
    pub kind: String,
    pub message: String,
    pub rejected: Vec<RejectionView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionView {
    pub item: String,
    pub reason: String,
}

/// `GET /api/v1/locations/{id}/stats`: one row per gateway and peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    pub gateway_id: String,
    pub peer_id: u64,
    pub public_key: String,
    pub endpoint: Option<String>,
    /// The kernel's counters as last reported.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Exact totals across counter resets (the proto's epoch rule).
    pub total_rx: u64,
    pub total_tx: u64,
    pub counter_epoch: u64,
    /// Unix ms, null = never.
    pub last_handshake: Option<i64>,
    /// Unix ms (the gateway's collection time).
    pub updated_at: i64,
    /// The row's id (the pagination key; kept across updates).
    #[serde(default)]
    pub id: u64,
}

/// `GET /api/v1/locations/{id}/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub gateway_id: String,
    pub seq: u64,
    pub public_key: String,
    pub peer_id: Option<u64>,
    /// "mfa_inactive", "offline_policy" or "unspecified".
    pub reason: String,
    /// Unix ms, null = never.
    pub last_handshake: Option<i64>,
    /// Unix ms, when the gateway acted.
    pub at: i64,
    pub mfa_session: u64,
    pub detail: String,
    /// What the Core did: `session_ended`, `session_renewed` (the peer was active on
    /// another gateway), `stale_session`, or empty.
    #[serde(default)]
    pub outcome: String,
    /// The event's id, in the order the Core received events (the pagination key).
    #[serde(default)]
    pub id: u64,
}

/// `PUT /api/v1/locations/{id}/firewall`: mirrors the proto `FirewallPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallPolicy {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub default_verdict: Verdict,
    #[serde(default)]
    pub rules: Vec<FirewallRule>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    #[serde(default)]
    pub priority: u32,
    /// "10.0.0.5", "10.0.0.0/24", "10.0.0.5-10.0.0.9", IPv6 alike; empty = any.
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default)]
    pub destinations: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    pub verdict: Verdict,
    #[serde(default)]
    pub comment: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub start: u32,
    pub end: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

/// Every 4xx/5xx answer: `{"error": "...", "field": "allowed_ips[1]"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
