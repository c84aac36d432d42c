//! The machine's model of the interface: the last read with every successful apply carried
//! over by the rule of [`crate::plan::simulate`] (each allowed IP belongs to one peer; giving
//! it to a peer takes it from the others). Beside the interface the model keeps an index of
//! who holds each allowed IP, built once per read and kept up to date by each apply, so an
//! apply of k peer changes costs O(k log N): a one-peer change costs the same at 1,000 and
//! at 100,000 peers, and a cold apply of 100,000 is not quadratic.

use std::collections::BTreeMap;
use std::ops::Deref;

use ipnet::IpNet;

use crate::model::{DeviceState, Key, Observed, PeerState};
use crate::plan::{simulate, Op, Plan, Step};

/// Who holds each allowed IP.
type Owners = BTreeMap<IpNet, Key>;

/// The interface as the machine believes it is, with the owners of its allowed IPs. Read
/// it as an [`Observed`] (`Deref`); change it only with [`Model::apply`].
#[derive(Clone, Debug, Default)]
pub(super) struct Model {
    observed: Observed,
    owners: Owners,
}

impl Model {
    /// The model of a fresh read of the interface.
    pub(super) fn new(observed: Observed) -> Self {
        let owners = index(&observed.device);
        Model { observed, owners }
    }

    /// Applies `plan` as the interface did (what `simulate` makes of it).
    pub(super) fn apply(&mut self, plan: &Plan) {
        for step in &plan.steps {
            apply_op(&mut self.observed, &mut self.owners, &step.op);
        }
    }
}

impl Deref for Model {
    type Target = Observed;

    fn deref(&self) -> &Observed {
        &self.observed
    }
}

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

/// One operation of a plan on the model and its owners.
fn apply_op(model: &mut Observed, owners: &mut Owners, op: &Op) {
    match op {
        Op::AddPeer(spec) => {
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
                release(owners, key, old.config.allowed_ips.iter());
            }
        }
        // Link and device settings: as `simulate` does (a new link empties the device).
        _ => {
            let step = Step {
                op: op.clone(),
                reasons: Vec::new(),
            };
            simulate(model, &Plan { steps: vec![step] });
            if matches!(op, Op::CreateLink) {
                owners.clear();
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
        let mut model = Model::default();
        let mut reference = Observed::default();
        for (i, want) in steps.iter().enumerate() {
            let p = plan(want, &model);
            model.apply(&p);
            simulate(&mut reference, &p);
            assert_eq!(*model, reference, "step {i}");
            assert_eq!(model.owners, index(&model.device), "step {i}: owners");
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
        let mut model = Model::default();
        let first = plan(&desired(&[(1, &["10.0.0.2/32"])]), &model);
        model.apply(&first);
        let mut reference = (*model).clone();
        let p = Plan {
            steps: plan(
                &desired(&[(1, &["10.0.0.2/32"]), (2, &["10.0.0.2/32"])]),
                &model,
            )
            .steps,
        };
        model.apply(&p);
        simulate(&mut reference, &p);
        assert_eq!(*model, reference);
        assert_eq!(model.owners, index(&model.device));
        assert!(model.device.peers[&Key([1; 32])]
            .config
            .allowed_ips
            .is_empty());
    }
}
