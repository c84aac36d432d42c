//! The address watcher's side of HA (design §12): its reports go to the event loop, which
//! feeds them to the machine's role ([`super::machine`]); a failing watcher is started
//! again and its failure counted in the status.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::ha::addrwatch;

/// How long the address watcher waits before it starts again after a failure.
const WATCH_RETRY: Duration = Duration::from_secs(5);

/// What the address watcher tells the loop.
#[derive(Debug)]
pub(super) enum VipEvent {
    Present(BTreeSet<IpAddr>),
    WatchFailed(String),
}

/// Runs the address watcher until `stop`, starting it again after a failure; its
/// reports and failures go to the loop.
pub(super) async fn watch_vips(
    vips: Vec<IpAddr>,
    tx: mpsc::Sender<VipEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (inner_tx, mut inner_rx) = mpsc::channel(16);
        let forward = async {
            while let Some(set) = inner_rx.recv().await {
                if tx.send(VipEvent::Present(set)).await.is_err() {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(
            addrwatch::run(vips.clone(), inner_tx, stop.clone()),
            forward
        );
        if *stop.borrow() {
            return;
        }
        let error = match result {
            Ok(()) => "the address watcher stopped".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if tx.send(VipEvent::WatchFailed(error)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_RETRY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Forwards reports of the floating addresses present made by someone else (see
/// [`super::run_with_vip_reports`]) until `stop` or either side is gone.
pub(super) async fn forward_vips(
    mut reports: mpsc::Receiver<BTreeSet<IpAddr>>,
    tx: mpsc::Sender<VipEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let set = tokio::select! {
            set = reports.recv() => set,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(set) = set else { return };
        if tx.send(VipEvent::Present(set)).await.is_err() {
            return;
        }
    }
}
