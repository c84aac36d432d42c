//! The SQLite store: locations, tokens, peers, MFA sessions, gateways, stats and events.
//!
//! Every admin change runs in one transaction that also bumps the location's revision and
//! returns the `Delta` describing it; the caller broadcasts that delta while it still
//! holds the store, so deltas leave in revision order. Snapshots are built with one query
//! over the peers (no per-peer round trips).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use gatehouse_proto::v1 as pb;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::api;
use crate::audit::{self, Audit};
use crate::error::CoreError;
use crate::page::Page;
use crate::peer_index::{Indexes, Outcome};
use crate::relay;
use crate::stats::{self, CounterRun};
use crate::validate;
use crate::whereabouts;

type Result<T> = std::result::Result<T, CoreError>;

/// The Core's database. Not `Sync`: the server wraps it in a mutex.
pub struct Store {
    pub(crate) conn: Connection,
    /// Stored items the shared rules reject: reported, and left out of what is served.
    pub(crate) audit: Audit,
    /// Per location, the index a peer change is checked against (O(change)).
    pub(crate) indexes: Indexes,
}

/// What a stats batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StatsOutcome {
    pub stored: usize,
    /// Rows for public keys that are not peers of the location (ignored).
    pub unknown: usize,
    /// Peers whose location-wide view this batch changed (a newer sign of life, or the
    /// client seen at another endpoint), with the new view: relayed at once to the other
    /// gateways (protocol rule 8, design §12).
    pub relay: Vec<pb::ActivePeer>,
}

/// A gateway row, without the live `connected` flag.
pub type GatewayRow = api::GatewayView;

impl Store {
    /// Opens (or creates) the database and its schema.
    pub fn open(path: &Path) -> Result<Store> {
        crate::dbfile::prepare(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        crate::tokens::init(&conn)?;
        crate::whereabouts::init(&conn)?;
        crate::dbfile::restrict(path)?;
        let mut store = Store {
            conn,
            audit: Audit::default(),
            indexes: Indexes::default(),
        };
        store.audit_all()?;
        Ok(store)
    }

    // ------------------------------------------------------------------- audit --

    /// Checks every stored location against the shared rules (at start) and logs each
    /// failing item.
    fn audit_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self
            .conn
            .prepare("SELECT id FROM locations ORDER BY id")?
            .query_map([], |r| r.get::<_, i64>(0))?
            .map(|r| r.map(|id| id as u64))
            .collect::<rusqlite::Result<_>>()?;
        for id in ids {
            self.audit_location(id)?;
            for f in self
                .audit
                .get(id)
                .map(|a| a.findings.clone())
                .unwrap_or_default()
            {
                tracing::warn!(
                    location = f.location,
                    peer = f.peer_id,
                    item = %f.item,
                    reason = %f.reason,
                    served = %f.served,
                    "stored content fails the shared rules"
                );
            }
        }
        Ok(())
    }

    /// Checks one location as stored (every peer, with or without an MFA session).
    fn audit_location(&mut self, id: u64) -> Result<()> {
        let loc = load_location(&self.conn, id)?;
        let rows = load_peers(&self.conn, id, None)?;
        let location = pb::Location {
            id,
            name: loc.name.clone(),
            interface: Some(loc.interface()),
            peers: rows.iter().filter_map(|r| r.desired(false)).collect(),
            firewall: loc.firewall.as_ref().map(|p| firewall_pb(Some(p))),
            mfa: Some(loc.mfa_settings()),
        };
        let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
        self.audit.set(id, audit::check(&location, &ids));
        Ok(())
    }

    /// Every stored item that fails the shared rules, and what is served instead.
    pub fn audit_findings(&self) -> Vec<audit::Finding> {
        self.audit.findings()
    }

    /// A delta as served: while the location has findings it is checked again (a change
    /// may have fixed them) and the failing items are left out.
    pub fn served_delta(&mut self, location: u64, mut delta: pb::Delta) -> Result<pb::Delta> {
        if self.audit.has_findings(location) {
            self.audit_location(location)?;
            if let Some(a) = self.audit.get(location) {
                a.serve_delta(&mut delta);
            }
        }
        Ok(delta)
    }

    /// Writes the WAL back into the database file (done on a graceful stop).
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    // --------------------------------------------------------------- locations --

    pub fn create_location(
        &mut self,
        new: api::NewLocation,
        now: i64,
    ) -> Result<api::LocationView> {
        let name = validate::name(&new.name)?;
        let listen_port = validate::listen_port(new.listen_port)?;
        let addresses = validate::addresses("addresses", &new.addresses)?;
        let mtu = validate::mtu(new.mtu)?;
        let fwmark = validate::fwmark(new.fwmark)?;
        let threshold = validate::threshold(new.mfa, new.disconnect_threshold_secs)?;
        let private_key = match &new.private_key {
            Some(k) => validate::private_key("private_key", k)?,
            None => x25519_dalek::StaticSecret::random().to_bytes(),
        };
        self.conn.execute(
            "INSERT INTO locations (name, private_key, listen_port, addresses, mtu, fwmark, mfa,
                 disconnect_threshold_secs, firewall, revision, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, 1, ?9)",
            params![
                name,
                private_key.as_slice(),
                listen_port,
                addresses.join("\n"),
                mtu,
                fwmark,
                new.mfa,
                threshold,
                now
            ],
        )?;
        let id = self.conn.last_insert_rowid() as u64;
        self.location(id)
    }

    pub fn location(&self, id: u64) -> Result<api::LocationView> {
        Ok(load_location(&self.conn, id)?.view())
    }

    pub fn patch_location(
        &mut self,
        id: u64,
        patch: api::LocationPatch,
    ) -> Result<(api::LocationView, pb::Delta)> {
        let tx = self.conn.transaction()?;
        let old = load_location(&tx, id)?;
        let mut new = old.clone();
        if let Some(name) = &patch.name {
            new.name = validate::name(name)?;
        }
        if let Some(v) = patch.listen_port {
            new.listen_port = validate::listen_port(v)?;
        }
        if let Some(v) = &patch.addresses {
            new.addresses = validate::addresses("addresses", v)?;
        }
        if let Some(v) = patch.mtu {
            new.mtu = validate::mtu(v)?;
        }
        if let Some(v) = patch.fwmark {
            new.fwmark = validate::fwmark(v)?;
        }
        if let Some(v) = patch.mfa {
            new.mfa = v;
        }
        new.threshold = validate::threshold(
            new.mfa,
            patch
                .disconnect_threshold_secs
                .unwrap_or(u64::from(new.threshold)),
        )?;
        if let Some(k) = &patch.private_key {
            new.private_key = validate::private_key("private_key", k)?;
        }
        if old.interface() != new.interface() {
            let before = cross_check(&tx, &old, &[])?.unchanged.len();
            let after = cross_check(&tx, &new, &[])?;
            if let Some((k, _, reason)) = after.unchanged.get(before) {
                let field = if reason.contains("own public key") {
                    "private_key"
                } else {
                    "addresses"
                };
                return Err(CoreError::conflict(field, format!("peer {k}: {reason}")));
            }
            after.into_result(|_, f, _| f.to_owned())?;
        }
        tx.execute(
            "UPDATE locations SET name = ?2, private_key = ?3, listen_port = ?4, addresses = ?5,
                 mtu = ?6, fwmark = ?7, mfa = ?8, disconnect_threshold_secs = ?9 WHERE id = ?1",
            params![
                id as i64,
                new.name,
                new.private_key.as_slice(),
                new.listen_port,
                new.addresses.join("\n"),
                new.mtu,
                new.fwmark,
                new.mfa,
                new.threshold
            ],
        )?;
        let mut changes = Vec::new();
        if old.interface() != new.interface() {
            changes.push(change(pb::change::Kind::SetInterface(new.interface())));
        }
        if old.mfa_settings() != new.mfa_settings() {
            changes.push(change(pb::change::Kind::SetMfa(new.mfa_settings())));
        }
        if old.mfa != new.mfa {
            // Which peers are desired depends on MFA: diff the two peer sets.
            let rows = load_peers(&tx, id, None)?;
            let before = desired_map(old.mfa, &rows);
            let after = desired_map(new.mfa, &rows);
            for key in before.keys().filter(|k| !after.contains_key(*k)) {
                changes.push(change(pb::change::Kind::RemovePeer(key.clone())));
            }
            for (key, peer) in &after {
                if before.get(key) != Some(peer) {
                    changes.push(change(pb::change::Kind::UpsertPeer(peer.clone())));
                }
            }
        }
        let delta = bump(&tx, id, changes)?;
        // The interface's key and addresses enter the peer check: rebuilt at the next one.
        self.indexes.forget(id);
        tx.commit()?;
        let mut view = new.view();
        view.revision = delta.revision;
        Ok((view, delta))
    }

    pub fn put_firewall(
        &mut self,
        id: u64,
        policy: api::FirewallPolicy,
    ) -> Result<(api::FirewallPolicy, pb::Delta)> {
        let mut policy = policy;
        validate::firewall(&mut policy)?;
        let tx = self.conn.transaction()?;
        load_location(&tx, id)?;
        let json =
            serde_json::to_string(&policy).map_err(|e| CoreError::Internal(e.to_string()))?;
        tx.execute(
            "UPDATE locations SET firewall = ?2 WHERE id = ?1",
            params![id as i64, json],
        )?;
        let change = change(pb::change::Kind::SetFirewall(firewall_pb(Some(&policy))));
        let delta = bump(&tx, id, vec![change])?;
        tx.commit()?;
        Ok((policy, delta))
    }

    // -------------------------------------------------------------------- peers --

    /// Adds one or many peers in one transaction and one revision.
    pub fn add_peers(
        &mut self,
        location: u64,
        peers: Vec<api::NewPeer>,
        now: i64,
        item_prefix: bool,
    ) -> Result<(Vec<api::PeerView>, pb::Delta)> {
        let tx = self.conn.transaction()?;
        let loc = load_location(&tx, location)?;
        self.indexes
            .prepare(location, || stored_location(&tx, &loc))?;
        let mut ids = Vec::with_capacity(peers.len());
        let mut request_ips = Vec::with_capacity(peers.len());
        {
            let mut insert = tx.prepare(
                "INSERT INTO peers (location_id, public_key, preshared_key, allowed_ips,
                     persistent_keepalive, endpoint, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut key_taken =
                tx.prepare("SELECT 1 FROM peers WHERE location_id = ?1 AND public_key = ?2")?;
            let mut claim = ClaimIps::new(&tx)?;
            for (i, p) in peers.iter().enumerate() {
                let prefix = if item_prefix {
                    format!("[{i}].")
                } else {
                    String::new()
                };
                let wrap = |e: CoreError| e.in_item(&prefix);
                let public_key = validate::public_key("public_key", &p.public_key).map_err(wrap)?;
                let psk = p
                    .preshared_key
                    .as_deref()
                    .map(|k| validate::preshared_key("preshared_key", k))
                    .transpose()
                    .map_err(wrap)?;
                let ips = validate::allowed_ips("allowed_ips", &p.allowed_ips).map_err(wrap)?;
                let keepalive = validate::keepalive(p.persistent_keepalive).map_err(wrap)?;
                let endpoint =
                    validate::endpoint(p.endpoint.as_deref().unwrap_or("")).map_err(wrap)?;
                if key_taken.exists(params![location as i64, public_key.as_slice()])? {
                    return Err(wrap(CoreError::conflict(
                        "public_key",
                        "a peer with this public key exists in the location",
                    )));
                }
                insert.execute(params![
                    location as i64,
                    public_key.as_slice(),
                    psk.as_ref().map(|k| k.as_slice()),
                    validate::sorted_ips(&ips).join("\n"),
                    keepalive,
                    endpoint,
                    now
                ])?;
                let id = tx.last_insert_rowid();
                claim.claim(location, id, &ips).map_err(wrap)?;
                ids.push(id as u64);
                request_ips.push(ips);
            }
        }
        let rows = load_peers_by_ids(&tx, location, &ids)?;
        let added: Vec<pb::Peer> = rows.iter().filter_map(|r| r.desired(false)).collect();
        let (found, checked) = match self.indexes.check(location, &[], &added) {
            Outcome::Checked(found, checked) => (found, checked),
            Outcome::Full(checked) => (cross_check(&tx, &loc, &ids)?, checked),
        };
        found.only_peers().into_result(|k, field, stored| {
            let prefix = if item_prefix {
                format!("[{k}].")
            } else {
                String::new()
            };
            let field = validate::request_field(field, stored, &request_ips[k]);
            format!("{prefix}{field}")
        })?;
        let changes = rows
            .iter()
            .filter_map(|r| r.desired(loc.mfa))
            .map(|p| change(pb::change::Kind::UpsertPeer(p)))
            .collect();
        let delta = bump(&tx, location, changes)?;
        commit(tx, &mut self.indexes, location, checked.as_ref())?;
        Ok((rows.iter().map(|r| r.view(loc.mfa)).collect(), delta))
    }

    /// A page of the location's peers, by id.
    pub fn peers(&self, location: u64, page: &Page) -> Result<Vec<api::PeerView>> {
        let loc = load_location(&self.conn, location)?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "{PEER_SELECT} AND p.id > ?2 ORDER BY p.id LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(
                params![location as i64, page.after_id(), page.limit as i64],
                peer_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows.iter().map(|r| r.view(loc.mfa)).collect())
    }

    pub fn patch_peer(
        &mut self,
        location: u64,
        peer: u64,
        patch: api::PeerPatch,
    ) -> Result<(api::PeerView, pb::Delta)> {
        let tx = self.conn.transaction()?;
        let loc = load_location(&tx, location)?;
        let old = load_peer(&tx, location, peer)?;
        self.indexes
            .prepare(location, || stored_location(&tx, &loc))?;
        let mut new = old.clone();
        if let Some(k) = &patch.public_key {
            new.public_key = validate::public_key("public_key", k)?.to_vec();
            if new.public_key != old.public_key {
                let taken: bool = tx
                    .prepare("SELECT 1 FROM peers WHERE location_id = ?1 AND public_key = ?2")?
                    .exists(params![location as i64, new.public_key])?;
                if taken {
                    return Err(CoreError::conflict(
                        "public_key",
                        "a peer with this public key exists in the location",
                    ));
                }
            }
        }
        if let Some(k) = &patch.preshared_key {
            new.preshared_key = if k.is_empty() {
                None
            } else {
                Some(validate::preshared_key("preshared_key", k)?.to_vec())
            };
        }
        if let Some(v) = patch.persistent_keepalive {
            new.keepalive = validate::keepalive(v)?;
        }
        if let Some(e) = &patch.endpoint {
            new.endpoint = validate::endpoint(e)?;
        }
        let mut request_ips = Vec::new();
        if let Some(ips) = &patch.allowed_ips {
            let ips = validate::allowed_ips("allowed_ips", ips)?;
            request_ips.clone_from(&ips);
            new.allowed_ips = validate::sorted_ips(&ips);
            tx.execute("DELETE FROM peer_ips WHERE peer_id = ?1", [peer as i64])?;
            ClaimIps::new(&tx)?.claim(location, peer as i64, &ips)?;
        }
        tx.execute(
            "UPDATE peers SET public_key = ?2, preshared_key = ?3, allowed_ips = ?4,
                 persistent_keepalive = ?5, endpoint = ?6 WHERE id = ?1",
            params![
                peer as i64,
                new.public_key,
                new.preshared_key,
                new.allowed_ips.join("\n"),
                new.keepalive,
                new.endpoint
            ],
        )?;
        let removed = if new.public_key == old.public_key {
            Vec::new()
        } else {
            vec![old.public_key.clone()]
        };
        let changed: Vec<pb::Peer> = new.desired(false).into_iter().collect();
        let (found, checked) = match self.indexes.check(location, &removed, &changed) {
            Outcome::Checked(found, checked) => (found, checked),
            Outcome::Full(checked) => (cross_check(&tx, &loc, &[peer])?, checked),
        };
        found
            .only_peers()
            .into_result(|_, field, stored| validate::request_field(field, stored, &request_ips))?;
        let mut changes = Vec::new();
        let (was, is) = (old.desired(loc.mfa), new.desired(loc.mfa));
        if let Some(was) = &was {
            if is.as_ref().map(|p| &p.public_key) != Some(&was.public_key) {
                changes.push(change(pb::change::Kind::RemovePeer(was.public_key.clone())));
            }
        }
        if let Some(is) = is {
            if was.as_ref() != Some(&is) {
                changes.push(change(pb::change::Kind::UpsertPeer(is)));
            }
        }
        let delta = bump(&tx, location, changes)?;
        commit(tx, &mut self.indexes, location, checked.as_ref())?;
        Ok((new.view(loc.mfa), delta))
    }

    pub fn delete_peer(&mut self, location: u64, peer: u64) -> Result<pb::Delta> {
        let tx = self.conn.transaction()?;
        let loc = load_location(&tx, location)?;
        let old = load_peer(&tx, location, peer)?;
        tx.execute("DELETE FROM peers WHERE id = ?1", [peer as i64])?;
        let changes = old
            .desired(loc.mfa)
            .map(|p| change(pb::change::Kind::RemovePeer(p.public_key)))
            .into_iter()
            .collect();
        let delta = bump(&tx, location, changes)?;
        if let Err(e) = tx.commit() {
            self.indexes.forget(location);
            return Err(e.into());
        }
        self.indexes.remove(location, &old.public_key);
        Ok(delta)
    }

    /// Starts a new MFA session for the peer (ending the current one, if any).
    pub fn start_mfa(
        &mut self,
        location: u64,
        peer: u64,
        preshared_key: Option<&str>,
        now: i64,
    ) -> Result<(api::MfaSessionStarted, pb::Delta)> {
        let psk = match preshared_key {
            Some(k) => validate::preshared_key("preshared_key", k)?,
            None => rand::random::<[u8; 32]>(),
        };
        let tx = self.conn.transaction()?;
        let loc = load_location(&tx, location)?;
        if !loc.mfa {
            return Err(CoreError::conflict("mfa", "the location does not use MFA"));
        }
        load_peer(&tx, location, peer)?;
        tx.execute(
            "UPDATE mfa_sessions SET ended_at = ?2, end_reason = 'replaced'
             WHERE peer_id = ?1 AND ended_at IS NULL",
            params![peer as i64, now],
        )?;
        tx.execute(
            "INSERT INTO mfa_sessions (peer_id, preshared_key, started_at) VALUES (?1, ?2, ?3)",
            params![peer as i64, psk.as_slice(), now],
        )?;
        let session_id = tx.last_insert_rowid() as u64;
        let row = load_peer(&tx, location, peer)?;
        let changes = row
            .desired(true)
            .map(|p| change(pb::change::Kind::UpsertPeer(p)))
            .into_iter()
            .collect();
        let delta = bump(&tx, location, changes)?;
        tx.commit()?;
        let started = api::MfaSessionStarted {
            session_id,
            preshared_key: B64.encode(psk),
            revision: delta.revision,
        };
        Ok((started, delta))
    }

    /// Ends the peer's active MFA session: the peer leaves the desired state.
    pub fn end_mfa(&mut self, location: u64, peer: u64, now: i64) -> Result<pb::Delta> {
        let tx = self.conn.transaction()?;
        let loc = load_location(&tx, location)?;
        let row = load_peer(&tx, location, peer)?;
        if row.session.is_none() {
            return Err(CoreError::NotFound {
                msg: "the peer has no active MFA session".into(),
                field: Some("mfa_session".into()),
            });
        }
        let delta = end_session(&tx, &loc, &row, now, "admin")?;
        tx.commit()?;
        Ok(delta)
    }

    // --------------------------------------------------------- gateway protocol --

    /// The whole location at its current revision.
    pub fn snapshot(&self, location: u64) -> Result<pb::Snapshot> {
        let mut snapshot = self.stored_snapshot(location)?;
        if let (Some(a), Some(loc)) = (self.audit.get(location), &mut snapshot.location) {
            a.serve_location(loc);
        }
        Ok(snapshot)
    }

    fn stored_snapshot(&self, location: u64) -> Result<pb::Snapshot> {
        let loc = load_location(&self.conn, location)?;
        let peers = load_peers(&self.conn, location, None)?
            .iter()
            .filter_map(|r| r.desired(loc.mfa))
            .collect();
        Ok(pb::Snapshot {
            revision: loc.revision,
            location: Some(pb::Location {
                id: location,
                name: loc.name.clone(),
                interface: Some(loc.interface()),
                peers,
                firewall: Some(firewall_pb(loc.firewall.as_ref())),
                mfa: Some(loc.mfa_settings()),
            }),
        })
    }

    /// The location's view of where each peer of `snapshot` is (latest activity and
    /// endpoint), in the snapshot's order; peers with no view are left out.
    pub fn whereabouts(
        &self,
        location: u64,
        snapshot: &pb::Snapshot,
    ) -> Result<Vec<pb::ActivePeer>> {
        let mut known = whereabouts::of_location(&self.conn, location)?;
        let peers = snapshot.location.iter().flat_map(|l| &l.peers);
        Ok(peers
            .filter_map(|p| {
                let view = known.remove(&p.public_key)?;
                Some(relay::active_peer(p.public_key.clone(), &view))
            })
            .collect())
    }

    /// Records a gateway's `Hello`, and the address its stream came from (`remote_addr`,
    /// empty when unknown).
    pub fn gateway_hello(
        &mut self,
        location: u64,
        hello: &pb::Hello,
        remote_addr: &str,
        now: i64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO gateways (location_id, gateway_id, name, version, applied_revision,
                 last_error, last_seen, remote_addr)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?7)
             ON CONFLICT (location_id, gateway_id) DO UPDATE SET name = excluded.name,
                 version = excluded.version, applied_revision = excluded.applied_revision,
                 last_seen = excluded.last_seen, remote_addr = excluded.remote_addr",
            params![
                location as i64,
                hello.gateway_id,
                hello.name,
                hello.version,
                hello.applied_revision as i64,
                now,
                remote_addr
            ],
        )?;
        Ok(())
    }

    /// Marks the gateway as seen now.
    pub fn touch_gateway(&mut self, location: u64, gateway: &str, now: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE gateways SET last_seen = ?3 WHERE location_id = ?1 AND gateway_id = ?2",
            params![location as i64, gateway, now],
        )?;
        Ok(())
    }

    /// Records an `Applied`: the revision on success, else the error.
    pub fn applied(
        &mut self,
        location: u64,
        gateway: &str,
        applied: &pb::Applied,
        now: i64,
    ) -> Result<()> {
        match &applied.error {
            None => self.conn.execute(
                "UPDATE gateways SET applied_revision = ?3, last_error = NULL, last_seen = ?4
                 WHERE location_id = ?1 AND gateway_id = ?2",
                params![location as i64, gateway, applied.revision as i64, now],
            )?,
            Some(e) => {
                let view = api::ApplyErrorView {
                    attempted_revision: applied.attempted_revision,
                    kind: short_name(e.kind().as_str_name(), "APPLY_ERROR_KIND_"),
                    message: e.message.clone(),
                    rejected: e
                        .rejected
                        .iter()
                        .map(|r| api::RejectionView {
                            item: r.item.clone(),
                            reason: r.reason.clone(),
                        })
                        .collect(),
                };
                let json =
                    serde_json::to_string(&view).map_err(|e| CoreError::Internal(e.to_string()))?;
                self.conn.execute(
                    "UPDATE gateways SET last_error = ?3, last_seen = ?4
                     WHERE location_id = ?1 AND gateway_id = ?2",
                    params![location as i64, gateway, json, now],
                )?
            }
        };
        Ok(())
    }

    /// Stores peer events (see [`record_event`]) in one transaction, in order. Returns the
    /// deltas they caused, in revision order.
    pub fn record_events(
        &mut self,
        location: u64,
        gateway: &str,
        events: &[pb::PeerEvent],
        now: i64,
        connected: &BTreeSet<String>,
        core_started_at: i64,
    ) -> Result<Vec<pb::Delta>> {
        let tx = self.conn.transaction()?;
        let mut deltas = Vec::new();
        for ev in events {
            deltas.extend(record_event(
                &tx,
                location,
                gateway,
                ev,
                now,
                connected,
                core_started_at,
            )?);
        }
        tx.commit()?;
        Ok(deltas)
    }

    /// Folds a stats batch into the per (gateway, peer) rows; unknown peers are skipped.
    pub fn record_stats(
        &mut self,
        location: u64,
        gateway: &str,
        stats: &pb::Stats,
        now: i64,
    ) -> Result<StatsOutcome> {
        let tx = self.conn.transaction()?;
        let mut outcome = StatsOutcome::default();
        {
            let mut find =
                tx.prepare("SELECT id FROM peers WHERE location_id = ?1 AND public_key = ?2")?;
            let mut prev = tx.prepare(
                "SELECT epoch, rx, tx, base_rx, base_tx, last_handshake, last_active, endpoint
                 FROM stats WHERE location_id = ?1 AND gateway_id = ?2 AND peer_id = ?3",
            )?;
            let mut upsert = tx.prepare(
                // An upsert, not a replace: the row keeps its id (the pagination key).
                "INSERT INTO stats (location_id, gateway_id, peer_id, public_key,
                     endpoint, rx, tx, epoch, base_rx, base_tx, last_handshake, updated_at,
                     last_active)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (location_id, gateway_id, peer_id) DO UPDATE SET
                     public_key = excluded.public_key, endpoint = excluded.endpoint,
                     rx = excluded.rx, tx = excluded.tx, epoch = excluded.epoch,
                     base_rx = excluded.base_rx, base_tx = excluded.base_tx,
                     last_handshake = excluded.last_handshake,
                     updated_at = excluded.updated_at, last_active = excluded.last_active",
            )?;
            let at = if stats.collected_at_ms > 0 {
                stats.collected_at_ms
            } else {
                now
            };
            for p in &stats.peers {
                let Some(peer_id) = find
                    .query_row(params![location as i64, p.public_key], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()?
                else {
                    tracing::debug!(
                        location,
                        gateway,
                        public_key = %B64.encode(&p.public_key),
                        "stats for a peer the location does not have; ignored"
                    );
                    outcome.unknown += 1;
                    continue;
                };
                let old = prev
                    .query_row(params![location as i64, gateway, peer_id], |r| {
                        Ok((
                            CounterRun {
                                epoch: r.get::<_, i64>(0)? as u64,
                                rx: r.get::<_, i64>(1)? as u64,
                                tx: r.get::<_, i64>(2)? as u64,
                                base_rx: r.get::<_, i64>(3)? as u64,
                                base_tx: r.get::<_, i64>(4)? as u64,
                            },
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, String>(7)?,
                        ))
                    })
                    .optional()?;
                let endpoint = crate::input::endpoint(&p.endpoint);
                let (old, old_handshake, old_active, endpoint_moved) = match old {
                    Some((run, hs, active, ep)) => (Some(run), hs, active, ep != endpoint),
                    None => (None, 0, 0, false),
                };
                let last_active = stats::last_active(
                    old.as_ref(),
                    old_handshake,
                    old_active,
                    p.counter_epoch,
                    p.rx_bytes,
                    p.last_handshake_ms,
                    at,
                );
                let seen = relay::Sighting {
                    active_at: (last_active > old_active).then_some(last_active),
                    endpoint: relay::endpoint(&endpoint),
                    endpoint_moved,
                };
                let known = whereabouts::get(&tx, location, peer_id, &p.public_key)?;
                if let Some(view) = relay::fold(known.as_ref(), gateway, &seen) {
                    whereabouts::put(&tx, location, peer_id, &p.public_key, &view, now)?;
                    outcome
                        .relay
                        .push(relay::active_peer(p.public_key.clone(), &view));
                }
                let run = CounterRun::advance(old, p.counter_epoch, p.rx_bytes, p.tx_bytes);
                upsert.execute(params![
                    location as i64,
                    gateway,
                    peer_id,
                    p.public_key,
                    endpoint,
                    run.rx as i64,
                    run.tx as i64,
                    run.epoch as i64,
                    run.base_rx as i64,
                    run.base_tx as i64,
                    p.last_handshake_ms,
                    at,
                    last_active
                ])?;
                outcome.stored += 1;
            }
        }
        // Every `Stats` message and every entry it carries (known peers or not) are
        // counted, so a benchmark can check that a stats cycle sends only changed peers.
        tx.execute(
            "UPDATE gateways SET last_seen = ?3, stats_messages = stats_messages + 1,
                 stats_entries = stats_entries + ?4
             WHERE location_id = ?1 AND gateway_id = ?2",
            params![location as i64, gateway, now, stats.peers.len() as i64],
        )?;
        tx.commit()?;
        Ok(outcome)
    }

    /// Every gateway seen for the location (`connected` is filled in by the caller).
    pub fn gateways(&self, location: u64, page: &Page) -> Result<Vec<GatewayRow>> {
        self.location_exists(location)?;
        let mut stmt = self.conn.prepare(
            "SELECT gateway_id, name, version, applied_revision, last_error, last_seen,
                 remote_addr, stats_messages, stats_entries
             FROM gateways WHERE location_id = ?1 AND gateway_id > ?2
             ORDER BY gateway_id LIMIT ?3",
        )?;
        let args = params![location as i64, page.after_key(), page.limit as i64];
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (gateway_id, name, version, applied, err, last_seen, remote_addr, msgs, entries) =
                row?;
            out.push(api::GatewayView {
                gateway_id,
                name,
                version,
                connected: false,
                applied_revision: applied as u64,
                last_error: err.and_then(|s| serde_json::from_str(&s).ok()),
                last_seen,
                remote_addr,
                stats_messages: msgs as u64,
                stats_entries: entries as u64,
            });
        }
        Ok(out)
    }

    /// A page of the stats rows, by row id (a row keeps its id across updates).
    pub fn stats(&self, location: u64, page: &Page) -> Result<Vec<api::StatsView>> {
        self.location_exists(location)?;
        let mut stmt = self.conn.prepare(
            "SELECT gateway_id, peer_id, public_key, endpoint, rx, tx, epoch, base_rx, base_tx,
                 last_handshake, updated_at, rowid
             FROM stats WHERE location_id = ?1 AND rowid > ?2 ORDER BY rowid LIMIT ?3",
        )?;
        let args = params![location as i64, page.after_id(), page.limit as i64];
        let rows = stmt.query_map(args, |r| {
            let run = CounterRun {
                epoch: r.get::<_, i64>(6)? as u64,
                rx: r.get::<_, i64>(4)? as u64,
                tx: r.get::<_, i64>(5)? as u64,
                base_rx: r.get::<_, i64>(7)? as u64,
                base_tx: r.get::<_, i64>(8)? as u64,
            };
            let endpoint: String = r.get(3)?;
            let handshake: i64 = r.get(9)?;
            Ok(api::StatsView {
                gateway_id: r.get(0)?,
                peer_id: r.get::<_, i64>(1)? as u64,
                public_key: B64.encode(r.get::<_, Vec<u8>>(2)?),
                endpoint: (!endpoint.is_empty()).then_some(endpoint),
                rx_bytes: run.rx,
                tx_bytes: run.tx,
                total_rx: run.total_rx(),
                total_tx: run.total_tx(),
                counter_epoch: run.epoch,
                last_handshake: (handshake > 0).then_some(handshake),
                updated_at: r.get(10)?,
                id: r.get::<_, i64>(11)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A page of the events, in the order they were received (by id).
    pub fn events(&self, location: u64, page: &Page) -> Result<Vec<api::EventView>> {
        self.location_exists(location)?;
        let mut stmt = self.conn.prepare(
            "SELECT gateway_id, seq, public_key, peer_id, reason, last_handshake, at_ms,
                 mfa_session, detail, outcome, rowid
             FROM events WHERE location_id = ?1 AND rowid > ?2 ORDER BY rowid LIMIT ?3",
        )?;
        let args = params![location as i64, page.after_id(), page.limit as i64];
        let rows = stmt.query_map(args, |r| {
            let handshake: i64 = r.get(5)?;
            Ok(api::EventView {
                gateway_id: r.get(0)?,
                seq: r.get::<_, i64>(1)? as u64,
                public_key: B64.encode(r.get::<_, Vec<u8>>(2)?),
                peer_id: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                reason: r.get(4)?,
                last_handshake: (handshake > 0).then_some(handshake),
                at: r.get(6)?,
                mfa_session: r.get::<_, i64>(7)? as u64,
                detail: r.get(8)?,
                outcome: r.get(9)?,
                id: r.get::<_, i64>(10)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn location_exists(&self, id: u64) -> Result<()> {
        location_exists(&self.conn, id)
    }
}

/// `Ok` when location `id` exists, else a 404 naming it.
pub(crate) fn location_exists(conn: &Connection, id: u64) -> Result<()> {
    let found = conn
        .prepare_cached("SELECT 1 FROM locations WHERE id = ?1")?
        .exists([id as i64])?;
    if found {
        Ok(())
    } else {
        Err(CoreError::not_found(format!("no location {id}")))
    }
}

// ------------------------------------------------------------------- internals --

/// Stores a peer event once per (gateway, seq) and acts on it. Returns the delta when
/// the event changed the location (an MFA peer removed for inactivity).
///
/// Less than a threshold after this Core started (`core_started_at`), gateways not in
/// `connected` may have seen a peer active while the Core was away: a peer such a
/// gateway saw active before keeps its session (renewed) rather than being cut on
/// another gateway's idle view (protocol rule 8).
fn record_event(
    tx: &Transaction<'_>,
    location: u64,
    gateway: &str,
    ev: &pb::PeerEvent,
    now: i64,
    connected: &BTreeSet<String>,
    core_started_at: i64,
) -> Result<Option<pb::Delta>> {
    let loc = load_location(tx, location)?;
    let peer_id: Option<i64> = tx
        .query_row(
            "SELECT id FROM peers WHERE location_id = ?1 AND public_key = ?2",
            params![location as i64, ev.public_key],
            |r| r.get(0),
        )
        .optional()?;
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO events (location_id, gateway_id, seq, public_key, peer_id,
             reason, last_handshake, at_ms, mfa_session, detail, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            location as i64,
            gateway,
            ev.seq as i64,
            ev.public_key,
            peer_id,
            short_name(ev.reason().as_str_name(), "PEER_EVENT_REASON_"),
            ev.last_handshake_ms,
            ev.at_ms,
            ev.mfa_session as i64,
            ev.detail,
            now
        ],
    )?;
    let mut delta = None;
    if inserted == 1 {
        let mut outcome = "";
        match ev.reason() {
            pb::PeerEventReason::MfaInactive => {
                if let Some(id) = peer_id {
                    let row = load_peer(tx, location, id as u64)?;
                    let current = row.session.as_ref().map(|s| s.id);
                    if loc.mfa && ev.mfa_session != 0 && current == Some(ev.mfa_session) {
                        // Protocol rule 8: active on another gateway within the
                        // threshold → keep the session, renew its id.
                        let threshold_ms = i64::from(loc.threshold) * 1000;
                        let mut q = tx.prepare_cached(
                            "SELECT s.last_active, COALESCE(g.last_seen, 0)
                             FROM stats s LEFT JOIN gateways g
                               ON g.location_id = s.location_id AND g.gateway_id = s.gateway_id
                             WHERE s.location_id = ?1 AND s.peer_id = ?2 AND s.gateway_id != ?3",
                        )?;
                        let rows: Vec<(i64, i64)> = q
                            .query_map(params![location as i64, id, gateway], |r| {
                                Ok((r.get(0)?, r.get(1)?))
                            })?
                            .collect::<rusqlite::Result<_>>()?;
                        let elsewhere = rows
                            .iter()
                            .map(|(active, seen)| {
                                stats::activity_elsewhere(*active, *seen, threshold_ms)
                            })
                            .max()
                            .unwrap_or(0);
                        let core_view_incomplete =
                            now.saturating_sub(core_started_at) <= threshold_ms;
                        let active_before_on_unknown = core_view_incomplete && {
                            let mut q = tx.prepare_cached(
                                "SELECT gateway_id FROM stats
                                 WHERE location_id = ?1 AND peer_id = ?2 AND last_active > 0",
                            )?;
                            let seen: Vec<String> = q
                                .query_map(params![location as i64, id], |r| r.get(0))?
                                .collect::<rusqlite::Result<_>>()?;
                            seen.iter().any(|g| g != gateway && !connected.contains(g))
                        };
                        if (elsewhere > 0 && now.saturating_sub(elsewhere) <= threshold_ms)
                            || active_before_on_unknown
                        {
                            tracing::info!(location, gateway, peer = id, last_active = elsewhere,
                                "MFA inactivity event for a peer active on another gateway: session renewed");
                            delta = Some(renew_session(tx, &loc, &row, now)?);
                            outcome = "session_renewed";
                        } else {
                            delta = Some(end_session(tx, &loc, &row, now, "mfa_inactive")?);
                            outcome = "session_ended";
                        }
                    } else {
                        outcome = "stale_session";
                    }
                }
            }
            // The gateway re-adds those when the Core is back: nothing to change.
            pb::PeerEventReason::OfflinePolicy | pb::PeerEventReason::Unspecified => {}
        }
        tx.execute(
            "UPDATE events SET outcome = ?4
             WHERE location_id = ?1 AND gateway_id = ?2 AND seq = ?3",
            params![location as i64, gateway, ev.seq as i64, outcome],
        )?;
    }
    Ok(delta)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS locations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    private_key BLOB NOT NULL,
    listen_port INTEGER NOT NULL,
    addresses TEXT NOT NULL,
    mtu INTEGER NOT NULL,
    fwmark INTEGER NOT NULL,
    mfa INTEGER NOT NULL,
    disconnect_threshold_secs INTEGER NOT NULL,
    firewall TEXT,
    revision INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    location_id INTEGER NOT NULL REFERENCES locations(id) ON DELETE CASCADE,
    public_key BLOB NOT NULL,
    preshared_key BLOB,
    allowed_ips TEXT NOT NULL,
    persistent_keepalive INTEGER NOT NULL,
    endpoint TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (location_id, public_key)
);
CREATE TABLE IF NOT EXISTS peer_ips (
    location_id INTEGER NOT NULL,
    cidr TEXT NOT NULL,
    peer_id INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
    PRIMARY KEY (location_id, cidr)
);
CREATE INDEX IF NOT EXISTS peer_ips_peer ON peer_ips(peer_id);
CREATE TABLE IF NOT EXISTS mfa_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
    preshared_key BLOB NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    end_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS mfa_sessions_active ON mfa_sessions(peer_id)
    WHERE ended_at IS NULL;
CREATE TABLE IF NOT EXISTS gateways (
    location_id INTEGER NOT NULL REFERENCES locations(id) ON DELETE CASCADE,
    gateway_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    applied_revision INTEGER NOT NULL,
    last_error TEXT,
    last_seen INTEGER NOT NULL,
    -- The address the gateway's latest stream came from, as the Core saw it ('' = unknown).
    remote_addr TEXT NOT NULL DEFAULT '',
    -- `Stats` messages and the peer entries in them received from the gateway.
    stats_messages INTEGER NOT NULL DEFAULT 0,
    stats_entries INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (location_id, gateway_id)
);
CREATE TABLE IF NOT EXISTS stats (
    location_id INTEGER NOT NULL,
    gateway_id TEXT NOT NULL,
    peer_id INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
    public_key BLOB NOT NULL,
    endpoint TEXT NOT NULL,
    rx INTEGER NOT NULL,
    tx INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    base_rx INTEGER NOT NULL,
    base_tx INTEGER NOT NULL,
    last_handshake INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- Latest sign of life this gateway saw (a newer handshake, or rx grew), Unix ms.
    last_active INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (location_id, gateway_id, peer_id)
);
CREATE INDEX IF NOT EXISTS stats_peer ON stats(peer_id);
CREATE TABLE IF NOT EXISTS events (
    location_id INTEGER NOT NULL,
    gateway_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    peer_id INTEGER,
    reason TEXT NOT NULL,
    last_handshake INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    mfa_session INTEGER NOT NULL,
    detail TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    -- What the Core did: session_ended, session_renewed (active on another gateway),
    -- stale_session, or empty.
    outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (location_id, gateway_id, seq)
);
";

/// "PEER_EVENT_REASON_MFA_INACTIVE" -> "mfa_inactive".
fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn change(kind: pb::change::Kind) -> pb::Change {
    pb::Change { kind: Some(kind) }
}

/// Bumps the location's revision; the delta leads from the previous one to it.
fn bump(tx: &Transaction<'_>, location: u64, changes: Vec<pb::Change>) -> Result<pb::Delta> {
    let revision: i64 = tx.query_row(
        "UPDATE locations SET revision = revision + 1 WHERE id = ?1 RETURNING revision",
        [location as i64],
        |r| r.get(0),
    )?;
    let revision = revision as u64;
    Ok(pb::Delta {
        revision,
        base_revision: revision - 1,
        changes,
    })
}

/// Replaces the peer's active session by a new one with the same preshared key and start:
/// the client notices nothing; a gateway holding a tombstone for the old session id adds
/// the peer back.
fn renew_session(
    tx: &Transaction<'_>,
    loc: &LocationRow,
    row: &PeerRow,
    now: i64,
) -> Result<pb::Delta> {
    let Some(session) = &row.session else {
        return bump(tx, loc.id, Vec::new());
    };
    tx.execute(
        "UPDATE mfa_sessions SET ended_at = ?2, end_reason = 'renewed'
         WHERE peer_id = ?1 AND ended_at IS NULL",
        params![row.id as i64, now],
    )?;
    tx.execute(
        "INSERT INTO mfa_sessions (peer_id, preshared_key, started_at) VALUES (?1, ?2, ?3)",
        params![row.id as i64, session.preshared_key, session.started_at],
    )?;
    let renewed = load_peer(tx, loc.id, row.id)?;
    let changes = renewed
        .desired(loc.mfa)
        .map(|p| change(pb::change::Kind::UpsertPeer(p)))
        .into_iter()
        .collect();
    bump(tx, loc.id, changes)
}

/// Columns added after the first schema: added to databases created before them.
fn migrate(conn: &Connection) -> Result<()> {
    for (table, column, decl) in [
        ("stats", "last_active", "INTEGER NOT NULL DEFAULT 0"),
        ("events", "outcome", "TEXT NOT NULL DEFAULT ''"),
        ("gateways", "remote_addr", "TEXT NOT NULL DEFAULT ''"),
        ("gateways", "stats_messages", "INTEGER NOT NULL DEFAULT 0"),
        ("gateways", "stats_entries", "INTEGER NOT NULL DEFAULT 0"),
    ] {
        let exists: bool = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

fn end_session(
    tx: &Transaction<'_>,
    loc: &LocationRow,
    row: &PeerRow,
    now: i64,
    reason: &str,
) -> Result<pb::Delta> {
    tx.execute(
        "UPDATE mfa_sessions SET ended_at = ?2, end_reason = ?3
         WHERE peer_id = ?1 AND ended_at IS NULL",
        params![row.id as i64, now, reason],
    )?;
    let changes = row
        .desired(loc.mfa)
        .map(|p| change(pb::change::Kind::RemovePeer(p.public_key)))
        .into_iter()
        .collect();
    bump(tx, loc.id, changes)
}

/// The location checked as a gateway will, with the peers `changed` (ids, in request order)
/// listed last, so that a conflict is blamed on them.
fn cross_check(
    conn: &Connection,
    loc: &LocationRow,
    changed: &[u64],
) -> Result<validate::CrossCheck> {
    let wanted: BTreeSet<u64> = changed.iter().copied().collect();
    let mut by_id = BTreeMap::new();
    let mut unchanged = Vec::new();
    for r in load_peers(conn, loc.id, None)? {
        let Some(p) = r.desired(false) else { continue };
        if wanted.contains(&r.id) {
            by_id.insert(r.id, p);
        } else {
            unchanged.push(p);
        }
    }
    let changed = changed.iter().filter_map(|id| by_id.remove(id)).collect();
    Ok(validate::cross_check(loc.interface(), unchanged, changed))
}

/// Commits a checked change of peers and keeps the location's index in step with it
/// (dropped when the commit fails: what the database holds is then unsure).
fn commit(
    tx: Transaction<'_>,
    indexes: &mut Indexes,
    location: u64,
    checked: Option<&gatehouse_validate::index::CheckedDelta>,
) -> Result<()> {
    if let Err(e) = tx.commit() {
        indexes.forget(location);
        return Err(e.into());
    }
    indexes.committed(location, checked);
    Ok(())
}

/// The stored location as the peer check reads it: the interface and every peer.
fn stored_location(conn: &Connection, loc: &LocationRow) -> Result<(pb::Interface, Vec<pb::Peer>)> {
    let peers = load_peers(conn, loc.id, None)?
        .iter()
        .filter_map(|r| r.desired(false))
        .collect();
    Ok((loc.interface(), peers))
}

/// Claims allowed IPs for a peer: each normalized CIDR at most once per location.
struct ClaimIps<'a> {
    owner: rusqlite::Statement<'a>,
    insert: rusqlite::Statement<'a>,
}

impl<'a> ClaimIps<'a> {
    fn new(tx: &'a Transaction<'_>) -> Result<Self> {
        Ok(ClaimIps {
            owner: tx
                .prepare("SELECT peer_id FROM peer_ips WHERE location_id = ?1 AND cidr = ?2")?,
            insert: tx
                .prepare("INSERT INTO peer_ips (location_id, cidr, peer_id) VALUES (?1, ?2, ?3)")?,
        })
    }

    /// `ips`: (index in the user's input, normalized CIDR).
    fn claim(&mut self, location: u64, peer: i64, ips: &[(usize, String)]) -> Result<()> {
        for (i, ip) in ips {
            let owner: Option<i64> = self
                .owner
                .query_row(params![location as i64, ip], |r| r.get(0))
                .optional()?;
            if let Some(owner) = owner {
                return Err(CoreError::conflict(
                    format!("allowed_ips[{i}]"),
                    format!("{ip} is already an allowed IP of peer {owner}"),
                ));
            }
            self.insert.execute(params![location as i64, ip, peer])?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct LocationRow {
    id: u64,
    name: String,
    private_key: [u8; 32],
    listen_port: u16,
    addresses: Vec<String>,
    mtu: u32,
    fwmark: u32,
    mfa: bool,
    threshold: u32,
    firewall: Option<api::FirewallPolicy>,
    revision: u64,
}

impl LocationRow {
    fn interface(&self) -> pb::Interface {
        pb::Interface {
            private_key: self.private_key.to_vec(),
            listen_port: u32::from(self.listen_port),
            addresses: self.addresses.clone(),
            mtu: self.mtu,
            fwmark: self.fwmark,
        }
    }

    fn mfa_settings(&self) -> pb::MfaSettings {
        pb::MfaSettings {
            enabled: self.mfa,
            disconnect_threshold_secs: self.threshold,
        }
    }

    fn view(&self) -> api::LocationView {
        let secret = x25519_dalek::StaticSecret::from(self.private_key);
        api::LocationView {
            id: self.id,
            name: self.name.clone(),
            public_key: B64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes()),
            listen_port: self.listen_port,
            addresses: self.addresses.clone(),
            mtu: self.mtu,
            fwmark: self.fwmark,
            mfa: self.mfa,
            disconnect_threshold_secs: self.threshold,
            revision: self.revision,
            firewall: self.firewall.clone(),
        }
    }
}

fn load_location(conn: &Connection, id: u64) -> Result<LocationRow> {
    let row = conn
        .prepare_cached(
            "SELECT name, private_key, listen_port, addresses, mtu, fwmark, mfa,
                 disconnect_threshold_secs, firewall, revision
             FROM locations WHERE id = ?1",
        )?
        .query_row([id as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, u16>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, u32>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, u32>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })
        .optional()?
        .ok_or_else(|| CoreError::not_found(format!("no location {id}")))?;
    let (name, key, listen_port, addresses, mtu, fwmark, mfa, threshold, firewall, revision) = row;
    let private_key = <[u8; 32]>::try_from(key.as_slice())
        .map_err(|_| CoreError::Internal(format!("location {id}: stored key is not 32 bytes")))?;
    let firewall = firewall
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| CoreError::Internal(format!("location {id}: stored firewall: {e}")))?;
    Ok(LocationRow {
        id,
        name,
        private_key,
        listen_port,
        addresses: split_lines(&addresses),
        mtu,
        fwmark,
        mfa,
        threshold,
        firewall,
        revision: revision as u64,
    })
}

#[derive(Clone)]
struct Session {
    id: u64,
    preshared_key: Vec<u8>,
    started_at: i64,
}

#[derive(Clone)]
struct PeerRow {
    id: u64,
    public_key: Vec<u8>,
    preshared_key: Option<Vec<u8>>,
    allowed_ips: Vec<String>,
    keepalive: u16,
    endpoint: Option<String>,
    session: Option<Session>,
}

impl PeerRow {
    /// The peer as the gateways must hold it, or None when it is not desired (an MFA
    /// location's peer without an active session).
    fn desired(&self, mfa: bool) -> Option<pb::Peer> {
        let (preshared_key, mfa_session) = if mfa {
            let s = self.session.as_ref()?;
            (s.preshared_key.clone(), s.id)
        } else {
            (self.preshared_key.clone().unwrap_or_default(), 0)
        };
        Some(pb::Peer {
            public_key: self.public_key.clone(),
            preshared_key,
            allowed_ips: self.allowed_ips.clone(),
            persistent_keepalive: u32::from(self.keepalive),
            endpoint: self.endpoint.clone().unwrap_or_default(),
            id: self.id,
            mfa_session,
        })
    }

    fn view(&self, mfa: bool) -> api::PeerView {
        api::PeerView {
            id: self.id,
            public_key: B64.encode(&self.public_key),
            allowed_ips: self.allowed_ips.clone(),
            has_preshared_key: self.preshared_key.is_some(),
            persistent_keepalive: self.keepalive,
            endpoint: self.endpoint.clone(),
            mfa_session: self.session.as_ref().map(|s| api::MfaSessionView {
                id: s.id,
                started_at: s.started_at,
            }),
            active: !mfa || self.session.is_some(),
        }
    }
}

fn desired_map(mfa: bool, rows: &[PeerRow]) -> BTreeMap<Vec<u8>, pb::Peer> {
    rows.iter()
        .filter_map(|r| r.desired(mfa))
        .map(|p| (p.public_key.clone(), p))
        .collect()
}

const PEER_SELECT: &str = "
    SELECT p.id, p.public_key, p.preshared_key, p.allowed_ips, p.persistent_keepalive,
        p.endpoint, s.id, s.preshared_key, s.started_at
    FROM peers p LEFT JOIN mfa_sessions s ON s.peer_id = p.id AND s.ended_at IS NULL
    WHERE p.location_id = ?1";

fn peer_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PeerRow> {
    let session = match r.get::<_, Option<i64>>(6)? {
        Some(id) => Some(Session {
            id: id as u64,
            preshared_key: r.get(7)?,
            started_at: r.get(8)?,
        }),
        None => None,
    };
    Ok(PeerRow {
        id: r.get::<_, i64>(0)? as u64,
        public_key: r.get(1)?,
        preshared_key: r.get(2)?,
        allowed_ips: split_lines(&r.get::<_, String>(3)?),
        keepalive: r.get(4)?,
        endpoint: r.get(5)?,
        session,
    })
}

/// All peers of the location (or one), in id order, with their active MFA session.
fn load_peers(conn: &Connection, location: u64, peer: Option<u64>) -> Result<Vec<PeerRow>> {
    let rows = match peer {
        None => {
            let mut stmt = conn.prepare_cached(&format!("{PEER_SELECT} ORDER BY p.id"))?;
            let rows = stmt
                .query_map([location as i64], peer_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        }
        Some(id) => {
            let mut stmt = conn.prepare_cached(&format!("{PEER_SELECT} AND p.id = ?2"))?;
            let rows = stmt
                .query_map(params![location as i64, id as i64], peer_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        }
    };
    Ok(rows)
}

fn load_peer(conn: &Connection, location: u64, peer: u64) -> Result<PeerRow> {
    load_peers(conn, location, Some(peer))?
        .pop()
        .ok_or_else(|| CoreError::not_found(format!("no peer {peer} in location {location}")))
}

fn load_peers_by_ids(conn: &Connection, location: u64, ids: &[u64]) -> Result<Vec<PeerRow>> {
    let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
        return Ok(Vec::new());
    };
    // Ids of one insert batch are consecutive under the store lock; filter to be exact.
    let wanted: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    let mut stmt = conn.prepare_cached(&format!(
        "{PEER_SELECT} AND p.id BETWEEN ?2 AND ?3 ORDER BY p.id"
    ))?;
    let rows = stmt
        .query_map(
            params![location as i64, *first as i64, *last as i64],
            peer_from_row,
        )?
        .filter(|r| r.as_ref().map_or(true, |p| wanted.contains(&p.id)))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn split_lines(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The proto form of a stored policy; none stored = firewall management off.
pub fn firewall_pb(policy: Option<&api::FirewallPolicy>) -> pb::FirewallPolicy {
    let Some(p) = policy else {
        return pb::FirewallPolicy {
            enabled: false,
            default_verdict: pb::Verdict::Accept as i32,
            rules: Vec::new(),
        };
    };
    let verdict = |v: api::Verdict| match v {
        api::Verdict::Accept => pb::Verdict::Accept as i32,
        api::Verdict::Drop => pb::Verdict::Drop as i32,
    };
    pb::FirewallPolicy {
        enabled: p.enabled,
        default_verdict: verdict(p.default_verdict),
        rules: p
            .rules
            .iter()
            .map(|r| pb::FirewallRule {
                priority: r.priority,
                sources: r.sources.clone(),
                destinations: r.destinations.clone(),
                ports: r
                    .ports
                    .iter()
                    .map(|p| pb::PortRange {
                        start: p.start,
                        end: p.end,
                    })
                    .collect(),
                protocols: r
                    .protocols
                    .iter()
                    .map(|p| match p {
                        api::Protocol::Tcp => pb::Protocol::Tcp as i32,
                        api::Protocol::Udp => pb::Protocol::Udp as i32,
                        api::Protocol::Icmp => pb::Protocol::Icmp as i32,
                    })
                    .collect(),
                verdict: verdict(r.verdict),
                comment: r.comment.clone(),
            })
            .collect(),
    }
}
