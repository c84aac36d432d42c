//! The reconciler: desired state + observed interface → a plan of operations, each with
//! the reasons it exists (subject, field, old, new). Pure: no I/O, no clock.
//!
//! Properties (checked by a property test below): applying a plan to the observed state
//! with [`simulate`] gives a state that matches the desired one, and planning again from
//! there gives an empty plan. Unchanged peers get no operation at all, so their sessions
//! and counters survive.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

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
    ConfigureDevice(Box<DeviceChange>),
    /// The desired peer itself (shared, not copied: a cold apply of N peers holds no second
    /// copy of them, and the model of the interface keeps the same one).
    AddPeer(Arc<PeerSpec>),
    UpdatePeer(Box<PeerUpdate>),
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
/// Secrets are shown as `<set>` / `<none>` only. Fixed words are not copied, and a peer is
/// named by its key (formatted when the reason is shown): a plan of N additions holds no
/// text per peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    pub subject: Subject,
    pub field: &'static str,
    pub old: Cow<'static, str>,
    pub new: Cow<'static, str>,
}

/// What a [`Reason`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Interface,
    Peer(Key),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Interface => f.write_str("interface"),
            Subject::Peer(key) => write!(f, "peer {key}"),
        }
    }
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
    /// The reasons besides the one a peer's addition or removal carries in itself: all of
    /// them are [`Step::why`].
    pub reasons: Vec<Reason>,
}

impl Step {
    /// Why the step exists: a peer added or removed (made from the operation, so a plan of
    /// N additions holds no reason per peer), then each stored reason.
    pub fn why(&self) -> impl Iterator<Item = Reason> + '_ {
        let implied = match &self.op {
            Op::AddPeer(p) => Some(reason(
                Subject::Peer(p.public_key),
                "peer",
                "absent",
                "present",
            )),
            Op::RemovePeer(k) => Some(reason(Subject::Peer(*k), "peer", "present", "absent")),
            _ => None,
        };
        implied.into_iter().chain(self.reasons.iter().cloned())
    }
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
    /// Splits the plan by phase, keeping the plan's order within each. The largest part
    /// keeps the plan's own vector (a cold apply's peers are not copied); the others are
    /// taken out of it.
    pub fn into_phases(self) -> Phases {
        // Parts, in the order of `Phases`' fields.
        fn part(op: &Op) -> usize {
            match op.phase() {
                Phase::PeerRemovals => 0,
                Phase::Link if *op == Op::CreateLink => 1,
                Phase::Link | Phase::Addresses => 2,
                Phase::Peers => 3,
                Phase::Device => 4,
            }
        }
        // The longest run of one part stays in the plan's vector; the steps before and
        // after it (few, in a plan: link and device settings) are moved out around it.
        let mut steps = self.steps;
        let (mut start, mut best) = (0, 0..0);
        for i in 1..=steps.len() {
            if i == steps.len() || part(&steps[i].op) != part(&steps[start].op) {
                if i - start > best.len() {
                    best = start..i;
                }
                start = i;
            }
        }
        let tail = steps.split_off(best.end);
        let head: Vec<Step> = steps.drain(..best.start).collect();
        let mut parts: [Vec<Step>; 5] = Default::default();
        for s in head {
            parts[part(&s.op)].push(s);
        }
        if let Some(p) = steps.first().map(|s| part(&s.op)) {
            let before = std::mem::replace(&mut parts[p], steps);
            parts[p].splice(0..0, before);
        }
        for s in tail {
            parts[part(&s.op)].push(s);
        }
        let [removals, create, link, peers, device] = parts;
        Phases {
            removals: Plan { steps: removals },
            // A plan creates the link at most once (the last one counts).
            create: create.into_iter().last(),
            link,
            peers: Plan { steps: peers },
            device: Plan { steps: device },
        }
    }

    /// Appends `other`'s steps after this plan's, moving the larger of the two vectors
    /// rather than copying it.
    pub fn append(&mut self, mut other: Plan) {
        if other.steps.len() > self.steps.len() {
            std::mem::swap(self, &mut other);
            self.steps.splice(0..0, other.steps);
        } else {
            self.steps.append(&mut other.steps);
        }
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
    fn get(&self, key: &Key) -> Option<&Arc<PeerSpec>> {
        self.desired
            .peers
            .get(key)
            .filter(|_| !(self.excluded)(key))
    }

    fn contains(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &Arc<PeerSpec>)> {
        self.desired
            .peers
            .iter()
            .filter(|(k, _)| !(self.excluded)(k))
    }
}

/// A removal; its reason is the operation's own ([`Step::why`]).
fn removal(key: &Key) -> Step {
    Step {
        op: Op::RemovePeer(*key),
        reasons: Vec::new(),
    }
}

/// An addition of the desired peer itself; its reason is the operation's own.
fn addition(want: &Arc<PeerSpec>) -> Step {
    Step {
        op: Op::AddPeer(Arc::clone(want)),
        reasons: Vec::new(),
    }
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
                reason(Subject::Interface, "link", "absent", "present"),
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
                reason(
                    Subject::Interface,
                    "mtu",
                    link.mtu.to_string(),
                    mtu.to_string(),
                ),
            ));
        }
    }
    for addr in link.addresses.difference(&iface.addresses) {
        steps.push(step(
            Op::RemoveAddress(*addr),
            reason(Subject::Interface, "address", addr.to_string(), "absent"),
        ));
    }
    for addr in iface.addresses.difference(&link.addresses) {
        steps.push(step(
            Op::AddAddress(*addr),
            reason(Subject::Interface, "address", "absent", addr.to_string()),
        ));
    }
    if !link.up {
        steps.push(step(
            Op::SetLinkUp,
            reason(Subject::Interface, "state", "down", "up"),
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
            Subject::Interface,
            "private_key",
            secret_label(device.private_key.as_ref()),
            "<new key>",
        ));
    }
    if iface.listen_port != 0 && device.listen_port != iface.listen_port {
        change.listen_port = Some(iface.listen_port);
        reasons.push(reason(
            Subject::Interface,
            "listen_port",
            device.listen_port.to_string(),
            iface.listen_port.to_string(),
        ));
    }
    if device.fwmark != iface.fwmark {
        change.fwmark = Some(iface.fwmark);
        reasons.push(reason(
            Subject::Interface,
            "fwmark",
            device.fwmark.to_string(),
            iface.fwmark.to_string(),
        ));
    }
    if !reasons.is_empty() {
        steps.push(Step {
            op: Op::ConfigureDevice(Box::new(change)),
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
    let mut added = 0;
    for (key, want) in wanted.iter() {
        match device.peers.get(key) {
            None => added += 1,
            Some(have) => steps.extend(peer_update(want, &have.config)),
        }
    }
    // The additions (all of a cold apply) in a vector of their size, and the device
    // step after them: no doubling, no second list.
    steps.reserve_exact(added + 1);
    for (key, want) in wanted.iter() {
        if !device.peers.contains_key(key) {
            steps.push(addition(want));
        }
    }
}

fn peer_update(want: &PeerSpec, have: &PeerSpec) -> Option<Step> {
    let subject = Subject::Peer(want.public_key);
    let mut update = PeerUpdate::new(want.public_key);
    let mut reasons = Vec::new();
    if want.preshared_key != have.preshared_key {
        update.preshared_key = Some(want.preshared_key.clone());
        reasons.push(reason(
            subject,
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
            subject,
            "persistent_keepalive",
            have.persistent_keepalive.to_string(),
            want.persistent_keepalive.to_string(),
        ));
    }
    if want.allowed_ips != have.allowed_ips {
        update.allowed_ips = Some(want.allowed_ips.clone());
        reasons.push(reason(
            subject,
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
                subject,
                "endpoint",
                have.endpoint
                    .map_or(Cow::Borrowed("<none>"), |e| e.to_string().into()),
                endpoint.to_string(),
            ));
        }
    }
    if reasons.is_empty() {
        None
    } else {
        Some(Step {
            op: Op::UpdatePeer(Box::new(update)),
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
    subject: Subject,
    field: &'static str,
    old: impl Into<Cow<'static, str>>,
    new: impl Into<Cow<'static, str>>,
) -> Reason {
    Reason {
        subject,
        field,
        old: old.into(),
        new: new.into(),
    }
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
            peers: peers
                .into_iter()
                .map(|p| (p.public_key, p.into()))
                .collect(),
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
        Arc::make_mut(d2.peers.get_mut(&key(7)).unwrap()).persistent_keepalive = 25;
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
        Arc::make_mut(&mut o.device.peers.get_mut(&key(1)).unwrap().config).endpoint =
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
                    .map(|p| (p.public_key, p.into()))
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
                .map(|(k, p)| (*k, PeerSpec::clone(&p.config)))
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

        /// Split by phase, any plan (in any order) gives each phase's steps in plan order,
        /// as the step-by-step split did.
        #[test]
        fn into_phases_keeps_each_phase_in_plan_order(kinds in proptest::collection::vec(0u8..6, 0..40)) {
            let steps: Vec<Step> = kinds
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let n = i as u8;
                    let op = match k {
                        0 => Op::RemovePeer(key(n)),
                        1 => Op::CreateLink,
                        2 => Op::AddAddress(net(&format!("10.1.0.{n}/32"))),
                        3 => Op::AddPeer(PeerSpec::new(key(n), []).into()),
                        4 => Op::ConfigureDevice(Box::new(DeviceChange {
                            listen_port: Some(u16::from(n)),
                            ..DeviceChange::default()
                        })),
                        _ => Op::SetLinkUp,
                    };
                    step(op, reason(Subject::Interface, "test", "", ""))
                })
                .collect();
            let mut want = Phases::default();
            for step in steps.clone() {
                match step.op.phase() {
                    Phase::PeerRemovals => want.removals.steps.push(step),
                    Phase::Link if step.op == Op::CreateLink => want.create = Some(step),
                    Phase::Link | Phase::Addresses => want.link.push(step),
                    Phase::Peers => want.peers.steps.push(step),
                    Phase::Device => want.device.steps.push(step),
                }
            }
            prop_assert_eq!(Plan { steps }.into_phases(), want);
        }

        /// Appending moves the larger side and keeps the order.
        #[test]
        fn append_keeps_the_order(a in 0usize..20, b in 0usize..20) {
            let mk = |r: std::ops::Range<usize>| Plan {
                steps: r.map(|i| removal(&key(i as u8))).collect(),
            };
            let mut first = mk(0..a);
            first.append(mk(a..a + b));
            prop_assert_eq!(first, mk(0..a + b));
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
