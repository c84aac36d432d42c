//! The Core protocol on the machine's side: Hello, snapshots, deltas (judged together at
//! the end of a run), acks, peer activity, the stream's ups and downs, and what the agent
//! sends back (Applied, Stats, PeerEvent, SnapshotRequest).
//!
//! An accepted revision becomes the held one at once and is applied by the batch's end
//! ([`Machine::handle_core_batch_end`]): a burst of deltas is one apply of the newest state.
//! A rejected revision: what was accepted before is applied first, then the rejection is
//! reported and its removals applied.

use std::collections::BTreeSet;
use std::time::Duration;

use gatehouse_proto::v1::{self, gateway_message::Kind as Out};
use gatehouse_proto::MAX_HELLO_EVENTS;
use tracing::{debug, info, warn};

use super::reconcile::{Then, Wait};
use super::{Action, Job, Machine, Now, SendMode};
use crate::agent::client::message_kind;
use crate::agent::status::{unix_ms, Rejected};
use crate::location::{self, Update};
use crate::model::Key;
use crate::state::Record;
use crate::stats::Report;
use crate::validate::Rejection;

/// Peer events sent and not yet acknowledged, at most (a small part of the outbound queue).
const EVENTS_IN_FLIGHT: usize = 1000;
/// Largest `Stats` message the agent sends: a quarter of the protocol's 1 MiB. A report's
/// messages are built one at a time as the stream takes them, and one being built holds
/// about 6 times its encoded size (memory_bounds), so smaller messages keep a report of
/// every peer light; at 50,000 peers it is about 12 of them.
const STATS_MESSAGE_BYTES: usize = 256 * 1024;

impl Machine {
    /// The `Hello` of the next stream: the oldest pending events, at most
    /// `MAX_HELLO_EVENTS` of them; the rest follow as `PeerEvent`s once the stream is up.
    /// Call [`Machine::handle_core_batch_end`] first.
    pub fn handle_hello_wanted(&mut self, now: Now) -> v1::Hello {
        self.input(now);
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

    /// A stream is open (the driver holds its sender).
    pub fn handle_connected(&mut self, now: Now) {
        self.input(now);
        self.stream_up = true;
        self.core.streams += 1;
        self.core.connected = true;
        self.core.since_unix_ms = Some(unix_ms(now.wall));
        self.core.consecutive_failures = 0;
        self.core.retry_in_ms = None;
        self.core.retry_ceiling_ms = None;
        self.last_contact = Some(now.wall);
        self.offline.connected();
        self.stats.reset();
        self.snapshot_requested = false;
        if self.offline_removed {
            info!("the Core is back: the offline policy no longer applies");
            self.offline_removed = false;
        }
        self.spawn(Job::SendPendingEvents);
        self.run();
    }

    /// The stream ended or could not be opened; the next attempt comes after `retry_in`.
    pub fn handle_disconnected(
        &mut self,
        error: String,
        retry_in: Duration,
        retry_ceiling: Duration,
        now: Now,
    ) {
        self.input(now);
        if std::mem::take(&mut self.stream_up) {
            // The stream was up until now: the Core was reachable until now, however long
            // ago it last sent something (an idle location sends nothing).
            self.last_contact = Some(now.wall);
            self.core.since_unix_ms = Some(unix_ms(now.wall));
        } else if self.core.since_unix_ms.is_none() {
            // The first failure of this run: unreachable since the last contact a previous
            // run recorded, if any.
            self.core.since_unix_ms = Some(unix_ms(self.last_contact.unwrap_or(now.wall)));
        }
        self.core.connected = false;
        self.offline.disconnected(now.mono);
        self.core.last_error = Some(error);
        self.core.consecutive_failures += 1;
        self.core.retry_in_ms = Some(retry_in.as_millis() as u64);
        self.core.retry_ceiling_ms = Some(retry_ceiling.as_millis() as u64);
        self.sent_up_to = 0;
        self.run();
    }

    /// A message of the current batch.
    pub fn handle_core_message(&mut self, msg: v1::CoreMessage, now: Now) {
        self.input(now);
        self.last_contact = Some(now.wall);
        if !matches!(msg.kind, Some(v1::core_message::Kind::Delta(_))) {
            // In order: the deltas before this message are judged first.
            self.spawn(Job::FlushDeltas);
        }
        self.spawn(Job::CoreMessage(Box::new(msg)));
        self.run();
    }

    /// The end of a batch of Core messages: what was accepted is applied, once.
    pub fn handle_core_batch_end(&mut self, now: Now) {
        self.input(now);
        self.spawn(Job::FlushDeltas);
        self.spawn(Job::ApplyHeld);
        self.run();
    }

    pub(super) fn on_message(&mut self, msg: v1::CoreMessage) {
        use v1::core_message::Kind;
        let update = match msg.kind {
            Some(Kind::Snapshot(snapshot)) => {
                self.core.snapshots += 1;
                self.snapshot_requested = false;
                info!(
                    revision = snapshot.revision,
                    peers = snapshot.location.as_ref().map_or(0, |l| l.peers.len()),
                    "snapshot from the Core"
                );
                location::on_snapshot(snapshot)
            }
            Some(Kind::Delta(delta)) => {
                // Taken together with the deltas queued behind it (see `flush_deltas`).
                self.queued_deltas.push_back(delta);
                return;
            }
            Some(Kind::EventAck(ack)) => {
                // The Core has seen numbers up to this one: never use them again (an older
                // state file restored from a backup holds a lower next number).
                self.next_seq = self.next_seq.max(ack.up_to_seq.saturating_add(1));
                let before = self.pending.len();
                self.pending.retain(|e| e.seq > ack.up_to_seq);
                if self.pending.len() != before {
                    info!(
                        up_to_seq = ack.up_to_seq,
                        acknowledged = before - self.pending.len(),
                        "the Core stored peer events"
                    );
                    // An `Acked` record is small; a full rewrite costs the whole backlog:
                    // while a long one drains without a journal, acked events leave the
                    // file with a later save (a crash in between only repeats events, and
                    // the Core takes a repeat as one event).
                    if self.pending.len() <= EVENTS_IN_FLIGHT || !self.disk.needs_full() {
                        self.spawn(Job::Write(vec![Record::Acked {
                            up_to: ack.up_to_seq,
                        }]));
                    }
                }
                // Acknowledged events make room for the next ones of a backlog.
                self.spawn(Job::SendPendingEvents);
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
        self.on_update(update);
    }

    /// A new held revision (a snapshot, or deltas applied in place): applied at the end of
    /// the batch; the HA book keeps only its peers.
    fn accepted(&mut self) {
        self.accepted_keeping_book();
        self.bound_ha_book();
    }

    /// [`Machine::accepted`] without bounding the HA book (deltas forget their removed
    /// peers from it themselves, in O(changed)).
    fn accepted_keeping_book(&mut self) {
        self.held_trimmed = false;
        self.last_rejected = None;
        self.unapplied = true;
    }

    fn on_update(&mut self, update: Update) {
        match update {
            Update::Advanced { revision, renewed } => {
                // A peer authorized by a new MFA session starts a new inactivity timer.
                for key in &renewed {
                    self.mfa.forget(key);
                }
                debug!(revision, "deltas accepted");
                self.accepted_keeping_book();
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
                // Not reached by deltas: the next write is the full state, the next plan
                // covers every peer.
                self.disk.forget();
                self.scope = None;
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
                self.send_must(Out::SnapshotRequest(v1::SnapshotRequest {
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
                self.spawn(Job::ApplyHeld);
                self.spawn(Job::Rejected {
                    revision,
                    items: rejections,
                    listed,
                });
            }
        }
    }

    /// A rejected revision, after what was accepted before is applied: reported, and the
    /// peers it no longer lists leave the held state (on disk first) and the interface.
    pub(super) fn rejected(
        &mut self,
        revision: u64,
        rejections: Vec<Rejection>,
        listed: Option<BTreeSet<Key>>,
    ) {
        warn!(
            revision,
            count = rejections.len(),
            first = %rejections.first().map(|r| r.to_string()).unwrap_or_default(),
            "rejected a revision from the Core; keeping the last good state"
        );
        self.last_rejected = Some(Rejected {
            revision,
            items: rejections.iter().map(|r| r.to_string()).collect(),
        });
        let gone = match (&listed, &mut self.held) {
            (Some(listed), Some(held)) => held.keep_only(listed),
            _ => vec![],
        };
        if !gone.is_empty() {
            self.bound_ha_book();
            self.held_trimmed = true;
            self.disk.forget();
            for key in &gone {
                info!(peer = %key, revision, "peer removed: the rejected revision no longer lists it");
            }
            self.spawn(Job::Save);
            self.spawn(Job::Reconcile {
                trigger: format!("removals of rejected revision {revision}"),
                read: false,
                save_first: false,
                then: Then::RejectedRemovals { revision },
            });
        }
        self.send_applied(
            revision,
            Some(v1::ApplyError {
                kind: v1::ApplyErrorKind::Invalid as i32,
                message: summary(&rejections),
                rejected: rejections.iter().map(Rejection::to_proto).collect(),
            }),
        );
    }

    /// Judges the queued deltas: a run of deltas that follow each other becomes one update
    /// of the newest state ([`location::on_deltas`]); the rest are judged after it.
    pub(super) fn flush_deltas(&mut self) {
        if self.queued_deltas.is_empty() {
            return;
        }
        let deltas: Vec<v1::Delta> = std::mem::take(&mut self.queued_deltas).into();
        let (update, used) = match self.held.as_mut() {
            // The held content lost peers a rejected revision no longer listed: it is not
            // the base the Core means any more.
            Some(held) if self.held_trimmed => (
                Update::Gap {
                    held: held.revision,
                    base: deltas[0].base_revision,
                },
                1,
            ),
            held => location::on_deltas(held, &deltas),
        };
        let used = used.clamp(1, deltas.len());
        if matches!(update, Update::Advanced { .. }) {
            self.disk.deltas_accepted(&deltas[..used]);
            self.touched(&deltas[..used]);
            // The HA book keeps only held peers: those the deltas removed leave it.
            for change in deltas[..used].iter().flat_map(|d| &d.changes) {
                if let Some(v1::change::Kind::RemovePeer(k)) = &change.kind {
                    if let Some(key) = Key::from_slice(k) {
                        self.ha.book.forget(&key);
                    }
                }
            }
        }
        info!(
            deltas = used,
            base = deltas[0].base_revision,
            revision = deltas[used - 1].revision,
            "deltas from the Core"
        );
        self.queued_deltas = deltas.into_iter().skip(used).collect();
        self.on_update(update);
        if !self.queued_deltas.is_empty() {
            self.spawn(Job::FlushDeltas);
        }
    }

    /// Applies the held revision when one was accepted since the last apply, then tells
    /// the Core (`Applied`). One apply however many revisions arrived in between; the
    /// state is saved before it.
    pub(super) fn apply_held(&mut self) {
        if !std::mem::take(&mut self.unapplied) {
            return;
        }
        let Some(revision) = self.held.as_ref().map(|h| h.revision) else {
            return;
        };
        // Planned on the touched peers only when the model holds every earlier revision.
        let scope = self.scope.take();
        self.apply_scope = scope.filter(|_| self.model.is_some());
        self.reconcile(
            format!("revision {revision}"),
            false,
            true,
            Then::ApplyHeld { revision },
        );
    }

    /// Signs of life other gateways saw: activity for MFA expiry here, and where each peer
    /// was last seen for a takeover.
    fn on_peer_activity(&mut self, activity: &v1::PeerActivity) {
        let Now { mono, wall } = self.now;
        for peer in &activity.peers {
            let Some(key) = Key::from_slice(&peer.public_key) else {
                debug!("peer activity with a malformed key ignored");
                continue;
            };
            let at = std::time::SystemTime::UNIX_EPOCH
                + Duration::from_millis(peer.last_active_ms.max(0) as u64);
            self.mfa.seen_elsewhere(&key, at, mono, wall);
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
        self.send_must(Out::Applied(v1::Applied {
            revision,
            attempted_revision: attempted,
            error,
        }));
    }

    /// Sends pending events not sent on this stream yet, keeping at most
    /// `EVENTS_IN_FLIGHT` unacknowledged: a long backlog goes out as acks come back and
    /// never fills the queue that `Applied` and `Stats` need.
    pub(super) fn send_pending_events(&mut self) {
        if !self.stream_up {
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
        if unsent.is_empty() {
            return;
        }
        let seqs = unsent.iter().map(|e| e.seq).collect();
        let messages = unsent
            .into_iter()
            .map(|e| v1::GatewayMessage {
                kind: Some(Out::PeerEvent(e)),
            })
            .collect();
        // In order or not at all: the Core acknowledges by seq, and a later event
        // acknowledged before an earlier one arrived would drop the earlier one.
        self.send(messages, SendMode::Events(seqs));
    }

    /// The stats report of the model just read: the peers whose counters changed since
    /// the last report, as they read now. None while no stream is up (the tracker keeps
    /// its baseline).
    pub(super) fn stats_changed(&mut self) -> Option<Report> {
        let model = self.model.as_mut()?;
        let changed = self
            .stream_up
            .then(|| self.stats.changed(model, &self.epochs))?;
        Some(Report::new(changed, self.now.wall, STATS_MESSAGE_BYTES))
    }

    /// Sends a stats report taken by [`Machine::stats_changed`].
    pub(super) fn send_stats(&mut self, report: Option<Report>) {
        let Some(report) = report else {
            return;
        };
        if !self.stream_up {
            // The stream went down since the read: everything is reported next time.
            self.stats.reset();
            return;
        }
        if report.is_empty() {
            // Nothing changed since the last report: the Core is up to date with this read.
            self.counts.stats.synced_unix_ms = Some(unix_ms(self.now.wall));
        } else {
            self.counts.stats_in_flight = Some(self.now.wall);
            self.request(Action::SendStats(report), Wait::Sent(SendMode::Stats));
        }
    }

    /// A message the protocol cannot lose (Applied, SnapshotRequest). When it cannot be
    /// queued, the stream is given up: the next one starts with Hello and a snapshot,
    /// which carry the same information.
    fn send_must(&mut self, kind: Out) {
        if self.stream_up {
            let messages = vec![v1::GatewayMessage { kind: Some(kind) }];
            self.send(messages, SendMode::Must);
        }
    }

    fn send(&mut self, messages: Vec<v1::GatewayMessage>, mode: SendMode) {
        self.request(
            Action::Send {
                messages,
                mode: mode.clone(),
            },
            Wait::Sent(mode),
        );
    }

    /// How many of the messages of a `Send` were queued.
    pub(super) fn sent(&mut self, mode: SendMode, queued: usize) {
        match mode {
            SendMode::Must if queued == 0 => {
                warn!("the stream to the Core is congested: reconnecting to resynchronize");
                // The driver dropped the only sender: the connection task sees the stream
                // end and reconnects.
                self.stream_up = false;
            }
            SendMode::Must => {}
            SendMode::Events(seqs) => {
                if let Some(seq) = queued.checked_sub(1).and_then(|i| seqs.get(i)) {
                    self.sent_up_to = *seq;
                }
            }
            // Queued; a refused report comes back as `Outcome::StatsRefused`.
            SendMode::Stats => {
                self.counts.stats.reports += 1;
                if let Some(read) = self.counts.stats_in_flight.take() {
                    self.counts.stats.synced_unix_ms = Some(unix_ms(read));
                }
            }
        }
    }

    /// A stats report the stream could not take (congested or gone): its peers are
    /// reported again at the next tick (a new stream reports everyone anyway).
    pub(super) fn stats_refused(&mut self, report: Report) {
        self.counts.stats.refused += 1;
        self.counts.stats_in_flight = None;
        self.stats.refused(self.model.as_mut(), &report);
    }
}

fn summary(rejections: &[Rejection]) -> String {
    match rejections {
        [one] => format!("rejected: {one}"),
        [first, rest @ ..] => format!("rejected: {first} (and {} more)", rest.len()),
        [] => "rejected".into(),
    }
}
