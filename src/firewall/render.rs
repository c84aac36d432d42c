//! The pure renderer: the agent's firewall inputs (policy, interface, listen port,
//! masquerade) → the complete nftables table `inet gatehouse_<interface>` as data
//! (chains, interval sets, rules as expression lists). The executor writes exactly this,
//! in one batch, and compares the kernel's table against it.
//!
//! Layout of the table:
//! - `forward` (filter, hook forward, priority 0, policy accept): packets from or to the
//!   WireGuard interface jump to `vpn`; nothing else is looked at.
//! - `input` (filter, hook input, priority 0, policy accept): packets from the WireGuard
//!   interface, except to WireGuard's own UDP port, jump to `vpn`.
//! - `vpn` (the policy): established/related accept, new TCP without SYN drop (a cut
//!   connection cannot be picked up again mid-stream), ICMPv6 neighbour discovery accept, the rules in
//!   evaluation order (one nftables rule per family and protocol), then the default.
//! - `postrouting` (nat, hook postrouting, priority 100), only with masquerade: packets that
//!   came in through the WireGuard interface and leave through another are masqueraded; the
//!   host's own traffic has no input interface and is never matched.

use super::policy::{merge_ports, Family, Policy, ProtoMatch, Span, Verdict};

/// The table's name for an interface.
pub fn table_name(interface: &str) -> String {
    format!("gatehouse_{interface}")
}

/// What the table is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs<'a> {
    pub interface: &'a str,
    pub listen_port: u16,
    /// None: no policy from the Core (no filter chains).
    pub policy: Option<&'a Policy>,
    pub masquerade: bool,
}

/// The whole table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub table: String,
    pub chains: Vec<Chain>,
    pub sets: Vec<Set>,
}

impl Ruleset {
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    pub fn element_count(&self) -> usize {
        self.sets.iter().map(|s| s.elements.len()).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Input,
    Forward,
    Postrouting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub hook: Hook,
    pub priority: i32,
    pub kind: ChainType,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// None: a regular chain (jumped to). Base chains always have policy accept.
    pub base: Option<BaseChain>,
    pub rules: Vec<Vec<Expr>>,
}

/// What a set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Ipv4,
    Ipv6,
    Port,
}

impl KeyType {
    /// nftables' datatype id and key length.
    pub fn nft(self) -> (u32, u32) {
        match self {
            KeyType::Ipv4 => (7, 4),
            KeyType::Ipv6 => (8, 16),
            KeyType::Port => (13, 2),
        }
    }
}

/// An interval set element: a start, or the first key after an interval (`end`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    pub key: Vec<u8>,
    pub end: bool,
}

/// A named interval set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key: KeyType,
    /// Sorted by key.
    pub elements: Vec<Element>,
}

/// What a meta expression loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meta {
    IifName,
    OifName,
    NfProto,
    L4Proto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadBase {
    Network,
    Transport,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Neq,
    Gte,
    Lte,
}

/// One nftables expression; every load goes to register 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Meta(Meta),
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
    },
    /// Loads the conntrack state bits.
    CtState,
    /// reg1 = reg1 & mask (xor 0).
    Bitwise {
        mask: Vec<u8>,
    },
    Cmp {
        op: CmpOp,
        data: Vec<u8>,
    },
    /// reg1 is in the named set.
    Lookup {
        set: String,
    },
    Accept,
    Drop,
    Jump(String),
    Masquerade,
}

/// `ct state established,related` bits (host byte order, as the kernel loads them).
const CT_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
/// `ct state new`.
const CT_NEW: u32 = 0x8;
/// The TCP flags byte and its SYN bit.
const TCP_FLAGS_OFFSET: u32 = 13;
const TCP_SYN: u8 = 0x02;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// ICMPv6 router solicitation .. redirect (133..137): neighbour discovery.
const ND_TYPES: (u8, u8) = (133, 137);

/// An interface name as nftables compares it (zero-padded to IFNAMSIZ).
pub fn ifname(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

fn iif(name: &str) -> [Expr; 2] {
    [
        Expr::Meta(Meta::IifName),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: ifname(name),
        },
    ]
}

fn oif(name: &str, op: CmpOp) -> [Expr; 2] {
    [
        Expr::Meta(Meta::OifName),
        Expr::Cmp {
            op,
            data: ifname(name),
        },
    ]
}

fn nfproto(f: Family) -> [Expr; 2] {
    [
        Expr::Meta(Meta::NfProto),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![match f {
                Family::V4 => NFPROTO_IPV4,
                Family::V6 => NFPROTO_IPV6,
            }],
        },
    ]
}

fn l4proto(n: u8) -> [Expr; 2] {
    [
        Expr::Meta(Meta::L4Proto),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![n],
        },
    ]
}

fn verdict(v: Verdict) -> Expr {
    match v {
        Verdict::Accept => Expr::Accept,
        Verdict::Drop => Expr::Drop,
    }
}

/// The address's (source or destination) offset in the network header.
fn addr_payload(f: Family, source: bool) -> Expr {
    let (offset, len) = match (f, source) {
        (Family::V4, true) => (12, 4),
        (Family::V4, false) => (16, 4),
        (Family::V6, true) => (8, 16),
        (Family::V6, false) => (24, 16),
    };
    Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len,
    }
}

fn key_bytes(family: Family, n: u128) -> Vec<u8> {
    match family {
        Family::V4 => (n as u32).to_be_bytes().to_vec(),
        Family::V6 => n.to_be_bytes().to_vec(),
    }
}

/// Interval elements of merged spans: each start, and the key after each end (none after
/// the family's last address).
pub fn address_elements(spans: &[Span]) -> Vec<Element> {
    let mut out = Vec::with_capacity(spans.len() * 2);
    for s in spans {
        out.push(Element {
            key: key_bytes(s.family, s.lo),
            end: false,
        });
        if s.hi < s.family.max() {
            out.push(Element {
                key: key_bytes(s.family, s.hi + 1),
                end: true,
            });
        }
    }
    out.sort();
    out
}

/// Interval elements of merged port ranges.
pub fn port_elements(ports: &[(u16, u16)]) -> Vec<Element> {
    let mut out = Vec::with_capacity(ports.len() * 2);
    for (a, b) in merge_ports(ports.to_vec()) {
        out.push(Element {
            key: a.to_be_bytes().to_vec(),
            end: false,
        });
        if b < u16::MAX {
            out.push(Element {
                key: (b + 1).to_be_bytes().to_vec(),
                end: true,
            });
        }
    }
    out.sort();
    out
}

/// Renders the table; None when nothing needs a table (no policy and no masquerade).
pub fn render(inp: &Inputs) -> Option<Ruleset> {
    if inp.policy.is_none() && !inp.masquerade {
        return None;
    }
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    if let Some(policy) = inp.policy {
        chains.push(Chain {
            name: "forward".into(),
            base: Some(BaseChain {
                hook: Hook::Forward,
                priority: 0,
                kind: ChainType::Filter,
            }),
            rules: vec![
                [&iif(inp.interface)[..], &[Expr::Jump("vpn".into())]].concat(),
                [
                    &oif(inp.interface, CmpOp::Eq)[..],
                    &[Expr::Jump("vpn".into())],
                ]
                .concat(),
            ],
        });
        let mut wg_port = iif(inp.interface).to_vec();
        wg_port.extend(l4proto(17));
        wg_port.extend([
            Expr::Payload {
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
            },
            Expr::Cmp {
                op: CmpOp::Eq,
                data: inp.listen_port.to_be_bytes().to_vec(),
            },
            Expr::Accept,
        ]);
        chains.push(Chain {
            name: "input".into(),
            base: Some(BaseChain {
                hook: Hook::Input,
                priority: 0,
                kind: ChainType::Filter,
            }),
            rules: vec![
                wg_port,
                [&iif(inp.interface)[..], &[Expr::Jump("vpn".into())]].concat(),
            ],
        });
        chains.push(policy_chain(policy, &mut sets));
    }
    if inp.masquerade {
        chains.push(Chain {
            name: "postrouting".into(),
            base: Some(BaseChain {
                hook: Hook::Postrouting,
                priority: 100,
                kind: ChainType::Nat,
            }),
            rules: vec![[
                &iif(inp.interface)[..],
                &oif(inp.interface, CmpOp::Neq)[..],
                &[Expr::Masquerade],
            ]
            .concat()],
        });
    }
    Some(Ruleset {
        table: table_name(inp.interface),
        chains,
        sets,
    })
}

fn policy_chain(policy: &Policy, sets: &mut Vec<Set>) -> Chain {
    let mut rules = vec![
        vec![
            Expr::CtState,
            Expr::Bitwise {
                mask: CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
            },
            Expr::Cmp {
                op: CmpOp::Neq,
                data: 0u32.to_ne_bytes().to_vec(),
            },
            Expr::Accept,
        ],
        // A TCP connection starts with SYN. A tracked connection that was cut (or expired)
        // cannot come back by mid-stream pickup, from either side.
        [
            &l4proto(6)[..],
            &[
                Expr::CtState,
                Expr::Bitwise {
                    mask: CT_NEW.to_ne_bytes().to_vec(),
                },
                Expr::Cmp {
                    op: CmpOp::Neq,
                    data: 0u32.to_ne_bytes().to_vec(),
                },
                Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: TCP_FLAGS_OFFSET,
                    len: 1,
                },
                Expr::Bitwise {
                    mask: vec![TCP_SYN],
                },
                Expr::Cmp {
                    op: CmpOp::Eq,
                    data: vec![0],
                },
                Expr::Drop,
            ],
        ]
        .concat(),
        [
            &nfproto(Family::V6)[..],
            &l4proto(58)[..],
            &[
                Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: 0,
                    len: 1,
                },
                Expr::Cmp {
                    op: CmpOp::Gte,
                    data: vec![ND_TYPES.0],
                },
                Expr::Cmp {
                    op: CmpOp::Lte,
                    data: vec![ND_TYPES.1],
                },
                Expr::Accept,
            ],
        ]
        .concat(),
    ];
    for rule in &policy.rules {
        let ports_set = format!("r{}_p", rule.index);
        let mut ports_used = false;
        for family in Family::BOTH {
            let Some(fm) = rule.family(family) else {
                continue;
            };
            let suffix = match family {
                Family::V4 => "4",
                Family::V6 => "6",
            };
            let mut head = nfproto(family).to_vec();
            for (source, list) in [(true, &fm.sources), (false, &fm.destinations)] {
                let Some(list) = list else { continue };
                let name = format!("r{}_{}{suffix}", rule.index, if source { "s" } else { "d" });
                sets.push(Set {
                    name: name.clone(),
                    key: match family {
                        Family::V4 => KeyType::Ipv4,
                        Family::V6 => KeyType::Ipv6,
                    },
                    elements: address_elements(list),
                });
                head.push(addr_payload(family, source));
                head.push(Expr::Lookup { set: name });
            }
            match rule.transport() {
                ProtoMatch::Any => {
                    head.push(verdict(rule.verdict));
                    rules.push(head);
                }
                ProtoMatch::Each(list) => {
                    for (proto, with_ports) in list {
                        let mut r = head.clone();
                        r.extend(l4proto(proto.number(family)));
                        if with_ports {
                            ports_used = true;
                            r.push(Expr::Payload {
                                base: PayloadBase::Transport,
                                offset: 2,
                                len: 2,
                            });
                            r.push(Expr::Lookup {
                                set: ports_set.clone(),
                            });
                        }
                        r.push(verdict(rule.verdict));
                        rules.push(r);
                    }
                }
            }
        }
        if ports_used {
            sets.push(Set {
                name: ports_set,
                key: KeyType::Port,
                elements: port_elements(&rule.ports),
            });
        }
    }
    rules.push(vec![verdict(policy.default)]);
    Chain {
        name: "vpn".into(),
        base: None,
        rules,
    }
}

#[cfg(test)]
mod tests;
