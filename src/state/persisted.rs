//! What the state file holds: the agent's memory across restarts (design §5).

use std::fmt;
use std::time::SystemTime;

use gatehouse_proto::v1::{PeerEvent, PeerEventReason};
use serde::{Deserialize, Serialize};

use super::codec;
use crate::ha::activity::ActivityBook;
use crate::location::Held;
use crate::mfa::{MfaSaved, MfaSnapshot, Tombstones};
use crate::model::Key;
use crate::stats::Epochs;

/// Everything the agent keeps on disk. The file also carries a format `version`, which
/// [`super::StateStore`] writes and checks; it is not part of this struct.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PersistedState {
    /// The gateway's stable id (also kept in its own `gateway-id` file, which wins).
    pub gateway_id: String,
    /// The revision last applied successfully; 0 for none.
    pub applied_revision: u64,
    /// The prost-encoded `gatehouse.v1.Location` of `applied_revision` (base64 in the
    /// file). Holds the interface's private key: never log it.
    #[serde(with = "codec::opt_bytes_b64")]
    pub location: Option<Vec<u8>>,
    pub mfa: MfaSnapshot,
    pub tombstones: Tombstones,
    pub epochs: Epochs,
    /// Events not yet acknowledged by the Core, oldest first.
    pub pending_events: Vec<PendingEvent>,
    /// The `seq` of the next event (never reused).
    pub next_seq: u64,
    /// Last time the Core was connected, Unix ms (shown in the status; the offline
    /// policy counts with `offline_ms` when present).
    pub core_last_contact_unix_ms: Option<i64>,
    /// Time without the Core counted up to this save (ms, monotonic within a run).
    pub offline_ms: Option<u64>,
    /// When this state was saved, Unix ms (the time the agent is stopped counts as time
    /// without the Core).
    pub saved_unix_ms: Option<i64>,
    /// HA: drain (kept until `undrain`) and where each client was last seen.
    pub ha: HaPersisted,
}

/// A [`PersistedState`] borrowed from its owners, for [`super::StateStore::save`]: it
/// serializes to the same JSON as the `PersistedState` they would build, without building
/// it (the MFA timers, the HA book and the location are written as they are read; the
/// location's encoding goes to the file a peer at a time).
#[derive(Serialize)]
pub struct SavedState<'a> {
    pub gateway_id: &'a str,
    pub applied_revision: u64,
    pub location: Option<LocationText<'a>>,
    pub mfa: MfaSaved<'a>,
    pub tombstones: &'a Tombstones,
    pub epochs: &'a Epochs,
    pub pending_events: &'a [PendingEvent],
    pub next_seq: u64,
    pub core_last_contact_unix_ms: Option<i64>,
    pub offline_ms: Option<u64>,
    pub saved_unix_ms: Option<i64>,
    pub ha: HaSaved<'a>,
}

/// [`HaPersisted`] borrowed (the book is not copied).
#[derive(Serialize)]
pub struct HaSaved<'a> {
    pub draining: bool,
    pub activity: &'a ActivityBook,
    pub vips_present: Vec<std::net::IpAddr>,
    pub operator: Option<crate::ha::role::Operator>,
    pub active_since_unix_ms: Option<i64>,
}

/// The held location as [`PersistedState::location`] stores it (base64 of its prost
/// encoding), produced while it is written: a JSON string made a peer at a time.
pub struct LocationText<'a>(pub &'a Held);

impl Serialize for LocationText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // `collect_str` writes what `Display` produces as it comes (serde_json).
        s.collect_str(self)
    }
}

impl fmt::Display for LocationText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = codec::B64Stream::default();
        self.0
            .encode_proto(&mut |bytes: &[u8]| text.push(bytes, &mut *f))?;
        text.finish(f)
    }
}

/// What HA keeps across restarts (design §12).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HaPersisted {
    pub draining: bool,
    pub activity: ActivityBook,
    /// The role's inputs at the last save: the floating addresses present, what the
    /// operator said last, and since when the gateway is active.
    pub vips_present: Vec<std::net::IpAddr>,
    pub operator: Option<crate::ha::role::Operator>,
    pub active_since_unix_ms: Option<i64>,
}

impl PersistedState {
    /// An empty state for a gateway.
    pub fn new(gateway_id: impl Into<String>) -> Self {
        PersistedState {
            gateway_id: gateway_id.into(),
            next_seq: 1,
            ..Default::default()
        }
    }
}

impl fmt::Debug for PersistedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistedState")
            .field("gateway_id", &self.gateway_id)
            .field("applied_revision", &self.applied_revision)
            .field(
                "location",
                &self
                    .location
                    .as_ref()
                    .map(|l| format!("<{} bytes, redacted>", l.len())),
            )
            .field("mfa_peers", &self.mfa.peers.len())
            .field("tombstones", &self.tombstones.len())
            .field("epochs", &self.epochs.len())
            .field("pending_events", &self.pending_events)
            .field("next_seq", &self.next_seq)
            .field("core_last_contact_unix_ms", &self.core_last_contact_unix_ms)
            .field("offline_ms", &self.offline_ms)
            .field("saved_unix_ms", &self.saved_unix_ms)
            .field("ha_draining", &self.ha.draining)
            .field("ha_activity", &self.ha.activity.len())
            .finish()
    }
}

/// The first event number of a gateway that has no state file (a first start, or a lost
/// or corrupt file). Event numbers must never be reused for one gateway id (the Core
/// takes a repeated (gateway id, seq) for a repeat of the stored event and drops it), and
/// the gateway id outlives the state file (its own `gateway-id` file). So a fresh start
/// numbers from the wall clock in Unix milliseconds, above every number an earlier run
/// can have used unless it produced more events than milliseconds have passed since it
/// started (or the clock went back that far). 1 when the clock reads before 1970.
pub fn first_event_seq(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

/// A `PeerEvent` waiting for the Core's `EventAck`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEvent {
    pub seq: u64,
    #[serde(with = "codec::key_b64")]
    pub public_key: Key,
    #[serde(with = "reason_name")]
    pub reason: PeerEventReason,
    /// 0 = never.
    pub last_handshake_ms: i64,
    pub at_ms: i64,
    pub mfa_session: u64,
    pub peer_id: u64,
    pub detail: String,
}

impl PendingEvent {
    /// The wire form.
    pub fn to_proto(&self) -> PeerEvent {
        PeerEvent {
            seq: self.seq,
            public_key: self.public_key.0.to_vec(),
            reason: self.reason as i32,
            last_handshake_ms: self.last_handshake_ms,
            at_ms: self.at_ms,
            mfa_session: self.mfa_session,
            peer_id: self.peer_id,
            detail: self.detail.clone(),
        }
    }
}

/// The reason as its proto name ("PEER_EVENT_REASON_MFA_INACTIVE"): readable, and stable
/// if numbers were ever reordered.
mod reason_name {
    use gatehouse_proto::v1::PeerEventReason;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &PeerEventReason, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerEventReason, D::Error> {
        let name = String::deserialize(d)?;
        PeerEventReason::from_str_name(&name)
            .ok_or_else(|| D::Error::custom(format!("unknown event reason {name:?}")))
    }
}
