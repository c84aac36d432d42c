//! The firewall (contract §7): the location's policy enforced as one nftables table owned
//! by the agent, `inet gatehouse_<interface>`.
//!
//! - [`policy`] (pure): the validated proto policy → typed rules; the rule semantics.
//! - [`render`] (pure): policy, interface, listen port, masquerade → the table as data.
//! - [`diff`] (pure): desired vs read-back table → the differences, each a reason.
//! - [`nft`] (acts): writes a table in one batch, removes it, reads it back (libnftnl).
//! - [`conntrack`]: which existing flows a new policy denies (pure) and their deletion
//!   (ctnetlink).

pub mod conntrack;
pub mod diff;
pub mod nft;
pub mod policy;
pub mod render;

pub use policy::{from_proto, Policy, PolicyError};
pub use render::{render, table_name, Inputs, Ruleset};
