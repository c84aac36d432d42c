//! Applies a `wg setconf` configuration with defguard_wireguard_rs (its kernel path,
//! `WGApi<Kernel>`), for the third column of `benches/kernel.rs`. Times only the library
//! calls (not this process's start nor the parsing) and prints the milliseconds.
//!
//!   gatehouse-bench-defguard cold IFNAME CONF MTU ADDRESS...   # create + configure_interface
//!   gatehouse-bench-defguard one IFNAME CONF KEY KEEPALIVE     # configure_peer of one peer
//!
//! CONF is the file `wg setconf` reads (`[Interface]` PrivateKey, ListenPort; `[Peer]`
//! PublicKey, AllowedIPs, PresharedKey, PersistentKeepalive).

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use defguard_wireguard_rs::{
    key::Key, net::IpAddrMask, peer::Peer, InterfaceConfiguration, Kernel, WGApi,
    WireguardInterfaceApi,
};

/// The interface's private key and port, and its peers in file order.
struct Conf {
    private_key: String,
    port: u16,
    peers: Vec<Peer>,
}

fn parse(text: &str) -> Result<Conf> {
    let mut conf = Conf {
        private_key: String::new(),
        port: 0,
        peers: Vec::new(),
    };
    for line in text.lines().map(str::trim) {
        if line == "[Peer]" || line == "[Interface]" || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(" = ")
            .with_context(|| format!("not `Name = value`: {line}"))?;
        match name {
            "PrivateKey" => conf.private_key = value.into(),
            "ListenPort" => conf.port = value.parse()?,
            "PublicKey" => conf.peers.push(Peer::new(key(value)?)),
            "AllowedIPs" => {
                let peer = conf.peers.last_mut().context("AllowedIPs before a peer")?;
                for ip in value.split(',') {
                    peer.allowed_ips.push(ip.parse::<IpAddrMask>()?);
                }
            }
            "PresharedKey" => {
                let peer = conf
                    .peers
                    .last_mut()
                    .context("PresharedKey before a peer")?;
                peer.preshared_key = Some(key(value)?);
            }
            "PersistentKeepalive" => {
                let peer = conf.peers.last_mut().context("keepalive before a peer")?;
                peer.persistent_keepalive_interval = Some(value.parse()?);
            }
            other => bail!("unknown setting {other}"),
        }
    }
    Ok(conf)
}

fn key(b64: &str) -> Result<Key> {
    Key::try_from(b64).map_err(|e| anyhow::anyhow!("key {b64}: {e}"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cmd), Some(ifname), Some(path)) = (args.get(1), args.get(2), args.get(3)) else {
        bail!("usage: cold IFNAME CONF MTU ADDRESS... | one IFNAME CONF KEY KEEPALIVE");
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let conf = parse(&text)?;
    match (cmd.as_str(), &args[4..]) {
        ("cold", [mtu, addresses @ ..]) => {
            let config = InterfaceConfiguration {
                name: ifname.clone(),
                prvkey: conf.private_key,
                addresses: addresses
                    .iter()
                    .map(|a| a.parse::<IpAddrMask>())
                    .collect::<Result<_, _>>()?,
                port: conf.port,
                peers: conf.peers,
                mtu: Some(mtu.parse()?),
                fwmark: None,
            };
            let start = Instant::now();
            let mut api = WGApi::<Kernel>::new(ifname.clone())?;
            api.create_interface()?;
            api.configure_interface(&config)?;
            println!("{:.3}", start.elapsed().as_secs_f64() * 1e3);
        }
        ("one", [public_key, keepalive]) => {
            let want = key(public_key)?;
            let mut peer = conf
                .peers
                .into_iter()
                .find(|p| p.public_key == want)
                .context("the peer is not in CONF")?;
            peer.persistent_keepalive_interval = Some(keepalive.parse()?);
            let start = Instant::now();
            let api = WGApi::<Kernel>::new(ifname.clone())?;
            api.configure_peer(&peer)?;
            println!("{:.3}", start.elapsed().as_secs_f64() * 1e3);
        }
        _ => bail!("usage: cold IFNAME CONF MTU ADDRESS... | one IFNAME CONF KEY KEEPALIVE"),
    }
    Ok(())
}
