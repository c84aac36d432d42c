//! Cutting connections a policy no longer allows. The rule is pure ([`select`]): a
//! tracked flow is cut when one of its ends lies in a removed peer's addresses, or when it
//! is a VPN flow (one end in the peers' addresses, not started by the gateway itself) that
//! the new policy denies. The flows are read and deleted over ctnetlink (netlink, no
//! `conntrack` tool): a flow that is still allowed is never touched, so it loses nothing.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::policy::{Flow, Policy, Span, Verdict};

/// A tracked connection: its original direction, and the raw attributes that name it in a
/// delete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub flow: Flow,
    family: u8,
    /// The CTA_TUPLE_ORIG attribute (header included) and CTA_ZONE if any.
    key: Vec<u8>,
}

impl Entry {
    /// An entry for tests of [`select`].
    pub fn of(flow: Flow) -> Entry {
        Entry {
            flow,
            family: 0,
            key: vec![],
        }
    }
}

/// Why entries are cut.
#[derive(Clone, Debug, Default)]
pub struct Cut<'a> {
    /// The policy now enforced; None: no filtering, nothing is denied.
    pub policy: Option<&'a Policy>,
    /// The peers' addresses (allowed IPs): flows with an end here are VPN flows.
    pub vpn: &'a [Span],
    /// The gateway's own addresses: flows it started are not the policy's.
    pub local: &'a [IpAddr],
    /// Addresses of peers just removed: all their flows go.
    pub removed: &'a [Span],
}

/// The indices of the entries to delete.
pub fn select(entries: &[Entry], cut: &Cut) -> Vec<usize> {
    let within = |list: &[Span], ip: IpAddr| list.iter().any(|s| s.contains(ip));
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            let f = &e.flow;
            if within(cut.removed, f.src) || within(cut.removed, f.dst) {
                return true;
            }
            let Some(policy) = cut.policy else {
                return false;
            };
            let vpn = within(cut.vpn, f.src) || within(cut.vpn, f.dst);
            vpn && !cut.local.contains(&f.src) && policy.decide(f) == Verdict::Drop
        })
        .map(|(i, _)| i)
        .collect()
}

// ------------------------------------------------------------------ netlink --

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Netlink attributes of a buffer: (type, payload, the whole attribute).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len], &b[..len]));
        let step = len.div_ceil(4) * 4;
        b = &b[step.min(b.len())..];
    }
    out
}

fn find<'a>(list: &[(u16, &'a [u8], &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    list.iter().find(|a| a.0 == kind).map(|a| a.1)
}

fn ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

/// Parses one ctnetlink message's payload (after the nfgenmsg header).
fn parse_entry(family: u8, payload: &[u8]) -> Option<Entry> {
    let top = attrs(payload);
    let orig_whole = top.iter().find(|a| a.0 == CTA_TUPLE_ORIG)?.2;
    let tuple = attrs(find(&top, CTA_TUPLE_ORIG)?);
    let ips = attrs(find(&tuple, CTA_TUPLE_IP)?);
    let proto = attrs(find(&tuple, CTA_TUPLE_PROTO)?);
    let (src, dst) = match (find(&ips, CTA_IP_V4_SRC), find(&ips, CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (ip(s)?, ip(d)?),
        _ => (
            ip(find(&ips, CTA_IP_V6_SRC)?)?,
            ip(find(&ips, CTA_IP_V6_DST)?)?,
        ),
    };
    let protocol = *find(&proto, CTA_PROTO_NUM)?.first()?;
    let dport = match protocol {
        6 | 17 => find(&proto, CTA_PROTO_DST_PORT)
            .and_then(|p| <[u8; 2]>::try_from(p).ok())
            .map(u16::from_be_bytes),
        _ => None,
    };
    let mut key = orig_whole.to_vec();
    if let Some(zone) = top.iter().find(|a| a.0 == CTA_ZONE) {
        key.extend_from_slice(zone.2);
        key.resize(key.len().div_ceil(4) * 4, 0);
    }
    Some(Entry {
        flow: Flow {
            src,
            dst,
            protocol,
            dport,
        },
        family,
        key,
    })
}

/// Appends one ctnetlink request to `buf`.
fn request(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0, 0, 0]);
    buf.extend_from_slice(attrs);
    buf.resize(buf.len().div_ceil(4) * 4, 0);
}

/// The error code of an NLMSG_ERROR body (0: an acknowledgement).
fn error_code(body: &[u8]) -> i32 {
    body.get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(-libc::EIO, i32::from_ne_bytes)
}

/// Reads messages until `each` says stop; `each` gets (type, body after the header).
fn receive(
    s: &mnl::Socket,
    mut each: impl FnMut(u16, &[u8]) -> io::Result<bool>,
) -> io::Result<()> {
    let mut words = vec![0u64; 1 << 14];
    loop {
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8)
        };
        let n = s.recv_raw(bytes)?;
        let mut off = 0usize;
        while off + 16 <= n {
            let len =
                u32::from_ne_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
                    as usize;
            if len < 16 || off + len > n {
                break;
            }
            let kind = u16::from_ne_bytes([bytes[off + 4], bytes[off + 5]]);
            let body = &bytes[off + 16..off + len];
            if !each(kind, body)? {
                return Ok(());
            }
            off += len.div_ceil(4) * 4;
        }
    }
}

/// Every tracked connection of this network namespace.
pub fn dump() -> io::Result<Vec<Entry>> {
    let s = super::netfilter_socket()?;
    let mut buf = Vec::new();
    request(
        &mut buf,
        IPCTNL_MSG_CT_GET,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        1,
        0,
        &[],
    );
    s.send(&buf)?;
    let mut out = Vec::new();
    receive(&s, |kind, body| match kind as i32 {
        libc::NLMSG_DONE => Ok(false),
        libc::NLMSG_ERROR => match error_code(body) {
            0 => Ok(false),
            code => Err(io::Error::from_raw_os_error(-code)),
        },
        _ => {
            // nfgenmsg: the family, then the attributes.
            let family = body.first().copied().unwrap_or(0);
            if let Some(e) = parse_entry(family, body.get(4..).unwrap_or(&[])) {
                out.push(e);
            }
            Ok(true)
        }
    })?;
    Ok(out)
}

/// Deletes the entries; an entry already gone is not an error. Returns how many went.
pub fn delete(entries: &[&Entry]) -> io::Result<usize> {
    if entries.is_empty() {
        return Ok(0);
    }
    let s = super::netfilter_socket()?;
    let mut deleted = 0;
    for chunk in entries.chunks(256) {
        let mut buf = Vec::new();
        for (i, e) in chunk.iter().enumerate() {
            request(
                &mut buf,
                IPCTNL_MSG_CT_DELETE,
                (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
                i as u32 + 1,
                e.family,
                &e.key,
            );
        }
        s.send(&buf)?;
        let mut answered = 0;
        receive(&s, |kind, body| {
            if kind as i32 == libc::NLMSG_ERROR {
                answered += 1;
                let code = error_code(body);
                if code == 0 {
                    deleted += 1;
                } else if -code != libc::ENOENT {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            Ok(answered < chunk.len())
        })?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::policy::{parse_spec, Family, Rule};
    use std::collections::BTreeSet;

    fn flow(src: &str, dst: &str, protocol: u8, dport: Option<u16>) -> Entry {
        Entry::of(Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            dport,
        })
    }

    #[test]
    fn only_denied_vpn_flows_and_removed_peers_are_cut() {
        let policy = Policy {
            default: Verdict::Drop,
            rules: vec![Rule {
                index: 0,
                priority: 0,
                sources: vec![],
                destinations: vec![parse_spec("198.51.100.10").unwrap()],
                ports: vec![(80, 80)],
                protocols: BTreeSet::new(),
                verdict: Verdict::Accept,
            }],
        };
        let vpn = [parse_spec("10.77.0.0/24").unwrap()];
        let removed = [parse_spec("10.77.0.9").unwrap()];
        let local: [IpAddr; 1] = ["10.77.0.1".parse().unwrap()];
        let entries = vec![
            flow("10.77.0.2", "198.51.100.10", 6, Some(80)), // allowed
            flow("10.77.0.2", "198.51.100.10", 6, Some(22)), // denied
            flow("192.0.2.5", "198.51.100.10", 6, Some(22)), // not a VPN flow
            flow("10.77.0.1", "10.77.0.2", 6, Some(22)),     // the gateway's own
            flow("198.51.100.10", "10.77.0.9", 1, None),     // removed peer
        ];
        let cut = Cut {
            policy: Some(&policy),
            vpn: &vpn,
            local: &local,
            removed: &removed,
        };
        assert_eq!(select(&entries, &cut), vec![1, 4]);
        let no_policy = Cut {
            policy: None,
            ..cut.clone()
        };
        assert_eq!(select(&entries, &no_policy), vec![4]);
        assert_eq!(Family::of(entries[0].flow.src), Family::V4);
    }

    #[test]
    fn a_dumped_message_parses() {
        // CTA_TUPLE_ORIG { IP { V4_SRC, V4_DST }, PROTO { NUM=6, SRC_PORT, DST_PORT=80 } }
        fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
            let mut b = ((payload.len() + 4) as u16).to_ne_bytes().to_vec();
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(payload);
            b.resize(b.len().div_ceil(4) * 4, 0);
            b
        }
        let nested = |k: u16, p: &[u8]| attr(k | 0x8000, p);
        let ips = [attr(1, &[10, 77, 0, 2]), attr(2, &[198, 51, 100, 10])].concat();
        let proto = [
            attr(1, &[6]),
            attr(2, &4321u16.to_be_bytes()),
            attr(3, &80u16.to_be_bytes()),
        ]
        .concat();
        let tuple = [nested(1, &ips), nested(2, &proto)].concat();
        let msg = nested(1, &tuple);
        let e = parse_entry(2, &msg).unwrap();
        assert_eq!(e.flow.src, "10.77.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.flow.dst, "198.51.100.10".parse::<IpAddr>().unwrap());
        assert_eq!((e.flow.protocol, e.flow.dport), (6, Some(80)));
        assert_eq!(e.key, msg);
    }
}
