//! The held location's Core forms in one place: its firewall policy, its encoding for the
//! state file, and its restore from the state file.

use gatehouse_proto::v1;
use tracing::warn;

use crate::location::Held;

/// The held location's firewall policy (None without a location or a policy).
pub(super) fn firewall_policy(held: Option<&Held>) -> Option<v1::FirewallPolicy> {
    held.and_then(|h| h.firewall().cloned())
}

/// The held location as the state file keeps it.
pub(super) fn encoded(held: Option<&Held>) -> Option<Vec<u8>> {
    held.map(|h| prost::Message::encode_to_vec(&h.to_proto()))
}

/// The location saved in the state file, if it decodes and is valid.
pub(super) fn restore(revision: u64, bytes: &[u8]) -> Option<Held> {
    let location = match <v1::Location as prost::Message>::decode(bytes) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "state file: the saved location does not decode; waiting for the Core");
            return None;
        }
    };
    match Held::validate(revision, location) {
        Ok(held) => Some(held),
        Err((rejections, _)) => {
            warn!(
                first = %rejections[0],
                "state file: the saved location is invalid; waiting for the Core"
            );
            None
        }
    }
}
