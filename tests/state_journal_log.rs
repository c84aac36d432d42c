//! The state journal's torn-tail warning names where the tail was cut, never the content
//! or the checksum (the records hold key material). In its own test binary: a log captured
//! with a scoped subscriber is only reliable when no other test thread registers the same
//! callsite at the same time (tracing caches a callsite's interest globally).

use std::fs;
use std::sync::{Arc, Mutex};

use gatehouse::state::journal::{Record, FRAME_LEN};
use gatehouse::state::{PersistedState, StateStore, JOURNAL_FILE};

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn deltas(revision: u64) -> Record {
    Record::Deltas {
        revision,
        deltas: vec![
            vec![revision as u8, 0, 255, 7],
            b"SECRET-PSK-BYTES".to_vec(),
        ],
    }
}

#[test]
fn the_torn_tail_warning_names_the_offset_not_the_content_or_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let first = {
        let (mut store, _) = StateStore::open(tmp.path()).unwrap();
        let state = PersistedState {
            gateway_id: store.gateway_id().to_string(),
            ..Default::default()
        };
        store.save(&state).unwrap();
        let first = store.journal_bytes() as usize;
        store.append(&[deltas(13)]).unwrap();
        store.append(&[deltas(14)]).unwrap();
        first
    };
    let path = tmp.path().join(JOURNAL_FILE);
    let mut bytes = fs::read(&path).unwrap();
    // Flip a payload bit of the first record (a `Deltas` holding "SECRET-PSK-BYTES").
    bytes[first + FRAME_LEN + 3] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let stored_sum = bytes[first + 4..first + FRAME_LEN].to_vec();

    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        StateStore::open(tmp.path()).unwrap();
    });
    let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("torn or corrupt tail"), "{log}");
    assert!(log.contains(&format!("offset={first}")), "{log}");
    let hex: String = stored_sum.iter().map(|b| format!("{b:02x}")).collect();
    let dec = format!("{stored_sum:?}");
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::STANDARD.encode(b"SECRET-PSK-BYTES");
    for forbidden in [hex.as_str(), &dec[1..dec.len() - 1], &secret, "SECRET"] {
        assert!(!log.contains(forbidden), "{forbidden:?} in {log}");
    }
    // Nor does the record's Debug show its deltas.
    assert!(!format!("{:?}", deltas(13)).contains("83, 69"));
}
