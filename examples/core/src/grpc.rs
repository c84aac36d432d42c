//! The `GatewayService`: one bidirectional stream per gateway, following the ordering
//! rules of `gateway.proto` (Hello first; its events processed before the snapshot;
//! deltas after the snapshot's revision only; a lagging stream gets a fresh snapshot).

use std::sync::Arc;

use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::gateway_service_server::GatewayService;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::CoreError;
use crate::hub::Broadcast;
use crate::shared::{now_ms, Shared};

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
        let location = self
            .shared
            .read(move |s| s.location_for_token(&token))
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::unauthenticated("unknown gateway token"))?;
        let (tx, rx) = mpsc::channel(16);
        let stream = Session {
            shared: Arc::clone(&self.shared),
            location,
            gateway_id: String::new(),
            out: tx,
            sent_revision: 0,
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(stream.run(request.into_inner(), shutdown));
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
    gateway_id: String,
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
    ) {
        let out = self.out.clone();
        match self.serve(inbound, shutdown).await {
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
    ) -> Result<Closed, Status> {
        let first = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Closed),
            Err(status) => return Err(status),
        };
        let hello = match first.kind {
            Some(pb::gateway_message::Kind::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.gateway_id.is_empty() {
            return Err(Status::invalid_argument("Hello.gateway_id is empty"));
        }
        self.gateway_id = hello.gateway_id.clone();
        tracing::info!(location = self.location, gateway_id = %hello.gateway_id,
            name = %hello.name, version = %hello.version,
            applied_revision = hello.applied_revision, "gateway connected");

        // Subscribe before the snapshot is built: nothing committed after it is missed.
        let mut deltas = self.shared.hub.subscribe(self.location);
        let (_registration, mut replaced) =
            self.shared.hub.register(self.location, &hello.gateway_id);
        let (location, now) = (self.location, now_ms());
        let record = hello.clone();
        self.shared
            .read(move |s| s.gateway_hello(location, &record, now))
            .await
            .map_err(internal)?;
        let mut up_to_seq = 0;
        for ev in &hello.pending_events {
            self.event(ev).await?;
            up_to_seq = up_to_seq.max(ev.seq);
        }
        if self.send(ack(up_to_seq)).await.is_err() {
            return Ok(Closed);
        }
        if self.snapshot().await?.is_none() {
            return Ok(Closed);
        }

        loop {
            tokio::select! {
                _ = shutdown.changed() => return Err(Status::unavailable("the Core is shutting down")),
                _ = &mut replaced => {
                    return Err(Status::aborted("replaced by a newer stream of the same gateway"));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        if self.handle(msg).await?.is_none() {
                            return Ok(Closed);
                        }
                    }
                    Ok(None) => return Ok(Closed),
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
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(location = self.location, gateway_id = %self.gateway_id,
                                missed = n, "gateway fell behind the broadcast: sending a snapshot");
                            self.snapshot().await?
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

    /// Handles one message after Hello. `None`: the gateway is gone.
    async fn handle(&mut self, msg: pb::GatewayMessage) -> Result<Option<()>, Status> {
        use pb::gateway_message::Kind;
        let (location, gateway, now) = (self.location, self.gateway_id.clone(), now_ms());
        match msg.kind {
            Some(Kind::Hello(_)) => Err(Status::invalid_argument("Hello sent twice on one stream")),
            Some(Kind::Applied(applied)) => {
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
                let outcome = self
                    .shared
                    .read(move |s| s.record_stats(location, &gateway, &stats, now))
                    .await
                    .map_err(internal)?;
                if outcome.unknown > 0 {
                    tracing::debug!(location, gateway_id = %self.gateway_id,
                        unknown = outcome.unknown, "stats rows for unknown peers ignored");
                }
                if !outcome.active.is_empty() {
                    // Protocol rule 8: the other gateways count it as activity for MFA.
                    let peers = outcome
                        .active
                        .into_iter()
                        .map(|(public_key, last_active_ms)| pb::ActivePeer {
                            public_key,
                            last_active_ms,
                        })
                        .collect();
                    self.shared.hub.relay(
                        location,
                        pb::CoreMessage {
                            kind: Some(pb::core_message::Kind::PeerActivity(pb::PeerActivity {
                                peers,
                            })),
                        },
                    );
                }
                Ok(Some(()))
            }
            Some(Kind::PeerEvent(ev)) => {
                self.event(&ev).await?;
                Ok(self.send(ack(ev.seq)).await.ok())
            }
            Some(Kind::SnapshotRequest(req)) => {
                tracing::info!(location, gateway_id = %gateway, held = req.held_revision,
                    reason = %req.reason, "snapshot requested");
                self.shared
                    .read(move |s| s.touch_gateway(location, &gateway, now))
                    .await
                    .map_err(internal)?;
                self.snapshot().await
            }
            None => {
                tracing::debug!(location, gateway_id = %gateway, "message of an unknown kind ignored");
                Ok(Some(()))
            }
        }
    }

    /// Stores an event once and acts on it (publishing the revision it causes).
    async fn event(&self, ev: &pb::PeerEvent) -> Result<(), Status> {
        let (location, gateway, now, ev) =
            (self.location, self.gateway_id.clone(), now_ms(), ev.clone());
        let connected = self.shared.hub.connected(location);
        let started_at = self.shared.started_at;
        self.shared
            .change(location, move |s| {
                let delta = s.record_event(location, &gateway, &ev, now, &connected, started_at)?;
                Ok(((), delta))
            })
            .await
            .map_err(internal)
    }

    /// Builds and sends a snapshot. `None`: the gateway is gone.
    async fn snapshot(&mut self) -> Result<Option<()>, Status> {
        let location = self.location;
        let snap = self
            .shared
            .read(move |s| s.snapshot(location))
            .await
            .map_err(internal)?;
        self.sent_revision = snap.revision;
        let msg = pb::CoreMessage {
            kind: Some(pb::core_message::Kind::Snapshot(snap)),
        };
        Ok(self.send(msg).await.ok())
    }

    async fn send(&self, msg: pb::CoreMessage) -> Result<(), ()> {
        self.out.send(Ok(msg)).await.map_err(|_| ())
    }
}

fn ack(up_to_seq: u64) -> pb::CoreMessage {
    pb::CoreMessage {
        kind: Some(pb::core_message::Kind::EventAck(pb::EventAck { up_to_seq })),
    }
}
