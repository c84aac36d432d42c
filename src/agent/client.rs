//! The Core connection: dials the Core (TLS or loopback http), opens the `Connect` stream
//! with the gateway token, forwards what the Core sends to the event loop and gives the
//! loop a sender for what goes back. Reconnects forever with exponential backoff and
//! jitter; HTTP/2 keepalive detects a dead Core. Owns no agent state: the `Hello` comes
//! from the event loop, which owns everything.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_proto::v1::{self, gateway_service_client::GatewayServiceClient};
use gatehouse_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::TokenSource;
use crate::stats::Report;

/// Messages queued towards the Core before the loop notices a slow stream.
pub const OUTBOUND_QUEUE: usize = 4096;

/// What the event loop queues towards the Core.
pub enum Outgoing {
    Message(v1::GatewayMessage),
    /// A stats report: its `Stats` messages are built one at a time as the stream takes
    /// them, so a report of every peer is never held in its wire form at once. The
    /// `Arc` is held until the report is sent or dropped: the loop queues no report while
    /// another is still on its way.
    Stats(Report, Arc<()>),
}

/// Queues a stats report on the stream's queue, holding `held` until it is sent; gives
/// the report back (not queued) when the Core is not keeping up: while the last report is
/// still on its way (someone else holds `held`), or the queue is half full. Megabytes of
/// stats are never queued behind a slow Core; the caller reports its peers next time.
pub fn queue_report(
    tx: &mpsc::Sender<Outgoing>,
    held: &Arc<()>,
    report: Report,
) -> Result<(), Box<Report>> {
    if Arc::strong_count(held) > 1 || tx.capacity() < tx.max_capacity() / 2 {
        return Err(Box::new(report));
    }
    match tx.try_reserve() {
        Ok(permit) => {
            permit.send(Outgoing::Stats(report, Arc::clone(held)));
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "cannot queue a stats report to the Core");
            Err(Box::new(report))
        }
    }
}

/// The request stream of one `Connect` call: the queued items, each report expanded into
/// its messages when the transport asks for the next message.
pub fn outgoing_stream(
    rx: mpsc::Receiver<Outgoing>,
) -> impl futures::Stream<Item = v1::GatewayMessage> + Send + 'static {
    futures::stream::unfold((rx, None), |(mut rx, mut current)| async move {
        loop {
            if let Some((mut report, held)) = current.take() {
                if let Some(stats) = Report::next(&mut report) {
                    let message = v1::GatewayMessage {
                        kind: Some(v1::gateway_message::Kind::Stats(stats)),
                    };
                    // The last message taken: the report is sent (let go of `held`).
                    let rest = (!report.is_empty()).then_some((report, held));
                    return Some((message, (rx, rest)));
                }
            }
            match rx.recv().await? {
                Outgoing::Message(message) => return Some((message, (rx, None))),
                Outgoing::Stats(report, held) => current = Some((report, held)),
            }
        }
    })
}

/// How to reach the Core.
#[derive(Clone)]
pub struct CoreSettings {
    pub url: String,
    /// Read at each connection attempt, so a rotated token file is picked up.
    pub token: TokenSource,
    /// PEM bundle to trust instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key (mTLS).
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl std::fmt::Debug for CoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreSettings")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What the connection task tells the event loop. `Debug` names messages by kind only
/// (they carry keys).
pub enum FromCore {
    /// The loop answers with the `Hello` that opens the next stream.
    HelloWanted(oneshot::Sender<v1::Hello>),
    /// A stream is open; `outbound` carries messages to the Core on it.
    Connected {
        outbound: mpsc::Sender<Outgoing>,
    },
    Message(v1::CoreMessage),
    /// The stream ended or could not be opened; the next attempt comes after `retry_in`.
    Disconnected {
        error: String,
        unauthenticated: bool,
        retry_in: Duration,
        /// The upper bound `retry_in` was drawn from (grows with each failure).
        retry_ceiling: Duration,
    },
}

impl std::fmt::Debug for FromCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FromCore::HelloWanted(_) => f.write_str("HelloWanted"),
            FromCore::Connected { .. } => f.write_str("Connected"),
            FromCore::Message(m) => write!(f, "Message({})", message_kind(m)),
            FromCore::Disconnected { error, .. } => write!(f, "Disconnected({error})"),
        }
    }
}

/// Runs until `shutdown` becomes true or the loop goes away.
pub async fn run(
    settings: CoreSettings,
    to_loop: mpsc::Sender<FromCore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let (hello_tx, hello_rx) = oneshot::channel();
        if to_loop.send(FromCore::HelloWanted(hello_tx)).await.is_err() {
            return;
        }
        let Ok(hello) = hello_rx.await else { return };
        let outcome = tokio::select! {
            outcome = session(&settings, hello, &to_loop, &mut backoff) => outcome,
            _ = shutdown.changed() => return,
        };
        let Some((error, unauthenticated)) = outcome else {
            return;
        };
        let retry_ceiling = backoff.ceiling();
        let retry_in = backoff.next_delay(rand::random::<f64>());
        if unauthenticated {
            warn!(%error, retry_in = ?retry_in, "the Core refused this gateway's token");
        } else {
            warn!(%error, retry_in = ?retry_in, "Core connection lost");
        }
        let note = FromCore::Disconnected {
            error,
            unauthenticated,
            retry_in,
            retry_ceiling,
        };
        if to_loop.send(note).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One stream from dial to end. `None`: the loop is gone. `Some((error, unauthenticated))`.
async fn session(
    settings: &CoreSettings,
    hello: v1::Hello,
    to_loop: &mpsc::Sender<FromCore>,
    backoff: &mut Backoff,
) -> Option<(String, bool)> {
    let channel = match channel(settings).await {
        Ok(c) => c,
        Err(e) => return Some((e, false)),
    };
    let mut client = GatewayServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let first = Outgoing::Message(v1::GatewayMessage {
        kind: Some(v1::gateway_message::Kind::Hello(hello)),
    });
    if tx.send(first).await.is_err() {
        return Some(("outbound queue closed".into(), false));
    }
    let token = match settings.token.read() {
        Ok(t) => t,
        Err(e) => return Some((format!("cannot read the token: {e}"), true)),
    };
    let mut request = Request::new(outgoing_stream(rx));
    // The header's copy of the token is wiped when dropped; HTTP/2 never indexes it
    // (HPACK "never indexed") and Debug output hides it.
    let header = zeroize::Zeroizing::new(format!("Bearer {}", token.expose()));
    match MetadataValue::try_from(header.as_str()) {
        Ok(mut v) => {
            v.set_sensitive(true);
            request.metadata_mut().insert("authorization", v);
        }
        Err(_) => {
            return Some((
                "the token contains characters not allowed in a header".into(),
                true,
            ))
        }
    }
    // A Core (or proxy) that accepts HTTP/2 but never answers must not hold the agent.
    let opened = tokio::time::timeout(settings.connect_timeout, client.connect(request)).await;
    let mut inbound = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return Some((
                format!("{}: {}", status.code(), status.message()),
                status.code() == Code::Unauthenticated,
            ))
        }
        Err(_) => {
            return Some((
                format!(
                    "the Core did not answer the stream within {:?}",
                    settings.connect_timeout
                ),
                false,
            ))
        }
    };
    info!(url = %settings.url, "Core stream open");
    if to_loop
        .send(FromCore::Connected { outbound: tx })
        .await
        .is_err()
    {
        return None;
    }
    let mut reset = false;
    loop {
        match inbound.message().await {
            Ok(Some(msg)) => {
                if !reset && matches!(msg.kind, Some(v1::core_message::Kind::Snapshot(_))) {
                    // The Core served the whole location: the connection is good, start
                    // the backoff over. (Not on the first message: a Core that acks and
                    // then fails, or two gateways sharing an id, must not reconnect hot.)
                    backoff.reset();
                    reset = true;
                }
                debug!(kind = message_kind(&msg), "from Core");
                if to_loop.send(FromCore::Message(msg)).await.is_err() {
                    return None;
                }
            }
            Ok(None) => return Some(("the Core closed the stream".into(), false)),
            Err(status) => {
                return Some((
                    format!("{}: {}", status.code(), status.message()),
                    status.code() == Code::Unauthenticated,
                ))
            }
        }
    }
}

async fn channel(settings: &CoreSettings) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(settings.url.clone())
        .map_err(|e| format!("bad Core URL {}: {e}", settings.url))?
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_interval)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(settings.keepalive_interval))
        .tcp_nodelay(true);
    if settings.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &settings.ca_pem {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &settings.client_identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| {
        format!(
            "cannot reach the Core at {}: {}",
            settings.url,
            error_chain(&e)
        )
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A short name of a Core message for logs.
pub fn message_kind(msg: &v1::CoreMessage) -> &'static str {
    use v1::core_message::Kind;
    match &msg.kind {
        Some(Kind::Snapshot(_)) => "snapshot",
        Some(Kind::Delta(_)) => "delta",
        Some(Kind::EventAck(_)) => "event_ack",
        Some(Kind::PeerActivity(_)) => "peer_activity",
        None => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use futures::StreamExt as _;

    use super::*;
    use crate::model::{DeviceState, Key, Observed, PeerSpec, PeerState};
    use crate::plan::KernelModel;
    use crate::stats::{Epochs, StatsTracker};

    fn report(n: u32, max_bytes: usize) -> Report {
        let peers: BTreeMap<Key, PeerState> = (0..n)
            .map(|i| {
                let mut k = [7u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                let ip = format!("10.0.{}.{}/32", i >> 8, i & 255).parse().unwrap();
                (Key(k), PeerState::fresh(PeerSpec::new(Key(k), [ip])))
            })
            .collect();
        let mut model = KernelModel::new(Observed {
            link: None,
            device: DeviceState {
                peers,
                ..Default::default()
            },
        });
        let readings = StatsTracker::new().changed(&mut model, &Epochs::new());
        Report::new(readings, SystemTime::UNIX_EPOCH, max_bytes)
    }

    fn hello() -> v1::GatewayMessage {
        v1::GatewayMessage {
            kind: Some(v1::gateway_message::Kind::Hello(v1::Hello::default())),
        }
    }

    #[tokio::test]
    async fn a_report_is_expanded_as_the_stream_takes_it_in_queue_order() {
        let (tx, rx) = mpsc::channel(8);
        let held = Arc::new(());
        let report = report(300, 1000);
        let total = report.len();
        tx.try_send(Outgoing::Message(hello())).unwrap();
        tx.try_send(Outgoing::Stats(report, Arc::clone(&held)))
            .unwrap();
        tx.try_send(Outgoing::Message(hello())).unwrap();
        let mut stream = Box::pin(outgoing_stream(rx));

        let first = stream.next().await.unwrap();
        assert!(matches!(
            first.kind,
            Some(v1::gateway_message::Kind::Hello(_))
        ));
        // One message of the report taken: the report is still on its way, the message
        // behind it still queued.
        let mut peers = 0;
        let Some(v1::gateway_message::Kind::Stats(s)) = stream.next().await.unwrap().kind else {
            panic!("the report's first message");
        };
        assert!(s.more && !s.peers.is_empty());
        peers += s.peers.len();
        assert_eq!(Arc::strong_count(&held), 2);
        assert_eq!(tx.capacity(), 8 - 1);
        let mut messages = 1;
        loop {
            let next = stream.next().await.unwrap();
            match next.kind {
                Some(v1::gateway_message::Kind::Stats(s)) => {
                    peers += s.peers.len();
                    messages += 1;
                    if !s.more {
                        break;
                    }
                }
                _ => panic!("the report's messages come together"),
            }
        }
        assert_eq!(peers, total);
        assert!(messages > 2);
        assert_eq!(Arc::strong_count(&held), 1, "the sent report is let go");
        let last = stream.next().await.unwrap();
        assert!(matches!(
            last.kind,
            Some(v1::gateway_message::Kind::Hello(_))
        ));
        drop(tx);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn no_report_is_queued_behind_one_on_its_way_or_a_half_full_queue() {
        let (tx, rx) = mpsc::channel(8);
        let held = Arc::new(());
        assert!(queue_report(&tx, &held, report(50, 1000)).is_ok());
        assert!(
            queue_report(&tx, &held, report(50, 1000)).is_err(),
            "one in the queue"
        );
        let mut stream = Box::pin(outgoing_stream(rx));
        stream.next().await.unwrap();
        assert!(
            queue_report(&tx, &held, report(50, 1000)).is_err(),
            "one being sent"
        );
        while Arc::strong_count(&held) > 1 {
            let Some(v1::gateway_message::Kind::Stats(s)) = stream.next().await.unwrap().kind
            else {
                panic!("stats");
            };
            assert_eq!(Arc::strong_count(&held) == 1, !s.more);
        }
        assert!(
            queue_report(&tx, &held, report(50, 1000)).is_ok(),
            "the last one was sent"
        );
        stream.next().await.unwrap();
        // A queue at least half full of other messages: no report.
        let held = Arc::new(());
        for _ in 0..5 {
            tx.try_send(Outgoing::Message(hello())).unwrap();
        }
        let back = queue_report(&tx, &held, report(50, 1000)).err().unwrap();
        assert_eq!(back.len(), 50, "a refused report comes back whole");
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
