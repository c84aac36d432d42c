//! gatehouse: a WireGuard gateway agent managed by a central Core.
//!
//! Deciding code (pure, tested without root): [`model`], [`plan`], [`validate`],
//! [`location`], [`backoff`], [`mfa`], [`stats`], [`agent::status`], [`config`],
//! [`peer_limit`], [`metrics`] (the page), [`agent::peers`], [`ha`]'s role, activity book
//! and takeover planner.
//! Acting code: [`backend`], [`agent`], [`state`], [`http`], [`hooks`], [`cli`].
//!
//! The deciding code reads no clock, draws no randomness and iterates no hash map: the calls
//! are listed in `clippy.toml` and denied here; the acting modules opt out below, each with
//! its reason (README, "Development").
#![deny(clippy::disallowed_methods, clippy::iter_over_hash_type)]

// The event loop: reads the clock, sleeps, draws epochs (its state machine denies again).
#[allow(clippy::disallowed_methods)]
pub mod agent;
// Wiring and `gatehouse status`: reads the clock to judge the readiness it prints.
#[allow(clippy::disallowed_methods)]
pub mod app;
pub mod backend;
pub mod backoff;
pub mod btree;
pub mod caps;
pub mod cli;
pub mod config;
pub mod firewall;
pub mod ha;
pub mod heap;
// Runs hook commands under a deadline (its tests poll for the killed children).
#[allow(clippy::disallowed_methods)]
pub mod hooks;
pub mod keyed;
// The HTTP server: reads the clock to judge readiness and a stale diff when asked.
#[allow(clippy::disallowed_methods)]
pub mod http;
// Calls clippy must refuse here, built only by scripts/lint-bites.sh.
#[cfg(feature = "lint-bites")]
mod lint_bites;
pub mod location;
pub mod metrics;
pub mod mfa;
pub mod model;
pub mod peer_limit;
pub mod plan;
pub mod show;
// The state file: a corrupt file is moved aside under the wall time, a new gateway id is random.
#[allow(clippy::disallowed_methods)]
pub mod state;
pub mod stats;
pub mod validate;
