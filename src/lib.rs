//! gatehouse: a WireGuard gateway agent managed by a central Core.
//!
//! Deciding code (pure, tested without root): [`model`], [`plan`], [`validate`],
//! [`location`], [`backoff`], [`mfa`], [`stats`], [`agent::status`], [`config`],
//! [`peer_limit`], [`ha`]'s role, activity book and takeover planner.
//! Acting code: [`backend`], [`agent`], [`state`], [`http`], [`hooks`], [`cli`].

pub mod agent;
pub mod app;
pub mod backend;
pub mod backoff;
pub mod caps;
pub mod cli;
pub mod config;
pub mod firewall;
pub mod ha;
pub mod hooks;
pub mod http;
pub mod location;
pub mod mfa;
pub mod model;
pub mod peer_limit;
pub mod plan;
pub mod state;
pub mod stats;
pub mod validate;
