//! The one set of validation rules (contract §11, and the firewall semantics of §7) that the
//! gatehouse agent and the reference Core share, so that whatever the Core accepts every
//! gateway applies.
//!
//! # Layout
//! - [`keys`]: public, private and preshared keys (length, all-zero, low order).
//! - [`net`]: allowed IPs, interface addresses, endpoints, ports, MTU, keepalive.
//! - [`overlap`]: allowed IPs that overlap another peer's or the gateway's own addresses,
//!   found by sorting (O(N log N) for 100,000 peers).
//! - [`text`]: interface names and strings from the network (bounded, printable).
//! - [`firewall`]: address specs and rules of a firewall policy.
//! - [`location`]: a whole `v1::Location` checked into a [`location::CheckedLocation`], or
//!   the list of [`Rejection`]s naming each bad item, and the peers still valid in it.
//! - [`index`]: an index of a valid location that checks and applies a delta in
//!   O(changed × log N), by the same rules.
//!
//! Each string rule comes in two forms: `normalize_*` (for the Core: trims whitespace and
//! returns the canonical form, or a reason) and the strict form (for the wire: accepts the
//! canonical form only). The strict form is defined as "normalizing gives the input back", so
//! what the Core stores always passes on the agent. Pure: no I/O, no clock.

#![deny(clippy::disallowed_methods, clippy::iter_over_hash_type, unsafe_code)] // pure: see clippy.toml

pub mod firewall;
pub mod index;
pub mod keys;
pub mod location;
pub mod net;
pub mod overlap;
pub mod text;

pub use location::{valid_peer_keys, validate_location, CheckedLocation, CheckedPeer};

/// Rejections listed for one location (more are summarized by one last item).
pub const MAX_REJECTIONS: usize = 100;

/// One rejected item: `item` is a path such as `peers[3].allowed_ips[1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub item: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(item: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection {
            item: item.into(),
            reason: reason.into(),
        }
    }

    /// As carried in `Applied`.
    pub fn to_proto(&self) -> gatehouse_proto::v1::Rejection {
        gatehouse_proto::v1::Rejection {
            item: self.item.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.item, self.reason)
    }
}

/// Collects rejections up to [`MAX_REJECTIONS`], counting the rest.
#[derive(Default, Debug)]
pub struct Rejections {
    list: Vec<Rejection>,
    dropped: usize,
}

impl Rejections {
    pub fn push(&mut self, item: impl Into<String>, reason: impl Into<String>) {
        if self.list.len() < MAX_REJECTIONS {
            self.list.push(Rejection::new(item, reason));
        } else {
            self.dropped += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The list, with a last item counting those not listed.
    pub fn finish(mut self) -> Result<(), Vec<Rejection>> {
        if self.dropped > 0 {
            self.list.push(Rejection::new(
                "...",
                format!("{} more rejected items not listed", self.dropped),
            ));
        }
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(self.list)
        }
    }
}
