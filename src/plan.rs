//! The reconciler: desired state + observed interface → a plan of operations, each with
//! the reasons it exists (subject, field, old, new). Pure: no I/O, no clock.
//!
//! Properties (checked by a property test below): applying a plan to the observed state
//! with [`simulate`] gives a state that matches the desired one, and planning again from
//! there gives an empty plan. Unchanged peers get no operation at all, so their sessions
//! and counters survive.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;

mod kernel;
pub use kernel::{simulate, KernelModel, Refresh};

use crate::model::{
    AllowedIps, Desired, DeviceState, Key, LinkState, Observed, PeerSpec, SecretKey,
};

/// One change to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create the WireGuard link (it does not exist).
    CreateLink,
    SetMtu(u32),
    SetLinkUp,
    AddAddress(IpNet),
    RemoveAddress(IpNet),
    /// Device-level settings; `None` fields stay as they are.
    ConfigureDevice(DeviceChange),
    AddPeer(PeerSpec),
    UpdatePeer(PeerUpdate),
    RemovePeer(Key),
}

/// Device fields to set.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceChange {
    pub private_key: Option<SecretKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
}

/// Fields of an existing peer to change; `None` fields stay as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    /// `Some(None)` removes the preshared key.
    pub preshared_key: Option<Option<SecretKey>>,
    pub persistent_keepalive: Option<u16>,
    /// Replaces the whole allowed-IP list.
    pub allowed_ips: Option<AllowedIps>,
    pub endpoint: Option<SocketAddr>,
}

/// Sets the fields `update` names on `config`, as the kernel does for a peer it holds (the
/// allowed IPs replace the old ones; who else held them is [`KernelModel`]'s business).
pub fn update_config(config: &mut PeerSpec, update: &PeerUpdate) {
    if let Some(psk) = &update.preshared_key {
        config.preshared_key = psk.clone();
    }
    if let Some(k) = update.persistent_keepalive {
        config.persistent_keepalive = k;
    }
    if let Some(ips) = &update.allowed_ips {
        config.allowed_ips = ips.clone();
    }
    if let Some(e) = update.endpoint {
        config.endpoint = Some(e);
    }
}

impl PeerUpdate {
    fn new(public_key: Key) -> Self {
        PeerUpdate {
            public_key,
            preshared_key: None,
            persistent_keepalive: None,
            allowed_ips: None,
            endpoint: None,
        }
    }
}

/// Why an operation exists: `subject`'s `field` goes from `old` to `new`.
/// Secrets are shown as `<set>` / `<none>` only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    pub subject: String,
    pub field: &'static str,
    pub old: String,
    pub new: String,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} -> {}",
            self.subject, self.field, self.old, self.new
        )
    }
}

/// An operation with its reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub op: Op,
    pub reasons: Vec<Reason>,
}

/// Operations in the order they must run: link, addresses, peer removals (which free
/// allowed IPs), updates, additions, then device settings last: a device setting the
/// kernel refuses (a listen port taken by another program) must not keep peer changes,
/// revocations among them, from the interface. The agent executes a plan by [`Phase`]
/// (see [`Plan::into_phases`]): peer removals first and on their own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

/// The kinds of operation, in the order the agent applies them. Each is applied on its
/// own, so one failing kind never keeps the others (above all the removals) from the
/// interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Peers to remove (revocations, ended MFA sessions, expiry, offline policy).
    PeerRemovals,
    /// Creating the link and setting it up.
    Link,
    /// Interface addresses and MTU.
    Addresses,
    /// Peers to add or update.
    Peers,
    /// Device settings: private key, listen port, fwmark.
    Device,
}

impl Op {
    /// The phase this operation belongs to.
    pub fn phase(&self) -> Phase {
        match self {
            Op::RemovePeer(_) => Phase::PeerRemovals,
            Op::CreateLink | Op::SetLinkUp => Phase::Link,
            Op::SetMtu(_) | Op::AddAddress(_) | Op::RemoveAddress(_) => Phase::Addresses,
            Op::AddPeer(_) | Op::UpdatePeer(_) => Phase::Peers,
            Op::ConfigureDevice(_) => Phase::Device,
        }
    }
}

/// A plan split by phase, each part in plan order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    pub removals: Plan,
    /// `CreateLink`, when the link is missing (nothing else works until it exists).
    pub create: Option<Step>,
    /// Link and address steps after the create, each applied on its own.
    pub link: Vec<Step>,
    pub peers: Plan,
    pub device: Plan,
}

impl Plan {
    /// Splits the plan by phase, keeping the plan's order within each.
    pub fn into_phases(self) -> Phases {
        let mut phases = Phases::default();
        for step in self.steps {
            match step.op.phase() {
                Phase::PeerRemovals => phases.removals.steps.push(step),
                Phase::Link if step.op == Op::CreateLink => phases.create = Some(step),
                Phase::Link | Phase::Addresses => phases.link.push(step),
                Phase::Peers => phases.peers.steps.push(step),
                Phase::Device => phases.device.steps.push(step),
            }
        }
        phases
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Counts of (link and address ops, device ops, peers added, updated, removed).
    pub fn summary(&self) -> PlanSummary {
        let mut s = PlanSummary::default();
        for step in &self.steps {
            match (&step.op, step.op.phase()) {
                (_, Phase::Link | Phase::Addresses) => s.link += 1,
                (_, Phase::Device) => s.device += 1,
                (Op::AddPeer(_), _) => s.peers_added += 1,
                (_, Phase::Peers) => s.peers_updated += 1,
                (_, Phase::PeerRemovals) => s.peers_removed += 1,
            }
        }
        s
    }
}

/// How many operations of each kind a plan holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanSummary {
    pub link: usize,
    pub device: usize,
    pub peers_added: usize,
    pub peers_updated: usize,
    pub peers_removed: usize,
}

impl fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "link={} device={} peers +{} ~{} -{}",
            self.link, self.device, self.peers_added, self.peers_updated, self.peers_removed
        )
    }
}

/// Plans the operations that make `observed` match `desired`.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    plan_excluding(desired, observed, |_| false)
}

/// [`plan`] for `desired` without the peers `excluded` says (e.g. ended MFA sessions),
/// without copying `desired`: an excluded peer is planned as not wanted.
pub fn plan_excluding(
    desired: &Desired,
    observed: &Observed,
    excluded: impl Fn(&Key) -> bool,
) -> Plan {
    let wanted = Wanted { desired, excluded };
    let mut steps = plan_settings_head(desired, observed);
    plan_peers(&wanted, &observed.device, &mut steps);
    plan_device(desired, &observed.device, &mut steps);
    Plan { steps }
}

/// What a scoped plan covers: some peers, and the link and device settings or not.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub keys: &'a BTreeSet<Key>,
    /// Whether link, address and device settings are planned too.
    pub settings: bool,
}

/// [`plan_excluding`] restricted to `scope`: the same steps, reasons and order as the full
/// plan filtered to the scope's peers (and its settings steps when asked), in
/// O(keys × log N) for the peers, whatever the size of the location.
pub fn plan_keys(
    desired: &Desired,
    observed: &Observed,
    scope: Scope<'_>,
    excluded: impl Fn(&Key) -> bool,
) -> Plan {
    let wanted = Wanted { desired, excluded };
    let device = &observed.device;
    let mut steps = if scope.settings {
        plan_settings_head(desired, observed)
    } else {
        Vec::new()
    };
    // The full plan's order: removals, updates, additions, each in key order.
    for key in scope.keys {
        if device.peers.contains_key(key) && wanted.get(key).is_none() {
            steps.push(removal(key));
        }
    }
    let mut additions = Vec::new();
    for key in scope.keys {
        let Some(want) = wanted.get(key) else {
            continue;
        };
        match device.peers.get(key) {
            None => additions.push(addition(want)),
            Some(have) => steps.extend(peer_update(want, &have.config)),
        }
    }
    steps.extend(additions);
    if scope.settings {
        plan_device(desired, device, &mut steps);
    }
    Plan { steps }
}

/// The desired peers less the excluded ones.
struct Wanted<'a, F> {
    desired: &'a Desired,
    excluded: F,
}

impl<F: Fn(&Key) -> bool> Wanted<'_, F> {
    fn get(&self, key: &Key) -> Option<&PeerSpec> {
        self.desired
            .peers
            .get(key)
            .filter(|_| !(self.excluded)(key))
    }

    fn contains(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &PeerSpec)> {
        self.desired
            .peers
            .iter()
            .filter(|(k, _)| !(self.excluded)(k))
    }
}

fn removal(key: &Key) -> Step {
    step(
        Op::RemovePeer(*key),
        reason(peer_subject(key), "peer", "present", "absent"),
    )
}

fn addition(want: &PeerSpec) -> Step {
    step(
        Op::AddPeer(want.clone()),
        reason(peer_subject(&want.public_key), "peer", "absent", "present"),
    )
}

/// The link steps, which come first in a plan.
fn plan_settings_head(desired: &Desired, observed: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    let empty_link = LinkState::default();
    let link = match &observed.link {
        Some(link) => link,
        None => {
            steps.push(step(
                Op::CreateLink,
                reason("interface", "link", "absent", "present"),
            ));
            &empty_link
        }
    };
    plan_link(desired, link, &mut steps);
    steps
}

fn plan_link(desired: &Desired, link: &LinkState, steps: &mut Vec<Step>) {
    let iface = &desired.interface;
    if let Some(mtu) = iface.mtu {
        if link.mtu != mtu {
            steps.push(step(
                Op::SetMtu(mtu),
                reason("interface", "mtu", link.mtu, mtu),
            ));
        }
    }
    for addr in link.addresses.difference(&iface.addresses) {
        steps.push(step(
            Op::RemoveAddress(*addr),
            reason("interface", "address", addr, "absent"),
        ));
    }
    for addr in iface.addresses.difference(&link.addresses) {
        steps.push(step(
            Op::AddAddress(*addr),
            reason("interface", "address", "absent", addr),
        ));
    }
    if !link.up {
        steps.push(step(
            Op::SetLinkUp,
            reason("interface", "state", "down", "up"),
        ));
    }
}

fn plan_device(desired: &Desired, device: &DeviceState, steps: &mut Vec<Step>) {
    let iface = &desired.interface;
    let mut change = DeviceChange::default();
    let mut reasons = Vec::new();
    if device.private_key.as_ref() != Some(&iface.private_key) {
        change.private_key = Some(iface.private_key.clone());
        reasons.push(reason(
            "interface",
            "private_key",
            secret_label(device.private_key.as_ref()),
            "<new key>",
        ));
    }
    if iface.listen_port != 0 && device.listen_port != iface.listen_port {
        change.listen_port = Some(iface.listen_port);
        reasons.push(reason(
            "interface",
            "listen_port",
            device.listen_port,
            iface.listen_port,
        ));
    }
    if device.fwmark != iface.fwmark {
        change.fwmark = Some(iface.fwmark);
        reasons.push(reason("interface", "fwmark", device.fwmark, iface.fwmark));
    }
    if !reasons.is_empty() {
        steps.push(Step {
            op: Op::ConfigureDevice(change),
            reasons,
        });
    }
}

fn plan_peers<F: Fn(&Key) -> bool>(
    wanted: &Wanted<'_, F>,
    device: &DeviceState,
    steps: &mut Vec<Step>,
) {
    for key in device.peers.keys() {
        if !wanted.contains(key) {
            steps.push(removal(key));
        }
    }
    let mut additions = Vec::new();
    for (key, want) in wanted.iter() {
        match device.peers.get(key) {
            None => additions.push(addition(want)),
            Some(have) => {
                if let Some(update) = peer_update(want, &have.config) {
                    steps.push(update);
                }
            }
        }
    }
    steps.extend(additions);
}

fn peer_update(want: &PeerSpec, have: &PeerSpec) -> Option<Step> {
    let subject = peer_subject(&want.public_key);
    let mut update = PeerUpdate::new(want.public_key);
    let mut reasons = Vec::new();
    if want.preshared_key != have.preshared_key {
        update.preshared_key = Some(want.preshared_key.clone());
        reasons.push(reason(
            &subject,
            "preshared_key",
            secret_label(have.preshared_key.as_ref()),
            match want.preshared_key {
                Some(_) => "<new key>",
                None => "<none>",
            },
        ));
    }
    if want.persistent_keepalive != have.persistent_keepalive {
        update.persistent_keepalive = Some(want.persistent_keepalive);
        reasons.push(reason(
            &subject,
            "persistent_keepalive",
            have.persistent_keepalive,
            want.persistent_keepalive,
        ));
    }
    if want.allowed_ips != have.allowed_ips {
        update.allowed_ips = Some(want.allowed_ips.clone());
        reasons.push(reason(
            &subject,
            "allowed_ips",
            join(&have.allowed_ips),
            join(&want.allowed_ips),
        ));
    }
    // A configured endpoint is where to reach a peer that has not been heard from; once the
    // kernel knows an endpoint (the peer's packets set it when it roams or sits behind a
    // NAT), rewriting it would send the gateway's packets to the old address.
    if let Some(endpoint) = want.endpoint {
        if have.endpoint.is_none() {
            update.endpoint = Some(endpoint);
            reasons.push(reason(
                &subject,
                "endpoint",
                have.endpoint
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "<none>".into()),
                endpoint,
            ));
        }
    }
    if reasons.is_empty() {
        None
    } else {
        Some(Step {
            op: Op::UpdatePeer(update),
            reasons,
        })
    }
}

fn step(op: Op, reason: Reason) -> Step {
    Step {
        op,
        reasons: vec![reason],
    }
}

fn reason(
    subject: impl Into<String>,
    field: &'static str,
    old: impl fmt::Display,
    new: impl fmt::Display,
) -> Reason {
    Reason {
        subject: subject.into(),
        field,
        old: old.to_string(),
        new: new.to_string(),
    }
}

fn peer_subject(key: &Key) -> String {
    format!("peer {key}")
}

fn secret_label(key: Option<&SecretKey>) -> &'static str {
    match key {
        Some(_) => "<set>",
        None => "<none>",
    }
}

fn join(ips: &AllowedIps) -> String {
    if ips.is_empty() {
        return "<none>".into();
    }
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InterfaceSpec, PeerState};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn desired(peers: Vec<PeerSpec>) -> Desired {
        Desired {
            interface: InterfaceSpec {
                private_key: SecretKey::new([7; 32]),
                listen_port: 51820,
                addresses: [net("10.0.0.1/24")].into(),
                mtu: Some(1420),
                fwmark: 0,
            },
            peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
        }
    }

    fn converge(d: &Desired, o: &Observed) -> Observed {
        let p = plan(d, o);
        let mut o = o.clone();
        simulate(&mut o, &p);
        o
    }

    #[test]
    fn missing_link_is_created_configured_and_brought_up() {
        let d = desired(vec![PeerSpec::new(key(1), [net("10.0.0.2/32")])]);
        let p = plan(&d, &Observed::default());
        let ops: Vec<_> = p.steps.iter().map(|s| &s.op).collect();
        assert_eq!(ops[0], &Op::CreateLink);
        assert!(ops.contains(&&Op::SetLinkUp));
        assert!(ops.contains(&&Op::AddAddress(net("10.0.0.1/24"))));
        assert!(
            matches!(ops.last(), Some(Op::ConfigureDevice(_))),
            "device last"
        );
        assert!(matches!(ops[ops.len() - 2], Op::AddPeer(_)));
        assert!(plan(&d, &converge(&d, &Observed::default())).is_empty());
    }

    #[test]
    fn unchanged_peers_get_no_operation() {
        let d = desired((1..=50).map(|i| PeerSpec::new(key(i), [])).collect());
        let o = converge(&d, &Observed::default());
        let mut d2 = d.clone();
        d2.peers.get_mut(&key(7)).unwrap().persistent_keepalive = 25;
        let p = plan(&d2, &o);
        assert_eq!(p.len(), 1);
        assert_eq!(p.steps[0].reasons[0].field, "persistent_keepalive");
        assert_eq!(p.steps[0].reasons[0].old, "0");
        assert_eq!(p.steps[0].reasons[0].new, "25");
    }

    #[test]
    fn each_peer_field_change_is_detected_with_its_reason() {
        let base = PeerSpec::new(key(1), [net("10.0.0.2/32")]);
        let d = desired(vec![base.clone()]);
        let o = converge(&d, &Observed::default());
        let cases: Vec<(&str, PeerSpec)> = vec![
            ("preshared_key", {
                let mut p = base.clone();
                p.preshared_key = Some(SecretKey::new([9; 32]));
                p
            }),
            ("allowed_ips", PeerSpec::new(key(1), [net("10.0.0.3/32")])),
            ("endpoint", {
                let mut p = base.clone();
                p.endpoint = Some("192.0.2.1:51820".parse().unwrap());
                p
            }),
        ];
        for (field, spec) in cases {
            let p = plan(&desired(vec![spec]), &o);
            assert_eq!(p.len(), 1, "{field}");
            assert_eq!(p.steps[0].reasons[0].field, field);
            assert!(matches!(p.steps[0].op, Op::UpdatePeer(_)));
        }
    }

    #[test]
    fn rotated_preshared_key_is_an_update_and_secrets_are_not_in_reasons() {
        let mut a = PeerSpec::new(key(1), []);
        a.preshared_key = Some(SecretKey::new([1; 32]));
        let o = converge(&desired(vec![a.clone()]), &Observed::default());
        a.preshared_key = Some(SecretKey::new([2; 32]));
        let p = plan(&desired(vec![a]), &o);
        assert_eq!(p.len(), 1);
        let text = format!("{:?} {}", p.steps[0].reasons, p.steps[0].reasons[0]);
        assert!(!text.contains("AgICAgIC"), "{text}");
        assert_eq!(p.steps[0].reasons[0].old, "<set>");
    }

    #[test]
    fn extra_addresses_and_peers_are_removed_wanted_ones_kept() {
        let d = desired(vec![PeerSpec::new(key(1), [])]);
        let mut o = converge(&d, &Observed::default());
        o.link
            .as_mut()
            .unwrap()
            .addresses
            .insert(net("10.9.9.9/32"));
        o.device
            .peers
            .insert(key(2), PeerState::fresh(PeerSpec::new(key(2), [])));
        let p = plan(&d, &o);
        let ops: Vec<_> = p.steps.iter().map(|s| s.op.clone()).collect();
        assert_eq!(
            ops,
            vec![
                Op::RemoveAddress(net("10.9.9.9/32")),
                Op::RemovePeer(key(2))
            ]
        );
    }

    #[test]
    fn a_roamed_endpoint_is_not_rewritten() {
        let mut spec = PeerSpec::new(key(1), [net("10.0.0.2/32")]);
        spec.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        let d = desired(vec![spec]);
        let mut o = converge(&d, &Observed::default());
        o.device.peers.get_mut(&key(1)).unwrap().config.endpoint =
            Some("198.51.100.7:40000".parse().unwrap());
        assert!(plan(&d, &o).is_empty(), "the peer's current endpoint stays");
    }

    #[test]
    fn listen_port_zero_is_not_enforced() {
        let mut d = desired(vec![]);
        d.interface.listen_port = 0;
        let mut o = converge(&d, &Observed::default());
        o.device.listen_port = 43512;
        assert!(plan(&d, &o).is_empty());
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u8..4, 0u8..4, 8u8..=32).prop_map(|(a, b, len)| {
                IpNet::new(std::net::Ipv4Addr::new(10, a, b, 1).into(), len)
                    .unwrap()
                    .trunc()
            }),
            (0u16..4, 48u8..=128).prop_map(|(a, len)| {
                IpNet::new(
                    std::net::Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, 0, 1).into(),
                    len,
                )
                .unwrap()
                .trunc()
            }),
        ]
    }

    fn arb_peer(k: u8) -> impl Strategy<Value = PeerSpec> {
        (
            proptest::collection::btree_set(arb_net(), 0..4),
            proptest::option::of(0u8..3),
            prop_oneof![Just(0u16), Just(25u16)],
            proptest::option::of(Just("192.0.2.7:51820".parse::<SocketAddr>().unwrap())),
        )
            .prop_map(move |(ips, psk, ka, ep)| PeerSpec {
                public_key: key(k),
                preshared_key: psk.map(|b| SecretKey::new([b; 32])),
                allowed_ips: ips.into(),
                persistent_keepalive: ka,
                endpoint: ep,
            })
    }

    fn arb_peers() -> impl Strategy<Value = Vec<PeerSpec>> {
        proptest::collection::btree_set(0u8..12, 0..8)
            .prop_flat_map(|keys| keys.into_iter().map(arb_peer).collect::<Vec<_>>())
    }

    /// Allowed IPs unique across peers, as validation guarantees for desired states.
    fn dedup_ips(peers: Vec<PeerSpec>) -> Vec<PeerSpec> {
        let mut seen = BTreeSet::new();
        peers
            .into_iter()
            .map(|mut p| {
                p.allowed_ips.retain(|ip| seen.insert(*ip));
                p
            })
            .collect()
    }

    fn arb_desired() -> impl Strategy<Value = Desired> {
        (
            arb_peers(),
            0u8..3,
            proptest::collection::btree_set(arb_net(), 0..3),
            proptest::option::of(1280u32..1500),
            0u32..3,
            prop_oneof![Just(0u16), Just(51820u16)],
        )
            .prop_map(|(peers, pk, addrs, mtu, fwmark, port)| Desired {
                interface: InterfaceSpec {
                    private_key: SecretKey::new([pk; 32]),
                    listen_port: port,
                    addresses: addrs,
                    mtu,
                    fwmark,
                },
                peers: dedup_ips(peers)
                    .into_iter()
                    .map(|p| (p.public_key, p))
                    .collect(),
            })
    }

    fn arb_observed() -> impl Strategy<Value = Observed> {
        (
            proptest::option::of((
                1280u32..1500,
                any::<bool>(),
                proptest::collection::btree_set(arb_net(), 0..3),
            )),
            arb_peers(),
            proptest::option::of(0u8..3),
            0u16..3,
        )
            .prop_map(|(link, peers, pk, port)| {
                let link = link.map(|(mtu, up, addresses)| LinkState { mtu, up, addresses });
                let device = if link.is_some() {
                    DeviceState {
                        private_key: pk.map(|b| SecretKey::new([b; 32])),
                        listen_port: port,
                        fwmark: 0,
                        peers: dedup_ips(peers)
                            .into_iter()
                            .map(|p| (p.public_key, PeerState::fresh(p)))
                            .collect::<BTreeMap<_, _>>(),
                    }
                } else {
                    DeviceState::default()
                };
                Observed { link, device }
            })
    }

    /// The peer a step is about, if any.
    fn step_key(step: &Step) -> Option<Key> {
        match &step.op {
            Op::AddPeer(s) => Some(s.public_key),
            Op::UpdatePeer(u) => Some(u.public_key),
            Op::RemovePeer(k) => Some(*k),
            _ => None,
        }
    }

    /// The full plan restricted to `keys` (and its settings steps when `settings`).
    fn restricted(plan: &Plan, keys: &BTreeSet<Key>, settings: bool) -> Plan {
        let steps = plan
            .steps
            .iter()
            .filter(|s| step_key(s).map_or(settings, |k| keys.contains(&k)))
            .cloned()
            .collect();
        Plan { steps }
    }

    proptest! {
        #[test]
        fn the_scoped_plan_is_the_full_plan_restricted_to_its_keys(
            d in arb_desired(),
            o in arb_observed(),
            keys in proptest::collection::btree_set((0u8..12).prop_map(key), 0..6),
            settings in any::<bool>(),
            dropped in proptest::collection::btree_set((0u8..12).prop_map(key), 0..3),
        ) {
            let none = |_: &Key| false;
            let full = plan(&d, &o);
            let scope = Scope { keys: &keys, settings };
            prop_assert_eq!(plan_keys(&d, &o, scope, none), restricted(&full, &keys, settings));
            // Every changed key (and the settings): the whole plan.
            let changed: BTreeSet<Key> = full.steps.iter().filter_map(step_key).collect();
            let all = Scope { keys: &changed, settings: true };
            prop_assert_eq!(plan_keys(&d, &o, all, none), full);
            // Excluding peers plans as if they were not desired, without a copy.
            let excluded = |k: &Key| dropped.contains(k);
            let mut less = d.clone();
            less.peers.retain(|k, _| !dropped.contains(k));
            let without = plan(&less, &o);
            prop_assert_eq!(&plan_excluding(&d, &o, excluded), &without);
            prop_assert_eq!(
                plan_keys(&d, &o, scope, excluded),
                restricted(&without, &keys, settings)
            );
        }

        #[test]
        fn applying_the_plan_converges_and_replanning_is_empty(
            d in arb_desired(),
            o in arb_observed(),
        ) {
            let after = converge(&d, &o);
            let link = after.link.as_ref().expect("link exists after the plan");
            prop_assert!(link.up);
            prop_assert_eq!(&link.addresses, &d.interface.addresses);
            if let Some(mtu) = d.interface.mtu {
                prop_assert_eq!(link.mtu, mtu);
            }
            prop_assert_eq!(after.device.private_key.as_ref(), Some(&d.interface.private_key));
            let got: BTreeMap<Key, PeerSpec> = after
                .device
                .peers
                .iter()
                .map(|(k, p)| (*k, p.config.clone()))
                .collect();
            for (k, want) in &d.peers {
                let have = &got[k];
                prop_assert_eq!(&have.allowed_ips, &want.allowed_ips);
                prop_assert_eq!(&have.preshared_key, &want.preshared_key);
                prop_assert_eq!(have.persistent_keepalive, want.persistent_keepalive);
                if want.endpoint.is_some() {
                    prop_assert!(have.endpoint.is_some(), "a configured endpoint is set");
                }
            }
            prop_assert_eq!(got.keys().collect::<Vec<_>>(), d.peers.keys().collect::<Vec<_>>());
            let again = plan(&d, &after);
            prop_assert!(again.is_empty(), "second plan not empty: {:?}", again);
        }

        #[test]
        fn applied_phase_by_phase_the_plan_converges_too(
            d in arb_desired(),
            o in arb_observed(),
        ) {
            let whole = plan(&d, &o);
            let phases = whole.clone().into_phases();
            let mut after = o.clone();
            let mut count = 0;
            let singles = phases.create.into_iter().chain(phases.link).map(|s| Plan { steps: vec![s] });
            let parts: Vec<Plan> = std::iter::once(phases.removals)
                .chain(singles)
                .chain([phases.peers, phases.device])
                .collect();
            prop_assert!(parts[0].steps.iter().all(|s| s.op.phase() == Phase::PeerRemovals));
            for part in &parts {
                count += part.len();
                simulate(&mut after, part);
            }
            prop_assert_eq!(count, whole.len(), "every step in exactly one phase");
            prop_assert!(plan(&d, &after).is_empty());
        }

        #[test]
        fn peers_equal_in_both_states_are_never_touched(
            d in arb_desired(),
            o in arb_observed(),
        ) {
            let p = plan(&d, &o);
            for step in &p.steps {
                let key = match &step.op {
                    Op::AddPeer(s) => s.public_key,
                    Op::UpdatePeer(u) => u.public_key,
                    Op::RemovePeer(k) => *k,
                    _ => continue,
                };
                let same = match (d.peers.get(&key), o.device.peers.get(&key)) {
                    (Some(w), Some(h)) => w.preshared_key == h.config.preshared_key
                        && w.allowed_ips == h.config.allowed_ips
                        && w.persistent_keepalive == h.config.persistent_keepalive
                        && (w.endpoint.is_none() || h.config.endpoint.is_some()),
                    _ => false,
                };
                prop_assert!(!same, "unchanged peer {} touched by {:?}", key, step.op);
            }
        }
    }
}
