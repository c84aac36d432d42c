//! Addresses and numbers: allowed IPs (canonical prefixes, no `/0`), interface addresses
//! (unicast, not `/0`, host bits kept: they are the gateway's own addresses), endpoints
//! (port not 0), the listen port (1..65535), MTU (0 or 1280..9000) and keepalive.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Largest MTU accepted (jumbo frames); 0 means the kernel's default.
pub const MTU_MAX: u32 = 9000;
/// Smallest MTU accepted (IPv6's minimum).
pub const MTU_MIN: u32 = 1280;

fn parse_net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

/// An allowed IP as the admin wrote it: whitespace trimmed, a bare address is a /32 or
/// /128; host bits set is an error (not silently masked), and so is `/0`.
pub fn normalize_allowed_ip(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = parse_net(t).ok_or_else(|| format!("not a CIDR: {s:?}"))?;
    if net.prefix_len() == 0 {
        return Err(format!("{net} would route every address to one peer"));
    }
    if net.trunc() != net {
        return Err(format!(
            "{net} has host bits set (the prefix is {})",
            net.trunc()
        ));
    }
    Ok(net)
}

/// An allowed IP on the wire: canonical only (`10.0.0.2/32`, `fd00::/64`).
pub fn allowed_ip(s: &str) -> Result<IpNet, String> {
    let net = normalize_allowed_ip(s)?;
    canonical(s, net)
}

/// An interface address as the admin wrote it: trimmed, host bits kept, unicast, not `/0`.
pub fn normalize_interface_address(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = parse_net(t).ok_or_else(|| format!("not a CIDR: {s:?}"))?;
    if net.prefix_len() == 0 {
        return Err(format!("{net}: a /0 interface address is not allowed"));
    }
    let ip = net.addr();
    let not_unicast = ip.is_unspecified()
        || ip.is_multicast()
        || match (ip, net) {
            (IpAddr::V4(v4), IpNet::V4(n)) => {
                v4.is_broadcast() || (n.prefix_len() <= 30 && v4 == n.broadcast())
            }
            _ => false,
        };
    if not_unicast {
        return Err(format!("{ip} is not a unicast address"));
    }
    Ok(net)
}

/// An interface address on the wire: canonical only (`10.0.0.1/24`).
pub fn interface_address(s: &str) -> Result<IpNet, String> {
    let net = normalize_interface_address(s)?;
    canonical(s, net)
}

/// An endpoint as the admin wrote it: trimmed; empty means none; `ip:port` or
/// `[ip6]:port` with a port other than 0 and a unicast address.
pub fn normalize_endpoint(s: &str) -> Result<Option<SocketAddr>, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = t
        .parse()
        .map_err(|_| format!("not ip:port or [ip6]:port: {s:?}"))?;
    if addr.port() == 0 {
        return Err(format!("{addr}: port 0 cannot be reached"));
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} is not a unicast address"));
    }
    Ok(Some(addr))
}

/// An endpoint on the wire: empty or canonical only.
pub fn endpoint(s: &str) -> Result<Option<SocketAddr>, String> {
    let addr = normalize_endpoint(s)?;
    let canon = addr.map(|a| a.to_string()).unwrap_or_default();
    if canon != s {
        return Err(format!("not in canonical form {canon:?}: {s:?}"));
    }
    Ok(addr)
}

/// The location's listen port: fixed (gateways behind one floating address share it).
pub fn listen_port(v: u64) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{v} is out of range 1..=65535")),
    }
}

/// 0 (the kernel's default, returned as `None`) or 1280..=9000.
pub fn mtu(v: u64) -> Result<Option<u32>, String> {
    match v {
        0 => Ok(None),
        v if (u64::from(MTU_MIN)..=u64::from(MTU_MAX)).contains(&v) => Ok(Some(v as u32)),
        v => Err(format!(
            "{v} is out of range {MTU_MIN}..={MTU_MAX} (0 = default)"
        )),
    }
}

/// Persistent keepalive in seconds, 0 = off.
pub fn keepalive(v: u64) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("{v} is out of range 0..=65535"))
}

/// The MFA inactivity threshold: > 0 when MFA is on, and fits in 32 bits.
pub fn mfa_threshold(enabled: bool, secs: u64) -> Result<u32, String> {
    let t = u32::try_from(secs).map_err(|_| format!("{secs} does not fit in 32 bits"))?;
    if enabled && t == 0 {
        return Err("must be > 0 when MFA is enabled".into());
    }
    Ok(t)
}

fn canonical(s: &str, net: IpNet) -> Result<IpNet, String> {
    let canon = net.to_string();
    if canon != s {
        return Err(format!("not in canonical form {canon:?}: {s:?}"));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ips_are_canonical_prefixes() {
        assert_eq!(
            normalize_allowed_ip(" 10.0.0.2 ").unwrap().to_string(),
            "10.0.0.2/32"
        );
        assert_eq!(
            normalize_allowed_ip("fd00::1").unwrap().to_string(),
            "fd00::1/128"
        );
        assert!(normalize_allowed_ip("10.1.2.3/16")
            .unwrap_err()
            .contains("host bits"));
        assert!(normalize_allowed_ip("0.0.0.0/0").is_err());
        assert!(normalize_allowed_ip("::/0").is_err());
        assert!(normalize_allowed_ip("10.0.0.0/33").is_err());
        assert!(allowed_ip("10.0.0.2/32").is_ok());
        assert!(allowed_ip("10.0.0.2").is_err(), "bare is not canonical");
        assert!(allowed_ip(" 10.0.0.2/32").is_err());
        assert!(allowed_ip("fd00:0::/64").is_err());
        assert!(allowed_ip("fd00::/64").is_ok());
    }

    #[test]
    fn interface_addresses_are_unicast() {
        assert_eq!(
            normalize_interface_address(" 10.0.0.1/24\n")
                .unwrap()
                .to_string(),
            "10.0.0.1/24"
        );
        for bad in [
            "0.0.0.0/8",
            "10.0.0.1/0",
            "224.0.0.1/24",
            "255.255.255.255/32",
            "10.0.0.255/24",
            "::/64",
            "ff02::1/64",
            "fd00::1/0",
        ] {
            assert!(normalize_interface_address(bad).is_err(), "{bad}");
        }
        assert!(interface_address("10.0.0.1/24").is_ok());
        assert!(interface_address("10.0.0.1").is_err());
        assert!(interface_address("10.0.0.1/31").is_ok());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            normalize_endpoint(" [fd00::1]:51820 ")
                .unwrap()
                .unwrap()
                .to_string(),
            "[fd00::1]:51820"
        );
        assert_eq!(normalize_endpoint("  "), Ok(None));
        assert!(normalize_endpoint("1.2.3.4:0")
            .unwrap_err()
            .contains("port 0"));
        assert!(normalize_endpoint("1.2.3.4").is_err());
        assert!(normalize_endpoint("0.0.0.0:1").is_err());
        assert!(normalize_endpoint("host:1").is_err());
        assert!(endpoint("1.2.3.4:5").is_ok());
        assert!(endpoint(" 1.2.3.4:5").is_err());
        assert_eq!(endpoint(""), Ok(None));
    }

    #[test]
    fn numbers() {
        assert!(listen_port(0).is_err());
        assert_eq!(listen_port(1), Ok(1));
        assert_eq!(listen_port(65535), Ok(65535));
        assert!(listen_port(65536).is_err());
        assert_eq!(mtu(0), Ok(None));
        assert_eq!(mtu(1280), Ok(Some(1280)));
        assert_eq!(mtu(9000), Ok(Some(9000)));
        assert!(mtu(1279).is_err() && mtu(9001).is_err());
        assert!(keepalive(65536).is_err());
        assert!(mfa_threshold(true, 0).is_err());
        assert_eq!(mfa_threshold(false, 0), Ok(0));
        assert!(mfa_threshold(true, 1 << 32).is_err());
    }
}
