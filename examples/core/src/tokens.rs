//! Gateway tokens: one per gateway, stored as a SHA-256 hash, with an optional expiry and a
//! binding to one gateway id (given at creation, else the first id that uses the token).
//!
//! The rules:
//! - a token authenticates only while it exists and has not expired; a revoked
//!   (deleted) or expired token is refused at connect, and the streams using it end
//!   (the caller broadcasts the revocation; each stream watches its own expiry);
//! - a token bound to a gateway id cannot be used by another id;
//! - an unbound token cannot claim an id that another live token of the location is
//!   bound to (so one token holder cannot take over another gateway's id and kick its
//!   stream); an operator who rotates a gateway's token names the id explicitly.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use rusqlite::{params, Connection, OptionalExtension};

use crate::api;
use crate::error::CoreError;
use crate::input;
use crate::page::Page;
use crate::store::Store;

type Result<T> = std::result::Result<T, CoreError>;

/// Longest expiry accepted (10 years), so times stay far from overflow.
pub const MAX_EXPIRES_IN_SECS: u64 = 10 * 365 * 24 * 3600;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gateway_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash BLOB NOT NULL UNIQUE,
    location_id INTEGER NOT NULL REFERENCES locations(id) ON DELETE CASCADE,
    gateway_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    last_used INTEGER
);
CREATE INDEX IF NOT EXISTS gateway_tokens_location ON gateway_tokens(location_id, id);
";

/// Creates the table and moves tokens of the first schema (`tokens`: location-wide, no
/// id) into it, unbound and without expiry.
pub(crate) fn init(conn: &Connection) -> Result<()> {
    conn.execute_batch(SCHEMA)?;
    let legacy: bool = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tokens'")?
        .exists([])?;
    if legacy {
        conn.execute_batch(
            "BEGIN;
             INSERT OR IGNORE INTO gateway_tokens (hash, location_id, created_at)
                 SELECT hash, location_id, created_at FROM tokens ORDER BY rowid;
             DROP TABLE tokens;
             COMMIT;",
        )?;
        tracing::info!("gateway tokens moved to the per-gateway table (unbound, no expiry)");
    }
    Ok(())
}

/// A token that authenticated a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: u64,
    pub location: u64,
    /// Unix ms; None: never expires.
    pub expires_at: Option<i64>,
}

/// What a `Hello`'s gateway id does to the token's binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Already bound to this id.
    Keep,
    /// Unbound: bind it to this id now.
    Bind,
    /// Refused, with the reason for the gateway.
    Refuse(&'static str),
}

/// Decides the binding of a token (`bound`: its id, if any) for a `Hello` of `hello_id`;
/// `claimed_elsewhere`: another live token of the location is bound to `hello_id`.
pub fn binding(bound: Option<&str>, hello_id: &str, claimed_elsewhere: bool) -> Binding {
    match bound {
        Some(id) if id == hello_id => Binding::Keep,
        Some(_) => Binding::Refuse("this token is bound to another gateway id"),
        None if claimed_elsewhere => {
            Binding::Refuse("this gateway id is bound to another token of the location")
        }
        None => Binding::Bind,
    }
}

impl Store {
    /// A fresh random gateway token; only its hash is stored. Answers its id and secret.
    pub fn create_token(
        &mut self,
        location: u64,
        new: &api::NewToken,
        now: i64,
    ) -> Result<api::TokenView> {
        crate::store::location_exists(&self.conn, location)?;
        let gateway_id = new
            .gateway_id
            .as_deref()
            .map(|g| {
                input::gateway_id(g.trim())
                    .map(str::to_owned)
                    .map_err(|e| CoreError::invalid("gateway_id", e.to_string()))
            })
            .transpose()?;
        let expires_at = match new.expires_in_secs {
            None => None,
            Some(s) if (1..=MAX_EXPIRES_IN_SECS).contains(&s) => Some(now + s as i64 * 1000),
            Some(_) => {
                return Err(CoreError::invalid(
                    "expires_in_secs",
                    format!("must be 1..={MAX_EXPIRES_IN_SECS}"),
                ))
            }
        };
        let token = format!("ght_{}", B64URL.encode(rand::random::<[u8; 32]>()));
        self.conn.execute(
            "INSERT INTO gateway_tokens (hash, location_id, gateway_id, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                token_hash(&token),
                location as i64,
                gateway_id,
                now,
                expires_at
            ],
        )?;
        let id = self.conn.last_insert_rowid() as u64;
        Ok(api::TokenView { id, token })
    }

    /// The location's tokens (never their secret), by id.
    pub fn tokens(&self, location: u64, page: Page) -> Result<Vec<api::TokenInfo>> {
        crate::store::location_exists(&self.conn, location)?;
        let mut stmt = self.conn.prepare(
            "SELECT id, gateway_id, created_at, expires_at, last_used FROM gateway_tokens
             WHERE location_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![location as i64, page.after_id(), page.limit as i64],
            |r| {
                Ok(api::TokenInfo {
                    id: r.get::<_, i64>(0)? as u64,
                    gateway_id: r.get(1)?,
                    created: r.get(2)?,
                    expires: r.get(3)?,
                    last_used: r.get(4)?,
                })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes the token (its streams are ended by the caller).
    pub fn revoke_token(&mut self, location: u64, token_id: u64) -> Result<()> {
        let n = self.conn.execute(
            "DELETE FROM gateway_tokens WHERE location_id = ?1 AND id = ?2",
            params![location as i64, token_id as i64],
        )?;
        if n == 0 {
            return Err(CoreError::not_found(format!(
                "no token {token_id} in location {location}"
            )));
        }
        Ok(())
    }

    /// The grant of a token that exists and has not expired at `now` (its use is
    /// recorded); None for an unknown, revoked or expired token.
    pub fn authenticate(&mut self, token: &str, now: i64) -> Result<Option<Grant>> {
        let row = self
            .conn
            .query_row(
                "SELECT id, location_id, expires_at FROM gateway_tokens WHERE hash = ?1",
                [token_hash(token)],
                |r| {
                    Ok(Grant {
                        id: r.get::<_, i64>(0)? as u64,
                        location: r.get::<_, i64>(1)? as u64,
                        expires_at: r.get(2)?,
                    })
                },
            )
            .optional()?;
        let Some(grant) = row.filter(|g| g.expires_at.is_none_or(|at| now < at)) else {
            return Ok(None);
        };
        self.conn.execute(
            "UPDATE gateway_tokens SET last_used = ?2 WHERE id = ?1",
            params![grant.id as i64, now],
        )?;
        Ok(Some(grant))
    }

    /// Whether the token still authenticates at `now` (a stream re-checks after missing
    /// revocation notices).
    pub fn token_valid(&self, token_id: u64, now: i64) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT 1 FROM gateway_tokens
                 WHERE id = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
            )?
            .exists(params![token_id as i64, now])?)
    }

    /// Applies the binding rule for a `Hello` of `gateway_id` with the token; on success
    /// the token is bound to that id.
    pub fn bind_token(&mut self, token_id: u64, gateway_id: &str, now: i64) -> Result<Binding> {
        let tx = self.conn.transaction()?;
        let (location, bound): (i64, Option<String>) = tx
            .query_row(
                "SELECT location_id, gateway_id FROM gateway_tokens WHERE id = ?1",
                [token_id as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| CoreError::not_found("the token was revoked"))?;
        let claimed: bool = tx
            .prepare(
                "SELECT 1 FROM gateway_tokens WHERE location_id = ?1 AND gateway_id = ?2
                 AND id != ?3 AND (expires_at IS NULL OR expires_at > ?4)",
            )?
            .exists(params![location, gateway_id, token_id as i64, now])?;
        let decision = binding(bound.as_deref(), gateway_id, claimed);
        if decision == Binding::Bind {
            tx.execute(
                "UPDATE gateway_tokens SET gateway_id = ?2 WHERE id = ?1",
                params![token_id as i64, gateway_id],
            )?;
        }
        tx.commit()?;
        Ok(decision)
    }
}

fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_the_first_schema_are_kept_unbound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE locations (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);
                 INSERT INTO locations (name) VALUES ('office');
                 CREATE TABLE tokens (hash BLOB PRIMARY KEY, location_id INTEGER NOT NULL,
                     created_at INTEGER NOT NULL);",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO tokens VALUES (?1, 1, 5)",
                [token_hash("ght_old")],
            )
            .unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        init(&conn).unwrap();
        init(&conn).unwrap(); // idempotent
        let mut store = Store {
            conn,
            audit: Default::default(),
            indexes: Default::default(),
        };
        let grant = store
            .authenticate("ght_old", 10)
            .unwrap()
            .expect("still valid");
        assert_eq!((grant.location, grant.expires_at), (1, None));
        assert_eq!(
            store.bind_token(grant.id, "gw-1", 10).unwrap(),
            Binding::Bind
        );
        assert_eq!(
            store.bind_token(grant.id, "gw-1", 11).unwrap(),
            Binding::Keep
        );
        assert!(store.authenticate("ght_other", 10).unwrap().is_none());
    }

    #[test]
    fn an_expired_token_does_not_authenticate_nor_hold_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let loc = store
            .create_location(
                api::NewLocation {
                    name: "x".into(),
                    listen_port: 51820,
                    ..Default::default()
                },
                0,
            )
            .unwrap()
            .id;
        let new = api::NewToken {
            gateway_id: Some("gw-1".into()),
            expires_in_secs: Some(60),
        };
        let old = store.create_token(loc, &new, 0).unwrap();
        assert!(store.authenticate(&old.token, 59_999).unwrap().is_some());
        assert!(store.authenticate(&old.token, 60_000).unwrap().is_none());
        assert!(!store.token_valid(old.id, 60_000).unwrap());
        // Once it expired, a new unbound token may take the id.
        let fresh = store
            .create_token(loc, &api::NewToken::default(), 0)
            .unwrap();
        let grant = store.authenticate(&fresh.token, 1).unwrap().unwrap();
        assert!(matches!(
            store.bind_token(grant.id, "gw-1", 1).unwrap(),
            Binding::Refuse(_)
        ));
        assert_eq!(
            store.bind_token(grant.id, "gw-1", 60_000).unwrap(),
            Binding::Bind
        );
    }

    #[test]
    fn binding_rule() {
        assert_eq!(binding(Some("a"), "a", false), Binding::Keep);
        assert_eq!(binding(Some("a"), "a", true), Binding::Keep);
        assert!(matches!(binding(Some("a"), "b", false), Binding::Refuse(_)));
        assert!(matches!(binding(None, "b", true), Binding::Refuse(_)));
        assert_eq!(binding(None, "b", false), Binding::Bind);
    }
}
