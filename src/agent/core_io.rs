//! The event loop's side of the Core protocol: what to do with each message from the
//! connection task (Hello, snapshots, deltas, acks, disconnects) and the messages the
//! agent sends back (Applied, Stats, PeerEvent, SnapshotRequest).
//!
//! An accepted revision becomes the held one at once and is applied by
//! [`Agent::apply_accepted`] at the end of the loop's batch of Core events (a burst of
//! deltas is one apply of the newest state) or before any event that must see it applied
//! (a rejection, a reconnect). A rejected revision's removals are applied at once.

use std::collections::BTreeSet;
use std::time::SystemTime;

use gatehouse_proto::v1::{self, gateway_message::Kind as Out};
use gatehouse_proto::MAX_HELLO_EVENTS;
use tracing::{debug, info, warn};

use super::client::{message_kind, FromCore};
use super::status::{unix_ms, Rejected};
use super::{batches, Agent, STATS_MESSAGE_BYTES};
use crate::location::{self, Update};
use crate::model::{Key, Observed};
use crate::validate::Rejection;

/// Peer events sent and not yet acknowledged, at most (a small part of the outbound queue).
const EVENTS_IN_FLIGHT: usize = 1000;

impl Agent {
    pub(super) async fn on_core(&mut self, event: FromCore) {
        if !matches!(event, FromCore::Message(_)) {
            // Hello, a new stream, a lost stream: the Core sees what is applied.
            self.apply_accepted().await;
        }
        match event {
            FromCore::HelloWanted(reply) => {
                let _ = reply.send(self.hello());
            }
            FromCore::Connected { outbound } => {
                let now = SystemTime::now();
                self.outbound = Some(outbound);
                self.core.connected = true;
                self.core.since_unix_ms = Some(unix_ms(now));
                self.core.consecutive_failures = 0;
                self.core.retry_in_ms = None;
                self.core.retry_ceiling_ms = None;
                self.last_contact = Some(now);
                self.offline.connected();
                self.stats.reset();
                self.snapshot_requested = false;
                if self.offline_removed {
                    info!("the Core is back: the offline policy no longer applies");
                    self.offline_removed = false;
                }
                self.send_pending_events();
            }
            FromCore::Message(msg) => {
                self.last_contact = Some(SystemTime::now());
                self.on_message(msg).await;
            }
            FromCore::Disconnected {
                error,
                unauthenticated: _,
                retry_in,
                retry_ceiling,
            } => {
                let now = SystemTime::now();
                if self.outbound.take().is_some() {
                    // The stream was up until now: the Core was reachable until now, however
                    // long ago it last sent something (an idle location sends nothing).
                    self.last_contact = Some(now);
                    self.core.since_unix_ms = Some(unix_ms(now));
                } else if self.core.since_unix_ms.is_none() {
                    // The first failure of this run: unreachable since the last contact a
                    // previous run recorded, if any.
                    self.core.since_unix_ms = Some(unix_ms(self.last_contact.unwrap_or(now)));
                }
                self.core.connected = false;
                self.offline.disconnected(self.mono());
                self.core.last_error = Some(error);
                self.core.consecutive_failures += 1;
                self.core.retry_in_ms = Some(retry_in.as_millis() as u64);
                self.core.retry_ceiling_ms = Some(retry_ceiling.as_millis() as u64);
                self.sent_up_to = 0;
            }
        }
    }

    /// The `Hello` of the next stream: the oldest pending events, at most
    /// `MAX_HELLO_EVENTS` of them; the rest follow as `PeerEvent`s once the stream is up.
    fn hello(&mut self) -> v1::Hello {
        let carried = &self.pending[..self.pending.len().min(MAX_HELLO_EVENTS)];
        self.sent_up_to = carried.last().map_or(0, |e| e.seq);
        v1::Hello {
            gateway_id: self.gateway_id.clone(),
            name: self.settings.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            applied_revision: self.applied_revision,
            pending_events: carried.iter().map(|e| e.to_proto()).collect(),
        }
    }

    async fn on_message(&mut self, msg: v1::CoreMessage) {
        use v1::core_message::Kind;
        if !matches!(msg.kind, Some(Kind::Delta(_))) {
            // In order: the deltas before this message are judged first.
            self.flush_deltas().await;
        }
        let update = match msg.kind {
            Some(Kind::Snapshot(snapshot)) => {
                self.core.snapshots += 1;
                self.snapshot_requested = false;
                info!(
                    revision = snapshot.revision,
                    peers = snapshot.location.as_ref().map_or(0, |l| l.peers.len()),
                    "snapshot from the Core"
                );
                location::on_snapshot(&snapshot)
            }
            Some(Kind::Delta(delta)) => {
                // Taken together with the deltas queued behind it (see `flush_deltas`).
                self.queued_deltas.push(delta);
                return;
            }
            Some(Kind::EventAck(ack)) => {
                // The Core has seen numbers up to this one: never use them again (an
                // older state file restored from a backup holds a lower next number).
                self.next_seq = self.next_seq.max(ack.up_to_seq.saturating_add(1));
                let before = self.pending.len();
                self.pending.retain(|e| e.seq > ack.up_to_seq);
                if self.pending.len() != before {
                    info!(
                        up_to_seq = ack.up_to_seq,
                        acknowledged = before - self.pending.len(),
                        "the Core stored peer events"
                    );
                    // A rewrite costs the whole backlog: while a long one drains, acked
                    // events leave the file with a later save (a crash in between only
                    // repeats events, and the Core takes a repeat as one event).
                    if self.pending.len() <= EVENTS_IN_FLIGHT {
                        self.save_state();
                    }
                }
                // Acknowledged events make room for the next ones of a backlog.
                self.send_pending_events();
                return;
            }
            Some(Kind::PeerActivity(activity)) => {
                self.on_peer_activity(&activity);
                return;
            }
            None => {
                warn!(
                    kind = message_kind(&msg),
                    "unknown message from the Core ignored"
                );
                return;
            }
        };
        self.on_update(update).await;
    }

    /// A new held revision (a snapshot, or deltas applied in place): it is applied at the
    /// end of the batch, and the HA book keeps only its peers.
    fn accepted(&mut self) {
        self.bound_ha_book();
        self.held_trimmed = false;
        self.last_rejected = None;
        self.unapplied = true;
    }

    async fn on_update(&mut self, update: Update) {
        match update {
            Update::Advanced { revision, renewed } => {
                // A peer authorized by a new MFA session starts a new inactivity timer.
                for key in &renewed {
                    self.mfa.forget(key);
                }
                debug!(revision, "deltas accepted");
                self.accepted();
            }
            Update::Accept(held) => {
                let revision = held.revision;
                // A peer authorized by a new MFA session starts a new inactivity timer.
                if let Some(old) = &self.held {
                    for (key, meta) in &held.valid.meta {
                        if old
                            .valid
                            .meta
                            .get(key)
                            .is_some_and(|m| m.mfa_session != meta.mfa_session)
                        {
                            self.mfa.forget(key);
                        }
                    }
                }
                debug!(revision, "revision accepted");
                self.held = Some(*held);
                self.accepted();
            }
            Update::Gap { held, base } if self.snapshot_requested => {
                debug!(
                    held,
                    base, "delta on another revision; the snapshot asked for is coming"
                );
            }
            Update::Gap { held, base } => {
                self.snapshot_requested = true;
                info!(
                    held,
                    base, "delta does not apply on the held revision: asking for a snapshot"
                );
                self.send_or_reconnect(Out::SnapshotRequest(v1::SnapshotRequest {
                    held_revision: held,
                    reason: format!("delta base {base} is not the held revision {held}"),
                }));
            }
            Update::Stale { held, got } => {
                info!(held, got, "ignoring an older revision");
            }
            Update::Reject {
                revision,
                rejections,
                listed,
            } => {
                // What was accepted before is applied and acknowledged first.
                self.apply_held().await;
                warn!(
                    revision,
                    count = rejections.len(),
                    first = %rejections[0],
                    "rejected a revision from the Core; keeping the last good state"
                );
                self.last_rejected = Some(Rejected {
                    revision,
                    items: rejections.iter().map(|r| r.to_string()).collect(),
                });
                self.send_applied(
                    revision,
                    Some(v1::ApplyError {
                        kind: v1::ApplyErrorKind::Invalid as i32,
                        message: summary(&rejections),
                        rejected: rejections.iter().map(Rejection::to_proto).collect(),
                    }),
                );
                if let Some(listed) = listed {
                    self.remove_unlisted(revision, &listed);
                }
            }
        }
    }

    /// Applies the removals of a rejected revision: held peers it no longer lists leave
    /// the held state (on disk first) and the interface.
    fn remove_unlisted(&mut self, revision: u64, listed: &BTreeSet<Key>) {
        let Some(held) = &mut self.held else { return };
        let gone = held.keep_only(listed);
        if gone.is_empty() {
            return;
        }
        self.bound_ha_book();
        self.held_trimmed = true;
        for key in &gone {
            info!(peer = %key, revision, "peer removed: the rejected revision no longer lists it");
        }
        self.save_state();
        if let Err(e) = self.reconcile(&format!("removals of rejected revision {revision}")) {
            warn!(error = %e, "removals of a rejected revision not complete; retried at the next resync");
        }
    }

    /// Judges the queued deltas: runs of deltas that follow each other become one update
    /// of the newest state ([`location::on_deltas`]).
    async fn flush_deltas(&mut self) {
        let deltas = std::mem::take(&mut self.queued_deltas);
        let mut at = 0;
        while at < deltas.len() {
            let rest = &deltas[at..];
            let (update, used) = match self.held.as_mut() {
                // The held content lost peers a rejected revision no longer listed: it is
                // not the base the Core means any more.
                Some(held) if self.held_trimmed => (
                    Update::Gap {
                        held: held.revision,
                        base: rest[0].base_revision,
                    },
                    1,
                ),
                held => location::on_deltas(held, rest),
            };
            let used = used.max(1);
            info!(
                deltas = used,
                base = rest[0].base_revision,
                revision = rest[used - 1].revision,
                "deltas from the Core"
            );
            at += used;
            self.on_update(update).await;
        }
    }

    /// Applies the held revision when one was accepted since the last apply, then tells
    /// the Core (`Applied`). One apply however many revisions arrived in between.
    pub(super) async fn apply_accepted(&mut self) {
        self.flush_deltas().await;
        self.apply_held().await;
    }

    /// [`Agent::apply_accepted`] without the queued deltas.
    async fn apply_held(&mut self) {
        if !std::mem::take(&mut self.unapplied) {
            return;
        }
        let Some(revision) = self.held.as_ref().map(|h| h.revision) else {
            return;
        };
        // On disk before the kernel changes: a crash in between restarts from this
        // revision, not from an older one that would re-add revoked peers.
        self.save_state();
        match self.reconcile(&format!("revision {revision}")) {
            Ok(_) => {
                self.applied_revision = revision;
                self.send_applied(revision, None);
                self.save_state();
                self.after_first_apply().await;
            }
            Err(e) => {
                let error = self.steps.to_apply_error().unwrap_or(v1::ApplyError {
                    kind: v1::ApplyErrorKind::Backend as i32,
                    message: e.to_string(),
                    rejected: vec![],
                });
                self.send_applied(revision, Some(error));
                self.save_state();
            }
        }
    }

    /// Signs of life other gateways saw: activity for MFA expiry here, and where each
    /// peer was last seen for a takeover.
    fn on_peer_activity(&mut self, activity: &v1::PeerActivity) {
        let (now, wall) = (self.mono(), SystemTime::now());
        for peer in &activity.peers {
            let Some(key) = Key::from_slice(&peer.public_key) else {
                debug!("peer activity with a malformed key ignored");
                continue;
            };
            let at = SystemTime::UNIX_EPOCH
                + std::time::Duration::from_millis(peer.last_active_ms.max(0) as u64);
            self.mfa.seen_elsewhere(&key, at, now, wall);
            self.ha_relayed(peer, key, at);
        }
    }

    /// `Applied` for `attempted`; on error the held revision stays the last good one.
    pub(super) fn send_applied(&mut self, attempted: u64, error: Option<v1::ApplyError>) {
        let revision = if error.is_some() {
            self.applied_revision
        } else {
            attempted
        };
        self.send_or_reconnect(Out::Applied(v1::Applied {
            revision,
            attempted_revision: attempted,
            error,
        }));
    }

    /// Sends pending events not sent on this stream yet, keeping at most
    /// `EVENTS_IN_FLIGHT` unacknowledged: a long backlog goes out as acks come back and
    /// never fills the queue that `Applied` and `Stats` need.
    pub(super) fn send_pending_events(&mut self) {
        if self.outbound.is_none() {
            return;
        }
        let in_flight = self
            .pending
            .iter()
            .take_while(|e| e.seq <= self.sent_up_to)
            .count();
        let unsent: Vec<v1::PeerEvent> = self
            .pending
            .iter()
            .filter(|e| e.seq > self.sent_up_to)
            .take(EVENTS_IN_FLIGHT.saturating_sub(in_flight))
            .map(|e| e.to_proto())
            .collect();
        for event in unsent {
            let seq = event.seq;
            if !self.send(Out::PeerEvent(event)) {
                // In order or not at all: the Core acknowledges by seq, and a later event
                // acknowledged before an earlier one arrived would drop the earlier one.
                break;
            }
            self.sent_up_to = seq;
        }
    }

    pub(super) fn send_stats(&mut self, observed: &Observed) {
        let Some(tx) = &self.outbound else {
            return;
        };
        if tx.capacity() < tx.max_capacity() / 2 {
            // The Core is not keeping up: skip this report (the next one carries the
            // changes) rather than queue megabytes of stats.
            self.stats.reset();
            return;
        }
        let peers = self.stats.changed(&observed.device.peers, &self.epochs);
        for stats in batches(peers, SystemTime::now(), STATS_MESSAGE_BYTES) {
            if !self.send(Out::Stats(stats)) {
                // The stream is gone or congested: report everything on the next one.
                self.stats.reset();
                return;
            }
        }
    }

    /// Queues a message the protocol cannot lose (Applied, SnapshotRequest). When it
    /// cannot be queued, the stream is given up: the next one starts with Hello and a
    /// snapshot, which carry the same information.
    fn send_or_reconnect(&mut self, kind: Out) {
        if self.outbound.is_some() && !self.send(kind) {
            warn!("the stream to the Core is congested: reconnecting to resynchronize");
            // Dropping the only sender ends the request stream; the connection task sees
            // the stream end and reconnects.
            self.outbound = None;
        }
    }

    /// Queues a message to the Core; false when there is no stream or it is congested.
    fn send(&mut self, kind: Out) -> bool {
        let Some(tx) = &self.outbound else {
            return false;
        };
        match tx.try_send(v1::GatewayMessage { kind: Some(kind) }) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "cannot queue a message to the Core");
                false
            }
        }
    }
}

fn summary(rejections: &[Rejection]) -> String {
    match rejections {
        [one] => format!("rejected: {one}"),
        [first, rest @ ..] => format!("rejected: {first} (and {} more)", rest.len()),
        [] => "rejected".into(),
    }
}
