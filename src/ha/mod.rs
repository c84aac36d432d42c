//! Several gateways per location (design §12): the role (active or standby, and drain),
//! the activity book (where each client was last seen, here or on another gateway), and
//! the takeover planner (whom to send a handshake to when this gateway becomes active).
//!
//! Deciding (pure): [`role`], [`activity`], [`takeover`]. Acting: [`addrwatch`] (the
//! floating addresses present on the host, from rtnetlink) and [`source`] (the routes
//! that make takeover handshakes leave from the floating address). The agent's event
//! loop owns the state and executes what these return (`agent::ha`).

pub mod activity;
pub mod addrwatch;
pub mod role;
pub mod source;
pub mod takeover;

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use role::Role;

/// The `[ha]` configuration as the event loop uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaSettings {
    /// Floating addresses; when one is present on the host, this gateway is active.
    pub vips: Vec<IpAddr>,
    /// Peers active this recently get a handshake on takeover.
    pub takeover_window: Duration,
    /// Most handshakes started per second in a takeover round.
    pub takeover_rate: u32,
    /// gatehouse's own routing table for the source routes.
    pub route_table: u32,
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            vips: Vec::new(),
            takeover_window: Duration::from_secs(300),
            takeover_rate: 2000,
            route_table: 51820,
        }
    }
}

/// An operator's HA command (HTTP `POST /drain` etc., `gatehouse drain` etc.).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Drain,
    Undrain,
    Activate,
    Deactivate,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Drain => "drain",
            Command::Undrain => "undrain",
            Command::Activate => "activate",
            Command::Deactivate => "deactivate",
        }
    }
}

/// The answer to a command: the state after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub role: Role,
    pub draining: bool,
}

/// A command sent to the event loop, with where to answer.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Answer>,
}

/// The `ha` object of `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HaStatus {
    pub role: Role,
    pub draining: bool,
    /// Configured floating addresses present on the host now.
    pub vips_present: Vec<IpAddr>,
    /// When this gateway last became active (unix ms); None while standby.
    pub active_since_unix_ms: Option<i64>,
    pub last_takeover: Option<TakeoverStatus>,
    /// Peers whose last endpoint is known (seen here or relayed by the Core).
    pub relayed_endpoints: usize,
    /// Transitions to active since start.
    pub takeovers: u64,
    /// Handshakes initiated since start.
    pub kicks: u64,
    /// Failed kicks, source-route writes and address watches since start.
    pub failures: u64,
    /// The last failure (kick, source routes, address watcher), if any.
    pub last_error: Option<String>,
}

/// One takeover round.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TakeoverStatus {
    pub at_unix_ms: i64,
    pub reason: String,
    /// Kicks sent so far in this round (a round is paced).
    pub kicked: usize,
    /// Kicks planned in this round.
    pub planned: usize,
    /// Peers re-created before their kick.
    pub recreated: usize,
    /// Peers active within the window whose endpoint is unknown.
    pub skipped_no_endpoint: usize,
    /// Source routes installed for the round's endpoints.
    pub source_routes: usize,
}
