//! The interface part of `gatehouse status`, in the form of `wg show`: the interface's
//! public key and port, then each peer with its endpoint, allowed IPs, latest handshake,
//! transfer and keepalive (peers with the most recent handshake first, as `wg show`
//! orders them). Secrets are shown as `(hidden)`, as `wg show` does.
//!
//! Pure: the time the handshakes are measured from is an argument.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::agent::peers::{PeerRow, PeerTable};
use crate::agent::status::unix_ms;

/// The `wg show` form of `table` for `interface`, ages measured at `now`.
pub fn render_interface(interface: &str, table: &PeerTable, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "interface: {interface}");
    if let Some(key) = &table.public_key {
        let _ = writeln!(out, "  public key: {key}");
        let _ = writeln!(out, "  private key: (hidden)");
    }
    if table.listen_port != 0 {
        let _ = writeln!(out, "  listening port: {}", table.listen_port);
    }
    if table.fwmark != 0 {
        let _ = writeln!(out, "  fwmark: {:#x}", table.fwmark);
    }
    if table.read_unix_ms.is_none() {
        let _ = writeln!(out, "  (not read yet)");
        return out;
    }
    if !table.listed {
        let _ = writeln!(
            out,
            "  peers: {} (listed up to http.peer_metrics_limit = {}; `wg show {interface}` lists them all)",
            table.peer_count, table.limit
        );
        return out;
    }
    let mut peers: Vec<&PeerRow> = table.peers.iter().collect();
    // Most recent handshake first, never-handshaken last (a stable sort keeps key order).
    peers.sort_by_key(|p| std::cmp::Reverse(p.latest_handshake_unix_ms.unwrap_or(i64::MIN)));
    let now_ms = unix_ms(now);
    for p in peers {
        let _ = writeln!(out, "\npeer: {}", p.public_key);
        if p.preshared_key {
            let _ = writeln!(out, "  preshared key: (hidden)");
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "  endpoint: {e}");
        }
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        let ips = if ips.is_empty() {
            "(none)".to_owned()
        } else {
            ips.join(", ")
        };
        let _ = writeln!(out, "  allowed ips: {ips}");
        if let Some(at) = p.latest_handshake_unix_ms {
            let secs = (now_ms.saturating_sub(at) / 1000).max(0) as u64;
            let _ = writeln!(out, "  latest handshake: {}", ago(secs));
        }
        if p.rx_bytes > 0 || p.tx_bytes > 0 {
            let _ = writeln!(
                out,
                "  transfer: {} received, {} sent",
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            );
        }
        if p.persistent_keepalive > 0 {
            let _ = writeln!(
                out,
                "  persistent keepalive: every {}",
                duration(u64::from(p.persistent_keepalive))
            );
        }
    }
    out
}

/// `wg show`'s "1 minute, 5 seconds ago" ("Now" for zero).
fn ago(secs: u64) -> String {
    if secs == 0 {
        return "Now".into();
    }
    format!("{} ago", duration(secs))
}

/// Years, days, hours, minutes and seconds, the units that are not zero, as `wg show`.
fn duration(mut secs: u64) -> String {
    let units = [
        ("year", 365 * 24 * 3600),
        ("day", 24 * 3600),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ];
    let mut parts = Vec::new();
    for (name, size) in units {
        let n = secs / size;
        secs %= size;
        if n > 0 {
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        }
    }
    parts.join(", ")
}

/// `wg show`'s byte counts: B below a KiB, else two decimals of KiB, MiB, GiB or TiB.
fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if f < KIB * KIB {
        format!("{:.2} KiB", f / KIB)
    } else if f < KIB * KIB * KIB {
        format!("{:.2} MiB", f / (KIB * KIB))
    } else if f < KIB * KIB * KIB * KIB {
        format!("{:.2} GiB", f / (KIB * KIB * KIB))
    } else {
        format!("{:.2} TiB", f / (KIB * KIB * KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn it_reads_like_wg_show() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |ago: i64| Some(1_800_000_000_000 - ago * 1000);
        let table = PeerTable {
            read_unix_ms: Some(1_800_000_000_000),
            public_key: Some("DEV=".into()),
            listen_port: 51820,
            peer_count: 3,
            limit: 10,
            listed: true,
            peers: vec![
                PeerRow {
                    public_key: "A=".into(),
                    allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                    ..Default::default()
                },
                PeerRow {
                    public_key: "B=".into(),
                    endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                    allowed_ips: vec![
                        "10.0.0.3/32".parse().unwrap(),
                        "fd00::3/128".parse().unwrap(),
                    ],
                    latest_handshake_unix_ms: at(3_665),
                    rx_bytes: 1_234_567,
                    tx_bytes: 512,
                    persistent_keepalive: 25,
                    preshared_key: true,
                    ..Default::default()
                },
                PeerRow {
                    public_key: "C=".into(),
                    latest_handshake_unix_ms: at(5),
                    rx_bytes: 2048,
                    tx_bytes: 3 << 30,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let want = "interface: wg0
  public key: DEV=
  private key: (hidden)
  listening port: 51820

peer: C=
  allowed ips: (none)
  latest handshake: 5 seconds ago
  transfer: 2.00 KiB received, 3.00 GiB sent

peer: B=
  preshared key: (hidden)
  endpoint: 192.0.2.1:51820
  allowed ips: 10.0.0.3/32, fd00::3/128
  latest handshake: 1 hour, 1 minute, 5 seconds ago
  transfer: 1.18 MiB received, 512 B sent
  persistent keepalive: every 25 seconds

peer: A=
  allowed ips: 10.0.0.2/32
";
        assert_eq!(render_interface("wg0", &table, now), want);
    }

    #[test]
    fn above_the_limit_it_says_how_many_and_where_to_look() {
        let table = PeerTable {
            read_unix_ms: Some(0),
            peer_count: 5000,
            limit: 1000,
            listed: false,
            ..Default::default()
        };
        let text = render_interface("wg0", &table, UNIX_EPOCH);
        assert!(
            text.contains("peers: 5000 (listed up to http.peer_metrics_limit = 1000; `wg show wg0` lists them all)"),
            "{text}"
        );
        assert_eq!(ago(0), "Now");
        assert_eq!(duration(86_400 * 366 + 1), "1 year, 1 day, 1 second");
    }
}
