//! The shape check of a WireGuard netlink answer, run before netlink-packet-wireguard
//! parses it: the crate indexes the value of `WGALLOWEDIP_A_CIDR_MASK` without checking
//! its length, so an answer with an empty mask would panic inside it. The check walks the
//! attribute tree (device → peers → peer → allowed IPs → allowed IP) and refuses what the
//! parser cannot take; every other length the crate checks itself.

use std::io;

/// Netlink message header length.
const NLMSG_HDRLEN: usize = 16;
/// Generic netlink header length.
const GENL_HDRLEN: usize = 4;
/// The control messages netlink-packet-core parses itself (`NLMSG_NOOP`, `NLMSG_ERROR`,
/// `NLMSG_DONE`, `NLMSG_OVERRUN`); it hands every other type, 0 and the reserved ones
/// included, to the WireGuard parser.
const CONTROL: std::ops::RangeInclusive<u16> = 1..=4;
/// The attribute header: `u16` length (header included), `u16` type.
const NLA_HDRLEN: usize = 4;
/// The type bits of an attribute's type field (the rest are the nested and byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;

const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

/// Checks one netlink message (`message`: header and payload, no more) that the WireGuard
/// parser will get. Control messages pass unchecked; a message that is too short for its
/// own header is left to the parser, which refuses it.
pub fn check_message(message: &[u8]) -> io::Result<()> {
    let Some(kind) = message.get(4..6) else {
        return Ok(());
    };
    if CONTROL.contains(&u16::from_ne_bytes([kind[0], kind[1]])) {
        return Ok(());
    }
    match message.get(NLMSG_HDRLEN + GENL_HDRLEN..) {
        Some(attributes) => device(attributes),
        None => Ok(()),
    }
}

fn device(attributes: &[u8]) -> io::Result<()> {
    each_nested(attributes, WGDEVICE_A_PEERS, |peer| {
        each_nested(peer, WGPEER_A_ALLOWEDIPS, allowed_ip)
    })
}

/// Runs `check` on each entry of every list attribute of type `kind` in `attributes`.
fn each_nested(
    attributes: &[u8],
    kind: u16,
    mut check: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    for (found, list) in nlas(attributes) {
        if found? == kind {
            for (entry, value) in nlas(list) {
                entry?;
                check(value)?;
            }
        }
    }
    Ok(())
}

fn allowed_ip(attributes: &[u8]) -> io::Result<()> {
    for (kind, value) in nlas(attributes) {
        if kind? == WGALLOWEDIP_A_CIDR_MASK && value.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad netlink answer: an allowed IP with an empty WGALLOWEDIP_A_CIDR_MASK",
            ));
        }
    }
    Ok(())
}

/// The attributes of `bytes`: (type or the error of a malformed header, value). A
/// malformed attribute ends the walk after its error.
fn nlas(bytes: &[u8]) -> impl Iterator<Item = (io::Result<u16>, &[u8])> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let header = rest.get(..NLA_HDRLEN);
        let len = header.map_or(0, |h| usize::from(u16::from_ne_bytes([h[0], h[1]])));
        let Some(value) = rest.get(NLA_HDRLEN..len).filter(|_| len >= NLA_HDRLEN) else {
            rest = &[];
            return Some((
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad netlink answer: a malformed attribute",
                )),
                &[][..],
            ));
        };
        let kind = header.map_or(0, |h| u16::from_ne_bytes([h[2], h[3]]) & NLA_TYPE_MASK);
        rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Some((Ok(kind), value))
    })
}
