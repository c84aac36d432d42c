//! One validator (§11): over generated admin input, whatever the Core's admin API accepts
//! the agent's validator accepts, and the agent applies it (in-process Core, memory
//! backend). The input mixes valid values with the cases gateways must never receive:
//! whitespace, bare addresses, host bits, `/0`, overlaps, the gateway's own address, port 0,
//! all-zero and low-order keys, the location's own key, out-of-range numbers.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use gatehouse::model::{Key, SecretKey};
use gatehouse_core::api::{NewLocation, NewPeer, PeerPatch};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::*;

/// A public key of order 8 (the Curve25519 8-torsion).
const ORDER_8: &str = "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=";

#[derive(Clone, Debug)]
enum KeyChoice {
    Fresh(u8),
    Own,
    Zero,
    LowOrder,
}

#[derive(Clone, Debug)]
struct GenPeer {
    key: KeyChoice,
    allowed_ips: Vec<String>,
    endpoint: Option<String>,
    psk: Option<u8>,
    keepalive: u64,
}

#[derive(Clone, Debug)]
struct Input {
    addresses: Vec<String>,
    mtu: u64,
    listen_port: u64,
    peers: Vec<GenPeer>,
    bulk: usize,
    patch: Option<(usize, Vec<String>)>,
}

fn prefix() -> impl Strategy<Value = String> {
    let v4 = (
        0u8..3,
        0u8..3,
        0u8..4,
        prop::sample::select(vec![0u8, 8, 16, 24, 30, 32]),
    );
    let v6 = (0u16..3, prop::sample::select(vec![0u8, 64, 127, 128]));
    prop_oneof![
        4 => (v4, any::<bool>(), any::<bool>()).prop_map(|((a, b, c, len), bare, space)| {
            let ip = format!("10.{a}.{b}.{c}");
            let s = if bare && len == 32 { ip } else { format!("{ip}/{len}") };
            if space { format!(" {s}") } else { s }
        }),
        1 => v6.prop_map(|(x, len)| format!("fd00::{x:x}/{len}")),
    ]
}

fn gen_peer() -> impl Strategy<Value = GenPeer> {
    let key = prop_oneof![
        8 => (1u8..=250).prop_map(KeyChoice::Fresh),
        1 => Just(KeyChoice::Own),
        1 => Just(KeyChoice::Zero),
        1 => Just(KeyChoice::LowOrder),
    ];
    let endpoint = prop::sample::select(vec![
        None,
        Some("192.0.2.1:51820".to_string()),
        Some(" [fd00::9]:1".to_string()),
        Some("192.0.2.1:0".to_string()),
        Some("nonsense".to_string()),
    ]);
    let psk = prop::sample::select(vec![None, Some(0u8), Some(7u8)]);
    (
        key,
        prop::collection::vec(prefix(), 0..3),
        endpoint,
        psk,
        prop::sample::select(vec![0u64, 25, 70000]),
    )
        .prop_map(|(key, allowed_ips, endpoint, psk, keepalive)| GenPeer {
            key,
            allowed_ips,
            endpoint,
            psk,
            keepalive,
        })
}

fn input() -> impl Strategy<Value = Input> {
    let addresses = prop::collection::vec(
        prop::sample::select(vec![
            "10.0.0.1/24",
            " 10.0.0.1/24",
            "10.1.0.1/16",
            "fd00::1/64",
            "10.0.0.255/24",
            "0.0.0.0/0",
            "224.0.0.1/24",
            "10.2.0.1",
        ]),
        1..3,
    )
    .prop_map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>());
    (
        addresses,
        prop::sample::select(vec![0u64, 1280, 1420, 100, 9001]),
        prop::sample::select(vec![51820u64, 1, 0, 70000]),
        prop::collection::vec(gen_peer(), 0..7),
        0usize..4,
        prop::option::of((0usize..7, prop::collection::vec(prefix(), 0..2))),
    )
        .prop_map(|(addresses, mtu, listen_port, peers, bulk, patch)| Input {
            addresses,
            mtu,
            listen_port,
            peers,
            bulk,
            patch,
        })
}

fn new_peer(p: &GenPeer, own: &str) -> NewPeer {
    let public_key = match p.key {
        KeyChoice::Fresh(seed) => SecretKey::new([seed; 32]).public_key().to_base64(),
        KeyChoice::Own => own.to_owned(),
        KeyChoice::Zero => B64.encode([0u8; 32]),
        KeyChoice::LowOrder => ORDER_8.to_owned(),
    };
    NewPeer {
        public_key,
        allowed_ips: p.allowed_ips.clone(),
        preshared_key: p.psk.map(|b| B64.encode([b; 32])),
        persistent_keepalive: p.keepalive,
        endpoint: p.endpoint.clone(),
    }
}

/// Runs one generated input against the Core, then checks the agent accepts and applies
/// what the Core serves.
async fn run_case(core: &Core, n: usize, input: &Input) -> Result<(), TestCaseError> {
    let wanted = NewLocation {
        name: format!(" prop {n} "),
        listen_port: input.listen_port,
        addresses: input.addresses.clone(),
        mtu: input.mtu,
        ..Default::default()
    };
    let loc = match core.admin.create_location(&wanted).await {
        Ok(l) => l,
        Err(_) => core
            .admin
            .create_location(&plain_location(&format!("prop {n}")))
            .await
            .expect("a plain location"),
    };
    let peers: Vec<NewPeer> = input
        .peers
        .iter()
        .map(|p| new_peer(p, &loc.public_key))
        .collect();
    let split = input.bulk.min(peers.len());
    let (bulk, singles) = peers.split_at(split);
    if !bulk.is_empty() {
        let _ = core.admin.add_peers(loc.id, bulk).await;
    }
    for p in singles {
        let _ = core.admin.add_peer(loc.id, p).await;
    }
    if let Some((i, ips)) = &input.patch {
        let stored = core.admin.peers(loc.id).await.unwrap();
        if let Some(p) = stored.get(*i) {
            let patch = PeerPatch {
                allowed_ips: Some(ips.clone()),
                ..Default::default()
            };
            let _ = core.admin.patch_peer(loc.id, p.id, &patch).await;
        }
    }

    let token = core.admin.create_token(loc.id).await.unwrap();
    let rev = core.revision(loc.id).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    let accepted = tokio::time::timeout(converge_limit(), async {
        while agent.status().applied_revision < rev {
            if agent.status().last_rejected.is_some() {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    })
    .await;
    let rejected = agent.status().last_rejected.clone();
    prop_assert!(
        accepted == Ok(true),
        "the agent did not apply revision {rev}: rejected {rejected:?}"
    );
    let stored: BTreeSet<Key> = core
        .admin
        .peers(loc.id)
        .await
        .unwrap()
        .iter()
        .filter_map(|p| Key::from_base64(&p.public_key))
        .collect();
    let applied: BTreeSet<Key> = agent.backend.state().device.peers.keys().copied().collect();
    prop_assert_eq!(applied, stored, "the agent applied every stored peer");
    agent.stop().await.unwrap();
    Ok(())
}

#[test]
fn whatever_the_core_accepts_the_agent_applies() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let core = rt.block_on(Core::start());
    let cases: u32 = std::env::var("GATEHOUSE_PROP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let n = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&input(), |input| {
            let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(run_case(&core, n, &input))
        })
        .unwrap();
}
