//! Serde helpers for the state file: keys as base64, key-indexed maps as JSON objects,
//! bytes as base64, and wall-clock times as Unix milliseconds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Key;

/// Unix milliseconds of a wall-clock time (negative before 1970, saturating).
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The wall-clock time of Unix milliseconds (saturating at what `SystemTime` holds).
pub fn from_unix_ms(ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH.checked_add(magnitude).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// Saturating `Duration` in whole milliseconds (for the state file).
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `#[serde(with = "key_b64")]` for one [`Key`].
pub mod key_b64 {
    use super::*;

    pub fn serialize<S: Serializer>(key: &Key, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&key.to_base64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let text = String::deserialize(d)?;
        Key::from_base64(&text).ok_or_else(|| D::Error::custom("not a base64 WireGuard key"))
    }
}

/// `#[serde(with = "key_map")]` for a `BTreeMap<Key, T>`: a JSON object keyed by base64.
pub mod key_map {
    use super::*;

    pub fn serialize<S, T>(map: &BTreeMap<Key, T>, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Serialize,
    {
        s.collect_map(map.iter().map(|(k, v)| (k.to_base64(), v)))
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<BTreeMap<Key, T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let raw = BTreeMap::<String, T>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                Key::from_base64(&k)
                    .map(|key| (key, v))
                    .ok_or_else(|| D::Error::custom(format!("not a base64 WireGuard key: {k:?}")))
            })
            .collect()
    }
}

/// `#[serde(with = "opt_bytes_b64")]` for an `Option<Vec<u8>>`.
pub mod opt_bytes_b64 {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&B64.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => B64
                .decode(text.as_bytes())
                .map(Some)
                .map_err(|e| D::Error::custom(format!("bad base64: {e}"))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_ms_round_trips_both_sides_of_the_epoch() {
        for ms in [0, 1, 1_700_000_000_123, -5_000] {
            assert_eq!(unix_ms(from_unix_ms(ms)), ms);
        }
    }
}
