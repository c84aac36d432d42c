//! One gateway of the drill's location: its namespace (by name), the agent as a real
//! process (`gatehouse run`, userspace backend, its own state directory kept across a
//! cut), its keepalived, and the acts the drill performs on it: cut the host off (links
//! down, every process of its namespace killed by pid), bring it back as after a reboot
//! (no floating address left, links up, processes started again), drain and undrain it.
//! Reading it goes through its loopback HTTP server (`curl` inside its namespace, as the
//! control endpoints answer loopback clients only) and `wg show`.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::agent::{self, AgentOptions, AgentPaths};
use super::keepalived;
use super::netns::ChildGuard;
use super::procs;
use super::wg::{self, Dump};

/// The agent's HTTP server inside each gateway namespace.
pub const AGENT_HTTP: &str = "127.0.0.1:9180";

/// A floating address as keepalived configures it.
#[derive(Clone, Debug)]
pub struct Vip {
    pub interface: String,
    /// Without prefix length.
    pub address: String,
    pub prefix: u8,
}

pub struct Gateway {
    /// "a" (the preferred one) or "b".
    pub label: &'static str,
    pub ns: String,
    pub paths: AgentPaths,
    pub options: AgentOptions,
    /// The Core's gRPC URL as the agent dials it.
    pub core_url: String,
    /// `[ha] vip` of the agent; empty = no `[ha]` section (the baseline).
    pub ha_vips: Vec<String>,
    pub keepalived: keepalived::Spec,
    pub keepalived_dir: PathBuf,
    /// Its links (ends inside its namespace): what a cut takes down.
    pub links: Vec<String>,
    pub vips: Vec<Vip>,
    agent: Option<ChildGuard>,
    vrrp: Option<ChildGuard>,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: &'static str,
        ns: String,
        paths: AgentPaths,
        core_url: String,
        ha_vips: Vec<String>,
        keepalived: keepalived::Spec,
        keepalived_dir: PathBuf,
        links: Vec<String>,
        vips: Vec<Vip>,
    ) -> Gateway {
        Gateway {
            label,
            ns,
            paths,
            options: AgentOptions {
                stats_interval: Duration::from_secs(2),
                resync_interval: Duration::from_secs(5),
                ..AgentOptions::default()
            },
            core_url,
            ha_vips,
            keepalived,
            keepalived_dir,
            links,
            vips,
            agent: None,
            vrrp: None,
        }
    }

    /// The agent's configuration: the e2e harness's, plus cleartext to the Core on the
    /// segment and, unless empty, `[ha] vip`.
    pub fn config(&self) -> String {
        let rendered = agent::render_config(&self.paths, &self.core_url, &self.options);
        let mut config: toml::Table = toml::from_str(&rendered).expect("rendered TOML");
        if let Some(core) = config.get_mut("core").and_then(|c| c.as_table_mut()) {
            core.insert("allow_insecure".into(), true.into());
        }
        if !self.ha_vips.is_empty() {
            let mut ha = toml::Table::new();
            let vips: Vec<toml::Value> = self.ha_vips.iter().map(|v| v.as_str().into()).collect();
            ha.insert("vip".into(), vips.into());
            config.insert("ha".into(), ha.into());
        }
        toml::to_string(&config).expect("render TOML")
    }

    /// Starts the agent in its namespace (output appended to its log), without any
    /// `GATEHOUSE_*` variable of the test's environment.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "gateway {}: agent runs", self.label);
        std::fs::write(&self.paths.config, self.config()).expect("write the agent config");
        let mut cmd = self.in_ns(env!("CARGO_BIN_EXE_gatehouse"));
        cmd.arg("run").arg("--config").arg(&self.paths.config);
        cmd.env("NO_COLOR", "1");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("GATEHOUSE_") {
                cmd.env_remove(name);
            }
        }
        self.agent = Some(spawn_logged(cmd, &self.paths.log, "the agent"));
    }

    /// SIGKILLs the agent alone (a crash: wireguard-go and the rest of the host stay) and
    /// reaps it.
    pub fn kill_agent(&mut self) {
        let mut guard = self.agent.take().expect("the agent runs");
        procs::signal(guard.pid(), libc::SIGKILL);
        let _ = guard.0.wait();
    }

    /// Whether the agent process was started and not killed since.
    pub fn agent_running(&self) -> bool {
        self.agent.is_some()
    }

    /// Starts keepalived in the foreground in its namespace, with its own configuration,
    /// pid files and log.
    pub fn start_keepalived(&mut self) {
        assert!(
            self.vrrp.is_none(),
            "gateway {}: keepalived runs",
            self.label
        );
        let dir = &self.keepalived_dir;
        std::fs::create_dir_all(dir).expect("keepalived dir");
        let conf = dir.join("keepalived.conf");
        std::fs::write(&conf, keepalived::render(&self.keepalived)).expect("keepalived.conf");
        let mut cmd = self.in_ns("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .arg("--use-file")
            .arg(&conf)
            .arg("--pid")
            .arg(dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(dir.join("vrrp.pid"))
            .arg("--checkers_pid")
            .arg(dir.join("checkers.pid"));
        self.vrrp = Some(spawn_logged(cmd, &self.keepalived_log(), "keepalived"));
    }

    pub fn keepalived_log(&self) -> PathBuf {
        self.keepalived_dir.join("keepalived.log")
    }

    /// The host cut off: its links down, then every process of its namespace (agent,
    /// wireguard-go, keepalived and its children, a running check) SIGKILLed by pid.
    pub fn cut(&mut self) {
        for link in &self.links {
            ip(&["-n", &self.ns, "link", "set", link, "down"]);
        }
        if let Some(id) = procs::netns_id(&self.ns) {
            for _ in 0..2 {
                let pids = procs::pids_in(id);
                for &pid in &pids {
                    procs::signal(pid, libc::SIGKILL);
                }
                for pid in pids {
                    assert!(
                        procs::wait_gone(pid, Duration::from_secs(10)),
                        "gateway {}: pid {pid} survived SIGKILL",
                        self.label
                    );
                }
            }
        }
        // Reaped (they are dead already).
        self.agent = None;
        self.vrrp = None;
    }

    /// The host back as after a reboot: no floating address left on its interfaces
    /// (keepalived, SIGKILLed, could not remove them), links up, agent and keepalived
    /// started again. The agent restores its interface and peers from its state file.
    pub fn restart(&mut self) {
        for vip in &self.vips {
            let cidr = format!("{}/{}", vip.address, vip.prefix);
            let _ = Command::new("ip")
                .args(["-n", &self.ns, "addr", "del", &cidr, "dev", &vip.interface])
                .stderr(Stdio::null())
                .status();
        }
        // After a reboot /run is empty: keepalived's pid files of the killed run must not
        // make the new one believe it is already running (a pid may be reused).
        for file in ["keepalived.pid", "vrrp.pid", "checkers.pid"] {
            let _ = std::fs::remove_file(self.keepalived_dir.join(file));
        }
        for link in &self.links {
            ip(&["-n", &self.ns, "link", "set", link, "up"]);
        }
        self.start_agent();
        self.start_keepalived();
    }

    /// Whether every floating address is on this gateway's interfaces.
    pub fn holds_vips(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-o", "addr", "show"])
            .output()
            .expect("ip addr show");
        let text = String::from_utf8_lossy(&out.stdout);
        self.vips
            .iter()
            .all(|v| text.contains(&format!(" {}/{} ", v.address, v.prefix)))
    }

    /// Whether any floating address is on this gateway's interfaces.
    pub fn holds_any_vip(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-o", "addr", "show"])
            .output()
            .expect("ip addr show");
        let text = String::from_utf8_lossy(&out.stdout);
        self.vips
            .iter()
            .any(|v| text.contains(&format!(" {}/{} ", v.address, v.prefix)))
    }

    /// GET on the agent's HTTP server: (status code, body); None when it does not answer.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{AGENT_HTTP}{path}");
        let out = self
            .exec(
                "curl",
                &[
                    "-s",
                    "-m",
                    "2",
                    "-o",
                    "/dev/stdout",
                    "-w",
                    "\n%{http_code}",
                    &url,
                ],
            )
            .await;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_string()))
    }

    /// The agent's `/status` as JSON (read as untyped JSON: the `ha` object is read by
    /// name).
    pub async fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.http_get("/status").await?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        matches!(self.http_get("/readyz").await, Some((200, _)))
    }

    /// `gatehouse <command> --http http://127.0.0.1:9180` in its namespace (drain,
    /// undrain, activate, deactivate, status).
    pub async fn ctl(&self, command: &str) -> Output {
        let url = format!("http://{AGENT_HTTP}");
        self.exec(env!("CARGO_BIN_EXE_gatehouse"), &[command, "--http", &url])
            .await
    }

    /// `wg show <if> dump` inside its namespace; None without the interface.
    pub async fn dump(&self) -> Option<Dump> {
        let out = self
            .exec("wg", &["show", &self.paths.interface, "dump"])
            .await;
        if !out.status.success() {
            return None;
        }
        wg::parse_dump(&String::from_utf8_lossy(&out.stdout)).ok()
    }

    /// Runs a program inside the namespace; its output whatever its status.
    pub async fn exec(&self, program: &str, args: &[&str]) -> Output {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    fn in_ns(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        // `ip netns exec` execs the program: the child's pid is the program's.
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// The tails of its logs (for a failing test).
    pub fn logs(&self) -> String {
        format!(
            "---- gateway {} agent log (last 40 lines) ----\n{}\n\
             ---- gateway {} keepalived log (last 25 lines) ----\n{}\n",
            self.label,
            agent::tail(&self.paths.log, 40),
            self.label,
            agent::tail(&self.keepalived_log(), 25)
        )
    }
}

/// Runs the program at the normal scheduling priority (nice 0) whatever the test's own
/// (long runs go under `nice`): the drill's components are measured as they run on a
/// gateway host, not behind the machine's builds.
pub fn normal_priority(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setpriority(2) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` (at normal priority) with stdout and stderr appended to `log`, killed by
/// pid on drop.
pub fn spawn_logged(mut cmd: Command, log: &std::path::Path, what: &str) -> ChildGuard {
    normal_priority(&mut cmd);
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let err = out.try_clone().expect("dup log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    ChildGuard(child)
}

/// `ip args...`, panicking with stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
