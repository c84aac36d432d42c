//! The drill's network: namespaces for the client, its NAT router, both gateways and
//! (variant "inside") the far host; the WAN segment as a bridge in the Core's namespace,
//! the inside segment as a bridge in the far host's; the router masquerades what leaves
//! on the WAN side (nftables), as a client's home router does.

#![allow(dead_code)]

use super::netns::Netns;
use super::{
    Variant, CLIENT_LAN, CORE_WAN, FAR_HOST, GW_INSIDE, GW_WAN, INSIDE_VIP, ROUTER_LAN, ROUTER_WAN,
};

/// The namespaces and links of one drill.
pub struct Net {
    pub client: Netns,
    pub router: Netns,
    pub gws: [Netns; 2],
    pub far: Option<Netns>,
    /// Each gateway's links (its WAN and, for "inside", its inside end).
    pub links: [Vec<String>; 2],
    /// The router's WAN end (masqueraded).
    pub router_wan: String,
    /// The Core's namespace: the WAN bridge, the Core; the drill's thread runs in it.
    pub core: Netns,
}

fn forwarding(ns: &Netns) {
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
}

impl Net {
    pub fn new(tag: &str, core: Netns, variant: Variant) -> Net {
        let client = Netns::new(&format!("{tag}c"));
        let router = Netns::new(&format!("{tag}r"));
        let gws = [
            Netns::new(&format!("{tag}a")),
            Netns::new(&format!("{tag}b")),
        ];
        core.bridge("wan", &format!("{CORE_WAN}/24"));
        let router_wan = router.plug_into(&core, "wan", "hr", &format!("{ROUTER_WAN}/24"));
        router.veth_to(
            &client,
            "hl",
            &format!("{ROUTER_LAN}/24"),
            &format!("{CLIENT_LAN}/24"),
        );
        client.ip(&["route", "add", "default", "via", ROUTER_LAN]);
        forwarding(&router);
        // The client's home router: masquerade what leaves on the WAN side.
        router.exec("nft", &["add", "table", "ip", "gha_nat"]);
        router.exec(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                "gha_nat",
                "post",
                "{ type nat hook postrouting priority srcnat; policy accept; }",
            ],
        );
        router.exec(
            "nft",
            &[
                "add",
                "rule",
                "ip",
                "gha_nat",
                "post",
                "oifname",
                &router_wan,
                "masquerade",
            ],
        );
        let mut links: [Vec<String>; 2] = [vec![], vec![]];
        for (i, gw) in gws.iter().enumerate() {
            links[i].push(gw.plug_into(&core, "wan", "hw", &format!("{}/24", GW_WAN[i])));
        }
        let far = (variant == Variant::Inside).then(|| {
            let far = Netns::new(&format!("{tag}f"));
            far.bridge("inside", &format!("{FAR_HOST}/24"));
            for (i, gw) in gws.iter().enumerate() {
                links[i].push(gw.plug_into(&far, "inside", "hi", &format!("{}/24", GW_INSIDE[i])));
                forwarding(gw);
            }
            far.ip(&["route", "add", "10.77.0.0/24", "via", INSIDE_VIP]);
            far
        });
        Net {
            client,
            router,
            gws,
            far,
            links,
            router_wan,
            core,
        }
    }

    pub fn all(&self) -> Vec<&Netns> {
        let mut all = vec![&self.client, &self.router, &self.gws[0], &self.gws[1]];
        all.extend(self.far.as_ref());
        all.push(&self.core);
        all
    }
}
