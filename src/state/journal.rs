//! The journal's records and its byte format (pure: no file I/O here).
//!
//! A journal is a header followed by framed records:
//! - header: magic `GHJRNL\0\0`, format version (u32 LE), generation (u64 LE), and the first
//!   8 bytes of SHA-256 over those 20 bytes. The generation ties the journal to one base:
//!   the base names the generation of the journal that continues it, and a journal of any
//!   other generation is stale (see the module doc of [`super`]).
//! - each record: payload length (u32 LE), the first 8 bytes of SHA-256 over the length and
//!   the payload, then the payload (the JSON of one [`Record`]).
//!
//! Reading stops at the first frame that is incomplete or whose checksum or content does not
//! match: that frame and everything after it are a torn or corrupt tail. The checksum is
//! computed over secret material (deltas can carry preshared and private keys): it is never
//! logged, only the offset and the reason.

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::codec::{self, from_unix_ms};
use super::persisted::{PendingEvent, PersistedState};
use crate::mfa::{Session, Tombstone};
use crate::model::Key;

/// The journal format this agent reads and writes; a journal of another version is an
/// error (like a base of an unknown version).
pub const JOURNAL_VERSION: u32 = 1;
/// The header's length in bytes.
pub const HEADER_LEN: usize = 28;
/// A record frame's length before its payload.
pub const FRAME_LEN: usize = 12;
/// The largest payload accepted; a larger length is taken for corruption.
pub const MAX_RECORD: usize = 64 << 20;

const MAGIC: &[u8; 8] = b"GHJRNL\0\0";

/// One change appended to the journal. Plain-data kinds are applied to the loaded state
/// by [`apply`]; [`Record::Deltas`] is replayed by the caller (the store does not
/// interpret a location).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// Prost-encoded `v1::Delta`s accepted on top of the previous revision (the base's
    /// `applied_revision`, or the previous `Deltas` record's), bringing the held location
    /// to `revision`. May hold keys (an interface or a preshared key): never logged.
    Deltas {
        revision: u64,
        #[serde(with = "bytes_list_b64")]
        deltas: Vec<Vec<u8>>,
    },
    /// MFA expiries: their events and tombstones, on disk before the peers are removed.
    Expired {
        events: Vec<PendingEvent>,
        buried: Vec<Buried>,
        next_seq: u64,
    },
    /// The Core stored the events up to and including `up_to` (their `seq`).
    Acked { up_to: u64 },
    /// Counter epochs of peers the agent is about to add.
    Epochs {
        #[serde(with = "codec::key_map")]
        started: BTreeMap<Key, u64>,
    },
    /// The Core-contact clocks (the offline policy's inputs) at `saved_unix_ms`.
    Clock {
        core_last_contact_unix_ms: Option<i64>,
        offline_ms: Option<u64>,
        saved_unix_ms: Option<i64>,
    },
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Record::Deltas { revision, deltas } => f
                .debug_struct("Deltas")
                .field("revision", revision)
                .field("deltas", &format!("<{} deltas, redacted>", deltas.len()))
                .finish(),
            Record::Expired {
                events,
                buried,
                next_seq,
            } => f
                .debug_struct("Expired")
                .field("events", events)
                .field("buried", buried)
                .field("next_seq", next_seq)
                .finish(),
            Record::Acked { up_to } => f.debug_struct("Acked").field("up_to", up_to).finish(),
            Record::Epochs { started } => f
                .debug_struct("Epochs")
                .field("started", &started.len())
                .finish(),
            Record::Clock {
                core_last_contact_unix_ms,
                offline_ms,
                saved_unix_ms,
            } => f
                .debug_struct("Clock")
                .field("core_last_contact_unix_ms", core_last_contact_unix_ms)
                .field("offline_ms", offline_ms)
                .field("saved_unix_ms", saved_unix_ms)
                .finish(),
        }
    }
}

/// A tombstone laid by an MFA expiry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buried {
    #[serde(with = "codec::key_b64")]
    pub key: Key,
    pub session: Session,
    pub removed_at_unix_ms: i64,
}

impl Buried {
    pub fn new(key: Key, tombstone: &Tombstone) -> Self {
        Buried {
            key,
            session: tombstone.session.clone(),
            removed_at_unix_ms: tombstone.removed_at_unix_ms,
        }
    }
}

/// Applies a plain-data record to a loaded state (idempotent: applying it twice gives the
/// state of applying it once). `Deltas` is left to the caller and changes nothing here.
pub fn apply(state: &mut PersistedState, record: &Record) {
    match record {
        Record::Deltas { .. } => {}
        Record::Expired {
            events,
            buried,
            next_seq,
        } => {
            for event in events {
                if !state.pending_events.iter().any(|e| e.seq == event.seq) {
                    state.pending_events.push(event.clone());
                }
            }
            state.pending_events.sort_by_key(|e| e.seq);
            for b in buried {
                state
                    .tombstones
                    .bury(b.key, b.session.clone(), from_unix_ms(b.removed_at_unix_ms));
            }
            state.next_seq = state.next_seq.max(*next_seq);
        }
        Record::Acked { up_to } => {
            state.pending_events.retain(|e| e.seq > *up_to);
            state.next_seq = state.next_seq.max(up_to.saturating_add(1));
        }
        Record::Epochs { started } => {
            for (key, epoch) in started {
                if let Some(epoch) = NonZeroU64::new(*epoch) {
                    state.epochs.insert(*key, epoch);
                }
            }
        }
        Record::Clock {
            core_last_contact_unix_ms,
            offline_ms,
            saved_unix_ms,
        } => {
            state.core_last_contact_unix_ms = *core_last_contact_unix_ms;
            state.offline_ms = *offline_ms;
            state.saved_unix_ms = *saved_unix_ms;
        }
    }
}

/// The header of a journal of `generation`.
pub fn header(generation: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&generation.to_le_bytes());
    let sum = checksum(&[&h[..20]]);
    h[20..].copy_from_slice(&sum);
    h
}

/// Appends the frames of `records` to `out`.
pub fn encode(records: &[Record], out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    for record in records {
        let mut payload = serde_json::to_vec(record)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= MAX_RECORD)
            .ok_or_else(|| {
                serde_json::Error::io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a journal record of {} bytes is too large", payload.len()),
                ))
            });
        let len = match len {
            Ok(l) => l.to_le_bytes(),
            Err(e) => {
                payload.zeroize();
                return Err(e);
            }
        };
        out.extend_from_slice(&len);
        out.extend_from_slice(&checksum(&[&len, &payload]));
        out.extend_from_slice(&payload);
        payload.zeroize();
    }
    Ok(())
}

/// Why a journal's header is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than a header, a wrong magic or checksum.
    Corrupt(&'static str),
    /// Written by an agent of another journal format.
    Version(u32),
}

/// What a journal's bytes hold: its generation, the records of its valid prefix, where
/// that prefix ends, and why reading stopped there (`None`: at the end).
#[derive(Debug)]
pub struct Decoded {
    pub generation: u64,
    pub records: Vec<Record>,
    pub valid_len: usize,
    pub tail: Option<TailError>,
}

/// The first bad frame: its offset and what is wrong with it (no content, no checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailError {
    pub offset: usize,
    pub reason: &'static str,
}

/// Reads the header and the valid prefix of a journal.
pub fn decode(bytes: &[u8]) -> Result<Decoded, HeaderError> {
    let generation = read_header(bytes)?;
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    let tail = loop {
        match read_frame(&bytes[at..]) {
            Frame::End => break None,
            Frame::Bad(reason) => break Some(TailError { offset: at, reason }),
            Frame::Record(record, used) => {
                records.push(record);
                at += used;
            }
        }
    };
    Ok(Decoded {
        generation,
        records,
        valid_len: at,
        tail,
    })
}

/// The generation in a journal's header.
pub fn read_header(bytes: &[u8]) -> Result<u64, HeaderError> {
    let h = bytes
        .get(..HEADER_LEN)
        .ok_or(HeaderError::Corrupt("shorter than its header"))?;
    if &h[..8] != MAGIC {
        return Err(HeaderError::Corrupt("not a gatehouse journal"));
    }
    if checksum(&[&h[..20]]) != h[20..] {
        return Err(HeaderError::Corrupt("header checksum mismatch"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if version != JOURNAL_VERSION {
        return Err(HeaderError::Version(version));
    }
    Ok(u64::from_le_bytes(h[12..20].try_into().unwrap_or_default()))
}

enum Frame {
    End,
    Bad(&'static str),
    Record(Record, usize),
}

fn read_frame(rest: &[u8]) -> Frame {
    if rest.is_empty() {
        return Frame::End;
    }
    let Some(head) = rest.get(..FRAME_LEN) else {
        return Frame::Bad("incomplete frame header");
    };
    let len_bytes = &head[..4];
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if len > MAX_RECORD {
        return Frame::Bad("record length out of range");
    }
    let Some(payload) = rest.get(FRAME_LEN..FRAME_LEN + len) else {
        return Frame::Bad("incomplete record");
    };
    if checksum(&[len_bytes, payload]) != head[4..FRAME_LEN] {
        return Frame::Bad("record checksum mismatch");
    }
    match serde_json::from_slice::<Record>(payload) {
        Ok(record) => Frame::Record(record, FRAME_LEN + len),
        Err(_) => Frame::Bad("record content not understood"),
    }
}

/// The first 8 bytes of SHA-256 over `parts`.
fn checksum(parts: &[&[u8]]) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let digest = ctx.finish();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest.as_ref()[..8]);
    out
}

/// `#[serde(with = "bytes_list_b64")]` for a `Vec<Vec<u8>>`: a list of base64 strings.
mod bytes_list_b64 {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(list: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(|b| B64.encode(b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|text| {
                B64.decode(text.as_bytes())
                    .map_err(|e| D::Error::custom(format!("bad base64: {e}")))
            })
            .collect()
    }
}
