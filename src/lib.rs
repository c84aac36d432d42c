//! gatehouse: a WireGuard gateway agent managed by a central Core.
//!
//! Deciding code (pure, tested without root): [`model`], [`plan`], [`validate`],
//! [`backoff`], [`mfa`], [`stats`]. Acting code: [`backend`], [`agent`], [`http`].

pub mod backend;
pub mod cli;
pub mod config;
pub mod hooks;
pub mod model;
pub mod plan;
