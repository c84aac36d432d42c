//! The `whereabouts` table: per location and peer, the location's view of where the
//! client is ([`relay::Whereabouts`]: latest activity on any gateway, last endpoint and
//! the gateway that saw it). Written with the stats that change it, read when a gateway
//! connects; kept across Core restarts. A peer's row goes with the peer.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::CoreError;
use crate::relay::{self, Whereabouts};

type Result<T> = std::result::Result<T, CoreError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS whereabouts (
    location_id INTEGER NOT NULL,
    peer_id INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
    public_key BLOB NOT NULL,
    -- Latest sign of life on any gateway of the location, Unix ms (0 = never).
    last_active INTEGER NOT NULL,
    -- Where the client was last seen (canonical ip:port), '' = unknown.
    endpoint TEXT NOT NULL,
    -- The gateway that reported that endpoint.
    gateway_id TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (location_id, peer_id)
);
CREATE INDEX IF NOT EXISTS whereabouts_peer ON whereabouts(peer_id);
";

/// Creates the table. A database from before it gets each peer's view from the stored
/// stats: the latest activity, and the endpoint of the gateway that saw it last.
pub(crate) fn init(conn: &Connection) -> Result<()> {
    let existed = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'whereabouts'")?
        .exists([])?;
    conn.execute_batch(SCHEMA)?;
    if !existed {
        let seeded = conn.execute(
            "INSERT OR IGNORE INTO whereabouts (location_id, peer_id, public_key, last_active,
                 endpoint, gateway_id, updated_at)
             SELECT location_id, peer_id, public_key, last_active, endpoint, gateway_id,
                 updated_at
             FROM stats AS s
             WHERE last_active > 0 AND NOT EXISTS (
                 SELECT 1 FROM stats AS o WHERE o.location_id = s.location_id
                     AND o.peer_id = s.peer_id
                     AND (o.last_active > s.last_active
                          OR (o.last_active = s.last_active AND o.rowid > s.rowid)))",
            [],
        )?;
        // Stored endpoints were only sanitized: keep the ones that parse, canonical.
        let rows: Vec<(i64, i64, String)> = conn
            .prepare("SELECT location_id, peer_id, endpoint FROM whereabouts")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (location, peer, endpoint) in rows {
            let canonical = relay::endpoint(&endpoint)
                .map(|e| e.to_string())
                .unwrap_or_default();
            if canonical != endpoint {
                conn.execute(
                    "UPDATE whereabouts SET endpoint = ?3 WHERE location_id = ?1 AND peer_id = ?2",
                    params![location, peer, canonical],
                )?;
            }
        }
        if seeded > 0 {
            tracing::info!(
                peers = seeded,
                "peer whereabouts derived from the stored stats"
            );
        }
    }
    Ok(())
}

fn from_row(last_active: i64, endpoint: &str, gateway_id: String) -> Whereabouts {
    Whereabouts {
        last_active_ms: last_active,
        endpoint: relay::endpoint(endpoint),
        gateway_id,
    }
}

/// The stored view of one peer (as long as its key is `public_key`).
pub(crate) fn get(
    conn: &Connection,
    location: u64,
    peer: i64,
    public_key: &[u8],
) -> Result<Option<Whereabouts>> {
    Ok(conn
        .prepare_cached(
            "SELECT last_active, endpoint, gateway_id FROM whereabouts
             WHERE location_id = ?1 AND peer_id = ?2 AND public_key = ?3",
        )?
        .query_row(params![location as i64, peer, public_key], |r| {
            Ok(from_row(r.get(0)?, &r.get::<_, String>(1)?, r.get(2)?))
        })
        .optional()?)
}

/// Stores the view of one peer.
pub(crate) fn put(
    conn: &Connection,
    location: u64,
    peer: i64,
    public_key: &[u8],
    w: &Whereabouts,
    now: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO whereabouts (location_id, peer_id, public_key, last_active, endpoint,
             gateway_id, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (location_id, peer_id) DO UPDATE SET public_key = excluded.public_key,
             last_active = excluded.last_active, endpoint = excluded.endpoint,
             gateway_id = excluded.gateway_id, updated_at = excluded.updated_at",
    )?
    .execute(params![
        location as i64,
        peer,
        public_key,
        w.last_active_ms,
        w.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        w.gateway_id,
        now
    ])?;
    Ok(())
}

/// Every stored view of the location, by public key (a peer whose key changed since
/// is another device: its old view is left out).
pub(crate) fn of_location(
    conn: &Connection,
    location: u64,
) -> Result<BTreeMap<Vec<u8>, Whereabouts>> {
    let mut stmt = conn.prepare_cached(
        "SELECT w.public_key, w.last_active, w.endpoint, w.gateway_id
         FROM whereabouts AS w JOIN peers AS p
             ON p.id = w.peer_id AND p.public_key = w.public_key
         WHERE w.location_id = ?1",
    )?;
    let rows = stmt.query_map([location as i64], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            from_row(r.get(1)?, &r.get::<_, String>(2)?, r.get(3)?),
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns of `peers` and `stats` this table reads.
    fn older_database() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE peers (id INTEGER PRIMARY KEY, location_id INTEGER NOT NULL,
                 public_key BLOB NOT NULL);
             CREATE TABLE stats (location_id INTEGER NOT NULL, gateway_id TEXT NOT NULL,
                 peer_id INTEGER NOT NULL, public_key BLOB NOT NULL, endpoint TEXT NOT NULL,
                 updated_at INTEGER NOT NULL, last_active INTEGER NOT NULL DEFAULT 0);
             INSERT INTO peers VALUES (1, 7, x'01'), (2, 7, x'02'), (3, 7, x'03');
             INSERT INTO stats VALUES
                 (7, 'gw-a', 1, x'01', '198.51.100.7:4000', 10, 1000),
                 (7, 'gw-b', 1, x'01', '203.0.113.9:5000', 20, 2000),
                 (7, 'gw-a', 2, x'02', 'garbage', 10, 500),
                 (7, 'gw-a', 3, x'03', '198.51.100.8:1', 10, 0);",
        )
        .unwrap();
        conn
    }

    #[test]
    fn an_older_database_is_seeded_from_its_stats_once() {
        let conn = older_database();
        init(&conn).unwrap();
        let known = of_location(&conn, 7).unwrap();
        // The latest activity wins, with the endpoint of the gateway that saw it.
        assert_eq!(
            known[&vec![1u8]],
            Whereabouts {
                last_active_ms: 2000,
                endpoint: relay::endpoint("203.0.113.9:5000"),
                gateway_id: "gw-b".into(),
            }
        );
        // An unparsable stored endpoint is dropped; never-active peers have no view.
        assert_eq!(known[&vec![2u8]].endpoint, None);
        assert_eq!(known[&vec![2u8]].last_active_ms, 500);
        assert!(!known.contains_key(&vec![3u8]));
        // A second start does not seed again over what was stored since.
        let moved = Whereabouts {
            last_active_ms: 3000,
            endpoint: relay::endpoint("[2001:db8::1]:6000"),
            gateway_id: "gw-a".into(),
        };
        put(&conn, 7, 1, &[1], &moved, 30).unwrap();
        init(&conn).unwrap();
        assert_eq!(get(&conn, 7, 1, &[1]).unwrap(), Some(moved));
    }

    #[test]
    fn a_peer_whose_key_changed_has_no_view() {
        let conn = older_database();
        init(&conn).unwrap();
        conn.execute("UPDATE peers SET public_key = x'09' WHERE id = 1", [])
            .unwrap();
        assert!(!of_location(&conn, 7).unwrap().contains_key(&vec![9u8]));
        assert!(!of_location(&conn, 7).unwrap().contains_key(&vec![1u8]));
        assert_eq!(get(&conn, 7, 1, &[9]).unwrap(), None);
    }
}
