//! Tests of the state journal (on a temp dir; no root needed).

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use gatehouse_proto::v1::PeerEventReason;

use super::journal::{self, HEADER_LEN};
use super::tests::sample_state;
use super::*;
use crate::mfa::Session;
use crate::model::Key;

fn event(seq: u64, key: u8) -> PendingEvent {
    PendingEvent {
        seq,
        public_key: Key([key; 32]),
        reason: PeerEventReason::MfaInactive,
        last_handshake_ms: 1_700_000_000_000,
        at_ms: 1_700_000_200_000 + seq as i64,
        mfa_session: 40 + seq,
        peer_id: 100 + seq,
        detail: format!("inactive, event {seq}"),
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

/// One record of each kind, in an order where each changes what the next sees.
fn records() -> Vec<Record> {
    vec![
        deltas(13),
        Record::Expired {
            events: vec![event(5, 3), event(6, 4)],
            buried: vec![
                Buried {
                    key: Key([3; 32]),
                    session: Session::Mfa(45),
                    removed_at_unix_ms: 1_700_000_200_005,
                },
                Buried {
                    key: Key([4; 32]),
                    session: Session::Unknown,
                    removed_at_unix_ms: 1_700_000_200_006,
                },
            ],
            next_seq: 7,
        },
        Record::Acked { up_to: 5 },
        deltas(14),
        Record::Clock {
            core_last_contact_unix_ms: Some(1_700_000_300_000),
            offline_ms: Some(7),
            saved_unix_ms: Some(1_700_000_300_001),
        },
    ]
}

/// The sample state after the first `k` of [`records`], written out by hand.
fn expected_after(id: &str, k: usize) -> (PersistedState, Vec<Record>) {
    let mut s = sample_state(id);
    let all = records();
    if k >= 2 {
        s.pending_events.push(event(5, 3));
        s.pending_events.push(event(6, 4));
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        s.tombstones
            .bury(Key([3; 32]), Session::Mfa(45), at(1_700_000_200_005));
        s.tombstones
            .bury(Key([4; 32]), Session::Unknown, at(1_700_000_200_006));
        s.next_seq = 7;
    }
    if k >= 3 {
        // The sample's event 4 and event 5 are acknowledged.
        s.pending_events = vec![event(6, 4)];
    }
    if k >= 5 {
        s.core_last_contact_unix_ms = Some(1_700_000_300_000);
        s.offline_ms = Some(7);
        s.saved_unix_ms = Some(1_700_000_300_001);
    }
    let replay = [(1, &all[0]), (4, &all[3])]
        .into_iter()
        .filter(|(n, _)| k >= *n)
        .map(|(_, r)| r.clone())
        .collect();
    (s, replay)
}

fn loaded(outcome: LoadOutcome) -> PersistedState {
    match outcome {
        LoadOutcome::Loaded(s) => *s,
        other => panic!("expected Loaded, got {other:?}"),
    }
}

/// A saved sample base and the journal after appending each record alone: the journal's
/// length after 0, 1, .. records.
fn saved_with_records(dir: &Path) -> (String, Vec<u64>) {
    let (mut store, _) = StateStore::open(dir).unwrap();
    let id = store.gateway_id().to_string();
    store.save(&sample_state(&id)).unwrap();
    let mut ends = vec![store.journal_bytes()];
    for r in records() {
        let n = store.append(std::slice::from_ref(&r)).unwrap();
        assert!(n > 0);
        ends.push(store.journal_bytes());
    }
    (id, ends)
}

#[test]
fn load_is_the_base_with_the_records_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (id, ends) = saved_with_records(tmp.path());
    assert_eq!(
        fs::metadata(tmp.path().join(JOURNAL_FILE)).unwrap().len(),
        *ends.last().unwrap()
    );
    assert_eq!(
        fs::metadata(tmp.path().join(JOURNAL_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    let (want, want_replay) = expected_after(&id, 5);
    assert_eq!(loaded(outcome), want);
    assert_eq!(store.take_replay(), want_replay);
    assert!(store.take_replay().is_empty());
    assert_eq!(
        peek(tmp.path()).unwrap(),
        Some(Peeked {
            state: want.clone(),
            replay: want_replay.clone()
        })
    );

    // Appending goes on after the records read, in a group of two.
    store
        .append(&[Record::Acked { up_to: 6 }, deltas(15)])
        .unwrap();
    drop(store);
    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    let mut want = want;
    want.pending_events.clear();
    assert_eq!(loaded(outcome), want);
    let mut want_replay = want_replay;
    want_replay.push(deltas(15));
    assert_eq!(store.take_replay(), want_replay);
}

#[test]
fn every_truncation_of_the_journal_is_a_prefix_of_the_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (id, ends) = saved_with_records(tmp.path());
    let path = tmp.path().join(JOURNAL_FILE);
    let full = fs::read(&path).unwrap();
    let base = fs::read(tmp.path().join(STATE_FILE)).unwrap();
    for cut in HEADER_LEN..=full.len() {
        fs::write(tmp.path().join(STATE_FILE), &base).unwrap();
        fs::write(&path, &full[..cut]).unwrap();
        let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
        // The records that ended at or before the cut.
        let k = ends.iter().filter(|&&end| end <= cut as u64).count() - 1;
        let (want, want_replay) = expected_after(&id, k);
        assert_eq!(loaded(outcome), want, "cut at {cut}");
        assert_eq!(store.take_replay(), want_replay, "cut at {cut}");
        // The torn tail is cut off the file, so the next append follows record k.
        assert_eq!(fs::metadata(&path).unwrap().len(), ends[k], "cut at {cut}");
        assert_eq!(store.journal_bytes(), ends[k]);
    }
}

#[test]
fn a_flipped_bit_drops_its_record_and_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, ends) = saved_with_records(tmp.path());
    let full = fs::read(tmp.path().join(JOURNAL_FILE)).unwrap();
    let all = records();
    // Every byte of every record (frame header and payload alike), through the decoder.
    for at in HEADER_LEN..full.len() {
        let mut bytes = full.clone();
        bytes[at] ^= 0x10;
        let decoded = journal::decode(&bytes).unwrap();
        let k = ends.iter().filter(|&&end| end <= at as u64).count() - 1;
        assert_eq!(decoded.records, all[..k], "flip at {at}");
        assert_eq!(decoded.valid_len as u64, ends[k]);
        assert_eq!(decoded.tail.unwrap().offset as u64, ends[k]);
    }
    // And through the store: a flip in the third record keeps the first two.
    let mut bytes = full.clone();
    bytes[(ends[2] + ends[3]) as usize / 2] ^= 1;
    fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    let (want, want_replay) = expected_after(store.gateway_id(), 2);
    assert_eq!(loaded(outcome), want);
    assert_eq!(store.take_replay(), want_replay);
}

#[test]
fn save_after_appends_leaves_an_empty_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let (id, ends) = saved_with_records(tmp.path());
    assert!(*ends.last().unwrap() > HEADER_LEN as u64);
    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    let mut newer = loaded(outcome);
    newer.applied_revision = 14;
    store.save(&newer).unwrap();
    assert_eq!(store.journal_bytes(), HEADER_LEN as u64);
    assert_eq!(
        fs::metadata(tmp.path().join(JOURNAL_FILE)).unwrap().len(),
        HEADER_LEN as u64
    );
    drop(store);
    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(loaded(outcome), newer);
    assert!(store.take_replay().is_empty());
    assert_eq!(newer.gateway_id, id);
}

#[test]
fn a_crash_between_the_two_renames_of_a_save_keeps_the_new_base_alone() {
    let tmp = tempfile::tempdir().unwrap();
    saved_with_records(tmp.path());
    let path = tmp.path().join(JOURNAL_FILE);
    let old_journal = fs::read(&path).unwrap();
    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    let mut newer = loaded(outcome);
    newer.applied_revision = 14;
    store.save(&newer).unwrap();
    drop(store);
    // The new base is renamed in; the crash came before the new journal's rename.
    fs::write(&path, &old_journal).unwrap();

    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(
        loaded(outcome),
        newer,
        "the old records are not applied twice"
    );
    assert!(store.take_replay().is_empty());
    assert_eq!(fs::metadata(&path).unwrap().len(), HEADER_LEN as u64);
    // And appends after it are read back.
    store.append(&[deltas(15)]).unwrap();
    drop(store);
    let (mut store, _) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(store.take_replay(), vec![deltas(15)]);
}

#[test]
fn append_needs_a_base_and_a_stray_journal_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    // A journal without a base (its base was lost), of generation 5, with one record.
    let mut bytes = journal::header(5).to_vec();
    journal::encode(&[deltas(9)], &mut bytes).unwrap();
    fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();

    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert!(matches!(outcome, LoadOutcome::Fresh));
    assert!(store.take_replay().is_empty());
    assert!(store.should_compact());
    assert!(matches!(
        store.append(&[Record::Acked { up_to: 1 }]),
        Err(StateError::NeedsSave)
    ));
    let id = store.gateway_id().to_string();
    store.save(&PersistedState::new(id.clone())).unwrap();
    let on_disk = fs::read(tmp.path().join(JOURNAL_FILE)).unwrap();
    assert_eq!(on_disk, journal::header(6));
    store.append(&[Record::Acked { up_to: 1 }]).unwrap();
    drop(store);
    let (_, outcome) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(loaded(outcome).next_seq, 2);
}

#[test]
fn a_newer_journal_format_is_an_error_and_stays() {
    let tmp = tempfile::tempdir().unwrap();
    saved_with_records(tmp.path());
    let path = tmp.path().join(JOURNAL_FILE);
    let mut bytes = fs::read(&path).unwrap();
    // Version 2 in the header, with a matching header checksum.
    let generation = journal::read_header(&bytes).unwrap();
    let mut header = journal::header(generation);
    header[8] = 2;
    let sum = ring::digest::digest(&ring::digest::SHA256, &header[..20]);
    header[20..].copy_from_slice(&sum.as_ref()[..8]);
    bytes[..HEADER_LEN].copy_from_slice(&header);
    fs::write(&path, &bytes).unwrap();
    let err = StateStore::open(tmp.path()).unwrap_err();
    assert!(
        matches!(err, StateError::UnsupportedJournal { found: 2, .. }),
        "{err}"
    );
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_corrupt_header_moves_the_journal_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let (id, _) = saved_with_records(tmp.path());
    let path = tmp.path().join(JOURNAL_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[13] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(loaded(outcome), sample_state(&id));
    assert!(store.take_replay().is_empty());
    let aside: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with("state.journal.corrupt-").then_some(name)
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(fs::read(tmp.path().join(&aside[0])).unwrap(), bytes);
}

#[test]
fn compaction_waits_for_the_journal_to_outgrow_the_base_and_the_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = StateStore::open(tmp.path()).unwrap();
    let id = store.gateway_id().to_string();
    store.save(&sample_state(&id)).unwrap();
    assert!(store.base_bytes() > 0 && store.base_bytes() < COMPACT_FLOOR);
    while store.journal_bytes() <= COMPACT_FLOOR {
        assert!(!store.should_compact(), "at {}", store.journal_bytes());
        store.append(&[deltas(13)]).unwrap();
    }
    assert!(store.should_compact());
    store.save(&sample_state(&id)).unwrap();
    assert!(!store.should_compact());
}
