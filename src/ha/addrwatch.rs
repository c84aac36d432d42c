//! Watches which floating addresses (VIPs) are on this host (design §12): rtnetlink address
//! events of both families, every interface of the agent's network namespace.
//!
//! Rules:
//! - the socket subscribes to the address groups before it asks for the dump, so no change
//!   falls between the two; on an overrun (`ENOBUFS`: events were lost) or an interrupted
//!   dump it dumps again and the dump replaces what was known;
//! - a VIP is present when an interface holds exactly that address, whatever its prefix
//!   length or interface; an IPv6 address still in duplicate address detection (or whose
//!   detection failed) is not present yet: it cannot be a source address;
//! - the set is sent once after the first dump, then on every change of the set only.
//!
//! Deciding what changed ([`Tracker`]) is pure; [`run`] only moves datagrams.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, watch};

use crate::backend::link::own_ip;

/// One address change, reduced to what the watcher needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrEvent {
    /// The interface `index` holds `ip`; `usable` is false while IPv6 duplicate address
    /// detection runs (tentative) or after it failed.
    Present {
        index: u32,
        ip: IpAddr,
        usable: bool,
    },
    /// The interface `index` no longer holds `ip`.
    Gone { index: u32, ip: IpAddr },
}

/// The VIPs present, kept from address events and dumps. Pure.
#[derive(Clone, Debug)]
pub struct Tracker {
    vips: BTreeSet<IpAddr>,
    /// (interface, VIP) pairs known to be present.
    held: BTreeSet<(u32, IpAddr)>,
    /// While a dump runs: what it (and the events meanwhile) found; replaces `held`.
    dumping: Option<BTreeSet<(u32, IpAddr)>>,
    /// The set last reported (`None` before the first dump ended).
    reported: Option<BTreeSet<IpAddr>>,
}

impl Tracker {
    pub fn new(vips: impl IntoIterator<Item = IpAddr>) -> Self {
        Tracker {
            vips: vips.into_iter().map(|ip| ip.to_canonical()).collect(),
            held: BTreeSet::new(),
            dumping: None,
            reported: None,
        }
    }

    /// A dump starts: what it finds will replace what is known.
    pub fn begin_dump(&mut self) {
        self.dumping = Some(BTreeSet::new());
    }

    /// True while a dump runs.
    pub fn is_dumping(&self) -> bool {
        self.dumping.is_some()
    }

    /// An event (or a dump entry, `Present`). Returns the new set when it changed and no
    /// dump runs.
    pub fn event(&mut self, event: AddrEvent) -> Option<BTreeSet<IpAddr>> {
        let (pair, present) = match event {
            AddrEvent::Present { index, ip, usable } => ((index, ip.to_canonical()), usable),
            AddrEvent::Gone { index, ip } => ((index, ip.to_canonical()), false),
        };
        if !self.vips.contains(&pair.1) {
            return None;
        }
        for set in [Some(&mut self.held), self.dumping.as_mut()]
            .into_iter()
            .flatten()
        {
            if present {
                set.insert(pair);
            } else {
                set.remove(&pair);
            }
        }
        if self.dumping.is_some() {
            return None;
        }
        self.report()
    }

    /// The dump ended: its result replaces what was known. Returns the set when it is the
    /// first report or it changed.
    pub fn end_dump(&mut self) -> Option<BTreeSet<IpAddr>> {
        if let Some(found) = self.dumping.take() {
            self.held = found;
        }
        self.report()
    }

    /// The VIPs present now.
    pub fn present(&self) -> BTreeSet<IpAddr> {
        self.held.iter().map(|(_, ip)| *ip).collect()
    }

    fn report(&mut self) -> Option<BTreeSet<IpAddr>> {
        let now = self.present();
        if self.reported.as_ref() == Some(&now) {
            return None;
        }
        self.reported = Some(now.clone());
        Some(now)
    }
}

/// The event an address message describes (`None` for other messages).
pub fn addr_event(msg: &RouteNetlinkMessage) -> Option<AddrEvent> {
    let (addr, new) = match msg {
        RouteNetlinkMessage::NewAddress(a) => (a, true),
        RouteNetlinkMessage::DelAddress(a) => (a, false),
        _ => return None,
    };
    let ip = own_ip(addr)?;
    let index = addr.header.index;
    if !new {
        return Some(AddrEvent::Gone { index, ip });
    }
    // IFA_FLAGS (32 bits) supersedes the header's 8-bit flags when present.
    let unusable = match addr.attributes.iter().find_map(|a| match a {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    }) {
        Some(f) => f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed),
        None => addr
            .header
            .flags
            .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed),
    };
    Some(AddrEvent::Present {
        index,
        ip,
        usable: !unusable,
    })
}

/// What one received datagram says to the loop.
#[derive(Debug, Default, PartialEq, Eq)]
struct Datagram {
    events: Vec<AddrEvent>,
    /// The dump of this sequence number ended (`NLMSG_DONE`).
    dump_done: bool,
    /// The dump must be repeated (interrupted, failed, or the kernel reported an overrun).
    redump: bool,
}

/// Reads the messages of one datagram; `dump_seq` is the running dump's sequence number.
fn read_datagram(bytes: &[u8], dump_seq: u32) -> Datagram {
    let mut out = Datagram::default();
    let mut offset = 0;
    while offset + 16 <= bytes.len() {
        let rest = &bytes[offset..];
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            // A malformed datagram: what it said is lost, so ask again.
            out.redump = true;
            break;
        }
        offset += (len + 3) & !3;
        let ours = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]) == dump_seq;
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) else {
            out.redump = true;
            continue;
        };
        if ours && msg.header.flags & NLM_F_DUMP_INTR != 0 {
            out.redump = true;
        }
        match msg.payload {
            NetlinkPayload::InnerMessage(inner) => out.events.extend(addr_event(&inner)),
            NetlinkPayload::Done(_) if ours => out.dump_done = true,
            NetlinkPayload::Error(e) if ours && e.code.is_some() => {
                out.dump_done = true;
                out.redump = true;
            }
            NetlinkPayload::Overrun(_) => out.redump = true,
            _ => {}
        }
    }
    out
}

/// Netlink multicast groups of IPv4 and IPv6 address events.
const GROUPS: u32 = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
/// Receive buffer asked for: room for bursts of events (e.g. an interface going down).
const RECEIVE_BUFFER: usize = 1 << 20;

/// Watches the VIPs in this network namespace and sends the set present: once after the
/// first dump, then on every change. Returns when `stop` turns true (or its sender or
/// `tx`'s receiver is gone).
pub async fn run(
    vips: Vec<IpAddr>,
    tx: mpsc::Sender<BTreeSet<IpAddr>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if *stop.borrow_and_update() {
        return Ok(());
    }
    let mut socket = Socket::new(NETLINK_ROUTE).context("open rtnetlink socket")?;
    // Subscribed at bind, before the first dump is asked for.
    socket
        .bind(&SocketAddr::new(0, GROUPS))
        .context("subscribe to address events")?;
    if let Err(e) = socket.set_rx_buf_sz(RECEIVE_BUFFER) {
        tracing::debug!(error = %e, "could not enlarge the address watcher's receive buffer");
    }
    socket
        .set_non_blocking(true)
        .context("make the rtnetlink socket non-blocking")?;
    // SAFETY: the socket owns its descriptor, which stays open and the same until the
    // AsyncFd (its only owner from here on) drops it.
    let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("register the rtnetlink socket")?;
    let mut tracker = Tracker::new(vips);
    let mut seq = 0u32;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut redump = false;
    request_dump(fd.get_ref(), &mut tracker, &mut seq)?;
    loop {
        let mut guard = tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow_and_update() {
                    return Ok(());
                }
                continue;
            }
            guard = fd.readable() => guard.context("wait for address events")?,
        };
        let received = guard.try_io(|inner| {
            buf.clear();
            inner.get_ref().recv(&mut buf, 0)
        });
        let datagram = match received {
            Err(_would_block) => continue,
            Ok(Ok(_)) => read_datagram(&buf, seq),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::debug!("address events were lost (overrun); dumping again");
                Datagram {
                    redump: true,
                    ..Datagram::default()
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e).context("receive address events"),
        };
        let mut reports = Vec::new();
        for event in datagram.events {
            reports.extend(tracker.event(event));
        }
        // One dump at a time (the kernel refuses a second one): a repeat waits for the end
        // of the running dump, whose result it replaces.
        redump |= datagram.redump;
        if datagram.dump_done && !redump {
            reports.extend(tracker.end_dump());
        } else if redump && (datagram.dump_done || !tracker.is_dumping()) {
            redump = false;
            request_dump(fd.get_ref(), &mut tracker, &mut seq)?;
        }
        for set in reports {
            tracing::debug!(present = ?set, "floating addresses changed");
            if tx.send(set).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Asks for a dump of every address (both families); what it finds replaces what is known.
fn request_dump(socket: &Socket, tracker: &mut Tracker, seq: &mut u32) -> anyhow::Result<()> {
    *seq = seq.wrapping_add(1).max(1);
    let mut packet =
        NetlinkMessage::from(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
    packet.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    packet.header.sequence_number = *seq;
    packet.finalize();
    let mut bytes = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut bytes);
    socket
        .send_to(&bytes, &SocketAddr::new(0, 0), 0)
        .context("ask for the addresses")?;
    tracker.begin_dump();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, NetlinkHeader};
    use netlink_packet_route::AddressFamily;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| ip(s)).collect()
    }

    fn up(index: u32, s: &str) -> AddrEvent {
        AddrEvent::Present {
            index,
            ip: ip(s),
            usable: true,
        }
    }

    fn gone(index: u32, s: &str) -> AddrEvent {
        AddrEvent::Gone { index, ip: ip(s) }
    }

    #[test]
    fn the_first_dump_reports_once_then_only_changes() {
        let mut t = Tracker::new([ip("192.0.2.10"), ip("2001:db8::10")]);
        t.begin_dump();
        assert_eq!(t.event(up(2, "192.0.2.10")), None, "nothing during a dump");
        assert_eq!(t.event(up(2, "192.0.2.99")), None);
        assert_eq!(t.end_dump(), Some(set(&["192.0.2.10"])));
        assert_eq!(t.event(up(2, "192.0.2.10")), None, "no change, no report");
        assert_eq!(t.event(up(3, "198.51.100.1")), None, "not a VIP");
        assert_eq!(
            t.event(up(3, "2001:db8::10")),
            Some(set(&["192.0.2.10", "2001:db8::10"]))
        );
        assert_eq!(t.event(gone(2, "192.0.2.10")), Some(set(&["2001:db8::10"])));
        assert_eq!(t.event(gone(3, "2001:db8::10")), Some(set(&[])));
    }

    #[test]
    fn an_empty_first_dump_is_reported() {
        let mut t = Tracker::new([ip("192.0.2.10")]);
        t.begin_dump();
        assert_eq!(t.end_dump(), Some(set(&[])));
        assert_eq!(t.end_dump(), None);
    }

    #[test]
    fn a_vip_on_two_interfaces_stays_until_both_lose_it() {
        let mut t = Tracker::new([ip("192.0.2.10")]);
        t.begin_dump();
        t.end_dump();
        assert_eq!(t.event(up(2, "192.0.2.10")), Some(set(&["192.0.2.10"])));
        assert_eq!(t.event(up(3, "192.0.2.10")), None);
        assert_eq!(t.event(gone(2, "192.0.2.10")), None);
        assert_eq!(t.event(gone(3, "192.0.2.10")), Some(set(&[])));
    }

    #[test]
    fn a_tentative_address_becomes_present_when_detection_ends() {
        let mut t = Tracker::new([ip("2001:db8::10")]);
        t.begin_dump();
        t.end_dump();
        let tentative = AddrEvent::Present {
            index: 2,
            ip: ip("2001:db8::10"),
            usable: false,
        };
        assert_eq!(t.event(tentative), None);
        assert_eq!(t.event(up(2, "2001:db8::10")), Some(set(&["2001:db8::10"])));
    }

    #[test]
    fn a_redump_replaces_what_was_known_and_reports_the_difference_only() {
        let mut t = Tracker::new([ip("192.0.2.10"), ip("192.0.2.11")]);
        t.begin_dump();
        t.event(up(2, "192.0.2.10"));
        assert_eq!(t.end_dump(), Some(set(&["192.0.2.10"])));
        // Events were lost: .10 went away and .11 came; the dump says so.
        t.begin_dump();
        t.event(up(2, "192.0.2.11"));
        assert_eq!(t.end_dump(), Some(set(&["192.0.2.11"])));
        // A dump that finds what was known reports nothing.
        t.begin_dump();
        t.event(up(2, "192.0.2.11"));
        assert_eq!(t.end_dump(), None);
        // An event during a dump counts for the dump's result.
        t.begin_dump();
        t.event(up(2, "192.0.2.11"));
        t.event(gone(2, "192.0.2.11"));
        assert_eq!(t.end_dump(), Some(set(&[])));
    }

    fn message(seq: u32, flags: u16, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut msg = NetlinkMessage::new(header, payload);
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn address(new: bool, s: &str, flags: Option<AddressFlags>) -> RouteNetlinkMessage {
        let mut a = AddressMessage::default();
        a.header.index = 7;
        a.header.family = if ip(s).is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        a.header.prefix_len = 24;
        a.attributes.push(AddressAttribute::Address(ip(s)));
        if let Some(f) = flags {
            a.attributes.push(AddressAttribute::Flags(f));
        }
        if new {
            RouteNetlinkMessage::NewAddress(a)
        } else {
            RouteNetlinkMessage::DelAddress(a)
        }
    }

    #[test]
    fn datagrams_become_events_and_the_dump_end() {
        let mut bytes = message(
            0,
            0,
            NetlinkPayload::InnerMessage(address(true, "192.0.2.10", None)),
        );
        bytes.extend(message(
            0,
            0,
            NetlinkPayload::InnerMessage(address(
                true,
                "2001:db8::10",
                Some(AddressFlags::Tentative),
            )),
        ));
        bytes.extend(message(
            0,
            0,
            NetlinkPayload::InnerMessage(address(false, "192.0.2.11", None)),
        ));
        bytes.extend(message(4, 0, NetlinkPayload::Done(DoneMessage::default())));
        let d = read_datagram(&bytes, 4);
        assert_eq!(
            d.events,
            vec![
                up(7, "192.0.2.10"),
                AddrEvent::Present {
                    index: 7,
                    ip: ip("2001:db8::10"),
                    usable: false
                },
                gone(7, "192.0.2.11"),
            ]
        );
        assert!(d.dump_done && !d.redump);
        // The end of another (older) dump is not this one's.
        let d = read_datagram(
            &message(3, 0, NetlinkPayload::Done(DoneMessage::default())),
            4,
        );
        assert!(!d.dump_done);
        // An interrupted dump is repeated; garbage too.
        let d = read_datagram(
            &message(
                4,
                NLM_F_DUMP_INTR,
                NetlinkPayload::InnerMessage(address(true, "192.0.2.10", None)),
            ),
            4,
        );
        assert!(d.redump);
        assert!(read_datagram(&[0xff; 20], 4).redump);
    }
}
