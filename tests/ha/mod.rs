//! The HA drill's harness (issue 10, design §12): two gateways of one location behind
//! floating addresses held by real keepalived (VRRP v3), a real WireGuard client behind
//! a NAT router, the reference Core (`gatehouse-core` binary), all in network namespaces.
//!
//! ```text
//!  client ──── router (nft masquerade) ──┐ WAN segment: bridge in the Core's namespace
//!  172.16.0.2  172.16.0.1   203.0.113.1  ├── Core 203.0.113.5 (gatehouse-core)
//!  wg 10.77.0.2                          ├── gateway a 203.0.113.11 ┐ floating 203.0.113.10
//!  endpoint 203.0.113.10:51820           └── gateway b 203.0.113.12 ┘ (the client's endpoint)
//!                         inside segment (variant "inside"): bridge in the far host's
//!  far host 10.88.0.100 ── gateway a 10.88.0.11, b 10.88.0.12, floating 10.88.0.10
//!  (route to 10.77.0.0/24 via 10.88.0.10)
//! ```
//!
//! Both gateways run the agent as a process (userspace backend, own state directory and
//! configuration, `stats_interval` 2 s), tunnel address 10.77.0.1 on both. The body of a
//! drill runs on a thread inside the Core's namespace with its own runtime (the admin API
//! is on the Core's loopback). Everything is stopped by pid and removed on drop, also when
//! the drill fails: the processes this harness started, then every other process found in
//! the drill's namespaces, the UAPI sockets, the namespaces, the directory.

#![allow(dead_code)]

#[path = "../e2e/agent.rs"]
pub mod agent;
#[path = "../support/core_process.rs"]
pub mod core_process;
pub mod gateway;
pub mod keepalived;
#[path = "../e2e/keys.rs"]
pub mod keys;
#[path = "../netns/mod.rs"]
pub mod netns;
#[path = "../e2e/procs.rs"]
pub mod procs;
pub mod timeline;
pub mod topology;
pub mod traffic;
#[path = "../e2e/wg.rs"]
pub mod wg;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_core::api::{NewLocation, NewPeer};
use gatehouse_core::client::AdminClient;
use tokio::task::JoinHandle;

use agent::AgentPaths;
pub use gateway::{Gateway, Vip, AGENT_HTTP};
pub use keys::write_secret;
use keys::{wg_genkey, wg_pubkey};
use netns::{unique, ChildGuard, Netns};
pub use topology::Net;
use traffic::{Pinger, TcpFlow};

pub const CORE_WAN: &str = "203.0.113.5";
pub const ROUTER_WAN: &str = "203.0.113.1";
pub const WAN_VIP: &str = "203.0.113.10";
pub const GW_WAN: [&str; 2] = ["203.0.113.11", "203.0.113.12"];
pub const ROUTER_LAN: &str = "172.16.0.1";
pub const CLIENT_LAN: &str = "172.16.0.2";
pub const INSIDE_VIP: &str = "10.88.0.10";
pub const GW_INSIDE: [&str; 2] = ["10.88.0.11", "10.88.0.12"];
pub const FAR_HOST: &str = "10.88.0.100";
pub const ECHO_PORT: u16 = 7777;
pub const GW_TUNNEL: &str = "10.77.0.1";
pub const CLIENT_TUNNEL: &str = "10.77.0.2";
pub const LISTEN_PORT: u16 = 51820;
pub const CLIENT_PORT: u16 = 51821;
const CORE_GRPC_PORT: u16 = 50055;
const CORE_HTTP: &str = "127.0.0.1:8080";
const ADMIN_TOKEN: &str = "ha-drill-admin-token";
/// The location's MFA disconnect threshold: realistic, and longer than any move.
pub const MFA_THRESHOLD: Duration = Duration::from_secs(60);
/// How long a drill waits for a step to happen before failing (not a benchmark).
pub const WAIT: Duration = Duration::from_secs(90);

/// With or without the takeover handshake: `[ha] vip` in the agents' configuration and
/// the notify script in keepalived's, or neither (the baseline: WireGuard's own timers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    Handshake,
    Baseline,
}

/// What the client reaches: the location's tunnel address (one floating address, on
/// the WAN side), or a far host behind the gateways through an inside floating address,
/// with one TCP flow kept open as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Tunnel,
    Inside,
}

/// The drill's setting from the environment: `GATEHOUSE_HA_RUNS` (rounds of each kind,
/// default 1) and `GATEHOUSE_HA_HOLD_SECS` (how long traffic must keep flowing after a
/// gateway takes the address back, default 10).
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub runs: usize,
    pub hold: Duration,
}

impl Setting {
    pub fn from_env() -> Setting {
        let num = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        Setting {
            runs: num("GATEHOUSE_HA_RUNS", 1).max(1) as usize,
            hold: Duration::from_secs(num("GATEHOUSE_HA_HOLD_SECS", 10)),
        }
    }
}

/// Runs `body` on a thread inside a fresh namespace (the Core's, which also holds the
/// WAN segment's bridge) with its own multi-thread runtime. Skips when not root.
pub fn run<F>(tag: &str, body: F)
where
    F: AsyncFnOnce(Netns) + Send,
{
    if !netns::is_root() {
        eprintln!("skipped: needs root (network namespaces, TUN, keepalived)");
        return;
    }
    let core = Netns::new(&format!("{tag}w"));
    let name = core.name().to_string();
    netns::with_runtime_in(&name, move |rt| rt.block_on(body(core)));
}

/// Polls `check` every 100 ms until it returns `Some`, failing the drill after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether this build of the agent has `gatehouse <command>` (the HA commands arrive
/// with issue 10's agent side).
pub fn agent_has_command(command: &str) -> bool {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args([command, "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One drill: the topology, the Core, both gateways with keepalived, the client and its
/// traffic. Fields drop in order: traffic, processes, the cleanup of every process left
/// in the namespaces, the namespaces, the directory.
pub struct Drill {
    pub flow: Option<TcpFlow>,
    echo: Option<JoinHandle<()>>,
    pub pinger: Option<Pinger>,
    pub gws: Vec<Gateway>,
    client_wg: Option<ChildGuard>,
    core_proc: Option<ChildGuard>,
    pub admin: AdminClient,
    pub location: u64,
    pub peer_id: u64,
    pub client_key: String,
    pub client_if: String,
    pub takeover: Takeover,
    pub variant: Variant,
    pub tag: String,
    core_log: PathBuf,
    _cleanup: procs::Cleanup,
    pub net: Net,
    pub dir: tempfile::TempDir,
}

impl Drill {
    /// Builds the whole drill up to traffic flowing through gateway a.
    pub async fn start(tag: &str, core: Netns, takeover: Takeover, variant: Variant) -> Drill {
        // Under target/: keepalived runs scripts only from paths no other user can write.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let net = Net::new(tag, core, variant);
        let ifaces = [unique("ghaa"), unique("ghab")];
        let client_if = unique("ghac");
        let mut files = vec![];
        for i in ifaces.iter().chain([&client_if]) {
            for ext in ["sock", "log"] {
                files.push(PathBuf::from(format!("/var/run/wireguard/{i}.{ext}")));
            }
        }
        let cleanup = procs::Cleanup {
            namespaces: net
                .all()
                .iter()
                .filter_map(|n| procs::netns_id(n.name()))
                .collect(),
            files,
        };

        // The Core, on the WAN segment.
        let core_bin = core_process::core_binary();
        let core_conf = dir.path().join("core.toml");
        std::fs::write(
            &core_conf,
            format!(
                "grpc_listen = \"{CORE_WAN}:{CORE_GRPC_PORT}\"\nhttp_listen = \"{CORE_HTTP}\"\n\
                 database = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n",
                dir.path().join("core.db").display()
            ),
        )
        .expect("core.toml");
        let core_log = dir.path().join("core.log");
        let mut cmd = net.core.command(&core_bin.display().to_string());
        cmd.arg("--config").arg(&core_conf).env("NO_COLOR", "1");
        let core_proc = gateway::spawn_logged(cmd, &core_log, "gatehouse-core");
        let admin = AdminClient::new(format!("http://{CORE_HTTP}"), ADMIN_TOKEN);
        let http = reqwest::Client::new();
        eventually("the Core's /readyz", WAIT, || async {
            let r = http
                .get(format!("http://{CORE_HTTP}/readyz"))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;

        // The location (MFA, realistic threshold), one token per gateway, the client peer
        // with an MFA session.
        let loc = admin
            .create_location(&NewLocation {
                name: format!("ha-{tag}"),
                listen_port: LISTEN_PORT as u64,
                addresses: vec![format!("{GW_TUNNEL}/24")],
                mtu: 1420,
                mfa: true,
                disconnect_threshold_secs: MFA_THRESHOLD.as_secs(),
                ..Default::default()
            })
            .await
            .expect("create the location");
        let private = wg_genkey().await;
        let public = wg_pubkey(&private).await;
        let peer = admin
            .add_peer(
                loc.id,
                &NewPeer {
                    public_key: public.clone(),
                    allowed_ips: vec![format!("{CLIENT_TUNNEL}/32")],
                    ..Default::default()
                },
            )
            .await
            .expect("add the client peer");
        let session = admin
            .start_mfa_session(loc.id, peer.id, None)
            .await
            .expect("start the MFA session");

        let mut gws = vec![];
        for (i, label) in ["a", "b"].into_iter().enumerate() {
            let token = admin.create_token(loc.id).await.expect("token");
            let token_file = dir.path().join(format!("token-{label}"));
            write_secret(&token_file, &token);
            let paths = AgentPaths {
                config: dir.path().join(format!("gateway-{label}.toml")),
                token_file,
                state_dir: dir.path().join(format!("state-{label}")),
                log: dir.path().join(format!("agent-{label}.log")),
                http: AGENT_HTTP.parse().expect("address"),
                interface: ifaces[i].clone(),
                name: format!("ha-{tag}-{label}"),
            };
            let ns = net.gws[i].name().to_string();
            let mut vips = vec![Vip {
                interface: net.links[i][0].clone(),
                address: WAN_VIP.into(),
                prefix: 24,
            }];
            let mut instances = vec![keepalived::Instance {
                name: "wan".into(),
                interface: net.links[i][0].clone(),
                router_id: 51,
                address: format!("{WAN_VIP}/24"),
            }];
            if variant == Variant::Inside {
                vips.push(Vip {
                    interface: net.links[i][1].clone(),
                    address: INSIDE_VIP.into(),
                    prefix: 24,
                });
                instances.push(keepalived::Instance {
                    name: "inside".into(),
                    interface: net.links[i][1].clone(),
                    router_id: 52,
                    address: format!("{INSIDE_VIP}/24"),
                });
            }
            let notify = (takeover == Takeover::Handshake).then(|| {
                format!(
                    "{}/packaging/keepalived/notify.sh --bin {} --http http://{AGENT_HTTP}",
                    env!("CARGO_MANIFEST_DIR"),
                    env!("CARGO_BIN_EXE_gatehouse")
                )
            });
            let spec = keepalived::Spec {
                router_name: format!("gha-{label}"),
                priority: if i == 0 { 150 } else { 100 },
                instances,
                readyz_url: format!("http://{AGENT_HTTP}/readyz"),
                notify,
            };
            // Only the address clients talk to: takeover handshakes leave from it.
            let ha_vips = match takeover {
                Takeover::Handshake => vec![WAN_VIP.to_string()],
                Takeover::Baseline => vec![],
            };
            gws.push(Gateway::new(
                label,
                ns,
                paths,
                format!("http://{CORE_WAN}:{CORE_GRPC_PORT}"),
                ha_vips,
                spec,
                dir.path().join(format!("keepalived-{label}")),
                net.links[i].clone(),
                vips,
            ));
        }

        let mut drill = Drill {
            flow: None,
            echo: None,
            pinger: None,
            gws,
            client_wg: None,
            core_proc: Some(core_proc),
            admin,
            location: loc.id,
            peer_id: peer.id,
            client_key: public,
            client_if,
            takeover,
            variant,
            tag: tag.into(),
            core_log,
            _cleanup: cleanup,
            net,
            dir,
        };
        for gw in &mut drill.gws {
            gw.start_agent();
        }
        drill.wait_synced(0).await;
        drill.wait_synced(1).await;
        // a first: with the higher priority it takes the addresses; then b as backup.
        drill.gws[0].start_keepalived();
        eventually("gateway a holds the floating addresses", WAIT, || async {
            drill.gws[0].holds_vips().then_some(())
        })
        .await;
        drill.gws[1].start_keepalived();
        drill
            .start_client(&private, &session.preshared_key, &loc.public_key)
            .await;
        drill
    }

    /// Waits until the Core shows gateway `i` connected at the location's revision.
    pub async fn wait_synced(&self, i: usize) {
        let name = self.gws[i].paths.name.clone();
        eventually(
            &format!("gateway {} synced with the Core", self.gws[i].label),
            WAIT,
            || async {
                let revision = self.admin.location(self.location).await.ok()?.revision;
                let gws = self.admin.gateways(self.location).await.ok()?;
                gws.iter()
                    .any(|g| g.name == name && g.connected && g.applied_revision == revision)
                    .then_some(())
            },
        )
        .await;
    }

    /// The real client: wireguard-go configured with `wg`, its endpoint the WAN floating
    /// address; traffic started once a first ping is answered.
    async fn start_client(&mut self, private: &str, psk: &str, gw_public: &str) {
        let key_file = self.dir.path().join("client.key");
        let psk_file = self.dir.path().join("client.psk");
        write_secret(&key_file, private);
        write_secret(&psk_file, psk);
        let iface = self.client_if.clone();
        self.client_wg = Some(self.net.client.spawn_wireguard_go(&iface));
        let mut allowed = format!("{GW_TUNNEL}/24");
        if self.variant == Variant::Inside {
            allowed.push_str(",10.88.0.0/24");
        }
        let endpoint = format!("{WAN_VIP}:{LISTEN_PORT}");
        self.net.client.exec(
            "wg",
            &[
                "set",
                &iface,
                "private-key",
                &key_file.display().to_string(),
                "listen-port",
                &CLIENT_PORT.to_string(),
                "peer",
                gw_public,
                "preshared-key",
                &psk_file.display().to_string(),
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        );
        self.net
            .client
            .ip(&["addr", "add", &format!("{CLIENT_TUNNEL}/24"), "dev", &iface]);
        self.net.client.ip(&["link", "set", &iface, "up"]);
        let target = self.target();
        if self.variant == Variant::Inside {
            self.net
                .client
                .ip(&["route", "add", "10.88.0.0/24", "dev", &iface]);
        }
        eventually("a first answer through the tunnel", WAIT, || async {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", self.net.client.name()])
                .args(["ping", "-c", "1", "-W", "1", target])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .ok()?;
            out.success().then_some(())
        })
        .await;
        self.pinger = Some(Pinger::start(
            &self.net.client,
            target,
            &self.dir.path().join("ping.log"),
        ));
        if let Some(far) = &self.net.far {
            self.echo = Some(traffic::echo_server(
                far,
                &format!("{FAR_HOST}:{ECHO_PORT}"),
            ));
            self.flow = Some(TcpFlow::start(
                &self.net.client,
                &format!("{FAR_HOST}:{ECHO_PORT}"),
            ));
        }
    }

    /// What the client pings: the location's tunnel address, or the far host.
    pub fn target(&self) -> &'static str {
        match self.variant {
            Variant::Tunnel => GW_TUNNEL,
            Variant::Inside => FAR_HOST,
        }
    }

    pub fn pinger(&self) -> &Pinger {
        self.pinger.as_ref().expect("the pinger runs")
    }

    /// The tails of every log (for a failing drill).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for gw in &self.gws {
            s.push_str(&gw.logs());
        }
        s.push_str(&format!(
            "---- Core log (last 20 lines) ----\n{}\n---- ping log (last 15 lines) ----\n{}\n",
            agent::tail(&self.core_log, 20),
            self.pinger
                .as_ref()
                .map(|p| agent::tail(&p.log, 15))
                .unwrap_or_default()
        ));
        s
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("GATEHOUSE_HA_SHOW_LOG").is_some() {
            eprintln!("==== drill {} ====\n{}", self.tag, self.logs());
        }
    }
}
