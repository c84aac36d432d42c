//! The renderer checked by running its output: a small interpreter of the rendered
//! expressions decides random flows, and must agree with [`Policy::decide`].

use std::collections::BTreeSet;
use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::firewall::policy::{parse_spec, Flow, Proto, Rule};

/// A packet as the interpreter sees it.
#[derive(Clone, Debug)]
struct Packet {
    flow: Flow,
    icmp_type: u8,
    established: bool,
    /// A TCP packet with SYN (a connection's first).
    syn: bool,
    iif: String,
    oif: String,
}

fn load(p: &Packet, e: &Expr) -> Option<Vec<u8>> {
    let (family, src, dst) = match (p.flow.src, p.flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (2u8, s.octets().to_vec(), d.octets().to_vec()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (10u8, s.octets().to_vec(), d.octets().to_vec()),
        _ => unreachable!(),
    };
    Some(match e {
        Expr::Meta(Meta::IifName) => ifname(&p.iif),
        Expr::Meta(Meta::OifName) => ifname(&p.oif),
        Expr::Meta(Meta::NfProto) => vec![family],
        Expr::Meta(Meta::L4Proto) => vec![p.flow.protocol],
        Expr::CtState => (if p.established { 2u32 } else { 8u32 })
            .to_ne_bytes()
            .to_vec(),
        Expr::Payload {
            base: PayloadBase::Network,
            offset,
            ..
        } => match (family, offset) {
            (2, 12) | (10, 8) => src,
            (2, 16) | (10, 24) => dst,
            _ => panic!("unexpected offset {offset}"),
        },
        Expr::Payload {
            base: PayloadBase::Transport,
            offset: 2,
            ..
        } => p.flow.dport?.to_be_bytes().to_vec(),
        Expr::Payload {
            base: PayloadBase::Transport,
            offset: 0,
            ..
        } => vec![p.icmp_type],
        Expr::Payload {
            base: PayloadBase::Transport,
            offset: 13,
            ..
        } => vec![if p.syn { 0x02 } else { 0x10 }],
        _ => return None,
    })
}

fn in_set(set: &Set, key: &[u8]) -> bool {
    set.elements
        .iter()
        .filter(|e| e.key.len() == key.len() && e.key.as_slice() <= key)
        .max()
        .is_some_and(|e| !e.end)
}

/// Runs a chain: Some(verdict) or None (fell through).
fn run(rs: &Ruleset, chain: &str, p: &Packet) -> Option<Verdict> {
    let chain = rs.chains.iter().find(|c| c.name == chain).unwrap();
    'rules: for rule in &chain.rules {
        let mut reg: Vec<u8> = vec![];
        for e in rule {
            match e {
                Expr::Cmp { op, data } => {
                    let ok = match op {
                        CmpOp::Eq => &reg == data,
                        CmpOp::Neq => &reg != data,
                        CmpOp::Gte => reg >= *data,
                        CmpOp::Lte => reg <= *data,
                    };
                    if !ok {
                        continue 'rules;
                    }
                }
                Expr::Bitwise { mask } => {
                    reg = reg.iter().zip(mask).map(|(a, b)| a & b).collect();
                }
                Expr::Lookup { set } => {
                    let s = rs.sets.iter().find(|s| &s.name == set).unwrap();
                    if !in_set(s, &reg) {
                        continue 'rules;
                    }
                }
                Expr::Accept => return Some(Verdict::Accept),
                Expr::Drop => return Some(Verdict::Drop),
                Expr::Jump(c) => {
                    if let Some(v) = run(rs, c, p) {
                        return Some(v);
                    }
                }
                Expr::Masquerade => continue 'rules,
                other => match load(p, other) {
                    Some(v) => reg = v,
                    // No transport port (ICMP): the payload load breaks the rule.
                    None => continue 'rules,
                },
            }
        }
    }
    None
}

fn sample() -> Policy {
    let r = |index,
             priority,
             src: &[&str],
             dst: &[&str],
             ports: Vec<(u16, u16)>,
             protos: &[Proto],
             verdict| Rule {
        index,
        priority,
        sources: crate::firewall::policy::merge(
            src.iter().map(|s| parse_spec(s).unwrap()).collect(),
        ),
        destinations: crate::firewall::policy::merge(
            dst.iter().map(|s| parse_spec(s).unwrap()).collect(),
        ),
        ports,
        protocols: protos.iter().copied().collect::<BTreeSet<_>>(),
        verdict,
    };
    Policy {
        default: Verdict::Drop,
        rules: vec![
            r(2, 1, &[], &["10.1.0.66"], vec![], &[], Verdict::Drop),
            r(
                0,
                5,
                &["10.77.0.0/28", "fd77::/120"],
                &["10.1.0.0/24", "10.2.0.5-10.2.0.9", "fd01::/64"],
                vec![(80, 80), (8000, 8010)],
                &[],
                Verdict::Accept,
            ),
            r(
                1,
                5,
                &[],
                &["10.1.0.0/16"],
                vec![],
                &[Proto::Icmp],
                Verdict::Accept,
            ),
            r(
                3,
                9,
                &["10.77.0.0/24"],
                &["fd01::/64"],
                vec![],
                &[],
                Verdict::Accept,
            ),
            r(
                4,
                9,
                &[],
                &[],
                vec![(53, 53)],
                &[Proto::Udp, Proto::Icmp],
                Verdict::Accept,
            ),
        ],
    }
}

fn inputs(p: &Policy) -> Ruleset {
    render(&Inputs {
        interface: "wg0",
        listen_port: 51820,
        policy: Some(p),
        masquerade: false,
    })
    .unwrap()
}

fn packet(flow: Flow) -> Packet {
    Packet {
        flow,
        icmp_type: 8,
        established: false,
        syn: true,
        iif: "wg0".into(),
        oif: "eth0".into(),
    }
}

fn v4(x: &str) -> IpAddr {
    x.parse().unwrap()
}

#[test]
fn the_table_decides_like_the_policy_on_chosen_flows() {
    let p = sample();
    let rs = inputs(&p);
    let cases = [
        (
            v4("10.77.0.2"),
            v4("10.1.0.5"),
            6,
            Some(80),
            Verdict::Accept,
        ),
        (
            v4("10.77.0.2"),
            v4("10.1.0.5"),
            17,
            Some(8005),
            Verdict::Accept,
        ),
        (v4("10.77.0.2"), v4("10.1.0.5"), 6, Some(22), Verdict::Drop),
        (v4("10.77.0.2"), v4("10.1.0.66"), 6, Some(80), Verdict::Drop),
        (
            v4("10.77.0.2"),
            v4("10.2.0.9"),
            6,
            Some(80),
            Verdict::Accept,
        ),
        (v4("10.77.0.2"), v4("10.2.0.10"), 6, Some(80), Verdict::Drop),
        (v4("10.77.0.20"), v4("10.1.0.5"), 6, Some(80), Verdict::Drop),
        (v4("10.77.0.20"), v4("10.1.200.5"), 1, None, Verdict::Accept),
        (v4("fd77::5"), v4("fd01::1"), 6, Some(8010), Verdict::Accept),
        (v4("fd77::5"), v4("fd01::1"), 58, None, Verdict::Accept),
        (v4("fd77::5"), v4("fd01::1"), 6, Some(22), Verdict::Drop),
        (v4("fd77::5"), v4("fd02::1"), 58, None, Verdict::Accept),
        (v4("fd77::5"), v4("fd02::1"), 17, Some(53), Verdict::Accept),
        (v4("fd77::5"), v4("fd02::1"), 6, Some(53), Verdict::Drop),
    ];
    for (src, dst, protocol, dport, want) in cases {
        let flow = Flow {
            src,
            dst,
            protocol,
            dport,
        };
        assert_eq!(p.decide(&flow), want, "policy on {flow:?}");
        assert_eq!(
            run(&rs, "forward", &packet(flow)),
            Some(want),
            "table on {flow:?}"
        );
    }
}

#[test]
fn established_nd_and_other_interfaces_pass() {
    let p = sample();
    let rs = inputs(&p);
    let denied = Flow {
        src: v4("10.77.0.2"),
        dst: v4("10.9.9.9"),
        protocol: 6,
        dport: Some(1),
    };
    assert_eq!(run(&rs, "forward", &packet(denied)), Some(Verdict::Drop));
    let established = Packet {
        established: true,
        ..packet(denied)
    };
    assert_eq!(run(&rs, "forward", &established), Some(Verdict::Accept));
    let allowed = Flow {
        src: v4("10.77.0.2"),
        dst: v4("10.1.0.5"),
        protocol: 6,
        dport: Some(80),
    };
    let pickup = Packet {
        syn: false,
        ..packet(allowed)
    };
    assert_eq!(
        run(&rs, "forward", &pickup),
        Some(Verdict::Drop),
        "new TCP without SYN"
    );
    let pickup_established = Packet {
        established: true,
        ..pickup
    };
    assert_eq!(
        run(&rs, "forward", &pickup_established),
        Some(Verdict::Accept)
    );
    let elsewhere = Packet {
        iif: "eth1".into(),
        oif: "eth0".into(),
        ..packet(denied)
    };
    assert_eq!(
        run(&rs, "forward", &elsewhere),
        None,
        "not our interface: not looked at"
    );
    let to_vpn = Packet {
        iif: "eth0".into(),
        oif: "wg0".into(),
        ..packet(denied)
    };
    assert_eq!(run(&rs, "forward", &to_vpn), Some(Verdict::Drop));
    let nd = Packet {
        icmp_type: 135,
        ..packet(Flow {
            src: v4("fe80::1"),
            dst: v4("ff02::1"),
            protocol: 58,
            dport: None,
        })
    };
    assert_eq!(run(&rs, "input", &nd), Some(Verdict::Accept));
    let wg_port = packet(Flow {
        src: v4("10.77.0.2"),
        dst: v4("10.77.0.1"),
        protocol: 17,
        dport: Some(51820),
    });
    assert_eq!(run(&rs, "input", &wg_port), Some(Verdict::Accept));
    let to_host = packet(Flow {
        src: v4("10.77.0.2"),
        dst: v4("10.77.0.1"),
        protocol: 6,
        dport: Some(22),
    });
    assert_eq!(run(&rs, "input", &to_host), Some(Verdict::Drop));
}

#[test]
fn tables_exist_only_for_a_policy_or_masquerade() {
    let none = Inputs {
        interface: "wg0",
        listen_port: 1,
        policy: None,
        masquerade: false,
    };
    assert_eq!(render(&none), None);
    let masq = render(&Inputs {
        masquerade: true,
        ..none
    })
    .unwrap();
    assert_eq!(masq.table, "gatehouse_wg0");
    assert_eq!(masq.chains.len(), 1);
    assert_eq!(masq.chains[0].name, "postrouting");
    assert!(masq.sets.is_empty());
}

#[test]
fn ten_thousand_addresses_are_a_few_rules() {
    let spans = (0..10_000u32)
        .map(|i| parse_spec(&std::net::Ipv4Addr::from(0x0a00_0000 + i * 2).to_string()).unwrap())
        .collect();
    let p = Policy {
        default: Verdict::Drop,
        rules: vec![Rule {
            index: 0,
            priority: 0,
            sources: vec![],
            destinations: crate::firewall::policy::merge(spans),
            ports: vec![],
            protocols: BTreeSet::new(),
            verdict: Verdict::Accept,
        }],
    };
    let rs = inputs(&p);
    let vpn = rs.chains.iter().find(|c| c.name == "vpn").unwrap();
    assert_eq!(
        vpn.rules.len(),
        3 + 1 + 1,
        "established, TCP without SYN, ND, one rule, default"
    );
    assert_eq!(rs.element_count(), 20_000);
}

#[test]
fn interval_elements_end_after_each_range() {
    let s = |x| parse_spec(x).unwrap();
    let els = address_elements(&[s("10.0.0.0/24"), s("255.255.255.255")]);
    assert_eq!(
        els,
        vec![
            Element {
                key: vec![10, 0, 0, 0],
                end: false
            },
            Element {
                key: vec![10, 0, 1, 0],
                end: true
            },
            Element {
                key: vec![255, 255, 255, 255],
                end: false
            },
        ]
    );
    let ports = port_elements(&[(80, 80), (81, 90), (65535, 65535)]);
    assert_eq!(
        ports,
        vec![
            Element {
                key: vec![0, 80],
                end: false
            },
            Element {
                key: vec![0, 91],
                end: true
            },
            Element {
                key: vec![255, 255],
                end: false
            },
        ]
    );
}

fn arb_v4() -> impl Strategy<Value = IpAddr> {
    (0u8..4, 0u8..4).prop_map(|(a, b)| IpAddr::from([10, a, 0, b * 3]))
}

fn arb_v6() -> impl Strategy<Value = IpAddr> {
    (0u16..4, 0u16..4).prop_map(|(a, b)| IpAddr::from([0xfd00, a, 0, 0, 0, 0, 0, b * 3]))
}

fn arb_spec(v6: bool) -> impl Strategy<Value = String> {
    let addr = if v6 {
        arb_v6().boxed()
    } else {
        arb_v4().boxed()
    };
    prop_oneof![
        addr.clone().prop_map(|a| a.to_string()),
        (addr.clone(), 0u8..8).prop_map(move |(a, n)| {
            let (_, lo) = crate::firewall::policy::number(a);
            let hi = lo + n as u128;
            let end = parse_spec(&a.to_string()).unwrap().addr(hi);
            format!("{a}-{end}")
        }),
        addr.prop_map(move |a| if v6 {
            format!("{a}/126")
        } else {
            format!("{a}/30")
        }),
    ]
}

fn arb_rule() -> impl Strategy<Value = gatehouse_proto::v1::FirewallRule> {
    use gatehouse_proto::v1;
    (
        0u32..4,
        prop::collection::vec(prop::bool::ANY.prop_flat_map(arb_spec), 0..3),
        prop::collection::vec(prop::bool::ANY.prop_flat_map(arb_spec), 0..3),
        prop::collection::vec((1u32..6, 0u32..3), 0..3),
        prop::collection::btree_set(1i32..4, 0..3),
        prop::bool::ANY,
    )
        .prop_map(
            |(priority, sources, destinations, ports, protocols, accept)| {
                let mut protocols: Vec<i32> = protocols.into_iter().collect();
                if !ports.is_empty() && protocols == vec![3] {
                    protocols.push(1);
                }
                v1::FirewallRule {
                    priority,
                    sources,
                    destinations,
                    ports: ports
                        .into_iter()
                        .map(|(s, len)| v1::PortRange {
                            start: s,
                            end: s + len,
                        })
                        .collect(),
                    protocols,
                    verdict: if accept {
                        v1::Verdict::Accept
                    } else {
                        v1::Verdict::Drop
                    } as i32,
                    comment: String::new(),
                }
            },
        )
}

proptest! {
    /// Whatever the policy, the rendered table decides every flow as the policy does.
    #[test]
    fn rendered_table_agrees_with_the_policy(
        rules in prop::collection::vec(arb_rule(), 0..6),
        default_accept in prop::bool::ANY,
        flows in prop::collection::vec(
            (prop::bool::ANY, arb_v4(), arb_v4(), arb_v6(), arb_v6(), prop::sample::select(vec![1u8, 6, 17, 58]), 1u16..9),
            1..40,
        ),
    ) {
        use gatehouse_proto::v1;
        let proto = v1::FirewallPolicy {
            enabled: true,
            default_verdict: if default_accept { v1::Verdict::Accept } else { v1::Verdict::Drop } as i32,
            rules,
        };
        let p = crate::firewall::from_proto(&proto).unwrap().unwrap();
        let rs = inputs(&p);
        for (v6, s4, d4, s6, d6, protocol, port) in flows {
            let (src, dst, protocol) = if v6 {
                (s6, d6, if protocol == 1 { 58 } else { protocol })
            } else {
                (s4, d4, if protocol == 58 { 1 } else { protocol })
            };
            let dport = matches!(protocol, 6 | 17).then_some(port);
            let flow = Flow { src, dst, protocol, dport };
            prop_assert_eq!(run(&rs, "forward", &packet(flow)), Some(p.decide(&flow)), "{:?}", flow);
        }
    }
}
