//! The indexed model against a straightforward reference (each claim scans every peer,
//! O(N²)), and against the planner (a plan applied converges).

use super::*;
use crate::model::{Desired, InterfaceSpec, PeerSpec, SecretKey};
use crate::plan::{plan, DeviceChange, PeerUpdate, Step};
use proptest::prelude::*;

/// The kernel's rule written the plain way: every claim scans every other peer.
fn reference(observed: &mut Observed, plan: &Plan) {
    for step in &plan.steps {
        match &step.op {
            Op::AddPeer(spec) => {
                claim_by_scan(&mut observed.device, &spec.public_key, &spec.allowed_ips);
                observed
                    .device
                    .peers
                    .insert(spec.public_key, PeerState::fresh(spec.clone()));
            }
            Op::UpdatePeer(update) => {
                if let Some(ips) = &update.allowed_ips {
                    claim_by_scan(&mut observed.device, &update.public_key, ips);
                }
                if let Some(peer) = observed.device.peers.get_mut(&update.public_key) {
                    update_config(Arc::make_mut(&mut peer.config), update);
                }
            }
            Op::RemovePeer(key) => {
                observed.device.peers.remove(key);
            }
            // Link and device settings have no rule beyond setting the field.
            other => {
                let mut m = KernelModel {
                    observed: std::mem::take(observed),
                    owners: Owners::new(),
                    reads: 0,
                };
                m.apply_op(other);
                *observed = m.observed;
            }
        }
    }
}

fn claim_by_scan(device: &mut DeviceState, owner: &Key, ips: &AllowedIps) {
    for (key, peer) in device.peers.iter_mut() {
        if key != owner {
            Arc::make_mut(&mut peer.config)
                .allowed_ips
                .retain(|ip| !ips.contains(ip));
        }
    }
}

fn key(n: u8) -> Key {
    Key([n; 32])
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u8..6).prop_map(|a| IpNet::new(std::net::Ipv4Addr::new(10, 0, 0, a).into(), 32).unwrap()),
        (0u16..3).prop_map(|a| {
            IpNet::new(
                std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, a).into(),
                128,
            )
            .unwrap()
        }),
    ]
}

fn arb_ips() -> impl Strategy<Value = AllowedIps> {
    proptest::collection::vec(arb_net(), 0..4).prop_map(|v| v.into_iter().collect())
}

fn arb_spec() -> impl Strategy<Value = PeerSpec> {
    (0u8..8, arb_ips(), 0u16..2).prop_map(|(k, ips, ka)| {
        let mut spec = PeerSpec::new(key(k), ips);
        spec.persistent_keepalive = ka;
        spec
    })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => arb_spec().prop_map(|s| Op::AddPeer(s.into())),
        4 => (0u8..8, proptest::option::of(arb_ips()), proptest::option::of(0u16..30)).prop_map(
            |(k, ips, ka)| Op::UpdatePeer(Box::new(PeerUpdate {
                public_key: key(k),
                preshared_key: None,
                persistent_keepalive: ka,
                allowed_ips: ips,
                endpoint: None,
            }))
        ),
        2 => (0u8..8).prop_map(|k| Op::RemovePeer(key(k))),
        1 => Just(Op::CreateLink),
        1 => Just(Op::SetLinkUp),
        1 => (1280u32..1500).prop_map(Op::SetMtu),
        1 => Just(Op::ConfigureDevice(Box::new(DeviceChange { fwmark: Some(3), ..DeviceChange::default() }))),
    ]
}

fn arb_plan() -> impl Strategy<Value = Plan> {
    proptest::collection::vec(arb_op(), 0..8).prop_map(|ops| Plan {
        steps: ops
            .into_iter()
            .map(|op| Step {
                op,
                reasons: Vec::new(),
            })
            .collect(),
    })
}

/// A read: each allowed IP on at most one peer, as the kernel holds them.
fn arb_read() -> impl Strategy<Value = Observed> {
    proptest::collection::vec(arb_spec(), 0..8).prop_map(|specs| {
        let mut seen = BTreeSet::new();
        let peers = specs
            .into_iter()
            .map(|mut s| {
                s.allowed_ips.retain(|ip| seen.insert(*ip));
                (s.public_key, PeerState::fresh(s))
            })
            .collect();
        Observed {
            link: None,
            device: DeviceState {
                peers,
                ..DeviceState::default()
            },
        }
    })
}

proptest! {
    /// Plan after plan of any operations (IPs claimed from others, updates of absent
    /// peers, re-added keys, new links): the indexed model is the reference's state and
    /// its index is the index of that state.
    #[test]
    fn the_indexed_model_equals_the_reference(
        read in arb_read(),
        plans in proptest::collection::vec(arb_plan(), 1..5),
    ) {
        let mut model = KernelModel::new(read.clone());
        let mut plain = read;
        for p in &plans {
            model.apply(p);
            reference(&mut plain, p);
            prop_assert_eq!(&*model, &plain);
            prop_assert_eq!(&model.owners, &index(&model.device));
            let mut once = plain.clone();
            simulate(&mut once, &Plan::default());
            prop_assert_eq!(&once, &plain, "an empty plan changes nothing");
        }
        let mut whole = KernelModel::new(Observed::default()).into_observed();
        for p in &plans {
            simulate(&mut whole, p);
        }
        let mut plain_whole = Observed::default();
        for p in &plans {
            reference(&mut plain_whole, p);
        }
        prop_assert_eq!(whole, plain_whole);
    }
}

fn desired(peers: &[(u8, &[&str])]) -> Desired {
    Desired {
        interface: InterfaceSpec {
            private_key: SecretKey::new([7; 32]),
            listen_port: 51820,
            addresses: ["10.0.0.1/24".parse().unwrap()].into(),
            mtu: Some(1420),
            fwmark: 0,
        },
        peers: peers
            .iter()
            .map(|(n, ips)| {
                let ips: Vec<IpNet> = ips.iter().map(|s| s.parse().unwrap()).collect();
                (key(*n), PeerSpec::new(key(*n), ips).into())
            })
            .collect(),
    }
}

/// A sequence of locations, allowed IPs moving between peers, peers coming and going: the
/// model after each apply is the reference's, and planning again on it is empty.
#[test]
fn the_model_matches_the_reference_and_planning_again_is_empty() {
    let steps = [
        desired(&[(1, &["10.0.0.2/32"]), (2, &["10.0.0.3/32", "10.1.0.0/16"])]),
        // An IP moves from 2 to a new peer 3; 1 gains one.
        desired(&[
            (1, &["10.0.0.2/32", "10.0.0.9/32"]),
            (2, &["10.0.0.3/32"]),
            (3, &["10.1.0.0/16"]),
        ]),
        // 1 removed, its IP given to 2; 3 swaps with 2.
        desired(&[(2, &["10.1.0.0/16", "10.0.0.2/32"]), (3, &["10.0.0.3/32"])]),
        desired(&[]),
        desired(&[(4, &["10.0.0.3/32"]), (5, &["10.0.0.2/32"])]),
    ];
    let mut model = KernelModel::default();
    let mut plain = Observed::default();
    for (i, want) in steps.iter().enumerate() {
        let p = plan(want, &model);
        model.apply(&p);
        reference(&mut plain, &p);
        assert_eq!(*model, plain, "step {i}");
        assert_eq!(model.owners, index(&model.device), "step {i}: owners");
        assert!(
            plan(want, &model).is_empty(),
            "step {i}: {:?}",
            plan(want, &model)
        );
    }
}

/// A plan that takes an IP from a peer it does not otherwise touch (as after drift): the
/// other peer loses it, as in the kernel.
#[test]
fn a_claimed_ip_leaves_its_old_owner() {
    let mut model = KernelModel::default();
    let first = plan(&desired(&[(1, &["10.0.0.2/32"])]), &model);
    model.apply(&first);
    let p = plan(
        &desired(&[(1, &["10.0.0.2/32"]), (2, &["10.0.0.2/32"])]),
        &model,
    );
    model.apply(&p);
    assert_eq!(model.owners, index(&model.device));
    assert!(model.device.peers[&key(1)].config.allowed_ips.is_empty());
    assert_eq!(model.owners[&"10.0.0.2/32".parse().unwrap()], key(2));
}

/// An update naming a peer the interface does not hold takes its IPs from their holder
/// and leaves them to nobody.
#[test]
fn an_update_of_an_absent_peer_frees_its_ips() {
    let mut model = KernelModel::default();
    model.apply(&plan(&desired(&[(1, &["10.0.0.2/32"])]), &model));
    let update = Op::UpdatePeer(Box::new(PeerUpdate {
        public_key: key(9),
        preshared_key: None,
        persistent_keepalive: None,
        allowed_ips: Some(["10.0.0.2/32".parse().unwrap()].into()),
        endpoint: None,
    }));
    model.apply(&Plan {
        steps: vec![Step {
            op: update,
            reasons: Vec::new(),
        }],
    });
    assert!(model.device.peers[&key(1)].config.allowed_ips.is_empty());
    assert!(!model.device.peers.contains_key(&key(9)));
    assert!(model.owners.is_empty(), "{:?}", model.owners);
}

/// The model holds the desired peers themselves, not copies: after a cold apply, after a
/// read that finds the same settings, and (with [`KernelModel::share`]) after an update.
#[test]
fn the_model_shares_the_desired_peers() {
    let want = desired(&[(1, &["10.0.0.2/32"]), (2, &["10.0.0.3/32"])]);
    let shared = |model: &KernelModel, n: u8| {
        Arc::ptr_eq(&model.device.peers[&key(n)].config, &want.peers[&key(n)])
    };
    let mut model = KernelModel::default();
    model.apply(&plan(&want, &model));
    assert!(
        shared(&model, 1) && shared(&model, 2),
        "a cold apply shares"
    );

    // A read brings its own copies of the same settings, and traffic.
    let mut read = Observed::clone(&model);
    for p in read.device.peers.values_mut() {
        p.config = Arc::new(PeerSpec::clone(&p.config));
        p.rx_bytes = 7;
    }
    model.refresh_with(read);
    assert!(
        shared(&model, 1) && shared(&model, 2),
        "a read keeps them shared"
    );
    assert_eq!(model.device.peers[&key(1)].rx_bytes, 7);

    // An update gives the model its own copy; `share` gives it up.
    let mut next = want.clone();
    Arc::make_mut(next.peers.get_mut(&key(1)).unwrap()).persistent_keepalive = 25;
    let p = plan(&next, &model);
    model.apply(&p);
    let peer = &model.device.peers[&key(1)].config;
    assert!(!Arc::ptr_eq(peer, &next.peers[&key(1)]));
    model.share(&next, [key(1), key(2), key(9)].iter());
    assert!(Arc::ptr_eq(
        &model.device.peers[&key(1)].config,
        &next.peers[&key(1)]
    ));
    assert!(plan(&next, &model).is_empty());
}
