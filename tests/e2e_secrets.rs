//! No secret in any output (issue 12, acceptance item 2): a demo-sized run with every
//! secret the system handles, logs at `trace`, and then every log, answer and file the
//! agent, the Core and the hooks produced searched for every secret in every form.
//!
//! The run, in network namespaces (the gateway's with the Core and the agent, the
//! client's with a real WireGuard client, `wireguard-go`):
//! - the reference Core as a process (`gatehouse-core`, `RUST_LOG=trace`: its only log
//!   setting), its admin token from a file, TLS on its gRPC listener with a client CA;
//! - the agent as a process (userspace backend), `log.level = "trace"` (a filter for
//!   every target: h2, hyper, tonic, tower, rustls log at trace too) and `log.format`
//!   `"text"` in one test and `"json"` in the other, its gateway token from `token_file`,
//!   mTLS with a client certificate and key from files, the four hooks writing files and
//!   their environment (`post_up` failing on purpose), the firewall on with a policy put
//!   through the admin API;
//! - a location with a private key given at creation and rotated later, peers with
//!   preshared keys (one changed through the admin API), a preshared key and the private
//!   key changed by hand on the interface (`/diff` shows it, the resync repairs it); MFA
//!   turned on, sessions started with a given preshared key and without one (generated),
//!   replaced, ended through the admin API and by inactivity (the agent's event, the Core
//!   ends the session); the client reconfigured each time and pinging through;
//! - errors on purpose: a wrong gateway token first; bad admin requests (a wrong admin
//!   token, the gateway token as the admin token, a peer with a bad allowed IP carrying a
//!   preshared key, keys of 31 bytes, truncated JSON, a preshared key of the wrong type, a
//!   firewall rule the rules refuse); the Core stopped for a moment while its stored
//!   listen port is broken, so that it comes back serving a revision the agent rejects
//!   (design §11: served as stored), then fixed; a failing hook; the agent restarted.
//!
//! Then collected: the agent's and the Core's stdout/stderr, the agent's `/status`,
//! `/diff`, `/metrics` and `/readyz` at several moments (wrong token, drift, Core away,
//! revision rejected, end), `gatehouse status`, `diff` and `check-config`, the Core's
//! admin answers (the errors included), wireguard-go's log, the nftables ruleset, every
//! file the hooks wrote and every file in the state directory except the state itself (see
//! [`is_the_state`]).
//! None may contain the location's private keys (also clamped, as WireGuard reads them
//! back), any preshared key (peers' and MFA sessions'), the gateway token (nor the wrong
//! one tried first), the admin token (nor the wrong one), the mTLS client key or the
//! Core's TLS key, nor the malformed keys sent in bad requests, in any form of
//! `support/secrets.rs` (raw, base64 with and without padding, URL-safe base64, hex lower
//! and upper, decimal lists, base64 inside a longer blob; PEM keys also by their body
//! lines, DER and private scalar). A failure names the secret, the form and the source,
//! never the value. Before searching, the test checks that the scanner finds every form
//! of every secret planted in a buffer, the secrets in the input files that hold them, and
//! the location's key in the (excluded) state file.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_secrets`. `GATEHOUSE_E2E_KEEP=1` keeps
//! the run's directory (logs, captures, state) for a look afterwards.

#[path = "support/core_process.rs"]
mod core_process;
#[path = "e2e/mod.rs"]
mod e2e;
#[path = "support/secrets.rs"]
mod secrets;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use core_process::{core_binary, free_port, CoreProcess, Pki};
use e2e::agent::{self as agent_proc, AgentOptions, AgentPaths, AgentProcess};
use e2e::netns::{self, unique, ChildGuard, Netns};
use e2e::{cmd, cmd_ok, eventually, procs, write_secret};
use e2e::{CLIENT_PORT, CLIENT_TUNNEL, CLIENT_UNDERLAY, GW_TUNNEL, GW_UNDERLAY, LISTEN_PORT};
use gatehouse::model::SecretKey;
use gatehouse_core::api::{
    FirewallPolicy, FirewallRule, LocationPatch, NewLocation, NewPeer, PeerPatch, PortRange,
    Protocol, Verdict,
};
use gatehouse_core::client::AdminClient;
use secrets::{Scanner, Secret};
use serde_json::Value;

/// How long one step may take to converge.
const STEP: Duration = Duration::from_secs(30);
/// The MFA disconnect threshold: B (no client) is removed after it; A's client sends a
/// keepalive every second.
const MFA_THRESHOLD: Duration = Duration::from_secs(8);

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_secrets"]
fn no_secret_in_any_output_with_text_logs_at_trace() {
    run("skt", "text");
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_secrets"]
fn no_secret_in_any_output_with_json_logs_at_trace() {
    run("skj", "json");
}

/// The state: `state.json` and its journal `state.journal`, with the temporary files they
/// are written through (`.tmp-state.json`, `.tmp-state.journal`, renamed over them) and
/// the same files moved aside unchanged when unreadable (`state.json.corrupt-<ts>`).
/// Both hold the location as the Core sent it, private key and preshared keys included,
/// by design (mode 0600, design §5): the journal is the state file's tail — the changes
/// since `state.json` was written (encoded deltas: new keys, new preshared keys), replayed
/// onto it at start — and a backup of the state is both files (README, "What happens
/// when"). So the journal counts as "the state file" too, and these are the only files of
/// the state directory not searched. Everything else in it (`gateway-id`, `lock`,
/// anything new) is searched.
fn is_the_state(name: &str) -> bool {
    let name = name.strip_prefix(".tmp-").unwrap_or(name);
    let base = name.split_once(".corrupt-").map_or(name, |(base, _)| base);
    base == "state.json" || base == "state.journal"
}

#[test]
fn only_the_state_and_its_journal_are_left_out() {
    for name in [
        "state.json",
        "state.journal",
        ".tmp-state.json",
        ".tmp-state.journal",
        "state.json.corrupt-1796272670",
        "state.journal.corrupt-1796272670-1",
    ] {
        assert!(is_the_state(name), "{name}");
    }
    for name in [
        "gateway-id",
        "lock",
        ".tmp-gateway-id",
        "state.json.bak",
        "x.state.json",
    ] {
        assert!(!is_the_state(name), "{name}");
    }
}

fn random32() -> [u8; 32] {
    loop {
        let k = rand::random::<[u8; 32]>();
        if k.iter().any(|&b| b != 0) {
            return k;
        }
    }
}

fn public_of(private: &[u8; 32]) -> String {
    SecretKey::new(*private).public_key().to_base64()
}

/// A token as the Core makes them: a prefix and 32 random bytes in URL-safe base64.
fn token_like(prefix: &str) -> ([u8; 32], String) {
    let raw = random32();
    (raw, format!("{prefix}{}", B64URL.encode(raw)))
}

fn run(tag: &str, format: &'static str) {
    if !netns::is_root() {
        eprintln!("skipped: needs root (network namespaces, TUN)");
        return;
    }
    let started = Instant::now();
    let core_bin = core_binary();
    let gw = Netns::new(&format!("{tag}g"));
    let client = Netns::new(&format!("{tag}c"));
    gw.veth_to(
        &client,
        "sv",
        &format!("{GW_UNDERLAY}/24"),
        &format!("{CLIENT_UNDERLAY}/24"),
    );
    let name = gw.name().to_string();
    netns::with_runtime_in(&name, move |rt| {
        rt.block_on(async move {
            let mut demo = Demo::start(tag, format, &core_bin, gw, client).await;
            demo.scenario().await;
            demo.collect_and_check();
        })
    });
    eprintln!("{format} logs: done in {:?}", started.elapsed());
}

/// Everything of one run. Fields drop in order: the agent and the client (by pid), the
/// Core (by pid), every other process left in the namespaces (by pid) and the UAPI
/// sockets, the namespaces, the directory.
struct Demo {
    agent: Option<AgentProcess>,
    client_wg: Option<ChildGuard>,
    core: CoreProcess,
    _cleanup: procs::Cleanup,
    _gw: Netns,
    client_ns: Netns,
    dir: tempfile::TempDir,

    format: &'static str,
    paths: AgentPaths,
    admin: AdminClient,
    admin_base: String,
    admin_token: String,
    gateway_token: String,
    http: reqwest::Client,
    location: u64,
    client_if: String,
    client_private: [u8; 32],
    gw_public: String,
    peer_a: u64,
    peer_b: u64,
    /// The test's own captures (HTTP answers, command outputs): searched.
    captures: PathBuf,
    /// What the hooks write: searched.
    hooks_dir: PathBuf,
    /// Every secret of the run, as it becomes known.
    secrets: Vec<Secret>,
    /// Input files that must contain a given secret (the scanner's positive control).
    inputs: Vec<(PathBuf, String)>,
}

impl Demo {
    async fn start(
        tag: &str,
        format: &'static str,
        core_bin: &Path,
        gw: Netns,
        client_ns: Netns,
    ) -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let captures = dir.path().join("captures");
        let hooks_dir = dir.path().join("hooks");
        let pki_dir = dir.path().join("pki");
        for d in [&captures, &hooks_dir, &pki_dir] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let mut secrets = Vec::new();
        let mut inputs = Vec::new();

        // TLS: the Core's certificate and key, the client CA, the agent's client identity.
        let pki = Pki::generate();
        let ca = pki_dir.join("ca.pem");
        let server_cert = pki_dir.join("server.pem");
        let server_key = pki_dir.join("server.key");
        let client_cert = pki_dir.join("client.pem");
        let client_key = pki_dir.join("client.key");
        std::fs::write(&ca, &pki.ca_cert).expect("write");
        std::fs::write(&server_cert, &pki.server_cert).expect("write");
        std::fs::write(&client_cert, &pki.client_cert).expect("write");
        write_secret(&server_key, &pki.server_key);
        write_secret(&client_key, &pki.client_key);
        secrets.push(Secret::pem_private_key(
            "mTLS client private key",
            &pki.client_key,
        ));
        secrets.push(Secret::pem_private_key(
            "Core TLS private key",
            &pki.server_key,
        ));
        inputs.push((client_key.clone(), "mTLS client private key".into()));
        inputs.push((server_key.clone(), "Core TLS private key".into()));

        // The Core: admin token from a file, TLS with a client CA, trace logs.
        let (admin_raw, admin_token) = token_like("adm_");
        let admin_file = dir.path().join("admin-token");
        write_secret(&admin_file, &format!("{admin_token}\n"));
        secrets.push(
            Secret::text("admin token", &admin_token)
                .with_binary_part("its random part", &admin_raw),
        );
        inputs.push((admin_file.clone(), "admin token".into()));
        let grpc = free_port();
        let http = free_port();
        let core_conf = dir.path().join("core.toml");
        let q = |p: &Path| toml::Value::from(p.display().to_string()).to_string();
        std::fs::write(
            &core_conf,
            format!(
                "grpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\ndatabase = {}\n\
                 admin_token_file = {}\ntls_cert_file = {}\ntls_key_file = {}\n\
                 client_ca_file = {}\n",
                q(&dir.path().join("core.db")),
                q(&admin_file),
                q(&server_cert),
                q(&server_key),
                q(&ca),
            ),
        )
        .expect("write core.toml");
        let mut core = CoreProcess::start(
            core_bin,
            &core_conf,
            &dir.path().join("core.log"),
            http,
            &[("RUST_LOG", "trace"), ("NO_COLOR", "1")],
        );
        core.wait_ready(STEP).await;
        let admin_base = format!("http://{http}");
        let admin = AdminClient::new(admin_base.clone(), admin_token.clone());

        // The location, with a private key of ours.
        let first_key = random32();
        secrets.push(Secret::wireguard_private_key(
            "location private key",
            &first_key,
        ));
        let view = admin
            .create_location(&NewLocation {
                name: format!("secrets-{tag}"),
                listen_port: LISTEN_PORT.into(),
                addresses: vec![format!("{GW_TUNNEL}/24")],
                mtu: 1420,
                private_key: Some(B64.encode(first_key)),
                ..Default::default()
            })
            .await
            .expect("create the location");
        assert_eq!(view.public_key, public_of(&first_key));

        // Peers with preshared keys: A is the real client, B has no client, C no key.
        let client_private = random32();
        let psk_a = random32();
        let psk_b = random32();
        secrets.push(Secret::binary("peer A preshared key", &psk_a));
        secrets.push(Secret::binary("peer B preshared key", &psk_b));
        let peers = admin
            .add_peers(
                view.id,
                &[
                    NewPeer {
                        public_key: public_of(&client_private),
                        allowed_ips: vec![format!("{CLIENT_TUNNEL}/32")],
                        preshared_key: Some(B64.encode(psk_a)),
                        persistent_keepalive: 25,
                        endpoint: Some(format!("{CLIENT_UNDERLAY}:{CLIENT_PORT}")),
                    },
                    NewPeer {
                        public_key: public_of(&random32()),
                        allowed_ips: vec!["10.77.0.10/32".into()],
                        preshared_key: Some(B64.encode(psk_b)),
                        ..Default::default()
                    },
                    NewPeer {
                        public_key: public_of(&random32()),
                        allowed_ips: vec!["10.77.0.11/32".into()],
                        ..Default::default()
                    },
                ],
            )
            .await
            .expect("add the peers");

        // The gateway token; the agent's token file holds a wrong one first.
        let gateway_token = admin.create_token(view.id).await.expect("gateway token");
        let random_part = B64URL
            .decode(gateway_token.trim_start_matches("ght_"))
            .expect("a token is ght_ and URL-safe base64");
        secrets.push(
            Secret::text("gateway token", &gateway_token)
                .with_binary_part("its random part", &random_part),
        );
        let (wrong_raw, wrong_token) = token_like("ght_");
        secrets.push(
            Secret::text("wrong gateway token", &wrong_token)
                .with_binary_part("its random part", &wrong_raw),
        );

        // The agent's configuration: userspace, mTLS, hooks, firewall, trace logs.
        let interface = unique("ghs");
        let client_if = unique("ghsc");
        let paths = AgentPaths {
            config: dir.path().join("gateway.toml"),
            token_file: dir.path().join("token"),
            state_dir: dir.path().join("state"),
            log: dir.path().join("agent.log"),
            http: free_port(),
            interface: interface.clone(),
            name: format!("e2e-{tag}"),
        };
        write_secret(&paths.token_file, &format!("{wrong_token}\n"));
        let mut options = AgentOptions {
            // Long enough that `/diff` sees a drift made by hand before the repair.
            resync_interval: Duration::from_secs(4),
            log_level: "trace".into(),
            firewall: true,
            ..AgentOptions::default()
        };
        for hook in ["pre_up", "post_up", "pre_down", "post_down"] {
            options
                .hooks
                .insert(hook.into(), hook_command(hook, &hooks_dir));
        }
        let mut config: toml::Table = toml::from_str(&agent_proc::render_config(
            &paths,
            &format!("https://127.0.0.1:{}", grpc.port()),
            &options,
        ))
        .expect("the rendered configuration");
        let section = |config: &toml::Table, name: &str| -> toml::Table {
            config
                .get(name)
                .and_then(toml::Value::as_table)
                .cloned()
                .unwrap_or_default()
        };
        let mut core_section = section(&config, "core");
        for (key, file) in [
            ("ca_file", &ca),
            ("client_cert_file", &client_cert),
            ("client_key_file", &client_key),
        ] {
            core_section.insert(key.into(), file.display().to_string().into());
        }
        core_section.insert("reconnect_max".into(), "1s".into());
        config.insert("core".into(), core_section.into());
        let mut log_section = section(&config, "log");
        log_section.insert("format".into(), format.into());
        config.insert("log".into(), log_section.into());
        std::fs::write(&paths.config, toml::to_string(&config).expect("TOML"))
            .expect("write gateway.toml");

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
        let mut demo = Demo {
            agent: None,
            client_wg: None,
            core,
            _cleanup: cleanup,
            _gw: gw,
            client_ns,
            dir,
            format,
            paths,
            admin,
            admin_base,
            admin_token,
            gateway_token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
            location: view.id,
            client_if,
            client_private,
            gw_public: view.public_key,
            peer_a: peers[0].id,
            peer_b: peers[1].id,
            captures,
            hooks_dir,
            secrets,
            inputs,
        };
        demo.start_client(Some(&psk_a)).await;
        demo
    }

    // ---------------------------------------------------------------- scenario --

    async fn scenario(&mut self) {
        // 1. A wrong token first: refused, retried; then the right one.
        self.start_agent().await;
        let refused = eventually("the Core refuses the wrong token", STEP, || async {
            let s = self.status().await?;
            (s["core"]["consecutive_failures"].as_u64()? >= 1
                && !s["core"]["connected"].as_bool()?
                && s["core"]["last_error"].as_str().is_some())
            .then_some(s)
        })
        .await;
        self.save("status-wrong-token.json", &refused.to_string());
        self.capture_agent("wrong-token").await;
        write_secret(&self.paths.token_file, &format!("{}\n", self.gateway_token));
        self.inputs
            .push((self.paths.token_file.clone(), "gateway token".into()));
        self.wait_synced().await;
        self.wait_ping().await;
        let dump = self.gw_dump().await;
        assert_eq!(dump.peers.len(), 3, "{dump:?}");
        let with_psk = dump
            .peers
            .values()
            .filter(|p| p.config.preshared_key != "(none)")
            .count();
        assert_eq!(with_psk, 2, "A's and B's preshared keys on the interface");

        // 2. The firewall: a policy through the admin API, and one it refuses.
        let policy = FirewallPolicy {
            enabled: true,
            default_verdict: Verdict::Drop,
            rules: vec![
                rule(10, &[], &[], &[Protocol::Icmp], "ping"),
                rule(
                    20,
                    &["10.77.0.0/24"],
                    &[(22, 22)],
                    &[Protocol::Tcp],
                    "ssh from the VPN",
                ),
            ],
        };
        self.admin
            .put_firewall(self.location, &policy)
            .await
            .expect("put the firewall policy");
        let s = self.wait_applied().await;
        assert_eq!(s["firewall"]["state"], "in sync", "{s}");
        self.wait_ping().await;
        let refused_rule = serde_json::json!({
            "enabled": true,
            "default_verdict": "drop",
            "rules": [{"ports": [{"start": 80, "end": 80}], "protocols": ["icmp"], "verdict": "accept"}],
        });
        self.admin_call(
            "firewall rule with ports and only ICMP",
            reqwest::Method::PUT,
            &format!("/locations/{}/firewall", self.location),
            &self.admin_token.clone(),
            Some(refused_rule.to_string()),
            400,
        )
        .await;

        // 3. A preshared key changed through the admin API (an update, not a re-add).
        let psk_b2 = random32();
        self.secrets
            .push(Secret::binary("peer B preshared key (changed)", &psk_b2));
        self.admin
            .patch_peer(
                self.location,
                self.peer_b,
                &PeerPatch {
                    preshared_key: Some(B64.encode(psk_b2)),
                    ..Default::default()
                },
            )
            .await
            .expect("change B's preshared key");
        self.wait_applied().await;
        assert!(self.gw_psks().await.contains(&B64.encode(psk_b2)));

        // 4. Drift by hand, with secrets: A's preshared key and the interface's private
        //    key changed with `wg set`; `/diff` and `gatehouse diff` show it, the resync
        //    repairs it.
        self.drift().await;

        // 5. MFA on (threshold 8 s): B's session (generated key) is left to expire (the
        //    agent removes B, the Core ends the session); A's sessions: a given key, one
        //    generated that replaces it (an update), ended, and generated again.
        self.patch(LocationPatch {
            mfa: Some(true),
            disconnect_threshold_secs: Some(MFA_THRESHOLD.as_secs()),
            ..Default::default()
        })
        .await;
        assert!(self.gw_dump().await.peers.is_empty());
        let b = self
            .admin
            .start_mfa_session(self.location, self.peer_b, None)
            .await
            .expect("start B's session");
        self.secrets.push(Secret::binary(
            "MFA session preshared key (generated, peer B)",
            &key32(&b.preshared_key),
        ));
        self.wait_applied().await;
        assert!(self.gw_psks().await.contains(&b.preshared_key));
        let given = random32();
        self.secrets.push(Secret::binary(
            "MFA session preshared key (given, peer A)",
            &given,
        ));
        let a = self
            .admin
            .start_mfa_session(self.location, self.peer_a, Some(&B64.encode(given)))
            .await
            .expect("start A's session");
        assert!(
            a.preshared_key == B64.encode(given),
            "the Core answered another preshared key than the one given"
        );
        self.wait_applied().await;
        self.start_client(Some(&given)).await;
        self.wait_ping().await;
        let mut session_key = given;
        for (n, end_first) in [("replacing", false), ("after an end", true)] {
            if end_first {
                self.admin
                    .end_mfa_session(self.location, self.peer_a)
                    .await
                    .expect("end A's session");
                self.wait_applied().await;
                let dump = self.gw_dump().await;
                assert!(!dump.peers.contains_key(&public_of(&self.client_private)));
            }
            let a = self
                .admin
                .start_mfa_session(self.location, self.peer_a, None)
                .await
                .expect("start A's session");
            session_key = key32(&a.preshared_key);
            self.secrets.push(Secret::binary(
                format!("MFA session preshared key (generated, peer A, {n})"),
                &session_key,
            ));
            self.wait_applied().await;
            assert!(self.gw_psks().await.contains(&a.preshared_key));
            self.start_client(Some(&session_key)).await;
            self.wait_ping().await;
        }

        // 6. Bad admin requests, some carrying secrets.
        self.bad_admin_requests().await;

        // 7. The Core away for a moment; it comes back serving a revision the agent
        //    rejects (a listen port broken in its database: served as stored, design
        //    §11), fixed through the admin API; then the private key rotated.
        self.core.stop(Duration::from_secs(15));
        let away = eventually("the agent notices the Core is away", STEP, || async {
            let s = self.status().await?;
            (!s["core"]["connected"].as_bool()? && s["core"]["consecutive_failures"].as_u64()? >= 1)
                .then_some(s)
        })
        .await;
        self.save("status-core-away.json", &away.to_string());
        self.capture_agent("core-away").await;
        self.break_listen_port();
        self.core.start_again();
        self.core.wait_ready(STEP).await;
        let rejected = eventually("the agent rejects the revision", STEP, || async {
            let s = self.status().await?;
            let items = s["last_rejected"]["items"].as_array()?;
            items
                .iter()
                .any(|i| i.as_str().is_some_and(|i| i.contains("listen_port")))
                .then_some(s)
        })
        .await;
        self.save("status-rejected.json", &rejected.to_string());
        self.capture_agent("rejected").await;
        for (name, path) in [
            ("audit", "/audit".to_string()),
            ("gateways", format!("/locations/{}/gateways", self.location)),
        ] {
            let token = self.admin_token.clone();
            let body = self
                .admin_call(name, reqwest::Method::GET, &path, &token, None, 200)
                .await;
            self.save(&format!("core-{name}-rejected.json"), &body);
        }
        self.patch(LocationPatch {
            listen_port: Some(LISTEN_PORT.into()),
            ..Default::default()
        })
        .await;
        let rotated = random32();
        self.secrets.push(Secret::wireguard_private_key(
            "location private key (rotated)",
            &rotated,
        ));
        self.patch(LocationPatch {
            private_key: Some(B64.encode(rotated)),
            ..Default::default()
        })
        .await;
        self.gw_public = public_of(&rotated);
        assert_eq!(self.gw_dump().await.public_key, self.gw_public);
        self.start_client(Some(&session_key)).await;
        self.wait_ping().await;

        // B's session ended by the Core on the agent's inactivity event.
        eventually(
            "B removed for inactivity and its session ended",
            STEP,
            || async {
                let events = self.admin.events(self.location).await.ok()?;
                events
                    .iter()
                    .any(|e| e.peer_id == Some(self.peer_b) && e.reason == "mfa_inactive")
                    .then_some(())
            },
        )
        .await;

        // 8. The agent restarted: hooks again, the state and its journal read back.
        let t = Instant::now();
        self.stop_agent();
        self.start_agent().await;
        self.wait_synced().await;
        self.wait_ping().await;
        eprintln!(
            "{}: agent restarted and synced in {:?}",
            self.format,
            t.elapsed()
        );

        // 9. The final captures, then everything stopped.
        self.capture_agent("final").await;
        self.capture_cli().await;
        // What the agent wrote into the kernel's nftables (its table, comments included).
        let ruleset = cmd_ok("nft", &["list", "ruleset"]).await;
        assert!(ruleset.contains(&format!("gatehouse_{}", self.paths.interface)));
        self.save("nft-ruleset.txt", &ruleset);
        self.capture_core().await;
        self.stop_agent();
        self.core.stop(Duration::from_secs(15));
        let trail = std::fs::read_to_string(self.hooks_dir.join("trail")).unwrap_or_default();
        let ran: Vec<&str> = trail
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            ran,
            [
                "pre_up",
                "post_up",
                "pre_down",
                "post_down",
                "pre_up",
                "post_up",
                "pre_down",
                "post_down"
            ],
            "hooks run: {trail}"
        );
        let log = std::fs::read_to_string(&self.paths.log).unwrap_or_default();
        assert!(
            log.contains("exit status: 3"),
            "the failing post_up hook is not in the agent's log"
        );
    }

    /// Bad admin requests; their answers are searched too.
    async fn bad_admin_requests(&mut self) {
        let (wrong_raw, wrong_admin) = token_like("adm_");
        self.secrets.push(
            Secret::text("wrong admin token", &wrong_admin)
                .with_binary_part("its random part", &wrong_raw),
        );
        let location = format!("/locations/{}", self.location);
        let peers = format!("{location}/peers");
        self.admin_call(
            "wrong admin token",
            reqwest::Method::GET,
            &location,
            &wrong_admin,
            None,
            401,
        )
        .await;
        let gateway_token = self.gateway_token.clone();
        self.admin_call(
            "the gateway token as the admin token",
            reqwest::Method::GET,
            &location,
            &gateway_token,
            None,
            401,
        )
        .await;
        let admin = self.admin_token.clone();
        let refused_psk = random32();
        self.secrets.push(Secret::binary(
            "preshared key of a refused peer",
            &refused_psk,
        ));
        let body = serde_json::json!({
            "public_key": public_of(&random32()),
            "allowed_ips": ["10.77.0.300/32"],
            "preshared_key": B64.encode(refused_psk),
        })
        .to_string();
        self.admin_call(
            "peer with a bad allowed IP and a preshared key",
            reqwest::Method::POST,
            &peers,
            &admin,
            Some(body.clone()),
            400,
        )
        .await;
        self.admin_call(
            "truncated JSON with a preshared key",
            reqwest::Method::POST,
            &peers,
            &admin,
            Some(body[..body.len() - 3].to_string()),
            400,
        )
        .await;
        let short = rand::random::<[u8; 31]>();
        self.secrets
            .push(Secret::binary("malformed preshared key (31 bytes)", &short));
        self.admin_call(
            "MFA session with a 31-byte preshared key",
            reqwest::Method::POST,
            &format!("{peers}/{}/mfa-session", self.peer_b),
            &admin,
            Some(serde_json::json!({"preshared_key": B64.encode(short)}).to_string()),
            400,
        )
        .await;
        let short_key = rand::random::<[u8; 31]>();
        self.secrets.push(Secret::binary(
            "malformed private key (31 bytes)",
            &short_key,
        ));
        self.admin_call(
            "location private key of 31 bytes",
            reqwest::Method::PATCH,
            &location,
            &admin,
            Some(serde_json::json!({"private_key": B64.encode(short_key)}).to_string()),
            400,
        )
        .await;
        self.admin_call(
            "preshared key of the wrong type",
            reqwest::Method::PATCH,
            &format!("{peers}/{}", self.peer_b),
            &admin,
            Some(serde_json::json!({"preshared_key": 12345}).to_string()),
            400,
        )
        .await;
    }

    // ---------------------------------------------------------------- the Core --

    /// One admin request as sent, its answer saved; checks the status code.
    async fn admin_call(
        &mut self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: Option<String>,
        want: u16,
    ) -> String {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/api/v1{path}", self.admin_base))
            .bearer_auth(bearer);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let line = format!("{what}: {method} {path} -> {status} {text}\n");
        let file = self.captures.join("admin-answers.txt");
        let mut all = std::fs::read_to_string(&file).unwrap_or_default();
        all.push_str(&line);
        std::fs::write(&file, all).expect("write the admin answers");
        assert_eq!(
            status,
            want,
            "{what}: {status} {}",
            self.scanner().redact(text.as_bytes())
        );
        text
    }

    async fn revision(&self) -> u64 {
        self.admin
            .location(self.location)
            .await
            .expect("the location")
            .revision
    }

    async fn patch(&self, patch: LocationPatch) {
        self.admin
            .patch_location(self.location, &patch)
            .await
            .expect("patch the location");
        self.wait_applied().await;
    }

    /// Sets the location's listen port to 0 in the stopped Core's database: content the
    /// shared rules refuse, which the Core serves as stored (no safe substitute).
    fn break_listen_port(&self) {
        let db = self.dir.path().join("core.db");
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1])\n\
                 n = c.execute('UPDATE locations SET listen_port = 0 WHERE id = ?', \
                 (int(sys.argv[2]),)).rowcount\n\
                 c.commit()\nprint(n)",
            ])
            .arg(&db)
            .arg(self.location.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("python3 (sqlite3)");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1",
            "breaking the stored listen port failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The Core's admin answers at the end (none may hold a key).
    async fn capture_core(&mut self) {
        let loc = format!("/locations/{}", self.location);
        let admin = self.admin_token.clone();
        for (name, path) in [
            ("location", loc.clone()),
            ("peers", format!("{loc}/peers")),
            ("gateways", format!("{loc}/gateways")),
            ("tokens", format!("{loc}/tokens")),
            ("stats", format!("{loc}/stats")),
            ("events", format!("{loc}/events")),
            ("audit", "/audit".into()),
        ] {
            let body = self
                .admin_call(name, reqwest::Method::GET, &path, &admin, None, 200)
                .await;
            self.save(&format!("core-{name}.json"), &body);
        }
    }

    // ---------------------------------------------------------------- the agent --

    async fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent already runs");
        self.agent = Some(AgentProcess::spawn(&self.paths));
        let deadline = Instant::now() + STEP;
        while self.status().await.is_none() {
            if let Some(status) = self.agent.as_mut().and_then(AgentProcess::try_wait) {
                panic!("the agent exited at start ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "the agent's HTTP server is silent"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop_agent(&mut self) {
        let mut a = self.agent.take().expect("the agent runs");
        let status = a
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
            .expect("the agent exits within 20 s of SIGTERM");
        assert!(status.success(), "the agent exited with {status}");
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{}{path}", self.paths.http);
        let r = self.http.get(url).send().await.ok()?;
        let code = r.status().as_u16();
        Some((code, r.text().await.ok()?))
    }

    async fn status(&self) -> Option<Value> {
        let (code, body) = self.get("/status").await?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// `/status`, `/diff`, `/metrics` and `/readyz` as the agent answers them now.
    async fn capture_agent(&mut self, moment: &str) {
        for (name, path) in [
            ("status", "/status"),
            ("diff", "/diff"),
            ("metrics", "/metrics"),
            ("readyz", "/readyz"),
        ] {
            let (code, body) = self
                .get(path)
                .await
                .unwrap_or_else(|| panic!("the agent's {path} does not answer"));
            if name != "readyz" {
                assert_eq!(code, 200, "{path}: {body}");
            }
            self.save(&format!("agent-{name}-{moment}.txt"), &body);
        }
    }

    /// `gatehouse status`, `diff` and `check-config` as an operator runs them.
    async fn capture_cli(&mut self) {
        let http = format!("http://{}", self.paths.http);
        let config = self.paths.config.display().to_string();
        let token = self.gateway_token.clone();
        let none: &[(&str, &str)] = &[];
        // The token given inline instead, by the environment and by a flag (each shown
        // as `<redacted>`).
        let env_token = [
            ("GATEHOUSE_CORE_TOKEN", token.as_str()),
            ("GATEHOUSE_CORE_TOKEN_FILE", ""),
        ];
        for (name, args, env) in [
            ("status", vec!["status", "--http", http.as_str()], none),
            ("diff", vec!["diff", "--http", http.as_str()], none),
            (
                "check-config",
                vec!["check-config", "--config", config.as_str()],
                none,
            ),
            (
                "check-config-token-env",
                vec!["check-config", "--config", config.as_str()],
                &env_token[..],
            ),
            (
                "check-config-token-flag",
                vec!["check-config", "--config", &config, "--token", &token],
                none,
            ),
        ] {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
                .args(&args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .output()
                .await
                .expect("run gatehouse");
            let text = format!(
                "exit {:?}\n{}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            self.save(&format!("cli-{name}.txt"), &text);
        }
    }

    /// Waits until the agent applied the Core's current revision.
    async fn wait_applied(&self) -> Value {
        let revision = self.revision().await;
        eventually(
            &format!("the agent applied revision {revision}"),
            STEP,
            || async {
                let s = self.status().await?;
                (s["applied_revision"].as_u64()? >= revision).then_some(s)
            },
        )
        .await
    }

    /// Waits until the agent is connected and it and the Core agree on the revision.
    async fn wait_synced(&self) -> Value {
        eventually("the gateway synced with the Core", STEP, || async {
            let revision = self.revision().await;
            let gws = self.admin.gateways(self.location).await.ok()?;
            let gw = gws.iter().find(|g| g.name == self.paths.name)?;
            let s = self.status().await?;
            (gw.connected
                && gw.applied_revision == revision
                && s["core"]["connected"].as_bool()?
                && s["applied_revision"].as_u64()? == revision)
                .then_some(s)
        })
        .await
    }

    /// The preshared keys on the gateway's interface (base64).
    async fn gw_psks(&self) -> Vec<String> {
        self.gw_dump()
            .await
            .peers
            .values()
            .map(|p| p.config.preshared_key.clone())
            .collect()
    }

    /// Changes A's preshared key and the interface's private key by hand; captures
    /// `/diff` and `gatehouse diff` while they differ, and waits for the repair.
    async fn drift(&mut self) {
        let psk = random32();
        let key = random32();
        self.secrets
            .push(Secret::binary("preshared key set by hand (drift)", &psk));
        self.secrets.push(Secret::wireguard_private_key(
            "private key set by hand (drift)",
            &key,
        ));
        let (psk_file, key_file) = (
            self.dir.path().join("drift.psk"),
            self.dir.path().join("drift.key"),
        );
        write_secret(&psk_file, &B64.encode(psk));
        write_secret(&key_file, &B64.encode(key));
        let before = self.gw_dump().await;
        let a = public_of(&self.client_private);
        cmd_ok(
            "wg",
            &[
                "set",
                &self.paths.interface,
                "private-key",
                &key_file.display().to_string(),
                "peer",
                &a,
                "preshared-key",
                &psk_file.display().to_string(),
            ],
        )
        .await;
        let diff = eventually("/diff shows the drift", STEP, || async {
            let (_, body) = self.get("/diff").await?;
            let v: Value = serde_json::from_str(&body).ok()?;
            (v["operations"].as_array()?.len() >= 2).then_some(body)
        })
        .await;
        self.save("agent-diff-drift.txt", &diff);
        let out = cmd(
            env!("CARGO_BIN_EXE_gatehouse"),
            &["diff", "--http", &format!("http://{}", self.paths.http)],
        )
        .await;
        self.save("cli-diff-drift.txt", &String::from_utf8_lossy(&out.stdout));
        eventually("the drift repaired", STEP, || async {
            let d = self.try_gw_dump().await?;
            (d.config() == before.config()).then_some(())
        })
        .await;
        self.capture_agent("drift-repaired").await;
        self.wait_ping().await;
    }

    async fn try_gw_dump(&self) -> Option<e2e::wg::Dump> {
        let out = cmd("wg", &["show", &self.paths.interface, "dump"]).await;
        if !out.status.success() {
            return None;
        }
        e2e::wg::parse_dump(&String::from_utf8_lossy(&out.stdout)).ok()
    }

    async fn gw_dump(&self) -> e2e::wg::Dump {
        let out = cmd_ok("wg", &["show", &self.paths.interface, "dump"]).await;
        e2e::wg::parse_dump(&out).expect("parse the gateway's dump")
    }

    // ---------------------------------------------------------------- the client --

    /// Starts the client's wireguard-go (first call) and (re)configures its one peer,
    /// the gateway, with `psk`: the peer is removed and added again, so no session with
    /// an old key or preshared key lingers and the next ping starts a handshake.
    async fn start_client(&mut self, psk: Option<&[u8; 32]>) {
        let ns = self.client_ns.name().to_string();
        let iface = self.client_if.clone();
        if self.client_wg.is_none() {
            self.client_wg = Some(self.client_ns.spawn_wireguard_go(&iface));
            let key_file = self.dir.path().join("client.key");
            write_secret(&key_file, &B64.encode(self.client_private));
            let key = key_file.display().to_string();
            let port = CLIENT_PORT.to_string();
            let set = ["netns", "exec", &ns, "wg", "set", &iface];
            let mut args = set.to_vec();
            args.extend(["private-key", &key, "listen-port", &port]);
            cmd_ok("ip", &args).await;
            let addr = format!("{CLIENT_TUNNEL}/24");
            cmd_ok("ip", &["-n", &ns, "addr", "add", &addr, "dev", &iface]).await;
            cmd_ok("ip", &["-n", &ns, "link", "set", &iface, "up"]).await;
        }
        let dump = cmd_ok("ip", &["netns", "exec", &ns, "wg", "show", &iface, "peers"]).await;
        for old in dump.split_whitespace() {
            cmd_ok(
                "ip",
                &[
                    "netns", "exec", &ns, "wg", "set", &iface, "peer", old, "remove",
                ],
            )
            .await;
        }
        let psk_file = self.dir.path().join("client.psk");
        write_secret(&psk_file, &psk.map(|k| B64.encode(k)).unwrap_or_default());
        let psk_path = psk_file.display().to_string();
        let endpoint = format!("{GW_UNDERLAY}:{LISTEN_PORT}");
        let allowed = format!("{GW_TUNNEL}/24");
        let mut args = vec![
            "netns",
            "exec",
            &ns,
            "wg",
            "set",
            &iface,
            "peer",
            &self.gw_public,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
            "persistent-keepalive",
            "1",
        ];
        if psk.is_some() {
            args.extend(["preshared-key", &psk_path]);
        }
        cmd_ok("ip", &args).await;
    }

    async fn wait_ping(&self) {
        let ns = self.client_ns.name().to_string();
        eventually("a ping through the tunnel", STEP, || async {
            cmd(
                "ip",
                &[
                    "netns", "exec", &ns, "ping", "-c", "1", "-W", "1", GW_TUNNEL,
                ],
            )
            .await
            .status
            .success()
            .then_some(())
        })
        .await;
    }

    // ---------------------------------------------------------------- checking --

    fn save(&self, name: &str, text: &str) {
        std::fs::write(self.captures.join(name), text).expect("write a capture");
    }

    fn scanner(&self) -> Scanner {
        Scanner::new(self.secrets.clone())
    }

    /// Every output to search, as (what it is, its bytes).
    fn sources(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![];
        let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.push(("agent stdout/stderr".to_string(), read(&self.paths.log)));
        out.push(("Core stdout/stderr".to_string(), read(&self.core.log)));
        let wg_log = PathBuf::from(format!("/var/run/wireguard/{}.log", self.paths.interface));
        if wg_log.exists() {
            out.push((
                format!("wireguard-go log {}", wg_log.display()),
                read(&wg_log),
            ));
        }
        for (what, dir) in [
            ("capture", &self.captures),
            ("hook output", &self.hooks_dir),
            ("state directory", &self.paths.state_dir),
        ] {
            for file in walk(dir) {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                if what == "state directory" && is_the_state(&name) {
                    continue;
                }
                let rel = file
                    .strip_prefix(dir)
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                out.push((format!("{what} {rel}"), read(&file)));
            }
        }
        out
    }

    fn collect_and_check(&mut self) {
        let t = Instant::now();
        let scanner = self.scanner();

        // The scanner works with these very secrets: each form of each is found...
        for secret in scanner.secrets() {
            for form in secret.forms() {
                let mut planted = b"before ".to_vec();
                planted.extend_from_slice(&form.bytes);
                planted.extend_from_slice(b" after");
                let found = scanner.scan("planted", &planted);
                assert!(
                    found
                        .iter()
                        .any(|l| l.secret == secret.name() && l.form == form.label),
                    "the scanner misses {} as {}: {found:?}",
                    secret.name(),
                    form.label
                );
            }
        }
        // ...in the input files that hold them...
        for (file, secret) in &self.inputs {
            let found = scanner.scan(
                &file.display().to_string(),
                &std::fs::read(file).expect("input"),
            );
            assert!(
                found.iter().any(|l| &l.secret == secret),
                "the scanner misses {secret} in {}",
                file.display()
            );
        }
        // ...and in the state, which holds the location's keys by design (not searched,
        // see `is_the_state`), 0600.
        let state = self.paths.state_dir.join("state.json");
        let found = scanner.scan("state.json", &std::fs::read(&state).expect("state.json"));
        assert!(
            found
                .iter()
                .any(|l| l.secret == "location private key (rotated)"),
            "the scanner does not find the private key in state.json: {found:?}"
        );
        for name in ["state.json", "state.journal"] {
            let path = self.paths.state_dir.join(name);
            if let Ok(meta) = std::fs::metadata(&path) {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
            }
        }
        eprintln!(
            "{}: the state (excluded) holds, as expected: {}",
            self.format,
            found
                .iter()
                .map(|l| format!("{} as {}", l.secret, l.form))
                .collect::<Vec<_>>()
                .join("; ")
        );

        let sources = self.sources();
        let names: Vec<&str> = sources.iter().map(|(n, _)| n.as_str()).collect();
        for must in [
            "agent stdout/stderr",
            "Core stdout/stderr",
            "wireguard-go log ",
            "hook output pre_up.env",
            "hook output post_down.env",
            "state directory gateway-id",
            "capture agent-status-final.txt",
            "capture agent-diff-drift.txt",
            "capture agent-metrics-final.txt",
            "capture agent-diff-rejected.txt",
            "capture admin-answers.txt",
            "capture cli-check-config.txt",
        ] {
            assert!(
                names.iter().any(|n| n.starts_with(must)),
                "{must} was not collected: {names:?}"
            );
        }
        let mut leaks = vec![];
        let mut bytes = 0;
        for (name, data) in &sources {
            bytes += data.len();
            leaks.extend(scanner.scan(name, data));
        }
        eprintln!(
            "{}: searched {} sources ({} KiB; agent log {} KiB, Core log {} KiB) for {} secrets in {} forms in {:?}",
            self.format,
            sources.len(),
            bytes / 1024,
            sources[0].1.len() / 1024,
            sources[1].1.len() / 1024,
            scanner.secrets().len(),
            scanner.secrets().iter().map(|s| s.forms().len()).sum::<usize>(),
            t.elapsed()
        );
        assert!(
            leaks.is_empty(),
            "{} secret(s) found where none may be ({} logs at trace):\n{}",
            leaks.len(),
            self.format,
            secrets::report(&leaks)
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::env::var_os("GATEHOUSE_E2E_KEEP").is_some() {
            // Everything the run wrote, for a look afterwards (its secrets are random
            // and used nowhere else; the files holding them are 0600).
            self.dir.disable_cleanup(true);
            eprintln!("{}: kept {}", self.format, self.dir.path().display());
        }
        if std::thread::panicking() {
            // Tails of the logs, every secret in them redacted.
            let scanner = self.scanner();
            for (what, path) in [("agent", &self.paths.log), ("Core", &self.core.log)] {
                let text = std::fs::read(path).unwrap_or_default();
                let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
                let tail = lines[lines.len().saturating_sub(40)..].join(&b'\n');
                eprintln!(
                    "---- {what} log, last 40 lines, secrets redacted ----\n{}\n----",
                    scanner.redact(&tail)
                );
            }
        }
    }
}

/// A hook that notes it ran, writes its environment to a file and to its output (which
/// the agent logs); `post_up` then fails on purpose.
fn hook_command(hook: &str, dir: &Path) -> String {
    let dir = dir.display();
    let mut command = format!(
        "echo \"$GATEHOUSE_HOOK $GATEHOUSE_INTERFACE\" >> '{dir}/trail'; \
         env | sort > '{dir}/{hook}.env'; echo '{hook}: environment'; env | sort"
    );
    if hook == "post_up" {
        command.push_str("; echo 'post_up fails on purpose' >&2; exit 3");
    }
    command
}

fn rule(
    priority: u32,
    sources: &[&str],
    ports: &[(u32, u32)],
    protocols: &[Protocol],
    comment: &str,
) -> FirewallRule {
    FirewallRule {
        priority,
        sources: sources.iter().map(|s| s.to_string()).collect(),
        destinations: vec![],
        ports: ports
            .iter()
            .map(|&(start, end)| PortRange { start, end })
            .collect(),
        protocols: protocols.to_vec(),
        verdict: Verdict::Accept,
        comment: comment.into(),
    }
}

fn key32(b64: &str) -> [u8; 32] {
    B64.decode(b64)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .expect("a 32-byte key in base64")
}

/// Every regular file under `dir`, recursively, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(walk(&path)),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
    out.sort();
    out
}
