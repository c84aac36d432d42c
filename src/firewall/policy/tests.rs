use super::*;

fn proto_rule(priority: u32, verdict: v1::Verdict) -> v1::FirewallRule {
    v1::FirewallRule {
        priority,
        verdict: verdict as i32,
        ..Default::default()
    }
}

fn policy(rules: Vec<v1::FirewallRule>) -> v1::FirewallPolicy {
    v1::FirewallPolicy {
        enabled: true,
        default_verdict: v1::Verdict::Drop as i32,
        rules,
    }
}

fn flow(src: &str, dst: &str, protocol: u8, dport: Option<u16>) -> Flow {
    Flow {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol,
        dport,
    }
}

#[test]
fn specs_become_spans() {
    assert_eq!(
        parse_spec("10.0.0.5/24").unwrap(),
        Span {
            family: Family::V4,
            lo: 0x0a00_0000,
            hi: 0x0a00_00ff
        }
    );
    assert_eq!(
        parse_spec("10.0.0.5-10.0.0.9").unwrap(),
        Span {
            family: Family::V4,
            lo: 0x0a00_0005,
            hi: 0x0a00_0009
        }
    );
    assert!(parse_spec("10.0.0.9-10.0.0.5").is_err());
    assert!(parse_spec("10.0.0.1-fd00::1").is_err());
    assert_eq!(parse_spec("fd00::1").unwrap().family, Family::V6);
}

#[test]
fn merge_joins_overlapping_and_adjacent_spans_per_family() {
    let s = |x| parse_spec(x).unwrap();
    assert_eq!(
        merge(vec![
            s("10.0.0.4-10.0.0.7"),
            s("10.0.0.0-10.0.0.3"),
            s("10.0.0.9"),
            s("fd00::/127")
        ]),
        vec![s("10.0.0.0-10.0.0.7"), s("10.0.0.9"), s("fd00::/127")]
    );
    assert_eq!(
        merge_ports(vec![(90, 95), (80, 89), (100, 100)]),
        vec![(80, 95), (100, 100)]
    );
}

#[test]
fn disabled_policy_is_none_and_unspecified_verdicts_are_errors() {
    let mut p = policy(vec![]);
    p.enabled = false;
    assert_eq!(from_proto(&p).unwrap(), None);
    let mut p = policy(vec![]);
    p.default_verdict = 0;
    assert!(from_proto(&p).is_err());
    let p = policy(vec![proto_rule(1, v1::Verdict::Unspecified)]);
    assert!(
        matches!(from_proto(&p), Err(PolicyError::Invalid { item, .. }) if item == "rules[0].verdict")
    );
    let mut r = proto_rule(1, v1::Verdict::Accept);
    r.ports = vec![v1::PortRange { start: 1, end: 2 }];
    r.protocols = vec![v1::Protocol::Icmp as i32];
    assert!(
        from_proto(&policy(vec![r])).is_err(),
        "ports with only ICMP"
    );
}

#[test]
fn ascending_priority_then_given_order_first_match_wins() {
    let mut deny = proto_rule(5, v1::Verdict::Drop);
    deny.destinations = vec!["10.1.0.1".into()];
    let mut allow_all = proto_rule(5, v1::Verdict::Accept);
    allow_all.destinations = vec!["10.1.0.0/24".into()];
    let mut early = proto_rule(1, v1::Verdict::Accept);
    early.destinations = vec!["10.1.0.2".into()];
    let mut late_deny = proto_rule(9, v1::Verdict::Drop);
    late_deny.destinations = vec!["10.1.0.2".into()];
    let p = from_proto(&policy(vec![late_deny, deny, allow_all, early]))
        .unwrap()
        .unwrap();
    assert_eq!(
        p.rules.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![3, 1, 2, 0]
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 6, Some(1))),
        Verdict::Drop
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.2", 6, Some(1))),
        Verdict::Accept
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.3", 6, Some(1))),
        Verdict::Accept
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.2.0.1", 6, Some(1))),
        Verdict::Drop,
        "default"
    );
}

#[test]
fn ports_mean_tcp_and_udp_and_icmp_is_per_family() {
    let mut r = proto_rule(1, v1::Verdict::Accept);
    r.ports = vec![v1::PortRange { start: 80, end: 80 }];
    let mut icmp = proto_rule(2, v1::Verdict::Accept);
    icmp.protocols = vec![v1::Protocol::Icmp as i32];
    let p = from_proto(&policy(vec![r, icmp])).unwrap().unwrap();
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 6, Some(80))),
        Verdict::Accept
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 17, Some(80))),
        Verdict::Accept
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 6, Some(81))),
        Verdict::Drop
    );
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 1, None)),
        Verdict::Accept
    );
    assert_eq!(
        p.decide(&flow("fd77::2", "fd01::1", 58, None)),
        Verdict::Accept
    );
    assert_eq!(
        p.decide(&flow("fd77::2", "fd01::1", 1, None)),
        Verdict::Drop,
        "ICMPv4 number in IPv6"
    );
}

#[test]
fn addresses_apply_per_family() {
    let mut r = proto_rule(1, v1::Verdict::Accept);
    r.sources = vec!["10.77.0.0/24".into()];
    r.destinations = vec!["fd01::/64".into()];
    let p = from_proto(&policy(vec![r])).unwrap().unwrap();
    let rule = &p.rules[0];
    assert_eq!(
        rule.family(Family::V4),
        None,
        "IPv4 source, only IPv6 destinations"
    );
    assert_eq!(rule.family(Family::V6), None);
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 6, Some(1))),
        Verdict::Drop
    );
    let mut any_dst = proto_rule(1, v1::Verdict::Accept);
    any_dst.sources = vec!["10.77.0.0/24".into()];
    let p = from_proto(&policy(vec![any_dst])).unwrap().unwrap();
    assert_eq!(
        p.decide(&flow("10.77.0.2", "10.1.0.1", 6, Some(1))),
        Verdict::Accept
    );
}
