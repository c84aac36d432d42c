//! The WireGuard cross-platform UAPI text protocol (<https://www.wireguard.com/xplatform/>),
//! pure: [`encode_set`] turns a plan's device and peer operations into one `set=1`
//! transaction, [`GetParser`] turns a `get=1` answer, as it arrives, into a read of the
//! device (into any [`DeviceSink`]: the agent's model in place, or a [`DeviceState`]), and
//! [`parse_errno`] reads the answer to a `set`. Keys travel in hex.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::backend::kick::{kick_keepalive, recreated_peer, Kick};
use crate::model::{DeviceSink, DeviceState, Key, PeerSpec, PeerState, SecretKey};
use crate::plan::{DeviceChange, Op, PeerUpdate};

/// A `set=1` request. Holds secrets: zeroed on drop, never printed.
pub struct SetRequest {
    text: Zeroizing<String>,
    /// The listen port this request sets, to name it when the port is in use.
    pub listen_port: Option<u16>,
    /// How many peer sections it holds (wireguard-go's work before it answers).
    pub peers: usize,
    /// It sets the private key: wireguard-go then recomputes every peer it holds.
    pub rekeys: bool,
}

impl SetRequest {
    /// The bytes to write to the UAPI socket (ends with the blank line).
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl fmt::Debug for SetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SetRequest({} lines, <redacted>)",
            self.text.lines().count()
        )
    }
}

/// What the UAPI answered or how its answer was malformed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UapiError {
    /// The implementation answered `errno=N` with N ≠ 0 (N kept positive).
    #[error("wireguard-go answered errno={0} ({text})", text = std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// A line of the answer could not be understood.
    #[error("malformed UAPI answer line {line}: {why}")]
    Malformed { line: usize, why: String },
    /// The answer ended without an `errno=` line.
    #[error("UAPI answer without errno line")]
    Truncated,
}

/// A plan's device and peer operations as the ordered `set=1` transactions that apply
/// them: the private key first, then the peers in transactions of at most `batch`, then the
/// listen port and fwmark. Built one at a time as the caller takes them, so a cold apply's
/// text is never whole in memory.
///
/// wireguard-go computes one static-static secret per peer when the private key changes:
/// set before the peers of a cold apply it costs nothing (they compute theirs as they come),
/// set after 50,000 peers it is one silent pass over all of them that can outlast the UAPI
/// timeout. The port comes last, in its own transaction: wireguard-go stops a transaction at
/// its first error, and a taken port must not keep peer changes (revocations) from the
/// interface.
pub fn encode_transactions<'a>(
    ops: &'a [&'a Op],
    batch: usize,
) -> impl Iterator<Item = SetRequest> + 'a {
    let device = move |keep_key: bool| -> Option<SetRequest> {
        let changes: Vec<Op> = ops
            .iter()
            .filter_map(|op| match op {
                Op::ConfigureDevice(c) => Some(c),
                _ => None,
            })
            .map(|c| {
                if keep_key {
                    DeviceChange {
                        private_key: c.private_key.clone(),
                        ..Default::default()
                    }
                } else {
                    DeviceChange {
                        private_key: None,
                        ..DeviceChange::clone(c)
                    }
                }
            })
            .filter(|c| *c != DeviceChange::default())
            .map(|c| Op::ConfigureDevice(Box::new(c)))
            .collect();
        encode_set(changes.iter())
    };
    let peers: Vec<&'a Op> = ops
        .iter()
        .copied()
        .filter(|op| matches!(op, Op::AddPeer(_) | Op::UpdatePeer(_) | Op::RemovePeer(_)))
        .collect();
    let batch = batch.max(1);
    let batches = (0..peers.len())
        .step_by(batch)
        .map(move |i| encode_set(peers[i..peers.len().min(i + batch)].iter().copied()));
    std::iter::once_with(move || device(true))
        .chain(batches)
        .chain(std::iter::once_with(move || device(false)))
        .flatten()
}

/// Encodes the device and peer operations of a plan, in order, as one `set=1`
/// transaction; `None` when the plan has none (link operations are not UAPI's).
///
/// `replace_allowed_ips=true` goes with a new peer (so the result is exact even if the
/// peer appeared meanwhile) and with an update only when its allowed IPs change; updates
/// carry `update_only=true` so that they never create a peer that was removed meanwhile.
pub fn encode_set<'a>(ops: impl IntoIterator<Item = &'a Op> + Clone) -> Option<SetRequest> {
    // Reserve the whole size up front: a growing String would leave copies of the keys
    // in freed memory that Zeroizing never sees.
    let mut text = Zeroizing::new(String::with_capacity(size_bound(ops.clone())));
    text.push_str("set=1\n");
    let mut listen_port = None;
    let (mut any, mut peers, mut rekeys) = (false, 0, false);
    for op in ops {
        match op {
            Op::ConfigureDevice(change) => {
                any = true;
                encode_device(&mut text, change);
                listen_port = change.listen_port.or(listen_port);
                rekeys |= change.private_key.is_some();
            }
            Op::AddPeer(spec) => {
                any = true;
                peers += 1;
                encode_add(&mut text, spec);
            }
            Op::UpdatePeer(update) => {
                any = true;
                peers += 1;
                encode_update(&mut text, update);
            }
            Op::RemovePeer(key) => {
                any = true;
                peers += 1;
                line(&mut text, "public_key", hex(&key.0));
                line(&mut text, "remove", "true");
            }
            Op::CreateLink
            | Op::SetMtu(_)
            | Op::SetLinkUp
            | Op::AddAddress(_)
            | Op::RemoveAddress(_) => {}
        }
    }
    if !any {
        return None;
    }
    text.push('\n');
    Some(SetRequest {
        text,
        listen_port,
        peers,
        rekeys,
    })
}

/// Encodes takeover kicks as one `set=1` transaction; `None` for no kicks. Per kick, in
/// this order (wireguard-go's `persistent_keepalive_interval` line sends a keepalive when
/// the interval goes from 0 to nonzero, after the peer's section ends, and a keepalive
/// with no valid session starts a handshake):
/// - re-creation: `remove=true`, then the whole peer at the kick's endpoint with the
///   keepalive of [`kick_keepalive`] (a new peer's interval is 0: this sends);
/// - otherwise (`update_only=true`, so an absent peer is skipped): the endpoint with the
///   keepalive 0, then a second section with the keepalive of [`kick_keepalive`];
/// - then, when the desired keepalive is 0, a section setting it back to 0.
///
/// Every section that configures a peer sets the keepalive: wireguard-go keeps the
/// "send a keepalive" mark of the previous section otherwise. A re-creation creates the
/// peer even if it is absent: the caller leaves out the kicks of absent peers.
pub fn encode_kicks<'a>(kicks: impl IntoIterator<Item = &'a Kick> + Clone) -> Option<SetRequest> {
    let peers = kicks.clone().into_iter().count();
    let bound = 16
        + kicks
            .clone()
            .into_iter()
            .map(|k| 6 * 81 + 4 * 64 + k.peer.allowed_ips.len() * 64)
            .sum::<usize>();
    let mut text = Zeroizing::new(String::with_capacity(bound));
    text.push_str("set=1\n");
    let mut any = false;
    for kick in kicks {
        any = true;
        let key = hex(&kick.peer.public_key.0);
        let keepalive = |text: &mut String, value: u16| {
            line(text, "public_key", &key);
            line(text, "update_only", "true");
            line(text, "persistent_keepalive_interval", value);
        };
        if kick.recreate {
            line(&mut text, "public_key", &key);
            line(&mut text, "remove", "true");
            encode_add(&mut text, &recreated_peer(kick));
        } else {
            line(&mut text, "public_key", &key);
            line(&mut text, "update_only", "true");
            line(&mut text, "endpoint", kick.endpoint);
            line(&mut text, "persistent_keepalive_interval", 0);
            keepalive(&mut text, kick_keepalive(kick.peer.persistent_keepalive));
        }
        if kick.peer.persistent_keepalive == 0 {
            keepalive(&mut text, 0);
        }
    }
    if !any {
        return None;
    }
    text.push('\n');
    Some(SetRequest {
        text,
        listen_port: None,
        peers,
        rekeys: false,
    })
}

/// Parses the answer to `get=1` (the `key=value` lines up to and including `errno=`).
pub fn parse_get(answer: &str) -> Result<DeviceState, UapiError> {
    let mut parser = GetParser::default();
    for raw in answer.lines() {
        if parser.line(raw).is_break() {
            break;
        }
    }
    parser.finish()
}

/// The answer to `get=1` parsed line by line as it arrives, each peer handed to the sink
/// once its lines are read, so that neither the answer's text (a few hundred bytes per
/// peer) nor a second copy of the device is held beside what the sink fills (the agent's
/// model, in place).
pub struct GetParser<S = DeviceState> {
    sink: S,
    settings: Settings,
    peer: Option<PeerBuilder>,
    lines: usize,
    /// Set by the `errno=` line or the first malformed line: the answer is complete.
    end: Option<Result<(), UapiError>>,
}

/// The device's own lines, handed to the sink once the answer is complete.
#[derive(Default)]
struct Settings {
    private_key: Option<SecretKey>,
    listen_port: u16,
    fwmark: u32,
}

impl Default for GetParser<DeviceState> {
    fn default() -> Self {
        GetParser::new(DeviceState::default())
    }
}

impl<S: DeviceSink> GetParser<S> {
    pub fn new(sink: S) -> Self {
        GetParser {
            sink,
            settings: Settings::default(),
            peer: None,
            lines: 0,
            end: None,
        }
    }

    /// Feeds one line (without its newline). `Break` once the answer is complete (its
    /// `errno=` line) or malformed: later lines are not read.
    pub fn line(&mut self, raw: &str) -> ControlFlow<()> {
        if self.end.is_some() {
            return ControlFlow::Break(());
        }
        self.lines += 1;
        if raw.is_empty() {
            return ControlFlow::Continue(());
        }
        if let Err(e) = self.take(raw) {
            self.end = Some(Err(e));
        }
        match self.end {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    }

    fn take(&mut self, raw: &str) -> Result<(), UapiError> {
        let number = self.lines;
        let bad = |why: String| UapiError::Malformed { line: number, why };
        let (key, value) = raw
            .split_once('=')
            .ok_or_else(|| bad("no '=' in line".into()))?;
        match key {
            "errno" => {
                let code = parse_errno_value(value).map_err(bad)?;
                self.end_peer();
                self.end = Some(match code {
                    0 => Ok(()),
                    code => Err(UapiError::Errno(code)),
                });
            }
            "public_key" => {
                let key = parse_key(value).map_err(bad)?;
                self.end_peer();
                self.peer = Some(PeerBuilder::new(Key(key)));
            }
            _ => match self.peer.as_mut() {
                None => parse_device_line(&mut self.settings, key, value).map_err(bad)?,
                Some(p) => p.line(key, value).map_err(bad)?,
            },
        }
        Ok(())
    }

    fn end_peer(&mut self) {
        if let Some(p) = self.peer.take() {
            self.sink.peer(p.build());
        }
    }

    /// The sink, once the answer ended with `errno=0` (the device's settings in it).
    pub fn finish(mut self) -> Result<S, UapiError> {
        match self.end {
            Some(Ok(())) => {
                let s = std::mem::take(&mut self.settings);
                self.sink.settings(s.private_key, s.listen_port, s.fwmark);
                Ok(self.sink)
            }
            Some(Err(e)) => Err(e),
            None => Err(UapiError::Truncated),
        }
    }
}

/// Reads the answer to `set=1`: `Ok` for `errno=0`.
pub fn parse_errno(answer: &str) -> Result<(), UapiError> {
    for (n, raw) in answer.lines().enumerate() {
        if let Some(value) = raw.strip_prefix("errno=") {
            let code = parse_errno_value(value)
                .map_err(|why| UapiError::Malformed { line: n + 1, why })?;
            return match code {
                0 => Ok(()),
                code => Err(UapiError::Errno(code)),
            };
        }
    }
    Err(UapiError::Truncated)
}

/// An upper bound of the encoded size of these operations.
fn size_bound<'a>(ops: impl IntoIterator<Item = &'a Op>) -> usize {
    const KEY_LINE: usize = 16 + 64 + 1;
    const LINE: usize = 64;
    let ip_line = "allowed_ip=".len() + 43 + 1 + 3 + 1;
    let mut n = 16;
    for op in ops {
        n += match op {
            Op::ConfigureDevice(_) => KEY_LINE + 2 * LINE,
            Op::AddPeer(p) => 2 * KEY_LINE + 3 * LINE + p.allowed_ips.len() * ip_line,
            Op::UpdatePeer(u) => {
                2 * KEY_LINE
                    + 4 * LINE
                    + u.allowed_ips.as_ref().map_or(0, |ips| ips.len() * ip_line)
            }
            Op::RemovePeer(_) => KEY_LINE + LINE,
            _ => 0,
        };
    }
    n
}

fn encode_device(text: &mut String, change: &DeviceChange) {
    if let Some(key) = &change.private_key {
        line(text, "private_key", secret_hex(key.expose()).as_str());
    }
    if let Some(port) = change.listen_port {
        line(text, "listen_port", port);
    }
    if let Some(mark) = change.fwmark {
        line(text, "fwmark", mark);
    }
}

fn encode_add(text: &mut String, spec: &PeerSpec) {
    line(text, "public_key", hex(&spec.public_key.0));
    if let Some(psk) = &spec.preshared_key {
        line(text, "preshared_key", secret_hex(psk.expose()).as_str());
    }
    if let Some(endpoint) = spec.endpoint {
        line(text, "endpoint", endpoint);
    }
    if spec.persistent_keepalive != 0 {
        line(
            text,
            "persistent_keepalive_interval",
            spec.persistent_keepalive,
        );
    }
    encode_allowed_ips(text, &spec.allowed_ips);
}

fn encode_update(text: &mut String, update: &PeerUpdate) {
    line(text, "public_key", hex(&update.public_key.0));
    line(text, "update_only", "true");
    match &update.preshared_key {
        Some(Some(psk)) => line(text, "preshared_key", secret_hex(psk.expose()).as_str()),
        // All zeros removes the preshared key.
        Some(None) => line(text, "preshared_key", hex(&[0u8; 32])),
        None => {}
    }
    if let Some(endpoint) = update.endpoint {
        line(text, "endpoint", endpoint);
    }
    if let Some(keepalive) = update.persistent_keepalive {
        line(text, "persistent_keepalive_interval", keepalive);
    }
    if let Some(ips) = &update.allowed_ips {
        encode_allowed_ips(text, ips);
    }
}

fn encode_allowed_ips(text: &mut String, ips: &crate::model::AllowedIps) {
    line(text, "replace_allowed_ips", "true");
    for ip in ips {
        line(text, "allowed_ip", ip);
    }
}

fn line(text: &mut String, key: &str, value: impl fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(text, "{key}={value}");
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn secret_hex(bytes: &[u8; 32]) -> Zeroizing<String> {
    Zeroizing::new(hex(bytes))
}

fn parse_key(value: &str) -> Result<[u8; 32], String> {
    let v = value.as_bytes();
    if v.len() != 64 {
        return Err(format!("key of {} hex digits, not 64", v.len()));
    }
    let mut out = [0u8; 32];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => out[i] = h << 4 | l,
            _ => {
                out.zeroize();
                return Err("key is not hex".into());
            }
        }
    }
    Ok(out)
}

/// A secret key; all zeros means "none".
fn parse_secret(value: &str) -> Result<Option<SecretKey>, String> {
    let mut raw = parse_key(value)?;
    let key = (raw != [0u8; 32]).then(|| SecretKey::new(raw));
    raw.zeroize();
    Ok(key)
}

fn parse_errno_value(value: &str) -> Result<i32, String> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(|v| i32::try_from(v.unsigned_abs()).ok())
        .ok_or_else(|| format!("errno {value:?} is not a number"))
}

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key} {value:?} is not a valid number"))
}

fn parse_device_line(device: &mut Settings, key: &str, value: &str) -> Result<(), String> {
    match key {
        "private_key" => device.private_key = parse_secret(value)?,
        "listen_port" => device.listen_port = parse_number(key, value)?,
        "fwmark" => device.fwmark = parse_number(key, value)?,
        // Unknown keys are newer protocol additions.
        _ => {}
    }
    Ok(())
}

fn parse_endpoint(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    // `[fe80::1%eth0]:51820`: Rust parses numeric scope ids only; drop a named one.
    if let (Some(start), Some(end)) = (value.find('%'), value.find(']')) {
        if start < end {
            let plain = format!("{}{}", &value[..start], &value[end..]);
            if let Ok(addr) = plain.parse() {
                return Ok(addr);
            }
        }
    }
    Err(format!("endpoint {value:?} is not an address:port"))
}

/// A peer being read, line by line.
struct PeerBuilder {
    state: PeerState,
    /// The `allowed_ip` lines, made a set once at the end (a set built by one insert per
    /// line would copy itself per line: quadratic in a peer's prefixes).
    allowed_ips: Vec<IpNet>,
    handshake_sec: u64,
    handshake_nsec: u32,
}

impl PeerBuilder {
    fn new(key: Key) -> Self {
        PeerBuilder {
            state: PeerState::fresh(PeerSpec::new(key, [])),
            allowed_ips: Vec::new(),
            handshake_sec: 0,
            handshake_nsec: 0,
        }
    }

    fn line(&mut self, key: &str, value: &str) -> Result<(), String> {
        // The peer being read is not shared yet: no copy.
        let c = Arc::make_mut(&mut self.state.config);
        match key {
            "preshared_key" => c.preshared_key = parse_secret(value)?,
            "endpoint" => c.endpoint = Some(parse_endpoint(value)?),
            "persistent_keepalive_interval" => c.persistent_keepalive = parse_number(key, value)?,
            "allowed_ip" => {
                let net: IpNet = value
                    .parse()
                    .map_err(|_| format!("allowed_ip {value:?} is not a CIDR"))?;
                self.allowed_ips.push(net.trunc());
            }
            "rx_bytes" => self.state.rx_bytes = parse_number(key, value)?,
            "tx_bytes" => self.state.tx_bytes = parse_number(key, value)?,
            "last_handshake_time_sec" => self.handshake_sec = parse_number(key, value)?,
            "last_handshake_time_nsec" => self.handshake_nsec = parse_number(key, value)?,
            // protocol_version and newer additions.
            _ => {}
        }
        Ok(())
    }

    fn build(mut self) -> PeerState {
        Arc::make_mut(&mut self.state.config).allowed_ips =
            std::mem::take(&mut self.allowed_ips).into_iter().collect();
        if self.handshake_sec != 0 || self.handshake_nsec != 0 {
            // checked: absurd values from a misbehaving wireguard-go are "no handshake",
            // never an overflow panic in the event loop.
            self.state.last_handshake = Duration::from_secs(self.handshake_sec)
                .checked_add(Duration::from_nanos(u64::from(self.handshake_nsec)))
                .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d));
        }
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn text(req: &SetRequest) -> String {
        String::from_utf8(req.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn link_only_plans_encode_nothing() {
        let ops = [Op::CreateLink, Op::SetMtu(1420), Op::SetLinkUp];
        assert!(encode_set(&ops).is_none());
        assert!(encode_set(&[]).is_none());
    }

    #[test]
    fn the_key_goes_before_the_peers_and_the_port_after_them() {
        let ops = [
            Op::AddPeer(std::sync::Arc::new(PeerSpec::new(
                key(2),
                [net("10.0.0.2/32")],
            ))),
            Op::ConfigureDevice(Box::new(DeviceChange {
                private_key: Some(SecretKey::new([1; 32])),
                listen_port: Some(51820),
                fwmark: Some(7),
            })),
            Op::RemovePeer(key(4)),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let texts: Vec<String> = encode_transactions(&refs, 100).map(|r| text(&r)).collect();
        assert_eq!(texts.len(), 3, "{texts:?}");
        assert_eq!(
            texts[0],
            format!("set=1\nprivate_key={}\n\n", "01".repeat(32))
        );
        assert!(texts[1].contains(&format!("public_key={}", "02".repeat(32))));
        assert!(texts[1].contains(&format!("public_key={}\nremove=true", "04".repeat(32))));
        assert!(!texts[1].contains("private_key") && !texts[1].contains("listen_port"));
        assert_eq!(texts[2], "set=1\nlisten_port=51820\nfwmark=7\n\n");
        let last: Vec<SetRequest> = encode_transactions(&refs, 100).collect();
        assert_eq!(last[2].listen_port, Some(51820));
        assert_eq!(last[0].listen_port, None);
        // In batches of one: the key, each peer operation, then the port.
        assert_eq!(encode_transactions(&refs, 1).count(), 4);
    }

    #[test]
    fn without_a_key_change_there_is_no_key_transaction() {
        let ops = [
            Op::ConfigureDevice(Box::new(DeviceChange {
                listen_port: Some(51821),
                ..Default::default()
            })),
            Op::AddPeer(std::sync::Arc::new(PeerSpec::new(
                key(2),
                [net("10.0.0.2/32")],
            ))),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let texts: Vec<String> = encode_transactions(&refs, 100).map(|r| text(&r)).collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(texts[0].contains("public_key="));
        assert_eq!(texts[1], "set=1\nlisten_port=51821\n\n");
        let only_peers = [Op::RemovePeer(key(4))];
        let refs: Vec<&Op> = only_peers.iter().collect();
        assert_eq!(encode_transactions(&refs, 100).count(), 1);
    }

    #[test]
    fn device_and_new_peer_encode_as_one_transaction() {
        let mut peer = PeerSpec::new(key(2), [net("10.0.0.2/32"), net("fd00::2/128")]);
        peer.preshared_key = Some(SecretKey::new([3; 32]));
        peer.persistent_keepalive = 25;
        peer.endpoint = Some("[2001:db8::1]:51820".parse().unwrap());
        let ops = [
            Op::SetLinkUp,
            Op::ConfigureDevice(Box::new(DeviceChange {
                private_key: Some(SecretKey::new([1; 32])),
                listen_port: Some(51820),
                fwmark: Some(0),
            })),
            Op::AddPeer(std::sync::Arc::new(peer)),
        ];
        let req = encode_set(&ops).unwrap();
        assert_eq!(req.listen_port, Some(51820));
        let expected = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=0\npublic_key={}\n\
             preshared_key={}\nendpoint=[2001:db8::1]:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n\n",
            "01".repeat(32),
            "02".repeat(32),
            "03".repeat(32)
        );
        assert_eq!(text(&req), expected);
    }

    #[test]
    fn update_touches_only_changed_fields() {
        let mut only_keepalive = PeerUpdate {
            public_key: key(4),
            preshared_key: None,
            persistent_keepalive: Some(0),
            allowed_ips: None,
            endpoint: None,
        };
        let req = encode_set(&[Op::UpdatePeer(Box::new(only_keepalive.clone()))]).unwrap();
        let t = text(&req);
        assert_eq!(
            t,
            format!(
                "set=1\npublic_key={}\nupdate_only=true\npersistent_keepalive_interval=0\n\n",
                "04".repeat(32)
            )
        );
        assert!(!t.contains("replace_allowed_ips"));

        only_keepalive.persistent_keepalive = None;
        only_keepalive.preshared_key = Some(None);
        only_keepalive.allowed_ips = Some(crate::model::AllowedIps::new());
        let t = text(&encode_set(&[Op::UpdatePeer(Box::new(only_keepalive))]).unwrap());
        assert!(
            t.contains(&format!("preshared_key={}\n", "0".repeat(64))),
            "{t}"
        );
        assert!(t.ends_with("replace_allowed_ips=true\n\n"), "{t}");
    }

    #[test]
    fn removal_and_order_are_kept() {
        let steps = [
            Op::RemovePeer(key(5)),
            Op::AddPeer(std::sync::Arc::new(PeerSpec::new(
                key(6),
                [net("10.0.0.6/32")],
            ))),
        ];
        let t = text(&encode_set(&steps).unwrap());
        let remove = t.find(&format!("public_key={}\nremove=true\n", "05".repeat(32)));
        let add = t.find(&format!("public_key={}\n", "06".repeat(32)));
        assert!(remove.is_some() && add.is_some() && remove < add, "{t}");
    }

    #[test]
    fn size_bound_covers_the_encoding() {
        let mut peer = PeerSpec::new(
            key(2),
            (0..200u16).map(|i| {
                IpNet::new(
                    std::net::Ipv6Addr::new(0xfd00, i, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, i)
                        .into(),
                    128,
                )
                .unwrap()
            }),
        );
        peer.preshared_key = Some(SecretKey::new([3; 32]));
        peer.persistent_keepalive = 65535;
        peer.endpoint = Some(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
        );
        let ops = [
            Op::ConfigureDevice(Box::new(DeviceChange {
                private_key: Some(SecretKey::new([1; 32])),
                listen_port: Some(65535),
                fwmark: Some(u32::MAX),
            })),
            Op::AddPeer(std::sync::Arc::new(peer.clone())),
            Op::UpdatePeer(Box::new(PeerUpdate {
                public_key: key(2),
                preshared_key: Some(None),
                persistent_keepalive: Some(65535),
                allowed_ips: Some(peer.allowed_ips.clone()),
                endpoint: peer.endpoint,
            })),
            Op::RemovePeer(key(3)),
        ];
        let req = encode_set(&ops).unwrap();
        assert!(req.as_bytes().len() <= size_bound(&ops), "reallocated");
    }

    #[test]
    fn set_request_debug_hides_secrets() {
        let ops = [Op::ConfigureDevice(Box::new(DeviceChange {
            private_key: Some(SecretKey::new([0xab; 32])),
            ..DeviceChange::default()
        }))];
        let req = encode_set(&ops).unwrap();
        let shown = format!("{req:?}");
        assert!(!shown.contains("abab"), "{shown}");
    }

    const GET: &str = "private_key=0101010101010101010101010101010101010101010101010101010101010101
listen_port=51820
fwmark=7
public_key=0202020202020202020202020202020202020202020202020202020202020202
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=[2001:db8::9]:4500
last_handshake_time_sec=1700000000
last_handshake_time_nsec=250000000
tx_bytes=100
rx_bytes=200
persistent_keepalive_interval=25
allowed_ip=10.0.0.2/32
allowed_ip=fd00::2/128
public_key=0303030303030303030303030303030303030303030303030303030303030303
preshared_key=0404040404040404040404040404040404040404040404040404040404040404
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
errno=0

";

    /// Read into a model in place, the answer gives the model of the answer parsed whole
    /// (a vanished peer gone); an answer cut short changes the settings of nothing and
    /// drops nobody.
    #[test]
    fn a_get_read_into_a_model_in_place_is_the_model_of_the_whole_answer() {
        use crate::model::Observed;
        use crate::plan::KernelModel;
        let mut before = DeviceState::default();
        before.peer(PeerState::fresh(PeerSpec::new(
            key(2),
            [net("10.9.0.0/16")],
        )));
        before.peer(PeerState::fresh(PeerSpec::new(
            key(5),
            [net("10.0.0.2/32")],
        )));
        before.settings(None, 1, 0);
        let start = KernelModel::new(Observed {
            link: None,
            device: before,
        });

        let mut model = start.clone();
        let mut parser = GetParser::new(model.refresh());
        let _ = GET.lines().try_for_each(|l| parser.line(l));
        parser.finish().unwrap().finish();
        let want = KernelModel::new(Observed {
            link: None,
            device: parse_get(GET).unwrap(),
        });
        assert_eq!(model, want);

        let mut model = start.clone();
        let mut parser = GetParser::new(model.refresh());
        // Cut after peer 2 (whose IPs now include peer 5's 10.0.0.2/32).
        let _ = GET.lines().take(15).try_for_each(|l| parser.line(l));
        assert_eq!(parser.finish().err(), Some(UapiError::Truncated));
        assert_eq!(
            model.device.listen_port, 1,
            "settings only from a complete answer"
        );
        assert_eq!(model.device.peers.len(), 2, "nobody dropped");
        assert!(model.device.peers[&key(5)].config.allowed_ips.is_empty());
        assert_eq!(model.device.peers[&key(2)].config.allowed_ips.len(), 2);
        assert_eq!(
            model,
            KernelModel::new(Observed::clone(&model)),
            "index in step"
        );
    }

    #[test]
    fn get_answer_parses_device_and_every_peer() {
        let d = parse_get(GET).unwrap();
        assert_eq!(d.private_key, Some(SecretKey::new([1; 32])));
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, 7);
        assert_eq!(d.peers.len(), 2);
        let a = &d.peers[&key(2)];
        assert_eq!(a.config.preshared_key, None, "all zeros is no key");
        assert_eq!(
            a.config.endpoint,
            Some("[2001:db8::9]:4500".parse().unwrap())
        );
        assert_eq!(
            a.config.allowed_ips,
            [net("10.0.0.2/32"), net("fd00::2/128")].into()
        );
        assert_eq!(a.config.persistent_keepalive, 25);
        assert_eq!((a.rx_bytes, a.tx_bytes), (200, 100));
        assert_eq!(
            a.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000))
        );
        let b = &d.peers[&key(3)];
        assert_eq!(b.config.preshared_key, Some(SecretKey::new([4; 32])));
        assert_eq!(b.config.endpoint, None);
        assert_eq!(b.last_handshake, None);
        assert!(b.config.allowed_ips.is_empty());
    }

    #[test]
    fn get_answer_errors() {
        assert_eq!(parse_get("errno=-5\n\n"), Err(UapiError::Errno(5)));
        assert_eq!(parse_get("listen_port=1\n"), Err(UapiError::Truncated));
        assert!(matches!(
            parse_get("listen_port=abc\nerrno=0\n\n"),
            Err(UapiError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            parse_get("public_key=zz\nerrno=0\n\n"),
            Err(UapiError::Malformed { .. })
        ));
        assert!(matches!(
            parse_get("garbage\n"),
            Err(UapiError::Malformed { .. })
        ));
        let empty = parse_get("errno=0\n\n").unwrap();
        assert_eq!(empty, DeviceState::default());
    }

    #[test]
    fn endpoint_with_named_scope_parses() {
        let text = format!(
            "public_key={}\nendpoint=[fe80::1%eth0]:51820\nerrno=0\n\n",
            "02".repeat(32)
        );
        let d = parse_get(&text).unwrap();
        assert_eq!(
            d.peers[&key(2)].config.endpoint,
            Some("[fe80::1]:51820".parse().unwrap())
        );
    }

    #[test]
    fn set_answers() {
        assert_eq!(parse_errno("errno=0\n\n"), Ok(()));
        assert_eq!(parse_errno("errno=-98\n\n"), Err(UapiError::Errno(98)));
        assert_eq!(parse_errno("errno=98\n\n"), Err(UapiError::Errno(98)));
        assert_eq!(parse_errno(""), Err(UapiError::Truncated));
        let shown = UapiError::Errno(98).to_string();
        assert!(shown.contains("Address already in use"), "{shown}");
    }

    #[test]
    fn encoded_transaction_round_trips_through_the_parser() {
        // What a `set` writes, read back as a `get` answer, gives the same peer.
        let mut peer = PeerSpec::new(key(9), [net("10.9.0.0/16"), net("fd09::/64")]);
        peer.preshared_key = Some(SecretKey::new([8; 32]));
        peer.persistent_keepalive = 15;
        peer.endpoint = Some("192.0.2.9:51820".parse().unwrap());
        let req = encode_set(&[Op::AddPeer(std::sync::Arc::new(peer.clone()))]).unwrap();
        let body = text(&req)
            .trim_start_matches("set=1\n")
            .replace("replace_allowed_ips=true\n", "")
            .trim_end()
            .to_string();
        let d = parse_get(&format!("{body}\nerrno=0\n\n")).unwrap();
        assert_eq!(d.peers[&key(9)].config, std::sync::Arc::new(peer));
    }

    #[test]
    fn kicks_toggle_the_keepalive_and_recreate_in_one_transaction() {
        let mut quiet = PeerSpec::new(key(1), [net("10.0.0.1/32")]);
        quiet.endpoint = Some("192.0.2.1:1".parse().unwrap());
        let mut chatty = PeerSpec::new(key(2), [net("10.0.0.2/32")]);
        chatty.persistent_keepalive = 25;
        chatty.preshared_key = Some(SecretKey::new([0xab; 32]));
        let kicks = [
            Kick {
                peer: std::sync::Arc::new(quiet),
                endpoint: "198.51.100.1:40001".parse().unwrap(),
                recreate: false,
            },
            Kick {
                peer: std::sync::Arc::new(chatty),
                endpoint: "[2001:db8::2]:40002".parse().unwrap(),
                recreate: true,
            },
        ];
        let req = encode_kicks(&kicks).unwrap();
        let (k1, k2) = (hex(&key(1).0), hex(&key(2).0));
        let psk = hex(&[0xab; 32]);
        let want = format!(
            "set=1\n\
             public_key={k1}\nupdate_only=true\nendpoint=198.51.100.1:40001\n\
             persistent_keepalive_interval=0\n\
             public_key={k1}\nupdate_only=true\npersistent_keepalive_interval=1\n\
             public_key={k1}\nupdate_only=true\npersistent_keepalive_interval=0\n\
             public_key={k2}\nremove=true\n\
             public_key={k2}\npreshared_key={psk}\nendpoint=[2001:db8::2]:40002\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.2/32\n\n"
        );
        assert_eq!(text(&req), want);
        assert!(!format!("{req:?}").contains(&psk));
        assert!(encode_kicks(&[]).is_none());
    }
}
