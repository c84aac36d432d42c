//! keepalived for the HA drill: its configuration rendered from what the drill needs
//! (pure, unit-tested) in the shape of `packaging/keepalived/keepalived.conf.example`:
//! VRRP version 3 with a short advertisement interval, one instance per floating address
//! in one sync group (the addresses move together), a track script on the agent's
//! `/readyz` (a gateway that cannot carry traffic or is draining gives the addresses up),
//! the scripts assumed failed until they first pass (a gateway that starts takes nothing
//! before its agent is ready), preemption (the better gateway takes the addresses back),
//! and optionally the notify script.

#![allow(dead_code)]

use std::fmt::Write as _;

/// The advertisement interval (VRRP v3 takes centiseconds; keepalived 2.2 accepts 0.2).
pub const ADVERT_INT: &str = "0.2";

/// One floating address: the VRRP instance that carries it.
#[derive(Clone, Debug)]
pub struct Instance {
    pub name: String,
    pub interface: String,
    pub router_id: u8,
    /// With its prefix length, e.g. `203.0.113.10/24`.
    pub address: String,
}

/// Everything one gateway's keepalived is configured with.
#[derive(Clone, Debug)]
pub struct Spec {
    pub router_name: String,
    /// Higher wins; the better gateway takes the addresses back (preemption).
    pub priority: u8,
    pub instances: Vec<Instance>,
    /// The agent's readiness URL, checked every second.
    pub readyz_url: String,
    /// The notify command (keepalived appends GROUP, the group name, the state and the
    /// priority), e.g. `/path/notify.sh --http http://127.0.0.1:9180`; None: no notify.
    pub notify: Option<String>,
}

/// keepalived.conf for `spec`.
pub fn render(spec: &Spec) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "global_defs {{\n    router_id {}\n    script_user root\n    enable_script_security\n    \
         vrrp_version 3\n    vrrp_garp_master_repeat 3\n}}\n\n",
        spec.router_name
    );
    let _ = write!(
        s,
        "vrrp_script gatehouse_ready {{\n    script \"/usr/bin/curl -sf -m 0.8 -o /dev/null {}\"\n    \
         interval 1\n    timeout 1\n    fall 1\n    rise 1\n    init_fail\n}}\n\n",
        spec.readyz_url
    );
    let _ = writeln!(s, "vrrp_sync_group gatehouse {{\n    group {{");
    for i in &spec.instances {
        let _ = writeln!(s, "        {}", i.name);
    }
    let _ = writeln!(s, "    }}");
    if let Some(notify) = &spec.notify {
        let _ = writeln!(s, "    notify \"{notify}\"");
    }
    let _ = writeln!(s, "}}\n");
    for i in &spec.instances {
        let _ = write!(
            s,
            "vrrp_instance {} {{\n    state BACKUP\n    interface {}\n    virtual_router_id {}\n    \
             priority {}\n    advert_int {ADVERT_INT}\n    virtual_ipaddress {{\n        {}\n    }}\n    \
             track_script {{\n        gatehouse_ready\n    }}\n}}\n\n",
            i.name, i.interface, i.router_id, spec.priority, i.address
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(notify: Option<&str>) -> Spec {
        Spec {
            router_name: "gw-a".into(),
            priority: 150,
            instances: vec![
                Instance {
                    name: "wan".into(),
                    interface: "eth0".into(),
                    router_id: 51,
                    address: "203.0.113.10/24".into(),
                },
                Instance {
                    name: "inside".into(),
                    interface: "eth1".into(),
                    router_id: 52,
                    address: "10.88.0.10/24".into(),
                },
            ],
            readyz_url: "http://127.0.0.1:9180/readyz".into(),
            notify: notify.map(str::to_string),
        }
    }

    #[test]
    fn every_instance_is_in_the_group_and_tracks_readiness() {
        let text = render(&spec(None));
        assert!(text.contains("vrrp_version 3"));
        assert!(text.contains("init_fail"));
        assert!(text.contains("curl -sf -m 0.8 -o /dev/null http://127.0.0.1:9180/readyz"));
        assert_eq!(text.matches("vrrp_instance ").count(), 2);
        assert_eq!(text.matches("gatehouse_ready\n").count(), 2);
        assert_eq!(text.matches("advert_int 0.2").count(), 2);
        assert!(text.contains("group {\n        wan\n        inside\n    }"));
        assert!(text.contains("virtual_router_id 52"));
        assert!(text.contains("10.88.0.10/24"));
        assert!(!text.contains("notify"));
        assert!(!text.contains("nopreempt"));
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn notify_goes_on_the_group() {
        let text = render(&spec(Some("/x/notify.sh --http http://127.0.0.1:9180")));
        let group = text.split("vrrp_instance").next().unwrap();
        assert!(group.contains("notify \"/x/notify.sh --http http://127.0.0.1:9180\""));
    }

    /// The lines that matter: no comment, no blank line, no indentation.
    fn significant(text: &str) -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_packaged_example_is_what_the_drill_runs() {
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/keepalived/keepalived.conf.example"
        ))
        .unwrap();
        let spec = Spec {
            router_name: "gw-a".into(),
            priority: 150,
            instances: vec![
                Instance {
                    name: "wan".into(),
                    interface: "eth0".into(),
                    router_id: 51,
                    address: "192.0.2.10/24".into(),
                },
                Instance {
                    name: "inside".into(),
                    interface: "eth1".into(),
                    router_id: 52,
                    address: "10.0.0.10/24".into(),
                },
            ],
            readyz_url: "http://127.0.0.1:9180/readyz".into(),
            notify: Some(
                "/etc/keepalived/gatehouse-notify.sh --config /etc/gatehouse/gateway.toml".into(),
            ),
        };
        assert_eq!(significant(&example), significant(&render(&spec)));
    }
}
