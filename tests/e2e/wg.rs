//! The WireGuard side of the end-to-end tests: `wg show <if> dump` parsed into peers,
//! keys made by `wg genkey`, and ping summaries. Pure parsers with unit tests; the
//! commands themselves run from `Site`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;

/// `wg show <if> dump`: the device line and one line per peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dump {
    pub public_key: String,
    pub listen_port: u16,
    /// `off` or a number as `wg` prints it.
    pub fwmark: String,
    pub peers: BTreeMap<String, DumpPeer>,
}

/// One peer of a dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpPeer {
    pub config: PeerConfig,
    /// Unix seconds of the latest handshake; 0 = none.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What an operator configured for a peer (no counters, no handshake).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PeerConfig {
    /// The preshared key (base64) or `(none)`; redacted in Debug output.
    pub preshared_key: String,
    /// `ip:port` or `(none)`.
    pub endpoint: String,
    /// Sorted.
    pub allowed_ips: Vec<String>,
    /// `off` or seconds.
    pub persistent_keepalive: String,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field(
                "preshared_key",
                &if self.preshared_key == "(none)" {
                    "(none)"
                } else {
                    "<redacted>"
                },
            )
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

impl Dump {
    /// The configuration only: device settings and each peer's settings, without the
    /// counters and handshakes that traffic changes.
    pub fn config(&self) -> (String, u16, String, BTreeMap<String, PeerConfig>) {
        (
            self.public_key.clone(),
            self.listen_port,
            self.fwmark.clone(),
            self.peers
                .iter()
                .map(|(k, p)| (k.clone(), p.config.clone()))
                .collect(),
        )
    }

    /// The allowed IPs of a peer (empty when the peer is absent).
    pub fn allowed_ips(&self, peer: &str) -> Vec<String> {
        self.peers
            .get(peer)
            .map(|p| p.config.allowed_ips.clone())
            .unwrap_or_default()
    }
}

/// Parses `wg show <if> dump` (tab-separated; the private key on the first line is
/// skipped and never kept).
pub fn parse_dump(text: &str) -> Result<Dump, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or("empty dump")?;
    let f: Vec<&str> = first.split('\t').collect();
    if f.len() != 4 {
        return Err(format!("device line: expected 4 fields, got {}", f.len()));
    }
    let mut dump = Dump {
        public_key: f[1].to_string(),
        listen_port: f[2]
            .parse()
            .map_err(|e| format!("listen port {:?}: {e}", f[2]))?,
        fwmark: f[3].to_string(),
        peers: BTreeMap::new(),
    };
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 8 {
            return Err(format!("peer line: expected 8 fields, got {}", f.len()));
        }
        let num = |i: usize| {
            f[i].parse::<u64>()
                .map_err(|e| format!("peer field {i} {:?}: {e}", f[i]))
        };
        let mut allowed_ips: Vec<String> = if f[3] == "(none)" {
            vec![]
        } else {
            f[3].split(',').map(str::to_string).collect()
        };
        allowed_ips.sort();
        dump.peers.insert(
            f[0].to_string(),
            DumpPeer {
                config: PeerConfig {
                    preshared_key: f[1].to_string(),
                    endpoint: f[2].to_string(),
                    allowed_ips,
                    persistent_keepalive: f[7].to_string(),
                },
                latest_handshake: num(4)?,
                rx_bytes: num(5)?,
                tx_bytes: num(6)?,
            },
        );
    }
    Ok(dump)
}

/// Pings sent and answered, from ping's summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u64,
    pub received: u64,
}

impl PingResult {
    pub fn lost(&self) -> u64 {
        self.transmitted.saturating_sub(self.received)
    }
}

/// Parses "N packets transmitted, M received, ..." from ping's output.
pub fn parse_ping(text: &str) -> Result<PingResult, String> {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| format!("no summary in ping output: {text:?}"))?;
    let mut parts = line.split(',');
    let first_number = |s: Option<&str>| -> Result<u64, String> {
        s.and_then(|s| s.split_whitespace().next())
            .ok_or_else(|| format!("bad ping summary {line:?}"))?
            .parse()
            .map_err(|e| format!("bad ping summary {line:?}: {e}"))
    };
    Ok(PingResult {
        transmitted: first_number(parts.next())?,
        received: first_number(parts.next())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "cHJpdmF0ZQ==\tR1dQVUI=\t51820\toff\n\
        UEVFUjE=\t(none)\t192.0.2.2:51821\t10.77.0.3/32,10.77.0.2/32\t1700000000\t1234\t5678\t25\n\
        UEVFUjI=\tUFNL\t(none)\t(none)\t0\t0\t0\toff\n";

    #[test]
    fn dump_parses_device_and_peers_and_sorts_allowed_ips() {
        let d = parse_dump(DUMP).unwrap();
        assert_eq!(d.public_key, "R1dQVUI=");
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, "off");
        assert_eq!(d.peers.len(), 2);
        let p1 = &d.peers["UEVFUjE="];
        assert_eq!(p1.config.allowed_ips, vec!["10.77.0.2/32", "10.77.0.3/32"]);
        assert_eq!(p1.config.endpoint, "192.0.2.2:51821");
        assert_eq!(p1.config.persistent_keepalive, "25");
        assert_eq!(
            (p1.latest_handshake, p1.rx_bytes, p1.tx_bytes),
            (1700000000, 1234, 5678)
        );
        let p2 = &d.peers["UEVFUjI="];
        assert!(p2.config.allowed_ips.is_empty());
        assert!(!format!("{p2:?}").contains("UFNL"), "psk in Debug");
    }

    #[test]
    fn dump_config_ignores_counters_but_not_settings() {
        let a = parse_dump(DUMP).unwrap();
        let mut b = a.clone();
        b.peers.get_mut("UEVFUjE=").unwrap().rx_bytes += 1;
        b.peers.get_mut("UEVFUjE=").unwrap().latest_handshake += 1;
        assert_eq!(a.config(), b.config());
        b.peers
            .get_mut("UEVFUjE=")
            .unwrap()
            .config
            .allowed_ips
            .pop();
        assert_ne!(a.config(), b.config());
    }

    #[test]
    fn bad_dumps_are_errors() {
        assert!(parse_dump("").is_err());
        assert!(parse_dump("a\tb\tc\n").is_err());
        assert!(parse_dump("a\tb\tnotaport\toff\n").is_err());
        assert!(parse_dump("a\tb\t1\toff\np\t(none)\t(none)\t(none)\tx\t0\t0\toff\n").is_err());
    }

    #[test]
    fn ping_summary_parses() {
        let out = "PING 10.77.0.1 (10.77.0.1) 56(84) bytes of data.\n\n--- 10.77.0.1 ping statistics ---\n\
                   600 packets transmitted, 598 received, 0.333333% packet loss, time 119800ms\n";
        let r = parse_ping(out).unwrap();
        assert_eq!(
            r,
            PingResult {
                transmitted: 600,
                received: 598
            }
        );
        assert_eq!(r.lost(), 2);
        let errors =
            "5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 4004ms\n";
        assert_eq!(parse_ping(errors).unwrap().received, 0);
        assert!(parse_ping("ping: connect: Network is unreachable\n").is_err());
    }
}
