//! The agent: its state and decisions are a pure state machine ([`machine::Machine`]); this
//! module's event loop only moves inputs into it (the Core connection, the HTTP server,
//! the address watcher and the machine's timeout, through channels) and has the driver
//! (`driver.rs`) execute the actions it returns (the backend, the state file, the
//! firewall, the hooks, the Core stream, the status channels).
//!
//! Shutdown is injected: [`run`] returns when the `shutdown` future completes, leaving the
//! interface and its peers in place unless `remove_on_shutdown` is set.

pub mod client;
mod driver;
pub mod firewall;
mod ha;
pub mod machine;
pub mod offline;
pub mod peers;
pub mod status;
pub mod steps;
pub mod timers;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::backend::Backend;
use crate::hooks::Hooks;
use crate::http::{self, DiffChannel, DiffReport};
use crate::state::{LoadOutcome, StateStore};
use client::{CoreSettings, FromCore};
use machine::Machine;
use status::Status;

/// Most Core events handled in one turn of the loop before the coalesced apply and a
/// look at the timers.
const CORE_BATCH_EVENTS: usize = 1024;
/// Longest a turn keeps taking Core events before the coalesced apply (the timers wait
/// for at most about this plus one apply).
const CORE_BATCH_TIME: Duration = Duration::from_millis(200);

/// Everything the event loop needs, resolved from the configuration by the caller.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub interface: String,
    pub backend_name: String,
    pub state_dir: PathBuf,
    pub core: CoreSettings,
    pub stats_interval: Duration,
    pub resync_interval: Duration,
    /// None: keep peers without the Core; Some(d): remove them after `d` without it.
    pub offline_remove_after: Option<Duration>,
    pub remove_on_shutdown: bool,
    /// Overrides the generated gateway id (the `gateway.id` key).
    pub gateway_id: Option<String>,
    pub http_listen: Option<SocketAddr>,
    /// Per-peer metrics and `gatehouse status` peer rows while the interface has at most
    /// this many peers (`http.peer_metrics_limit`; 0: never).
    pub peer_metrics_limit: usize,
    pub hooks: Hooks,
    pub firewall: firewall::FirewallSettings,
    /// Several gateways per location (`[ha]`).
    pub ha: crate::ha::HaSettings,
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    settings: Settings,
    backend: Box<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (status_tx, _) = watch::channel(Status::default());
    run_with_status(settings, backend, shutdown, status_tx).await
}

/// [`run`], publishing the status on `status_tx` (tests and embedders watch it).
pub async fn run_with_status(
    settings: Settings,
    backend: Box<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
    status_tx: watch::Sender<Status>,
) -> anyhow::Result<()> {
    run_with_vip_reports(settings, backend, shutdown, status_tx, None).await
}

/// [`run_with_status`], the floating addresses present reported by `vip_reports` instead
/// of the rtnetlink watcher when given (tests, embedders with a watcher of their own).
pub async fn run_with_vip_reports(
    settings: Settings,
    backend: Box<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
    status_tx: watch::Sender<Status>,
    vip_reports: Option<mpsc::Receiver<BTreeSet<IpAddr>>>,
) -> anyhow::Result<()> {
    let (store, outcome) = StateStore::open(&settings.state_dir)
        .with_context(|| format!("state_dir {}", settings.state_dir.display()))?;
    let http_listener = match settings.http_listen {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let origin = Instant::now();
    let gateway_id = settings
        .gateway_id
        .clone()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| store.gateway_id().to_string());
    let loaded = match outcome {
        LoadOutcome::Fresh => {
            info!(%gateway_id, "no state file: starting fresh");
            None
        }
        LoadOutcome::Corrupt { moved_to, reason } => {
            warn!(
                moved_to = %moved_to.display(),
                %reason,
                "state file unreadable: moved aside, starting from the Core"
            );
            None
        }
        LoadOutcome::Loaded(state) => Some(*state),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (core_tx, core_rx) = mpsc::channel(1024);
    let (refresh_tx, refresh_rx) = mpsc::channel(1);
    let (diff_tx, diff_rx) = watch::channel(DiffReport::default());
    let (peers_tx, peers_rx) = watch::channel(std::sync::Arc::new(peers::PeerTable::default()));
    let apply_metrics = crate::metrics::ApplyMetrics::default();
    let (ha_tx, ha_rx) = mpsc::channel(16);
    let (vip_tx, vip_rx) = mpsc::channel(16);
    let status_rx = status_tx.subscribe();
    let mut driver = driver::Driver {
        firewall: firewall::FirewallStep::new(
            &settings.interface,
            settings.firewall,
            Box::new(firewall::Kernel),
        ),
        routes: (!settings.ha.vips.is_empty())
            .then(|| crate::ha::source::SourceRoutes::new(settings.ha.route_table)),
        hooks: settings.hooks.clone(),
        interface: settings.interface.clone(),
        outbound: None,
        report_held: std::sync::Arc::new(()),
        status_tx: Some(status_tx),
        unpublished: None,
        diff_tx: Some(diff_tx),
        peers_tx: Some(peers_tx),
        apply_metrics: apply_metrics.clone(),
        origin,
        store,
        backend,
    };
    let mut machine = Machine::new(
        settings.clone(),
        gateway_id,
        driver.backend.peer_limit(),
        loaded,
        driver.store.take_replay(),
        rand::random(),
        driver.now(),
    );
    let published = http::Published {
        status: status_rx,
        diff: DiffChannel {
            report: diff_rx,
            refresh: refresh_tx,
        },
        peers: peers_rx,
        apply: apply_metrics,
    };

    machine.handle_start(driver.now());
    driver.drain(&mut machine).await;
    driver.publish();
    let client = tokio::spawn(client::run(settings.core.clone(), core_tx, stop_rx.clone()));
    let http = http_listener.map(|l| {
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, published, ha_tx, stop).await {
                error!(error = %e, "HTTP server failed");
            }
        })
    });
    // The floating addresses are watched only when some are configured.
    let vips = settings.ha.vips.clone();
    let watcher = match vip_reports {
        Some(reports) => Some(tokio::spawn(ha::forward_vips(
            reports,
            vip_tx,
            stop_rx.clone(),
        ))),
        None => {
            (!vips.is_empty()).then(|| tokio::spawn(ha::watch_vips(vips, vip_tx, stop_rx.clone())))
        }
    };

    let inputs = Inputs {
        core: core_rx,
        refresh: refresh_rx,
        ha: ha_rx,
        vips: vip_rx,
    };
    event_loop(&mut machine, &mut driver, inputs, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = client.await;
    if let Some(h) = http {
        let _ = h.await;
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    machine.handle_shutdown(driver.now());
    driver.drain(&mut machine).await;
    Ok(())
}

/// The event loop's input channels.
struct Inputs {
    core: mpsc::Receiver<FromCore>,
    /// `/diff` asks for a fresh read.
    refresh: mpsc::Receiver<()>,
    /// HA commands from the HTTP server.
    ha: mpsc::Receiver<crate::ha::Request>,
    /// The address watcher's reports.
    vips: mpsc::Receiver<ha::VipEvent>,
}

/// The loop: it moves inputs into the machine and has the driver execute its actions.
/// Timers and inputs take turns at priority: after a turn that served an input the timers
/// go first, after a timer the inputs do. So no input (a burst of Core messages, a flood
/// of HTTP requests) can starve the timers, and timers whose work outlasts their period
/// cannot starve the inputs. Core events are taken in batches ([`CORE_BATCH_EVENTS`],
/// [`CORE_BATCH_TIME`]) whose revisions are applied once. A running takeover round's next
/// batch goes before anything but shutdown: it is one short write, paced by the round.
async fn event_loop(
    machine: &mut Machine,
    driver: &mut driver::Driver,
    inputs: Inputs,
    shutdown: impl Future<Output = ()>,
) {
    let Inputs {
        core: mut core_rx,
        refresh: mut refresh_rx,
        ha: mut ha_rx,
        vips: mut vip_rx,
    } = inputs;
    tokio::pin!(shutdown);
    let mut timers_first = true;
    loop {
        let timeout = machine.poll_timeout();
        let at = driver.origin + timeout.at;
        let turn = if timers_first || timeout.urgent {
            tokio::select! {
                biased;
                _ = &mut shutdown => Turn::Stop,
                _ = tokio::time::sleep_until(at) => Turn::Timeout,
                event = core_rx.recv() => event.map_or(Turn::Stop, Turn::Core),
                Some(()) = refresh_rx.recv() => Turn::Refresh,
                Some(request) = ha_rx.recv() => Turn::Ha(request),
                Some(event) = vip_rx.recv() => Turn::Vips(event),
            }
        } else {
            tokio::select! {
                biased;
                _ = &mut shutdown => Turn::Stop,
                event = core_rx.recv() => event.map_or(Turn::Stop, Turn::Core),
                Some(()) = refresh_rx.recv() => Turn::Refresh,
                Some(request) = ha_rx.recv() => Turn::Ha(request),
                Some(event) = vip_rx.recv() => Turn::Vips(event),
                _ = tokio::time::sleep_until(at) => Turn::Timeout,
            }
        };
        timers_first = !matches!(turn, Turn::Timeout);
        match turn {
            Turn::Stop => break,
            Turn::Timeout => machine.handle_timeout(driver.now()),
            Turn::Core(first) => {
                let started = Instant::now();
                driver.core_event(machine, first).await;
                let mut handled = 1;
                while handled < CORE_BATCH_EVENTS && started.elapsed() < CORE_BATCH_TIME {
                    let Ok(event) = core_rx.try_recv() else { break };
                    driver.core_event(machine, event).await;
                    handled += 1;
                }
                if handled > 1 {
                    debug!(events = handled, "Core events handled in one batch");
                }
                machine.handle_core_batch_end(driver.now());
            }
            Turn::Refresh => machine.handle_diff_refresh(driver.now()),
            Turn::Ha(request) => {
                machine.handle_ha_command(request.command, driver.now());
                driver.drain(machine).await;
                let _ = request.reply.send(machine.ha_answer());
            }
            Turn::Vips(ha::VipEvent::Present(set)) => {
                machine.handle_vips_present(set, driver.now())
            }
            Turn::Vips(ha::VipEvent::WatchFailed(e)) => {
                machine.handle_vip_watch_failed(e, driver.now())
            }
        }
        driver.drain(machine).await;
        driver.publish();
    }
}

/// What one turn of the event loop serves.
enum Turn {
    Stop,
    /// The machine's timeout ([`Machine::poll_timeout`]).
    Timeout,
    Core(FromCore),
    Refresh,
    Ha(crate::ha::Request),
    Vips(ha::VipEvent),
}
