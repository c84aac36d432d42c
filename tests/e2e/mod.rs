//! Shared harness of the end-to-end tests with real WireGuard: a "site" is a gateway
//! network namespace and a client namespace joined by a veth pair (192.0.2.1/24 and
//! 192.0.2.2/24). The whole test body runs on a thread that entered the gateway namespace,
//! with its own tokio runtime, so everything of the gateway side lives there: the
//! in-process reference Core on 127.0.0.1, its admin client, and the agent as a real
//! process (`gatehouse run`, userspace backend) that tests can SIGKILL and restart. The
//! client is a real wireguard-go configured with `wg` in the client namespace.
//!
//! ```ignore
//! #[path = "e2e/mod.rs"]
//! mod e2e;
//! #[test]
//! #[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace"]
//! fn tunnel() {
//!     e2e::run("tu", async |mut site: e2e::Site| {
//!         site.create_location(e2e::Site::default_location("tu")).await;
//!         site.add_client(e2e::ClientOptions::default()).await;
//!         site.start_agent().await;
//!         site.wait_synced().await;
//!         site.wait_ping().await;
//!     });
//! }
//! ```
//!
//! Names (namespaces, interfaces) are unique per test and process; wireguard-go's UAPI
//! socket directory is shared by all namespaces, so interface names are too. Everything
//! is cleaned up by guards, also when a test panics: the agent and client processes by
//! pid, every other process found in the site's namespaces (e.g. the wireguard-go a
//! SIGKILLed agent leaves behind) by pid, the UAPI sockets, the namespaces, the temporary
//! directory. On a panic the tail of the agent's log is printed (all of it, also on
//! success, with `GATEHOUSE_E2E_SHOW_LOG=1` and `--nocapture`).

#![allow(dead_code)]

pub mod agent;
pub mod keys;
#[path = "../netns/mod.rs"]
pub mod netns;
pub mod procs;
#[path = "../support/mod.rs"]
pub mod support;
pub mod wg;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use gatehouse::agent::status::Status;
use gatehouse_core::api::{GatewayView, NewLocation, NewPeer, PeerPatch};
use gatehouse_core::client::AdminClient;

pub use agent::{AgentOptions, AgentPaths, AgentProcess};
use keys::wg_pubkey;
pub use keys::write_secret;
use netns::{unique, ChildGuard, Netns};
pub use support::Core;
pub use wg::{Dump, PingResult};

/// The gateway's underlay address (veth, gateway namespace).
pub const GW_UNDERLAY: &str = "192.0.2.1";
/// The client's underlay address (veth, client namespace).
pub const CLIENT_UNDERLAY: &str = "192.0.2.2";
/// The gateway's tunnel address (the location's address).
pub const GW_TUNNEL: &str = "10.77.0.1";
/// The client's first tunnel address.
pub const CLIENT_TUNNEL: &str = "10.77.0.2";
/// The location's listen port.
pub const LISTEN_PORT: u16 = 51820;
/// The client's listen port.
pub const CLIENT_PORT: u16 = 51821;
/// How long a test waits for convergence by default.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// Runs `body` with a fresh site, on a thread inside the site's gateway namespace with
/// its own multi-thread runtime. Panics in `body` fail the test after cleanup. Skips
/// (with a message) when not root.
pub fn run<F>(tag: &str, body: F)
where
    F: AsyncFnOnce(Site) + Send,
{
    if !netns::is_root() {
        eprintln!("skipped: needs root (network namespaces, TUN)");
        return;
    }
    let gw = Netns::new(&format!("{tag}g"));
    let client = Netns::new(&format!("{tag}c"));
    gw.veth_to(
        &client,
        "ev",
        &format!("{GW_UNDERLAY}/24"),
        &format!("{CLIENT_UNDERLAY}/24"),
    );
    let name = gw.name().to_string();
    netns::with_runtime_in(&name, move |rt| {
        rt.block_on(async move {
            let site = Site::new(tag, gw, client).await;
            body(site).await;
        })
    });
}

/// Polls `check` every 100 ms until it returns `Some`, failing the test after `within`.
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

/// Runs a program (in the calling thread's namespace, i.e. the gateway's) and returns its
/// output, whatever its status.
pub async fn cmd(program: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// [`cmd`], panicking with stderr on failure; returns stdout.
pub async fn cmd_ok(program: &str, args: &[&str]) -> String {
    let out = cmd(program, args).await;
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A location created through the admin API.
#[derive(Clone, Debug)]
pub struct Location {
    pub id: u64,
    pub public_key: String,
    pub listen_port: u16,
}

/// How the client peer is registered and configured.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Its allowed IPs on the gateway (and its addresses on its own interface).
    pub addresses: Vec<String>,
    /// The gateway's persistent keepalive for it. With its endpoint known, a gateway whose
    /// wireguard-go restarted initiates the handshake at once, without waiting for the
    /// client's 15 s retry.
    pub keepalive: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            addresses: vec![format!("{CLIENT_TUNNEL}/32")],
            keepalive: 25,
        }
    }
}

/// The real client: wireguard-go in the client namespace, configured with `wg`.
#[derive(Debug)]
pub struct Client {
    _wireguard_go: ChildGuard,
    pub interface: String,
    pub public_key: String,
    pub peer_id: u64,
}

/// One gateway namespace, one client namespace, a Core, maybe an agent and a client.
/// Fields drop in order: processes first, then namespaces, then the directory.
pub struct Site {
    pub agent: Option<AgentProcess>,
    pub client: Option<Client>,
    pub core: Core,
    pub location: Option<Location>,
    /// Applied at the next `start_agent`.
    pub options: AgentOptions,
    pub paths: AgentPaths,
    /// The client's WireGuard interface name (in the client namespace).
    pub client_if: String,
    pub tag: String,
    http_client: reqwest::Client,
    _cleanup: procs::Cleanup,
    pub gw: Netns,
    pub client_ns: Netns,
    pub dir: tempfile::TempDir,
}

impl Site {
    async fn new(tag: &str, gw: Netns, client_ns: Netns) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = Core::start().await;
        let interface = unique("ghg");
        let client_if = unique("ghc");
        let http = free_port();
        let paths = AgentPaths {
            config: dir.path().join("gateway.toml"),
            token_file: dir.path().join("token"),
            state_dir: dir.path().join("state"),
            log: dir.path().join("agent.log"),
            http,
            interface: interface.clone(),
            name: format!("e2e-{tag}"),
        };
        let mut files = vec![];
        for i in [&interface, &client_if] {
            for ext in ["sock", "log"] {
                files.push(PathBuf::from(format!("/var/run/wireguard/{i}.{ext}")));
            }
        }
        let cleanup = procs::Cleanup {
            namespaces: [gw.name(), client_ns.name()]
                .into_iter()
                .filter_map(procs::netns_id)
                .collect(),
            files,
        };
        Site {
            agent: None,
            client: None,
            core,
            location: None,
            options: AgentOptions::default(),
            paths,
            client_if,
            tag: tag.into(),
            http_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
            _cleanup: cleanup,
            gw,
            client_ns,
            dir,
        }
    }

    pub fn admin(&self) -> &AdminClient {
        &self.core.admin
    }

    pub fn interface(&self) -> &str {
        &self.paths.interface
    }

    pub fn location(&self) -> &Location {
        self.location.as_ref().expect("create_location first")
    }

    /// A location with one IPv4 tunnel address, port [`LISTEN_PORT`], MTU 1420.
    pub fn default_location(name: &str) -> NewLocation {
        NewLocation {
            name: name.into(),
            listen_port: LISTEN_PORT as u64,
            addresses: vec![format!("{GW_TUNNEL}/24")],
            mtu: 1420,
            ..Default::default()
        }
    }

    /// Creates the location and writes a gateway token for the agent.
    pub async fn create_location(&mut self, new: NewLocation) -> Location {
        let view = self
            .admin()
            .create_location(&new)
            .await
            .expect("create location");
        let token = self.admin().create_token(view.id).await.expect("token");
        write_secret(&self.paths.token_file, &token);
        let location = Location {
            id: view.id,
            public_key: view.public_key,
            listen_port: view.listen_port,
        };
        self.location = Some(location.clone());
        location
    }

    /// The location's revision in the Core.
    pub async fn revision(&self) -> u64 {
        self.core.revision(self.location().id).await
    }

    // ------------------------------------------------------------------ client --

    /// Registers a client peer (key from `wg genkey`) and starts the real client.
    pub async fn add_client(&mut self, options: ClientOptions) -> &Client {
        assert!(self.client.is_none(), "one client per site");
        let private = cmd_ok("wg", &["genkey"]).await.trim().to_string();
        let public = wg_pubkey(&private).await;
        let peer = self
            .admin()
            .add_peer(
                self.location().id,
                &NewPeer {
                    public_key: public.clone(),
                    allowed_ips: options.addresses.clone(),
                    persistent_keepalive: options.keepalive,
                    endpoint: Some(format!("{CLIENT_UNDERLAY}:{CLIENT_PORT}")),
                    ..Default::default()
                },
            )
            .await
            .expect("add the client peer");
        let key_file = self.dir.path().join("client.key");
        write_secret(&key_file, &private);

        let iface = self.client_if.clone();
        let guard = self.client_ns.spawn_wireguard_go(&iface);
        let endpoint = format!("{GW_UNDERLAY}:{}", self.location().listen_port);
        let port = CLIENT_PORT.to_string();
        let key_path = key_file.display().to_string();
        let allowed = format!("{}/24", GW_TUNNEL);
        let ns = self.client_ns.name().to_string();
        let args = [
            "netns",
            "exec",
            &ns,
            "wg",
            "set",
            &iface,
            "private-key",
            &key_path,
            "listen-port",
            &port,
            "peer",
            &self.location().public_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ];
        cmd_ok("ip", &args).await;
        for addr in &options.addresses {
            // 10.77.0.2/32 on the gateway becomes 10.77.0.2/24 on the client.
            let ip = addr.split('/').next().unwrap_or(addr);
            self.client_ip(&["addr", "add", &format!("{ip}/24"), "dev", &iface])
                .await;
        }
        self.client_ip(&["link", "set", &iface, "up"]).await;
        self.client = Some(Client {
            _wireguard_go: guard,
            interface: iface,
            public_key: public,
            peer_id: peer.id,
        });
        self.client.as_ref().expect("just set")
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("add_client first")
    }

    /// Changes the client peer's allowed IPs through the admin API; returns the revision.
    pub async fn set_client_allowed_ips(&self, allowed: &[&str]) -> u64 {
        self.admin()
            .patch_peer(
                self.location().id,
                self.client().peer_id,
                &PeerPatch {
                    allowed_ips: Some(allowed.iter().map(|s| s.to_string()).collect()),
                    ..Default::default()
                },
            )
            .await
            .expect("patch the client peer");
        self.revision().await
    }

    /// `ip -n <client ns> args...`.
    pub async fn client_ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.client_ns.name()];
        all.extend_from_slice(args);
        cmd_ok("ip", &all).await
    }

    /// Pings the gateway's tunnel address from the client (`-c count -i interval`),
    /// from `source` when given.
    pub async fn ping(&self, count: u32, interval: &str, source: Option<&str>) -> PingResult {
        let args = self.ping_args(count, interval, source);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cmd("ip", &args).await;
        let text = String::from_utf8_lossy(&out.stdout);
        wg::parse_ping(&text)
            .unwrap_or_else(|e| panic!("{e}; stderr: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// True when one ping (1 s timeout) through the tunnel is answered.
    pub async fn ping_once(&self, source: Option<&str>) -> bool {
        self.ping(1, "1", source).await.received == 1
    }

    /// Waits until a ping through the tunnel is answered.
    pub async fn wait_ping(&self) -> Duration {
        let t = Instant::now();
        eventually("a ping through the tunnel", CONVERGE, || async {
            self.ping_once(None).await.then_some(())
        })
        .await;
        t.elapsed()
    }

    /// A ping running in the background (`-c count -i interval`) until it finishes.
    pub fn start_pinger(&self, count: u32, interval: &str) -> Pinger {
        let args = self.ping_args(count, interval, None);
        let child = tokio::process::Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start ping");
        Pinger { child }
    }

    fn ping_args(&self, count: u32, interval: &str, source: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = ["netns", "exec", self.client_ns.name(), "ping", "-n", "-q"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["-c".into(), count.to_string()]);
        args.extend(["-i".into(), interval.into(), "-W".into(), "1".into()]);
        if let Some(src) = source {
            args.extend(["-I".into(), src.into()]);
        }
        args.push(GW_TUNNEL.into());
        args
    }

    // ------------------------------------------------------------------ wg show --

    /// `wg show <if> dump` on the gateway; None when the interface is not there.
    pub async fn try_gw_dump(&self) -> Option<Dump> {
        let out = cmd("wg", &["show", self.interface(), "dump"]).await;
        if !out.status.success() {
            return None;
        }
        wg::parse_dump(&String::from_utf8_lossy(&out.stdout)).ok()
    }

    pub async fn gw_dump(&self) -> Dump {
        self.try_gw_dump()
            .await
            .unwrap_or_else(|| panic!("wg show {} dump failed", self.interface()))
    }

    /// `wg show <client if> dump` in the client namespace.
    pub async fn client_dump(&self) -> Dump {
        let ns = self.client_ns.name().to_string();
        let iface = self.client().interface.clone();
        let out = cmd_ok("ip", &["netns", "exec", &ns, "wg", "show", &iface, "dump"]).await;
        wg::parse_dump(&out).expect("parse the client's dump")
    }

    /// `wg set <gateway if> args...` (changes made by hand, outside gatehouse).
    pub async fn gw_wg_set(&self, args: &[&str]) {
        let mut all = vec!["set", self.interface()];
        all.extend_from_slice(args);
        cmd_ok("wg", &all).await;
    }

    /// The pid of the gateway's wireguard-go (found among the gateway namespace's
    /// processes by its command line).
    pub fn gw_wireguard_go_pid(&self) -> Option<u32> {
        procs::wireguard_go_pid(procs::netns_id(self.gw.name())?, self.interface())
    }

    // ------------------------------------------------------------------ agent --

    /// Writes the configuration from `options` and starts the agent; waits until its
    /// HTTP server answers.
    pub async fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent already runs");
        let config = agent::render_config(&self.paths, &self.core.url(), &self.options);
        std::fs::write(&self.paths.config, config).expect("write the agent configuration");
        self.agent = Some(AgentProcess::spawn(&self.paths));
        let deadline = Instant::now() + CONVERGE;
        while self.try_status().await.is_none() {
            if let Some(status) = self.agent.as_mut().and_then(AgentProcess::try_wait) {
                panic!(
                    "the agent exited at start ({status}):\n{}",
                    agent::tail(&self.paths.log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent's HTTP server did not answer within {CONVERGE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the agent and reaps it (wireguard-go stays, as after a crash).
    pub fn kill_agent(&mut self) {
        let mut a = self.agent.take().expect("the agent runs");
        a.signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
            .expect("the agent survived SIGKILL");
    }

    /// SIGTERMs the agent and waits (at most 20 s) for its exit; returns how long that
    /// took. Panics if it does not exit or exits with a failure.
    pub fn stop_agent(&mut self) -> Duration {
        let mut a = self.agent.take().expect("the agent runs");
        let t = Instant::now();
        let status = a
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("the agent did not exit within 20 s of SIGTERM"));
        assert!(status.success(), "the agent exited with {status}");
        t.elapsed()
    }

    /// The agent's `/status`, None when it does not answer.
    pub async fn try_status(&self) -> Option<Status> {
        let url = format!("http://{}/status", self.paths.http);
        let response = self.http_client.get(url).send().await.ok()?;
        response.json::<Status>().await.ok()
    }

    pub async fn status(&self) -> Status {
        self.try_status().await.expect("the agent's /status")
    }

    /// The HTTP status code of `/readyz` and its body; None when it does not answer.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let url = format!("http://{}/readyz", self.paths.http);
        let response = self.http_client.get(url).send().await.ok()?;
        let code = response.status().as_u16();
        Some((code, response.text().await.unwrap_or_default()))
    }

    /// Waits until the agent reports `revision` applied; returns its status.
    pub async fn wait_applied(&self, revision: u64) -> Status {
        eventually(
            &format!("the agent applied revision {revision}"),
            CONVERGE,
            || async {
                self.try_status()
                    .await
                    .filter(|s| s.applied_revision >= revision && s.apply_error.is_none())
            },
        )
        .await
    }

    /// The Core's view of this site's gateway.
    pub async fn gateway_in_core(&self) -> Option<GatewayView> {
        let gateways = self.admin().gateways(self.location().id).await.ok()?;
        gateways.into_iter().find(|g| g.name == self.paths.name)
    }

    /// Waits until the agent is connected and the Core shows it connected at the
    /// location's current revision; returns the agent's status.
    pub async fn wait_synced(&self) -> Status {
        self.wait_synced_within(CONVERGE).await
    }

    pub async fn wait_synced_within(&self, within: Duration) -> Status {
        eventually("the gateway synced with the Core", within, || async {
            let revision = self.revision().await;
            let gw = self.gateway_in_core().await?;
            let status = self.try_status().await?;
            (gw.connected
                && gw.applied_revision == revision
                && status.core.connected
                && status.applied_revision == revision)
                .then_some(status)
        })
        .await
    }

    /// The agent's log so far (all runs).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.paths.log).unwrap_or_default()
    }

    /// The state file's path.
    pub fn state_file(&self) -> PathBuf {
        self.paths.state_dir.join("state.json")
    }

    // ------------------------------------------------------------------ Core --

    pub async fn stop_core(&mut self) {
        self.core.stop().await;
    }

    /// Starts the Core again on the same database and ports.
    pub async fn start_core(&mut self) {
        self.core.start_again().await;
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- agent log of site {} (last 60 lines) ----\n{}\n----",
                self.tag,
                agent::tail(&self.paths.log, 60)
            );
        } else if std::env::var_os("GATEHOUSE_E2E_SHOW_LOG").is_some() {
            eprintln!(
                "---- agent log of site {} ----\n{}\n----",
                self.tag,
                self.agent_log()
            );
        }
    }
}

/// A ping running in the background.
#[derive(Debug)]
pub struct Pinger {
    child: tokio::process::Child,
}

impl Pinger {
    /// Waits for the ping to finish and returns its counts.
    pub async fn finish(self) -> PingResult {
        let out = self.child.wait_with_output().await.expect("wait for ping");
        wg::parse_ping(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|e| panic!("{e}; stderr: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// A free TCP port on 127.0.0.1 of the calling thread's namespace.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}
