//! Watches the host's addresses for the configured floating addresses (placeholder: the
//! rtnetlink watcher is built separately; this one only reports that it is missing).

use std::collections::BTreeSet;
use std::net::IpAddr;

use tokio::sync::{mpsc, watch};

/// Sends the set of configured VIPs currently present, once at start and on every change
/// of that set; returns when `stop` turns true.
pub async fn run(
    vips: Vec<IpAddr>,
    tx: mpsc::Sender<BTreeSet<IpAddr>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let _ = (vips, tx, stop);
    anyhow::bail!("the address watcher is not implemented in this build")
}
