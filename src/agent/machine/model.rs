//! The machine's model of the interface after a successful apply: the rule of
//! [`crate::plan::simulate`] (each allowed IP belongs to one peer; giving it to a peer
//! takes it from the others), with an index of the allowed IPs' owners built once per
//! apply, so an apply of k peer changes costs one pass over the model plus O(k log N)
//! instead of O(k · N) (which made a cold apply of 100,000 peers quadratic).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::model::{DeviceState, Key, Observed, PeerState};
use crate::plan::{simulate, Op, Plan};

/// Who holds each allowed IP.
type Owners = BTreeMap<IpNet, Key>;

fn index(device: &DeviceState) -> Owners {
    device
        .peers
        .iter()
        .flat_map(|(k, p)| p.config.allowed_ips.iter().map(move |ip| (*ip, *k)))
        .collect()
}

/// Gives `ips` to `owner`, taking them from whoever held them.
fn claim(
    owners: &mut Owners,
    device: &mut DeviceState,
    owner: &Key,
    ips: &std::collections::BTreeSet<IpNet>,
) {
    for ip in ips {
        if let Some(prev) = owners.insert(*ip, *owner) {
            if prev != *owner {
                if let Some(p) = device.peers.get_mut(&prev) {
                    p.config.allowed_ips.remove(ip);
                }
            }
        }
    }
}

/// Applies `plan` to the model as the interface did (what `simulate` would make of it).
pub(super) fn apply(model: &mut Observed, plan: &Plan) {
    let mut owners: Option<Owners> = None;
    for step in &plan.steps {
        match &step.op {
            Op::AddPeer(spec) => {
                let owners = owners.get_or_insert_with(|| index(&model.device));
                // A re-added key replaces the old entry: its old IPs are released first.
                if let Some(old) = model.device.peers.remove(&spec.public_key) {
                    release(owners, &spec.public_key, old.config.allowed_ips.iter());
                }
                claim(
                    owners,
                    &mut model.device,
                    &spec.public_key,
                    &spec.allowed_ips,
                );
                model
                    .device
                    .peers
                    .insert(spec.public_key, PeerState::fresh(spec.clone()));
            }
            Op::UpdatePeer(update) => {
                if let Some(ips) = &update.allowed_ips {
                    let owners = owners.get_or_insert_with(|| index(&model.device));
                    claim(owners, &mut model.device, &update.public_key, ips);
                    if let Some(peer) = model.device.peers.get(&update.public_key) {
                        let dropped: Vec<IpNet> =
                            peer.config.allowed_ips.difference(ips).copied().collect();
                        release(owners, &update.public_key, dropped.iter());
                    }
                }
                if let Some(peer) = model.device.peers.get_mut(&update.public_key) {
                    let c = &mut peer.config;
                    if let Some(psk) = &update.preshared_key {
                        c.preshared_key = psk.clone();
                    }
                    if let Some(k) = update.persistent_keepalive {
                        c.persistent_keepalive = k;
                    }
                    if let Some(ips) = &update.allowed_ips {
                        c.allowed_ips = ips.clone();
                    }
                    if let Some(e) = update.endpoint {
                        c.endpoint = Some(e);
                    }
                }
            }
            Op::RemovePeer(key) => {
                if let Some(old) = model.device.peers.remove(key) {
                    if let Some(owners) = owners.as_mut() {
                        release(owners, key, old.config.allowed_ips.iter());
                    }
                }
            }
            // Link and device settings: as `simulate` does (a new link empties the device).
            _ => {
                simulate(
                    model,
                    &Plan {
                        steps: vec![step.clone()],
                    },
                );
                if matches!(step.op, Op::CreateLink) {
                    owners = None;
                }
            }
        }
    }
}

/// Forgets `ips` as held by `key` (where it still holds them).
fn release<'a>(owners: &mut Owners, key: &Key, ips: impl Iterator<Item = &'a IpNet>) {
    for ip in ips {
        if owners.get(ip) == Some(key) {
            owners.remove(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Desired, InterfaceSpec, PeerSpec, SecretKey};
    use crate::plan::plan;

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
                    (Key([*n; 32]), PeerSpec::new(Key([*n; 32]), ips))
                })
                .collect(),
        }
    }

    /// A sequence of locations, allowed IPs moving between peers, peers coming and going:
    /// the model after each apply is what `simulate` makes, and planning again on it is
    /// empty.
    #[test]
    fn the_model_matches_simulate_and_planning_again_is_empty() {
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
        let mut model = Observed::default();
        let mut reference = Observed::default();
        for (i, want) in steps.iter().enumerate() {
            let p = plan(want, &model);
            apply(&mut model, &p);
            simulate(&mut reference, &p);
            assert_eq!(model, reference, "step {i}");
            assert!(
                plan(want, &model).is_empty(),
                "step {i}: {:?}",
                plan(want, &model)
            );
        }
    }

    /// A plan that takes an IP from a peer it does not otherwise touch (as after drift):
    /// the other peer loses it, as in the kernel.
    #[test]
    fn a_claimed_ip_leaves_its_old_owner() {
        let mut model = Observed::default();
        let first = plan(&desired(&[(1, &["10.0.0.2/32"])]), &model);
        apply(&mut model, &first);
        let mut reference = model.clone();
        let p = Plan {
            steps: plan(
                &desired(&[(1, &["10.0.0.2/32"]), (2, &["10.0.0.2/32"])]),
                &model,
            )
            .steps,
        };
        apply(&mut model, &p);
        simulate(&mut reference, &p);
        assert_eq!(model, reference);
        assert!(model.device.peers[&Key([1; 32])]
            .config
            .allowed_ips
            .is_empty());
    }
}
