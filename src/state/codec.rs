//! Serde helpers for the state file: keys as base64, key-indexed maps as JSON objects,
//! bytes as base64, and wall-clock times as Unix milliseconds.

use std::collections::BTreeMap;
use std::fmt;
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

    /// Each key decoded as it is read (no map of base64 strings built first: at 10,000
    /// peers that map, its string allocations and comparisons were most of a state file's
    /// parse); the entries are then sorted once and the map built in bulk. A key given
    /// twice keeps its last value, as a map of the strings did.
    pub fn deserialize<'de, D, T>(d: D) -> Result<BTreeMap<Key, T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        d.deserialize_map(Entries(std::marker::PhantomData))
    }

    struct Entries<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Entries<T> {
        type Value = BTreeMap<Key, T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map keyed by base64 WireGuard keys")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            // The hint comes from the input: bounded, the rest grows as entries arrive.
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
            while let Some((KeyText(key), value)) = map.next_entry::<KeyText, T>()? {
                entries.push((key, value));
            }
            // `collect` sorts stably and keeps the last of equal keys.
            Ok(entries.into_iter().collect())
        }
    }

    /// A map key: a base64 WireGuard key, decoded from the text as read.
    struct KeyText(Key);

    impl<'de> Deserialize<'de> for KeyText {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(KeyVisitor)
        }
    }

    struct KeyVisitor;

    impl serde::de::Visitor<'_> for KeyVisitor {
        type Value = KeyText;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a base64 WireGuard key")
        }

        fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<KeyText, E> {
            Key::from_base64(k)
                .map(KeyText)
                .ok_or_else(|| E::custom(format!("not a base64 WireGuard key: {k:?}")))
        }
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

/// Base64 (standard, padded) of a byte stream given in pieces of any size, written to a
/// formatter as it goes: the same text as encoding the pieces joined. Holds at most
/// [`B64Stream::CHUNK`] input bytes and their text, wiped after use (the state file's
/// location holds keys).
#[derive(Default)]
pub struct B64Stream {
    /// Input not encoded yet (fewer than 3 bytes between pushes).
    pending: zeroize::Zeroizing<Vec<u8>>,
    text: zeroize::Zeroizing<String>,
}

impl B64Stream {
    /// Input bytes encoded per write (a multiple of 3: no padding inside the text).
    pub const CHUNK: usize = 3 * 1024;

    /// Encodes what it can of `bytes` (whole groups of 3 with what was pending) to `f`.
    pub fn push(&mut self, mut bytes: &[u8], f: &mut impl fmt::Write) -> fmt::Result {
        while !bytes.is_empty() {
            let take = (Self::CHUNK - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            let whole = self.pending.len() / 3 * 3;
            self.write(whole, f)?;
        }
        Ok(())
    }

    /// Encodes the rest (with padding).
    pub fn finish(mut self, f: &mut impl fmt::Write) -> fmt::Result {
        let all = self.pending.len();
        self.write(all, f)
    }

    /// Encodes and writes the first `n` pending bytes, keeps the others.
    fn write(&mut self, n: usize, f: &mut impl fmt::Write) -> fmt::Result {
        use zeroize::Zeroize as _;
        if n == 0 {
            return Ok(());
        }
        self.text.zeroize();
        B64.encode_string(&self.pending[..n], &mut self.text);
        f.write_str(&self.text)?;
        self.pending.copy_within(n.., 0);
        let rest = self.pending.len() - n;
        self.pending[rest..].zeroize();
        self.pending.truncate(rest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Keyed(#[serde(with = "key_map")] BTreeMap<Key, u64>);

    /// Keys decode as they are read: the map round-trips, a key given twice keeps its
    /// last value, a key that is not base64 is named in the error.
    #[test]
    fn key_maps_decode_keys_as_read_last_value_wins() {
        let keys: Vec<Key> = (1..=3u8)
            .map(|b| Key::from_slice(&[b; 32]).unwrap())
            .collect();
        let map: BTreeMap<Key, u64> = keys
            .iter()
            .zip([30, 10, 20])
            .map(|(k, v)| (*k, v))
            .collect();
        let text = serde_json::to_string(&Keyed(map.clone())).unwrap();
        assert_eq!(serde_json::from_str::<Keyed>(&text).unwrap(), Keyed(map));

        let (a, b) = (keys[0].to_base64(), keys[1].to_base64());
        let twice = format!(r#"{{"{b}":1,"{a}":2,"{b}":3}}"#);
        let got = serde_json::from_str::<Keyed>(&twice).unwrap().0;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![(keys[0], 2), (keys[1], 3)]
        );

        let err = serde_json::from_str::<Keyed>(r#"{"nope":1}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a base64 WireGuard key: \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn streamed_base64_is_the_base64_of_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for pieces in [1, 2, 3, 4, 5, 7, 1000, 3072, 3073, 10_000] {
            let mut text = String::new();
            let mut b = B64Stream::default();
            for piece in data.chunks(pieces) {
                b.push(piece, &mut text).unwrap();
            }
            b.finish(&mut text).unwrap();
            assert_eq!(text, B64.encode(&data), "pieces of {pieces}");
        }
        let mut text = String::new();
        B64Stream::default().finish(&mut text).unwrap();
        assert_eq!(text, "");
    }

    #[test]
    fn unix_ms_round_trips_both_sides_of_the_epoch() {
        for ms in [0, 1, 1_700_000_000_123, -5_000] {
            assert_eq!(unix_ms(from_unix_ms(ms)), ms);
        }
    }
}
