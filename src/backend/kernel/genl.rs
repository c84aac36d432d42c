//! The WireGuard generic netlink socket: ONE socket, the `wireguard` family id resolved
//! once when it opens, then `WG_CMD_SET_DEVICE` requests (each waits for its ACK) and
//! `WG_CMD_GET_DEVICE` dumps (multi-part answers read until `NLMSG_DONE`, restarted when
//! the kernel flags the dump as interrupted by a concurrent change).
//!
//! Errors are `io::Error`s carrying the kernel's errno, so that callers can tell
//! `ENOENT` (no such family), `ENODEV` and `EADDRINUSE` apart.

use std::io;

use netlink_packet_core::{
    Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlHeader, GenlMessage};
use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use zeroize::Zeroize;

use crate::backend::link::set_receive_timeout;

/// The generic netlink family name of WireGuard.
pub const FAMILY: &str = "wireguard";
/// Receive buffer: the kernel sizes dump messages up to 32 KiB after the buffer we read
/// with, and ACKs are small (`NETLINK_CAP_ACK`).
const RECV_BUFFER: usize = 64 * 1024;
/// How long to wait for one answer before giving up (a dump of 10,000 peers is many
/// answers, each one quick; under TCG emulation too).
const RECEIVE_TIMEOUT_SECS: libc::time_t = 30;
/// A dump interrupted this many times in a row by concurrent changes is an error.
pub const DUMP_RETRIES: usize = 5;

/// The WireGuard generic netlink socket.
pub struct WgSocket {
    socket: Socket,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

impl WgSocket {
    /// Opens the socket and resolves the `wireguard` family. A kernel without WireGuard
    /// answers `ENOENT` (the lookup also makes the kernel load the module if it can).
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors come back without a copy of our (up to MESSAGE_LIMIT bytes) request.
        socket.set_cap_ack(true)?;
        socket.set_ext_ack(true)?;
        set_receive_timeout(&socket, RECEIVE_TIMEOUT_SECS)?;
        let mut this = WgSocket {
            socket,
            family: 0,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        };
        this.family = this.resolve_family()?;
        Ok(this)
    }

    /// The resolved family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    /// Sends one `WG_CMD_SET_DEVICE` request, a whole message as [`super::pack`] builds
    /// it (this fills in the header's family, flags and sequence number), and waits for
    /// its ACK.
    pub fn set_device(&mut self, message: &mut [u8]) -> io::Result<()> {
        let seq = self.next_seq();
        let header = message
            .get_mut(4..12)
            .ok_or_else(|| invalid("a WG_CMD_SET_DEVICE request shorter than its header"))?;
        header[..2].copy_from_slice(&self.family.to_ne_bytes());
        header[2..4].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        header[4..].copy_from_slice(&seq.to_ne_bytes());
        self.socket.send(message, 0)?;
        self.receive::<GenlMessage<WireguardMessage>>(seq, Expect::Ack)
            .map(|_| ())
    }

    /// Dumps the device `interface`: every part of the multi-part answer, in order.
    /// `ENODEV`: no such interface; `EOPNOTSUPP`: it is not a WireGuard interface.
    pub fn get_device(&mut self, interface: &str) -> io::Result<Vec<WireguardMessage>> {
        let mut attempt = 0;
        loop {
            let mut parts = Vec::new();
            match self.get_device_each(interface, |part| parts.push(part)) {
                Ok(()) => return Ok(parts),
                Err(e) if e.kind() == io::ErrorKind::Interrupted && attempt < DUMP_RETRIES => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Dumps the device `interface` once, handing each part to `each` as its datagram
    /// arrives (at most one datagram's parts are held here). A dump interrupted by a
    /// concurrent change ends in an `Interrupted` error after its last part: what `each`
    /// was given is not one consistent read, and the caller starts over.
    pub fn get_device_each(
        &mut self,
        interface: &str,
        mut each: impl FnMut(WireguardMessage),
    ) -> io::Result<()> {
        let seq = self.next_seq();
        let request = encode(
            self.family,
            WireguardCmd::GetDevice,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &[WireguardAttribute::IfName(interface.to_owned())],
        );
        self.socket.send(&request, 0)?;
        self.receive_each::<GenlMessage<WireguardMessage>>(seq, Expect::Dump, |m| each(m.payload))
    }

    fn resolve_family(&mut self) -> io::Result<u16> {
        let seq = self.next_seq();
        let mut msg = NetlinkMessage::from(GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_owned())],
        }));
        msg.header.flags = NLM_F_REQUEST;
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut request = vec![0; msg.buffer_len()];
        msg.serialize(&mut request);
        self.socket.send(&request, 0)?;
        let replies = self.receive::<GenlMessage<GenlCtrl>>(seq, Expect::Reply)?;
        replies
            .iter()
            .flat_map(|m| &m.payload.nlas)
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| invalid("family lookup answered without a family id"))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Reads the answers to request `seq` (answers to earlier requests are skipped).
    fn receive<T>(&mut self, seq: u32, expect: Expect) -> io::Result<Vec<T>>
    where
        T: Checked,
    {
        let mut all = Vec::new();
        self.receive_each(seq, expect, |m| all.push(m))?;
        Ok(all)
    }

    /// Reads the answers to request `seq`, handing each to `each` once its datagram is
    /// parsed.
    fn receive_each<T>(
        &mut self,
        seq: u32,
        expect: Expect,
        mut each: impl FnMut(T),
    ) -> io::Result<()>
    where
        T: Checked,
    {
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, libc::MSG_TRUNC)?;
            if n > self.buf.len() {
                return Err(invalid(format!(
                    "netlink answer of {n} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            let result =
                parse_datagram::<T>(&self.buf[..n], seq, expect, &mut out, &mut interrupted);
            // Dumps carry private and preshared keys.
            self.buf.zeroize();
            let progress = result?;
            out.drain(..).for_each(&mut each);
            match progress {
                Progress::More => continue,
                Progress::Done if interrupted => {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "dump interrupted by a concurrent change",
                    ))
                }
                Progress::Done => return Ok(()),
            }
        }
    }
}

/// What answer a request expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// An `NLMSG_ERROR` with code 0.
    Ack,
    /// One message.
    Reply,
    /// Messages until `NLMSG_DONE`.
    Dump,
}

/// An answer type with the shape check its parser needs first (see [`super::shape`]).
trait Checked: NetlinkDeserializable {
    /// Refuses a netlink message (header and payload) the parser would not survive.
    fn check(message: &[u8]) -> io::Result<()>;
}

impl Checked for GenlMessage<WireguardMessage> {
    fn check(message: &[u8]) -> io::Result<()> {
        super::shape::check_message(message)
    }
}

/// The controller's parser checks its lengths itself.
impl Checked for GenlMessage<GenlCtrl> {
    fn check(_: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

enum Progress {
    More,
    Done,
}

/// Parses one datagram (it may hold several netlink messages).
fn parse_datagram<T: Checked>(
    mut bytes: &[u8],
    seq: u32,
    expect: Expect,
    out: &mut Vec<T>,
    interrupted: &mut bool,
) -> io::Result<Progress> {
    while !bytes.is_empty() {
        let len = bytes
            .get(..4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        if len < 16 || len > bytes.len() {
            return Err(invalid(format!("bad netlink message length {len}")));
        }
        let message = &bytes[..len];
        T::check(message)?;
        let msg = NetlinkMessage::<T>::deserialize(message)
            .map_err(|e| invalid(format!("bad netlink answer: {e}")))?;
        bytes = advance(bytes, len);
        if msg.header.sequence_number != seq {
            continue;
        }
        if msg.header.flags & NLM_F_DUMP_INTR != 0 {
            *interrupted = true;
        }
        match msg.payload {
            NetlinkPayload::Error(e) => match e.code {
                None if expect == Expect::Ack => return Ok(Progress::Done),
                None => {}
                // Not `to_io()`: its `abs()` overflows on i32::MIN (found by fuzzing).
                Some(code) => {
                    let errno = code.get().checked_abs().unwrap_or(i32::MAX);
                    return Err(io::Error::from_raw_os_error(errno));
                }
            },
            NetlinkPayload::Done(done) => {
                if done.code < 0 {
                    // A code of i32::MIN has no positive errno (found by fuzzing).
                    return Err(io::Error::from_raw_os_error(done.code.saturating_neg()));
                }
                return Ok(Progress::Done);
            }
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                if expect == Expect::Reply {
                    return Ok(Progress::Done);
                }
            }
            NetlinkPayload::Overrun(_) => return Err(invalid("netlink overrun")),
            _ => {}
        }
    }
    Ok(Progress::More)
}

/// Parses the datagrams of a device dump as [`WgSocket::get_device`] receives them (answers to
/// sequence number `seq`) into its parts. Public for the fuzz target.
pub fn parse_dump(datagrams: &[&[u8]], seq: u32) -> io::Result<Vec<WireguardMessage>> {
    let mut out = Vec::<GenlMessage<WireguardMessage>>::new();
    let mut interrupted = false;
    for d in datagrams {
        if let Progress::Done = parse_datagram(d, seq, Expect::Dump, &mut out, &mut interrupted)? {
            break;
        }
    }
    Ok(out.into_iter().map(|m| m.payload).collect())
}

fn advance(bytes: &[u8], len: usize) -> &[u8] {
    let aligned = (len + 3) & !3;
    bytes.get(aligned..).unwrap_or(&[])
}

/// Encodes a WireGuard request: netlink header, generic netlink header, attributes.
pub fn encode(
    family: u16,
    cmd: WireguardCmd,
    flags: u16,
    seq: u32,
    attributes: &[WireguardAttribute],
) -> Vec<u8> {
    let len = super::pack::HEADERS_LEN + attributes.buffer_len();
    let mut buf = vec![0; len];
    let mut header = NetlinkHeader::default();
    header.length = len as u32;
    header.message_type = family;
    header.flags = flags;
    header.sequence_number = seq;
    header.emit(&mut buf[..16]);
    GenlHeader {
        cmd: cmd.into(),
        version: super::pack::WG_GENL_VERSION,
    }
    .emit(&mut buf[16..20]);
    attributes.emit(&mut buf[20..]);
    buf
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART};

    type Wg = GenlMessage<WireguardMessage>;

    fn part(seq: u32, flags: u16, port: u16) -> Vec<u8> {
        encode(
            0x1d,
            WireguardCmd::GetDevice,
            flags,
            seq,
            &[WireguardAttribute::ListenPort(port)],
        )
    }

    fn control(seq: u32, payload: NetlinkPayload<Wg>) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), payload);
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        let mut d = DoneMessage::default();
        d.code = code;
        control(seq, NetlinkPayload::Done(d))
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(code);
        e.header = vec![0; 16];
        control(seq, NetlinkPayload::Error(e))
    }

    fn ports(out: &[Wg]) -> Vec<u16> {
        out.iter()
            .flat_map(|m| &m.payload.attributes)
            .filter_map(|a| match a {
                WireguardAttribute::ListenPort(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dump_spans_datagrams_until_done_and_skips_stale_answers() {
        let mut out = Vec::new();
        let mut intr = false;
        let first = [part(6, NLM_F_MULTIPART, 99), part(7, NLM_F_MULTIPART, 1)].concat();
        assert!(matches!(
            parse_datagram::<Wg>(&first, 7, Expect::Dump, &mut out, &mut intr),
            Ok(Progress::More)
        ));
        let second = [part(7, NLM_F_MULTIPART, 2), done(7, 0)].concat();
        assert!(matches!(
            parse_datagram::<Wg>(&second, 7, Expect::Dump, &mut out, &mut intr),
            Ok(Progress::Done)
        ));
        assert_eq!(
            ports(&out),
            vec![1, 2],
            "the answer to request 6 is skipped"
        );
        assert!(!intr);
    }

    #[test]
    fn interrupted_dumps_and_errors_are_reported() {
        let mut out = Vec::new();
        let mut intr = false;
        let dg = [part(3, NLM_F_MULTIPART | NLM_F_DUMP_INTR, 1), done(3, 0)].concat();
        parse_datagram::<Wg>(&dg, 3, Expect::Dump, &mut out, &mut intr).unwrap();
        assert!(intr);

        let e = parse_datagram::<Wg>(
            &error(4, -libc::ENODEV),
            4,
            Expect::Dump,
            &mut out,
            &mut intr,
        )
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        let e = parse_datagram::<Wg>(
            &done(5, -libc::EINVAL),
            5,
            Expect::Dump,
            &mut out,
            &mut intr,
        )
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = parse_datagram::<Wg>(
            &error(6, -libc::EADDRINUSE),
            6,
            Expect::Ack,
            &mut out,
            &mut intr,
        )
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
        assert!(matches!(
            parse_datagram::<Wg>(&error(8, 0), 8, Expect::Ack, &mut out, &mut intr),
            Ok(Progress::Done)
        ));
    }

    /// A dump part with one peer whose allowed IP carries `mask` as its CIDR mask value.
    fn part_with_mask(seq: u32, mask: Vec<u8>) -> Vec<u8> {
        use netlink_packet_core::DefaultNla;
        use netlink_packet_wireguard::{
            WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardPeer,
            WireguardPeerAttribute,
        };
        let allowed_ip = WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
            WireguardAllowedIpAttr::IpAddr([10, 0, 0, 0].into()),
            WireguardAllowedIpAttr::Other(DefaultNla::new(3, mask)),
        ]);
        let peer = WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey([7; 32]),
            WireguardPeerAttribute::AllowedIps(vec![allowed_ip]),
        ]);
        encode(
            0x1d,
            WireguardCmd::GetDevice,
            NLM_F_MULTIPART,
            seq,
            &[WireguardAttribute::Peers(vec![peer])],
        )
    }

    #[test]
    fn an_allowed_ip_without_its_mask_byte_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        let mut intr = false;
        let good = [part_with_mask(2, vec![24]), done(2, 0)].concat();
        parse_datagram::<Wg>(&good, 2, Expect::Dump, &mut out, &mut intr).unwrap();
        assert_eq!(out.len(), 1);
        let bad = [part_with_mask(3, vec![]), done(3, 0)].concat();
        let e = parse_datagram::<Wg>(&bad, 3, Expect::Dump, &mut out, &mut intr)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("CIDR_MASK"), "{e}");
        // Every type but the four control messages goes to the WireGuard parser, 0 and
        // the reserved ones too.
        for kind in [0u16, 5, 15] {
            let mut bad = part_with_mask(4, vec![]);
            bad[4..6].copy_from_slice(&kind.to_ne_bytes());
            let e = parse_datagram::<Wg>(&bad, 4, Expect::Dump, &mut out, &mut intr)
                .err()
                .unwrap();
            assert!(e.to_string().contains("CIDR_MASK"), "type {kind}: {e}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        let mut intr = false;
        for bytes in [&[1u8, 2, 3][..], &[0xff; 40][..], &part(1, 0, 1)[..18]] {
            assert!(parse_datagram::<Wg>(bytes, 1, Expect::Dump, &mut out, &mut intr).is_err());
        }
        for min in [done(1, i32::MIN), error(1, i32::MIN)] {
            assert!(parse_datagram::<Wg>(&min, 1, Expect::Dump, &mut out, &mut intr).is_err());
        }
    }
}
