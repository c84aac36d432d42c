//! The firewall (contract §7): the location's policy enforced as one nftables table owned
//! by the agent, `inet gatehouse_<interface>`.
//!
//! - [`policy`] (pure): the validated proto policy → typed rules; the rule semantics.
//! - [`render`] (pure): policy, interface, listen port, masquerade → the table as data.
//! - [`diff`] (pure): desired vs read-back table → the differences, each a reason.
//! - [`nft`] (acts): writes a table in one batch, removes it, reads it back (libnftnl).
//! - [`conntrack`]: which existing flows a new policy denies (pure) and their deletion
//!   (ctnetlink).
//! - [`vpn`] (pure): the VPN's addresses (the peers' allowed IPs) and how a change of
//!   peers moves them.

pub mod conntrack;
pub mod diff;
pub mod nft;
pub mod policy;
pub mod render;
pub mod vpn;

pub use policy::{from_proto, Policy, PolicyError};
pub use render::{render, table_name, Inputs, Ruleset};

/// How long a netfilter answer may take: one that never comes must not hang the agent.
const RECEIVE_TIMEOUT_SECS: i64 = 5;

/// A netfilter netlink socket (nftables and ctnetlink) with a receive timeout.
fn netfilter_socket() -> std::io::Result<mnl::Socket> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    crate::backend::link::set_receive_timeout(&socket, RECEIVE_TIMEOUT_SECS)?;
    Ok(socket)
}
