//! Tests of the state directory (on a temp dir; no root needed).

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use gatehouse_proto::v1::PeerEventReason;

use super::*;
use crate::mfa::{MfaTracker, PeerSample, Session, Tombstones};
use crate::model::Key;
use crate::stats::Epochs;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub(super) fn sample_state(id: &str) -> PersistedState {
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut mfa = MfaTracker::new();
    mfa.observe(
        [(
            Key([1; 32]),
            PeerSample {
                rx_bytes: 42,
                last_handshake: Some(wall),
            },
        )],
        Duration::from_secs(3),
        wall,
    );
    let mut tombstones = Tombstones::new();
    tombstones.bury(Key([2; 32]), Session::Mfa(9), wall);
    let mut epochs = Epochs::new();
    epochs.insert(Key([1; 32]), std::num::NonZeroU64::new(77).unwrap());
    PersistedState {
        gateway_id: id.to_string(),
        applied_revision: 12,
        location: Some(vec![0, 1, 2, 250, 255]),
        mfa: mfa.persist(Duration::from_secs(10), wall),
        tombstones,
        epochs,
        pending_events: vec![PendingEvent {
            seq: 4,
            public_key: Key([2; 32]),
            reason: PeerEventReason::MfaInactive,
            last_handshake_ms: 1_699_999_000_000,
            at_ms: 1_700_000_000_000,
            mfa_session: 9,
            peer_id: 31,
            detail: "inactive for 612s > threshold 600s".into(),
        }],
        next_seq: 5,
        core_last_contact_unix_ms: Some(1_700_000_000_000),
        offline_ms: Some(42_000),
        saved_unix_ms: Some(1_700_000_100_000),
        ha: ha_sample(wall),
    }
}

fn ha_sample(wall: SystemTime) -> crate::state::HaPersisted {
    let mut activity = crate::ha::activity::ActivityBook::new();
    activity.relayed(
        Key([1; 32]),
        wall,
        Some("198.51.100.7:40000".parse().unwrap()),
    );
    crate::state::HaPersisted {
        draining: true,
        activity,
        vips_present: vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ],
        operator: Some(crate::ha::role::Operator::Deactivate),
        active_since_unix_ms: Some(1_700_000_000_000),
    }
}

#[test]
fn fresh_then_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/state");
    let (mut store, outcome) = StateStore::open(&dir).unwrap();
    assert!(matches!(outcome, LoadOutcome::Fresh));
    assert_eq!(mode(&dir), 0o700);
    let id = store.gateway_id().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    assert_eq!(
        fs::read_to_string(dir.join(GATEWAY_ID_FILE))
            .unwrap()
            .trim(),
        id
    );
    assert_eq!(mode(&dir.join(GATEWAY_ID_FILE)), 0o600);

    let state = sample_state(&id);
    store.save(&state).unwrap();
    assert_eq!(mode(&dir.join(STATE_FILE)), 0o600);
    // Saving again replaces it.
    let mut newer = state.clone();
    newer.applied_revision = 13;
    store.save(&newer).unwrap();
    drop(store);

    let (store, outcome) = StateStore::open(&dir).unwrap();
    assert_eq!(store.gateway_id(), id);
    match outcome {
        LoadOutcome::Loaded(loaded) => assert_eq!(*loaded, newer),
        other => panic!("expected Loaded, got {other:?}"),
    }
    let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
    assert!(text.contains("\"version\":2"));
    assert!(text.contains("PEER_EVENT_REASON_MFA_INACTIVE"));
    assert_eq!(
        peek(&dir).unwrap(),
        Some(Peeked {
            state: newer,
            replay: vec![]
        })
    );
}

#[test]
fn fresh_start_twice_keeps_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let id = StateStore::open(tmp.path())
        .unwrap()
        .0
        .gateway_id()
        .to_string();
    let (store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert!(matches!(outcome, LoadOutcome::Fresh));
    assert_eq!(store.gateway_id(), id);
}

#[test]
fn truncated_file_is_moved_aside_and_id_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = StateStore::open(tmp.path()).unwrap();
    let id = store.gateway_id().to_string();
    store.save(&sample_state(&id)).unwrap();
    drop(store);
    let path = tmp.path().join(STATE_FILE);
    let full = fs::read(&path).unwrap();
    fs::write(&path, &full[..full.len() / 2]).unwrap();

    let (mut store, outcome) = StateStore::open(tmp.path()).unwrap();
    let LoadOutcome::Corrupt { moved_to, reason } = outcome else {
        panic!("expected Corrupt, got {outcome:?}");
    };
    assert!(reason.contains("JSON"), "{reason}");
    assert!(moved_to
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("state.json.corrupt-"));
    assert_eq!(fs::read(&moved_to).unwrap(), &full[..full.len() / 2]);
    assert!(!path.exists());
    assert_eq!(store.gateway_id(), id);
    // And the agent can go on saving.
    store.save(&PersistedState::new(id.clone())).unwrap();
}

#[test]
fn empty_and_wrong_shape_files_are_corrupt() {
    for content in [
        "",
        "  \n",
        "[1,2]",
        r#"{"gateway_id":"x"}"#,
        r#"{"version":1,"next_seq":"many"}"#,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(STATE_FILE), content).unwrap();
        let (_, outcome) = StateStore::open(tmp.path()).unwrap();
        assert!(
            matches!(outcome, LoadOutcome::Corrupt { .. }),
            "{content:?}: {outcome:?}"
        );
    }
}

#[test]
fn id_comes_from_state_when_id_file_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join(STATE_FILE),
        r#"{"version":1,"gateway_id":"gw-from-state","applied_revision":3}"#,
    )
    .unwrap();
    let (store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(store.gateway_id(), "gw-from-state");
    let LoadOutcome::Loaded(s) = outcome else {
        panic!("expected Loaded")
    };
    assert_eq!(s.applied_revision, 3);
    assert_eq!(
        fs::read_to_string(tmp.path().join(GATEWAY_ID_FILE)).unwrap(),
        "gw-from-state\n"
    );
}

#[test]
fn id_file_wins_over_state() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join(GATEWAY_ID_FILE), "gw-file\n").unwrap();
    fs::write(
        tmp.path().join(STATE_FILE),
        r#"{"version":1,"gateway_id":"gw-state"}"#,
    )
    .unwrap();
    let (store, outcome) = StateStore::open(tmp.path()).unwrap();
    assert_eq!(store.gateway_id(), "gw-file");
    let LoadOutcome::Loaded(s) = outcome else {
        panic!("expected Loaded")
    };
    assert_eq!(s.gateway_id, "gw-file");
}

#[test]
fn leftover_temp_file_is_ignored_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = StateStore::open(tmp.path()).unwrap();
    let id = store.gateway_id().to_string();
    store.save(&sample_state(&id)).unwrap();
    drop(store);
    // A crash mid-write left a torn temp file behind.
    let leftover = tmp.path().join(format!("{TEMP_PREFIX}{STATE_FILE}"));
    fs::write(&leftover, "{\"version\":1,\"gatew").unwrap();

    let (_, outcome) = StateStore::open(tmp.path()).unwrap();
    assert!(matches!(outcome, LoadOutcome::Loaded(ref s) if **s == sample_state(&id)));
    assert!(!leftover.exists());
}

#[test]
fn unknown_version_is_a_clear_error_and_file_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(STATE_FILE);
    fs::write(&path, r#"{"version":3,"gateway_id":"gw","new_thing":[]}"#).unwrap();
    let err = StateStore::open(tmp.path()).unwrap_err();
    assert!(matches!(
        err,
        StateError::UnsupportedVersion { found: 3, .. }
    ));
    assert!(err.to_string().contains("newer gatehouse"), "{err}");
    assert!(path.exists());
}

#[test]
fn second_open_is_refused_while_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = StateStore::open(tmp.path()).unwrap();
    assert!(matches!(
        StateStore::open(tmp.path()),
        Err(StateError::Locked { .. })
    ));
    // Reading for `status` still works.
    assert_eq!(peek(tmp.path()).unwrap(), None);
    drop(store);
    StateStore::open(tmp.path()).unwrap();
}

#[test]
fn debug_redacts_the_location() {
    let mut state = sample_state("gw");
    state.location = Some(b"PRIVATE-KEY-BYTES".to_vec());
    let shown = format!("{state:?}");
    assert!(!shown.contains("80, 82"), "{shown}");
    assert!(shown.contains("redacted"));
}

#[test]
fn a_fresh_start_numbers_events_above_an_earlier_run() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    assert_eq!(first_event_seq(t), 1_700_000_000_123);
    // An earlier run started a second before and used 999 numbers: no overlap.
    let earlier = first_event_seq(t - Duration::from_secs(1));
    assert!(earlier + 999 < first_event_seq(t));
    // A clock before 1970 still gives a valid (nonzero) number.
    assert_eq!(first_event_seq(SystemTime::UNIX_EPOCH), 1);
    assert_eq!(
        first_event_seq(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
        1
    );
}

/// A location of `n` peers with keys and a firewall policy, as the Core sends it.
fn big_location(n: u32) -> gatehouse_proto::v1::Location {
    use gatehouse_proto::v1;
    let peers = (0..n)
        .map(|i| {
            let mut key = [7u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            v1::Peer {
                public_key: key.to_vec(),
                preshared_key: vec![9; 32],
                allowed_ips: vec![format!(
                    "10.{}.{}.{}/32",
                    1 + (i >> 16),
                    (i >> 8) & 255,
                    i & 255
                )],
                persistent_keepalive: 25,
                id: u64::from(i) + 1,
                mfa_session: u64::from(i % 3),
                ..Default::default()
            }
        })
        .collect();
    v1::Location {
        id: 4,
        name: "office".into(),
        interface: Some(v1::Interface {
            private_key: vec![5; 32],
            listen_port: 51820,
            addresses: vec!["10.0.0.1/8".into()],
            mtu: 1420,
            fwmark: 0,
        }),
        peers,
        firewall: None,
        mfa: Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 600,
        }),
    }
}

#[test]
fn a_borrowed_state_is_saved_as_the_owned_one_and_loads_back() {
    use crate::location::Held;
    use crate::validate::validate_location;

    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    // Large enough that the text passes the write buffer many times over.
    let location = big_location(3_000);
    let valid = validate_location(&location).expect("valid");
    let held = Held::new(8, location, valid);
    let mut mfa = MfaTracker::new();
    mfa.observe(
        (0..3_000u32).map(|i| {
            let mut key = [7u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let sample = PeerSample {
                rx_bytes: u64::from(i),
                last_handshake: (i % 2 == 0).then_some(wall),
            };
            (Key(key), sample)
        }),
        Duration::from_secs(3),
        wall,
    );
    let owned = sample_state("gw");
    let mut expected = owned.clone();
    expected.location = Some(prost::Message::encode_to_vec(&held.to_proto()));
    expected.mfa = mfa.persist(Duration::from_secs(10), wall);
    let view = SavedState {
        gateway_id: &owned.gateway_id,
        applied_revision: owned.applied_revision,
        location: Some(LocationText(&held)),
        mfa: mfa.saved(Duration::from_secs(10), wall),
        tombstones: &owned.tombstones,
        epochs: &owned.epochs,
        pending_events: &owned.pending_events,
        next_seq: owned.next_seq,
        core_last_contact_unix_ms: owned.core_last_contact_unix_ms,
        offline_ms: owned.offline_ms,
        saved_unix_ms: owned.saved_unix_ms,
        ha: HaSaved {
            draining: owned.ha.draining,
            activity: &owned.ha.activity,
            vips_present: owned.ha.vips_present.clone(),
            operator: owned.ha.operator,
            active_since_unix_ms: owned.ha.active_since_unix_ms,
        },
    };

    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (mut by_view, _) = StateStore::open(&a).unwrap();
    let (mut by_value, _) = StateStore::open(&b).unwrap();
    by_view.save(&view).unwrap();
    by_value.save(&expected).unwrap();
    let text = fs::read(a.join(STATE_FILE)).unwrap();
    assert!(
        text.len() > 4 * Wiped::<File>::CAPACITY,
        "{} bytes",
        text.len()
    );
    assert!(
        text == fs::read(b.join(STATE_FILE)).unwrap(),
        "the same bytes as the owned state's"
    );
    assert_eq!(by_view.base_bytes(), text.len() as u64);
    assert_eq!(mode(&a.join(STATE_FILE)), 0o600);
    drop(by_view);
    let (_, outcome) = StateStore::open(&a).unwrap();
    match outcome {
        LoadOutcome::Loaded(loaded) => {
            let mut expected = expected;
            expected.gateway_id = loaded.gateway_id.clone();
            assert!(*loaded == expected, "loads as the owned state");
        }
        other => panic!("expected Loaded, got {other:?}"),
    }
}

#[test]
fn a_save_that_cannot_encode_leaves_the_old_file() {
    struct Refuses;
    impl Serialize for Refuses {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = StateStore::open(tmp.path()).unwrap();
    let state = sample_state(store.gateway_id());
    store.save(&state).unwrap();
    let before = fs::read(tmp.path().join(STATE_FILE)).unwrap();
    assert!(matches!(store.save(&Refuses), Err(StateError::Encode(_))));
    assert_eq!(fs::read(tmp.path().join(STATE_FILE)).unwrap(), before);
    assert!(fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(TEMP_PREFIX)));
}
