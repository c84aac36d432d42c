//! The chaos drill's world (issue 13): one Core, two locations, two gateways each, one real
//! WireGuard client behind each gateway pinging through it, all in network namespaces.
//!
//! ```text
//!  WAN segment: bridge in the Core's namespace, 203.0.113.0/24
//!  ├── Core 203.0.113.5 (gatehouse-core process, gRPC :50055, admin API on its loopback)
//!  ├── gateway l0a .11, l0b .12  location 0 (no MFA)  tunnel 10.77.0.1/24
//!  ├── gateway l1a .13, l1b .14  location 1 (MFA)     tunnel 10.78.0.1/24
//!  └── client i at .21+i, endpoint gateway i, tunnel 10.(77+l).0.(10+i), ping -i 0.1
//! ```
//!
//! Each gateway runs the agent as a process (userspace backend, firewall managed, its own
//! state directory); the drill SIGKILLs and restarts agents and the Core, cuts gateways off
//! the Core with nftables drops in their namespace, changes the locations through the
//! admin API and makes drift by hand (`wg set`, `nft`). The body runs on a thread inside
//! the Core's namespace with its own runtime. Everything is stopped by pid and removed on
//! drop, also when the drill fails; then the seed, the timeline and the logs' tails are
//! printed.

#![allow(dead_code)]

pub mod acts;
#[path = "../e2e/agent.rs"]
pub mod agent;
pub mod checks;
#[path = "../support/core_process.rs"]
pub mod core_process;
pub mod drill;
#[path = "../ha/gateway.rs"]
pub mod gateway;
#[path = "../ha/keepalived.rs"]
pub mod keepalived;
#[path = "../e2e/keys.rs"]
pub mod keys;
#[path = "../netns/mod.rs"]
pub mod netns;
#[path = "../e2e/procs.rs"]
pub mod procs;
pub mod schedule;
#[path = "../ha/timeline.rs"]
pub mod timeline;
#[path = "../ha/traffic.rs"]
pub mod traffic;
#[path = "../e2e/wg.rs"]
pub mod wg;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use gatehouse_core::api::{NewLocation, NewPeer};
use gatehouse_core::client::AdminClient;

use agent::AgentPaths;
use core_process::CoreProcess;
use gateway::{Gateway, AGENT_HTTP};
use keys::write_secret;
use netns::{unique, ChildGuard, Netns};
use schedule::{gateway_label, location_of, GATEWAYS, LOCATIONS};
use traffic::Pinger;

pub const CORE_WAN: &str = "203.0.113.5";
pub const CORE_GRPC_PORT: u16 = 50055;
const CORE_HTTP: &str = "127.0.0.1:8080";
const ADMIN_TOKEN: &str = "chaos-drill-admin-token";
pub const LISTEN_PORT: u16 = 51820;
pub const CLIENT_PORT: u16 = 51821;
/// The MFA location's disconnect threshold: longer than any crash or cut of the schedule
/// (so a client's session never expires because its activity was not relayed in time),
/// short enough that churn sessions expire during the drill.
pub const MFA_THRESHOLD: Duration = Duration::from_secs(20);
/// The agents' resync interval (drift repair).
pub const RESYNC: Duration = Duration::from_secs(5);
/// The agents' stats interval.
pub const STATS: Duration = Duration::from_secs(2);
/// How long the drill waits for a step of its setup or end before failing.
pub const WAIT: Duration = Duration::from_secs(90);

/// A gateway's WAN address.
pub fn gw_wan(gw: usize) -> String {
    format!("203.0.113.{}", 11 + gw)
}

/// A client's WAN address.
pub fn client_wan(gw: usize) -> String {
    format!("203.0.113.{}", 21 + gw)
}

/// A location's tunnel address (the gateways'), without prefix.
pub fn tunnel_address(location: usize) -> String {
    format!("10.{}.0.1", 77 + location)
}

/// The tunnel address of the client behind gateway `gw`, without prefix.
pub fn client_tunnel(gw: usize) -> String {
    format!("10.{}.0.{}", 77 + location_of(gw), 10 + gw)
}

/// Which WireGuard the gateways and clients use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// wireguard-go (the agent's userspace backend; clients alike).
    Userspace,
    /// Kernel WireGuard (the agent's kernel backend; clients alike): in the VM.
    Kernel,
}

/// A location as created in the Core.
#[derive(Clone, Debug)]
pub struct Location {
    pub id: u64,
    pub public_key: String,
    pub mfa: bool,
}

/// The client behind a gateway: its peer in the location.
#[derive(Clone, Debug)]
pub struct ClientPeer {
    pub gw: usize,
    pub peer_id: u64,
    pub public_key: String,
}

/// What happened, with its time since the schedule started (printed on failure).
#[derive(Default)]
pub struct Timeline {
    pub start: Option<Instant>,
    pub lines: Vec<String>,
}

impl Timeline {
    pub fn note(&mut self, what: impl Into<String>) {
        let t = self.start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
        self.lines.push(format!("{t:8.2}  {}", what.into()));
    }
}

/// The drill's namespaces.
pub struct Nets {
    pub gws: Vec<Netns>,
    pub clients: Vec<Netns>,
    /// The Core's namespace: the WAN bridge, the Core; the drill's thread runs in it.
    pub core: Netns,
}

/// Everything of one drill. Fields drop in order: traffic, agents, clients, the Core,
/// every other process found in the namespaces (the gateways' wireguard-go), the
/// namespaces, the directory.
pub struct World {
    pub pingers: Vec<Pinger>,
    pub gws: Vec<Gateway>,
    clients_wg: Vec<ChildGuard>,
    pub core: CoreProcess,
    pub admin: AdminClient,
    pub locations: Vec<Location>,
    pub clients: Vec<ClientPeer>,
    pub timeline: Timeline,
    pub seed: u64,
    pub backend: Backend,
    pub model: acts::Model,
    _cleanup: procs::Cleanup,
    pub nets: Nets,
    pub dir: tempfile::TempDir,
}

/// Runs `body` on a thread inside a fresh namespace (the Core's, which holds the WAN
/// bridge) with its own multi-thread runtime. Skips when not root.
pub fn run<F>(tag: &str, body: F)
where
    F: AsyncFnOnce(Netns) + Send,
{
    if !netns::is_root() {
        eprintln!("skipped: needs root (network namespaces, TUN, nftables)");
        return;
    }
    let core = Netns::new(&format!("{tag}w"));
    let name = core.name().to_string();
    netns::with_runtime_in(&name, move |rt| rt.block_on(body(core)));
}

/// Polls `check` every 200 ms until it returns `Ok`, failing the drill after `within`
/// with the last `Err` (what still differs).
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => {
                panic!("timed out after {within:?} waiting for: {what}\nstill: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl World {
    /// Builds the world up to every client's ping answered through its gateway.
    pub async fn start(tag: &str, core_ns: Netns, seed: u64, backend: Backend) -> World {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let nets = Nets {
            gws: (0..GATEWAYS)
                .map(|i| Netns::new(&format!("{tag}g{i}")))
                .collect(),
            clients: (0..GATEWAYS)
                .map(|i| Netns::new(&format!("{tag}c{i}")))
                .collect(),
            core: core_ns,
        };
        nets.core.bridge("wan", &format!("{CORE_WAN}/24"));
        let mut links = vec![];
        for i in 0..GATEWAYS {
            links.push(nets.gws[i].plug_into(
                &nets.core,
                "wan",
                "xg",
                &format!("{}/24", gw_wan(i)),
            ));
            nets.clients[i].plug_into(&nets.core, "wan", "xc", &format!("{}/24", client_wan(i)));
        }
        let ifaces: Vec<String> = (0..GATEWAYS).map(|_| unique("ghx")).collect();
        let client_ifs: Vec<String> = (0..GATEWAYS).map(|_| unique("ghy")).collect();
        let mut files = vec![];
        for i in ifaces.iter().chain(&client_ifs) {
            for ext in ["sock", "log"] {
                files.push(PathBuf::from(format!("/var/run/wireguard/{i}.{ext}")));
            }
        }
        let cleanup = procs::Cleanup {
            namespaces: nets
                .gws
                .iter()
                .chain(&nets.clients)
                .chain([&nets.core])
                .filter_map(|n| procs::netns_id(n.name()))
                .collect(),
            files,
        };

        // The Core, on the WAN segment, as a process that can be SIGKILLed.
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
        let mut core = CoreProcess::start(
            &core_process::core_binary(),
            &core_conf,
            &dir.path().join("core.log"),
            CORE_HTTP.parse().expect("address"),
            &[("NO_COLOR", "1")],
        );
        core.wait_ready(WAIT).await;
        let admin = AdminClient::new(format!("http://{CORE_HTTP}"), ADMIN_TOKEN);

        let mut locations = vec![];
        for l in 0..LOCATIONS {
            let mfa = l == 1;
            let view = admin
                .create_location(&NewLocation {
                    name: format!("chaos-{tag}-{l}"),
                    listen_port: LISTEN_PORT as u64,
                    addresses: vec![format!("{}/24", tunnel_address(l))],
                    mtu: 1420,
                    mfa,
                    disconnect_threshold_secs: if mfa { MFA_THRESHOLD.as_secs() } else { 0 },
                    ..Default::default()
                })
                .await
                .expect("create a location");
            locations.push(Location {
                id: view.id,
                public_key: view.public_key,
                mfa,
            });
        }

        // One client per gateway: a peer of the gateway's location (with an MFA session on
        // the MFA location).
        let mut clients = vec![];
        let mut client_keys = vec![];
        for gw in 0..GATEWAYS {
            let loc = &locations[location_of(gw)];
            let private = keys::wg_genkey().await;
            let public = keys::wg_pubkey(&private).await;
            let peer = admin
                .add_peer(
                    loc.id,
                    &NewPeer {
                        public_key: public.clone(),
                        allowed_ips: vec![format!("{}/32", client_tunnel(gw))],
                        ..Default::default()
                    },
                )
                .await
                .expect("add a client peer");
            let psk = if loc.mfa {
                Some(
                    admin
                        .start_mfa_session(loc.id, peer.id, None)
                        .await
                        .expect("start a client's MFA session")
                        .preshared_key,
                )
            } else {
                None
            };
            clients.push(ClientPeer {
                gw,
                peer_id: peer.id,
                public_key: public,
            });
            client_keys.push((private, psk));
        }

        let mut gws = vec![];
        for (i, iface) in ifaces.iter().enumerate() {
            let loc = &locations[location_of(i)];
            let label = gateway_label(i);
            let token = admin.create_token(loc.id).await.expect("token");
            let token_file = dir.path().join(format!("token-{label}"));
            write_secret(&token_file, &token);
            let paths = AgentPaths {
                config: dir.path().join(format!("gateway-{label}.toml")),
                token_file,
                state_dir: dir.path().join(format!("state-{label}")),
                log: dir.path().join(format!("agent-{label}.log")),
                http: AGENT_HTTP.parse().expect("address"),
                interface: iface.clone(),
                name: format!("chaos-{tag}-{label}"),
            };
            let spec = keepalived::Spec {
                router_name: String::new(),
                priority: 100,
                instances: vec![],
                readyz_url: String::new(),
                notify: None,
            };
            let mut gw = Gateway::new(
                ["a", "b"][i % 2],
                nets.gws[i].name().to_string(),
                paths,
                format!("http://{CORE_WAN}:{CORE_GRPC_PORT}"),
                vec![],
                spec,
                dir.path().join(format!("unused-{label}")),
                vec![links[i].clone()],
                vec![],
            );
            gw.options.stats_interval = STATS;
            gw.options.resync_interval = RESYNC;
            gw.options.firewall = true;
            if backend == Backend::Kernel {
                gw.options.backend = "kernel".into();
            }
            gws.push(gw);
        }

        let mut world = World {
            pingers: vec![],
            gws,
            clients_wg: vec![],
            core,
            admin,
            locations,
            clients,
            timeline: Timeline::default(),
            seed,
            backend,
            model: acts::Model::default(),
            _cleanup: cleanup,
            nets,
            dir,
        };
        for gw in &mut world.gws {
            gw.start_agent();
        }
        for i in 0..GATEWAYS {
            world.wait_synced(i).await;
        }
        for (gw, (private, psk)) in client_keys.iter().enumerate() {
            world
                .start_client(gw, &client_ifs[gw], private, psk.as_deref())
                .await;
        }
        world
    }

    /// The gateways of location `l`.
    pub fn gateways_of(&self, l: usize) -> impl Iterator<Item = usize> {
        (0..GATEWAYS).filter(move |&g| location_of(g) == l)
    }

    /// The Core's view of gateway `gw`, by its name.
    pub async fn gateway_view(&self, gw: usize) -> Option<gatehouse_core::api::GatewayView> {
        let loc = self.locations[location_of(gw)].id;
        let name = &self.gws[gw].paths.name;
        let all = self.admin.gateways(loc).await.ok()?;
        all.into_iter().find(|g| &g.name == name)
    }

    /// Waits until the Core shows gateway `gw` connected at its location's revision.
    pub async fn wait_synced(&self, gw: usize) {
        eventually(
            &format!("gateway {} synced with the Core", gateway_label(gw)),
            WAIT,
            || async { self.synced(gw).await },
        )
        .await;
    }

    /// Ok when the Core shows gateway `gw` connected at its location's revision.
    pub async fn synced(&self, gw: usize) -> Result<(), String> {
        let loc = self.locations[location_of(gw)].id;
        let revision = self
            .admin
            .location(loc)
            .await
            .map_err(|e| format!("location: {e}"))?
            .revision;
        let view = self
            .gateway_view(gw)
            .await
            .ok_or_else(|| format!("gateway {} unknown to the Core", gateway_label(gw)))?;
        if view.connected && view.applied_revision == revision {
            Ok(())
        } else {
            Err(format!(
                "gateway {}: connected {}, applied {} of {revision}",
                gateway_label(gw),
                view.connected,
                view.applied_revision
            ))
        }
    }

    /// The real client behind gateway `gw`: WireGuard (wireguard-go or the kernel's)
    /// configured with `wg`, its
    /// endpoint the gateway's WAN address; its pinger started once a first ping is
    /// answered.
    async fn start_client(&mut self, gw: usize, iface: &str, private: &str, psk: Option<&str>) {
        let l = location_of(gw);
        let ns = &self.nets.clients[gw];
        let key_file = self.dir.path().join(format!("client-{gw}.key"));
        write_secret(&key_file, private);
        if self.backend == Backend::Kernel {
            ns.ip(&["link", "add", iface, "type", "wireguard"]);
        } else {
            self.clients_wg.push(ns.spawn_wireguard_go(iface));
        }
        let mut args: Vec<String> = vec![
            "set".into(),
            iface.into(),
            "private-key".into(),
            key_file.display().to_string(),
            "listen-port".into(),
            CLIENT_PORT.to_string(),
            "peer".into(),
            self.locations[l].public_key.clone(),
        ];
        if let Some(psk) = psk {
            let psk_file = self.dir.path().join(format!("client-{gw}.psk"));
            write_secret(&psk_file, psk);
            args.extend(["preshared-key".into(), psk_file.display().to_string()]);
        }
        args.extend([
            "endpoint".into(),
            format!("{}:{LISTEN_PORT}", gw_wan(gw)),
            "allowed-ips".into(),
            format!("{}/24", tunnel_address(l)),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ns.exec("wg", &args);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", client_tunnel(gw)),
            "dev",
            iface,
        ]);
        ns.ip(&["link", "set", iface, "up"]);
        let target = tunnel_address(l);
        eventually(
            &format!("a first answer through gateway {}", gateway_label(gw)),
            WAIT,
            || async {
                let ok = tokio::process::Command::new("ip")
                    .args(["netns", "exec", ns.name()])
                    .args(["ping", "-c", "1", "-W", "1", &target])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await
                    .map(|s| s.success())
                    .unwrap_or(false);
                ok.then_some(()).ok_or_else(|| "no answer".to_string())
            },
        )
        .await;
        self.pingers.push(Pinger::start(
            ns,
            &target,
            &self.dir.path().join(format!("ping-{gw}.log")),
        ));
    }

    /// The tails of every log and the whole timeline (for a failing drill).
    pub fn report(&self) -> String {
        let mut s = format!(
            "==== chaos drill: seed {} (replay: GATEHOUSE_CHAOS_SEED={}) ====\n---- timeline ----\n{}\n",
            self.seed,
            self.seed,
            self.timeline.lines.join("\n")
        );
        for gw in &self.gws {
            s.push_str(&format!(
                "---- agent {} log (last 40 lines) ----\n{}\n",
                gw.paths.name,
                agent::tail(&gw.paths.log, 40)
            ));
        }
        s.push_str(&format!(
            "---- Core log (last 30 lines) ----\n{}\n",
            agent::tail(&self.core.log, 30)
        ));
        s
    }

    /// Every agent's log, whole.
    pub fn agent_logs(&self) -> BTreeMap<String, String> {
        self.gws
            .iter()
            .map(|g| {
                (
                    g.paths.name.clone(),
                    std::fs::read_to_string(&g.paths.log).unwrap_or_default(),
                )
            })
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("GATEHOUSE_CHAOS_SHOW").is_some() {
            eprintln!("{}", self.report());
            // Every log, whole, kept for reading after the directory is gone.
            let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{}", self.seed));
            let _ = std::fs::create_dir_all(&keep);
            if let Ok(dir) = std::fs::read_dir(self.dir.path()) {
                for e in dir.flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                    }
                }
            }
            let _ = std::fs::write(keep.join("timeline.txt"), self.timeline.lines.join("\n"));
            eprintln!("the drill's logs: {}", keep.display());
        }
    }
}
