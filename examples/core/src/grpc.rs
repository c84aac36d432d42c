//! The `GatewayService`: one bidirectional stream per gateway, following the ordering
//! rules of `gateway.proto` (Hello first; its events processed before the snapshot;
//! deltas after the snapshot's revision only; a lagging stream gets a fresh snapshot).

use std::sync::Arc;
use std::time::Duration;

use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::gateway_service_server::GatewayService;
use gatehouse_proto::{MAX_HELLO_EVENTS, MAX_STATS_PEERS};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::error::CoreError;
use crate::hub::Broadcast;
use crate::input;
use crate::relay;
use crate::shared::{now_ms, Shared};
use crate::throttle::{SnapshotThrottle, SNAPSHOT_INTERVAL};
use crate::tokens::{Binding, Grant};

/// The gRPC service.
pub struct GatewaySvc {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

impl GatewaySvc {
    pub fn new(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Self {
        GatewaySvc { shared, shutdown }
    }
}

type Outbound = mpsc::Sender<Result<pb::CoreMessage, Status>>;

#[tonic::async_trait]
impl GatewayService for GatewaySvc {
    type ConnectStream = ReceiverStream<Result<pb::CoreMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::GatewayMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let token = bearer(&request)?;
        let remote_addr = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // Subscribed before the token is checked: a revocation after the check is seen.
        let revocations = self.shared.revocations.subscribe();
        let now = now_ms();
        let grant = self
            .shared
            .read(move |s| s.authenticate(&token, now))
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::unauthenticated("unknown, revoked or expired gateway token"))?;
        let (tx, rx) = mpsc::channel(16);
        let stream = Session {
            shared: Arc::clone(&self.shared),
            location: grant.location,
            token: grant,
            gateway_id: String::new(),
            remote_addr,
            out: tx,
            sent_revision: 0,
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(stream.run(request.into_inner(), shutdown, revocations));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn bearer<T>(request: &Request<T>) -> Result<String, Status> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
    value
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))
}

fn internal(e: CoreError) -> Status {
    tracing::error!(error = %e, "gateway stream: store failure");
    Status::internal("the Core failed to process the request")
}

/// One gateway's stream.
struct Session {
    shared: Arc<Shared>,
    location: u64,
    /// The token that opened the stream: its revocation or expiry ends the stream.
    token: Grant,
    gateway_id: String,
    /// The stream's peer address as the Core saw it (empty when unknown).
    remote_addr: String,
    out: Outbound,
    /// The highest revision sent (snapshot or delta): older deltas are skipped.
    sent_revision: u64,
}

/// Why a stream loop ended without an error for the gateway.
struct Closed;

impl Session {
    async fn run(
        mut self,
        inbound: Streaming<pb::GatewayMessage>,
        shutdown: watch::Receiver<bool>,
        revocations: broadcast::Receiver<u64>,
    ) {
        let out = self.out.clone();
        match self.serve(inbound, shutdown, revocations).await {
            Ok(Closed) => {}
            Err(status) => {
                tracing::info!(location = self.location, gateway_id = %self.gateway_id,
                    code = ?status.code(), message = status.message(), "gateway stream ended");
                let _ = out.send(Err(status)).await;
            }
        }
    }

    async fn serve(
        &mut self,
        mut inbound: Streaming<pb::GatewayMessage>,
        mut shutdown: watch::Receiver<bool>,
        mut revocations: broadcast::Receiver<u64>,
    ) -> Result<Closed, Status> {
        let first = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Closed),
            Err(status) => return Err(refused(status)),
        };
        let hello = match first.kind {
            Some(pb::gateway_message::Kind::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        input::gateway_id(&hello.gateway_id)
            .map_err(|e| Status::invalid_argument(format!("Hello.gateway_id: {e}")))?;
        if hello.pending_events.len() > MAX_HELLO_EVENTS {
            return Err(Status::invalid_argument(format!(
                "Hello carries {} events, at most {MAX_HELLO_EVENTS} are allowed: send the \
                 rest as PeerEvent messages after it",
                hello.pending_events.len()
            )));
        }
        let hello = input::hello(&hello);
        self.gateway_id = hello.gateway_id.clone();
        self.bind().await?;
        tracing::info!(location = self.location, gateway_id = %hello.gateway_id,
            name = %hello.name, version = %hello.version, token_id = self.token.id,
            applied_revision = hello.applied_revision, "gateway connected");
        tracing::debug!(location = self.location, gateway_id = %hello.gateway_id,
            remote_addr = %self.remote_addr, "gateway stream address");

        // Subscribe before the snapshot is built: nothing committed after it is missed.
        let mut deltas = self.shared.hub.subscribe(self.location);
        let (_registration, mut replaced) =
            self.shared.hub.register(self.location, &hello.gateway_id);
        let (location, now) = (self.location, now_ms());
        let (record, remote_addr) = (hello.clone(), self.remote_addr.clone());
        self.shared
            .read(move |s| s.gateway_hello(location, &record, &remote_addr, now))
            .await
            .map_err(internal)?;
        let up_to_seq = self.events(hello.pending_events.clone()).await?;
        if self.send(ack(up_to_seq)).await.is_err() {
            return Ok(Closed);
        }
        // Protocol rule 8: then where the clients are, so a standby that (re)connects can
        // take over without waiting for the next stats.
        if self.snapshot(Then::Whereabouts).await?.is_none() {
            return Ok(Closed);
        }

        let expiry = expiry(self.token.expires_at);
        tokio::pin!(expiry);
        let mut throttle = SnapshotThrottle::new(SNAPSHOT_INTERVAL);
        loop {
            let snapshot_due = throttle.deadline();
            tokio::select! {
                _ = shutdown.changed() => return Err(Status::unavailable("the Core is shutting down")),
                _ = &mut replaced => {
                    return Err(Status::aborted("replaced by a newer stream of the same gateway"));
                }
                _ = &mut expiry => {
                    return Err(Status::unauthenticated("the gateway token expired"));
                }
                r = revocations.recv() => self.on_revocation(r).await?,
                _ = tokio::time::sleep_until(snapshot_due.unwrap_or_else(Instant::now)),
                    if snapshot_due.is_some() =>
                {
                    if throttle.due(Instant::now())
                        && self.snapshot(Then::Nothing).await?.is_none()
                    {
                        return Ok(Closed);
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        let mut next = Some(msg);
                        while let Some(msg) = next.take() {
                            let (batch, rest) = drain_events(msg, &mut inbound);
                            if !batch.is_empty() {
                                let up_to_seq = self.events(batch).await?;
                                if self.send(ack(up_to_seq)).await.is_err() {
                                    return Ok(Closed);
                                }
                            }
                            next = rest;
                            if let Some(other) = next.take() {
                                if other_is_event(&other) {
                                    next = Some(other);
                                } else if self.handle(other, &mut throttle).await?.is_none() {
                                    return Ok(Closed);
                                }
                            }
                        }
                    }
                    Ok(None) => return Ok(Closed),
                    Err(status) if is_too_large(&status) => return Err(refused(status)),
                    Err(status) => {
                        tracing::info!(location = self.location, gateway_id = %self.gateway_id,
                            %status, "gateway stream broke");
                        return Ok(Closed);
                    }
                },
                b = deltas.recv() => {
                    let sent = match b {
                        Ok(Broadcast::Delta(d)) => {
                            if d.revision <= self.sent_revision {
                                continue;
                            }
                            self.sent_revision = d.revision;
                            let msg = pb::CoreMessage {
                                kind: Some(pb::core_message::Kind::Delta((*d).clone())),
                            };
                            self.send(msg).await.ok()
                        }
                        Ok(Broadcast::Raw(m)) => self.send((*m).clone()).await.ok(),
                        // What this gateway saw itself is not sent back to it.
                        Ok(Broadcast::Relay { from, .. }) if *from == *self.gateway_id => continue,
                        Ok(Broadcast::Relay { msg, .. }) => self.send((*msg).clone()).await.ok(),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // Relays may be among the missed: the whereabouts follow again.
                            tracing::warn!(location = self.location, gateway_id = %self.gateway_id,
                                missed = n, "gateway fell behind the broadcast: sending a snapshot");
                            self.snapshot(Then::Whereabouts).await?
                        }
                        Err(broadcast::error::RecvError::Closed) => None,
                    };
                    if sent.is_none() {
                        return Ok(Closed);
                    }
                }
            }
        }
    }

    /// Applies the token's gateway id binding for this stream's id (see `tokens`).
    async fn bind(&self) -> Result<(), Status> {
        let (token_id, gateway, now) = (self.token.id, self.gateway_id.clone(), now_ms());
        match self
            .shared
            .read(move |s| s.bind_token(token_id, &gateway, now))
            .await
        {
            Ok(Binding::Keep) => Ok(()),
            Ok(Binding::Bind) => {
                tracing::info!(location = self.location, token_id, gateway_id = %self.gateway_id,
                    "gateway token bound to its first gateway id");
                Ok(())
            }
            Ok(Binding::Refuse(why)) => {
                tracing::warn!(location = self.location, token_id, gateway_id = %self.gateway_id,
                    reason = why, "gateway id refused for this token");
                Err(Status::permission_denied(why))
            }
            Err(CoreError::NotFound { .. }) => {
                Err(Status::unauthenticated("the gateway token was revoked"))
            }
            Err(e) => Err(internal(e)),
        }
    }

    /// A revocation notice: the stream ends when it names this stream's token. A stream
    /// that missed notices re-checks its token in the store.
    async fn on_revocation(
        &self,
        notice: Result<u64, broadcast::error::RecvError>,
    ) -> Result<(), Status> {
        let revoked = match notice {
            Ok(id) => id == self.token.id,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let (id, now) = (self.token.id, now_ms());
                !self
                    .shared
                    .read(move |s| s.token_valid(id, now))
                    .await
                    .map_err(internal)?
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(Status::unavailable("the Core is shutting down"))
            }
        };
        if revoked {
            Err(Status::unauthenticated("the gateway token was revoked"))
        } else {
            Ok(())
        }
    }

    /// Handles one message after Hello. `None`: the gateway is gone.
    async fn handle(
        &mut self,
        msg: pb::GatewayMessage,
        throttle: &mut SnapshotThrottle,
    ) -> Result<Option<()>, Status> {
        use pb::gateway_message::Kind;
        let (location, gateway, now) = (self.location, self.gateway_id.clone(), now_ms());
        match msg.kind {
            Some(Kind::Hello(_)) => Err(Status::invalid_argument("Hello sent twice on one stream")),
            Some(Kind::Applied(applied)) => {
                let applied = input::applied(&applied);
                if let Some(e) = &applied.error {
                    tracing::warn!(location, gateway_id = %gateway,
                        attempted = applied.attempted_revision, error = %e.message,
                        rejected = e.rejected.len(), "gateway rejected a revision");
                }
                self.shared
                    .read(move |s| s.applied(location, &gateway, &applied, now))
                    .await
                    .map_err(internal)?;
                Ok(Some(()))
            }
            Some(Kind::Stats(stats)) => {
                if stats.peers.len() > MAX_STATS_PEERS {
                    return Err(Status::invalid_argument(format!(
                        "Stats carries {} peers, at most {MAX_STATS_PEERS} are allowed: split it",
                        stats.peers.len()
                    )));
                }
                let hub = Arc::clone(&self.shared.hub);
                let (unknown, relayed) = self
                    .shared
                    .read(move |s| {
                        let outcome = s.record_stats(location, &gateway, &stats, now)?;
                        let relayed = outcome.relay.len();
                        // Protocol rule 8, at once and while the store is held (relays
                        // leave in the order they were stored): the other gateways count
                        // the activity for MFA and keep the endpoint for a takeover. A
                        // Stats has at most MAX_STATS_PEERS peers: one piece.
                        for msg in relay::pieces(outcome.relay, relay::MAX_ACTIVITY_PEERS) {
                            hub.relay(location, &gateway, msg);
                        }
                        Ok((outcome.unknown, relayed))
                    })
                    .await
                    .map_err(internal)?;
                if unknown > 0 {
                    tracing::debug!(location, gateway_id = %self.gateway_id,
                        unknown, "stats rows for unknown peers ignored");
                }
                if relayed > 0 {
                    tracing::debug!(location, gateway_id = %self.gateway_id, peers = relayed,
                        "peer activity and endpoints relayed to the other gateways");
                }
                Ok(Some(()))
            }
            Some(Kind::PeerEvent(ev)) => {
                let up_to_seq = self.events(vec![ev]).await?;
                Ok(self.send(ack(up_to_seq)).await.ok())
            }
            Some(Kind::SnapshotRequest(req)) => {
                let reason = input::text(&req.reason, input::MAX_TEXT);
                self.shared
                    .read(move |s| s.touch_gateway(location, &gateway, now))
                    .await
                    .map_err(internal)?;
                if throttle.request(Instant::now()) {
                    tracing::info!(location, gateway_id = %self.gateway_id,
                        held = req.held_revision, %reason, "snapshot requested");
                    self.snapshot(Then::Nothing).await
                } else {
                    // Coalesced: the snapshot sent at the throttle's deadline answers it.
                    tracing::debug!(location, gateway_id = %self.gateway_id,
                        held = req.held_revision, %reason, "snapshot request coalesced");
                    Ok(Some(()))
                }
            }
            None => {
                tracing::debug!(location, gateway_id = %gateway, "message of an unknown kind ignored");
                Ok(Some(()))
            }
        }
    }

    /// Stores events (each once) in one transaction and acts on them, publishing the
    /// revisions they cause. Returns the highest seq (0 for none), to acknowledge.
    async fn events(&self, events: Vec<pb::PeerEvent>) -> Result<u64, Status> {
        if events.is_empty() {
            return Ok(0);
        }
        let events: Vec<pb::PeerEvent> = events.iter().map(input::event).collect();
        let up_to_seq = events.iter().map(|e| e.seq).max().unwrap_or(0);
        let (location, gateway, now) = (self.location, self.gateway_id.clone(), now_ms());
        let connected = self.shared.hub.connected(location);
        let started_at = self.shared.started_at;
        self.shared
            .change_many(location, move |s| {
                let deltas =
                    s.record_events(location, &gateway, &events, now, &connected, started_at)?;
                Ok(((), deltas))
            })
            .await
            .map_err(internal)?;
        Ok(up_to_seq)
    }

    /// Builds and sends a snapshot, then (with `Then::Whereabouts`) the location's view of
    /// where its peers are, in bounded pieces. `None`: the gateway is gone.
    async fn snapshot(&mut self, then: Then) -> Result<Option<()>, Status> {
        let location = self.location;
        let (snap, seen) = self
            .shared
            .read(move |s| {
                let snap = s.snapshot(location)?;
                let seen = match then {
                    Then::Whereabouts => s.whereabouts(location, &snap)?,
                    Then::Nothing => Vec::new(),
                };
                Ok((snap, seen))
            })
            .await
            .map_err(internal)?;
        self.sent_revision = snap.revision;
        let msg = pb::CoreMessage {
            kind: Some(pb::core_message::Kind::Snapshot(snap)),
        };
        if self.send(msg).await.is_err() {
            return Ok(None);
        }
        let peers = seen.len();
        for msg in relay::pieces(seen, relay::MAX_ACTIVITY_PEERS) {
            if self.send(msg).await.is_err() {
                return Ok(None);
            }
        }
        if peers > 0 {
            tracing::debug!(location, gateway_id = %self.gateway_id, peers,
                "known peer activity and endpoints sent after the snapshot");
        }
        Ok(Some(()))
    }

    async fn send(&self, msg: pb::CoreMessage) -> Result<(), ()> {
        self.out.send(Ok(msg)).await.map_err(|_| ())
    }
}

/// What follows a snapshot: the location's whereabouts of its peers (protocol rule 8:
/// on a new stream, and after a stream fell behind and may have missed relays) or nothing.
#[derive(Clone, Copy, Debug)]
enum Then {
    Whereabouts,
    Nothing,
}

/// Most events stored in one transaction (and acknowledged by one `EventAck`).
const EVENT_BATCH: usize = 1000;

/// `first` and the peer events that already arrived after it (without waiting), so a
/// backlog is stored in few transactions. Returns the events and the first message that
/// is not one (handled next). A stream end or error is left for the next read to see.
fn drain_events(
    first: pb::GatewayMessage,
    inbound: &mut Streaming<pb::GatewayMessage>,
) -> (Vec<pb::PeerEvent>, Option<pb::GatewayMessage>) {
    use futures::FutureExt as _;
    let mut batch = match first.kind {
        Some(pb::gateway_message::Kind::PeerEvent(ev)) => vec![ev],
        _ => return (Vec::new(), Some(first)),
    };
    while batch.len() < EVENT_BATCH {
        match inbound.message().now_or_never() {
            Some(Ok(Some(pb::GatewayMessage {
                kind: Some(pb::gateway_message::Kind::PeerEvent(ev)),
            }))) => batch.push(ev),
            Some(Ok(Some(other))) => return (batch, Some(other)),
            _ => break,
        }
    }
    (batch, None)
}

fn other_is_event(msg: &pb::GatewayMessage) -> bool {
    matches!(msg.kind, Some(pb::gateway_message::Kind::PeerEvent(_)))
}

/// Resolves when the token expires (never without an expiry).
async fn expiry(expires_at: Option<i64>) {
    match expires_at {
        Some(at) => {
            let left = u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(left)).await
        }
        None => std::future::pending().await,
    }
}

/// A message over the size limit (ordering rule 7).
fn is_too_large(status: &Status) -> bool {
    matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
}

/// The answer to an inbound message that could not be decoded: the size limit is named.
fn refused(status: Status) -> Status {
    if is_too_large(&status) {
        Status::resource_exhausted(format!("message refused: {}", status.message()))
    } else {
        status
    }
}

fn ack(up_to_seq: u64) -> pb::CoreMessage {
    pb::CoreMessage {
        kind: Some(pb::core_message::Kind::EventAck(pb::EventAck { up_to_seq })),
    }
}
