//! The agent as a real process: its generated configuration (userspace backend, state in
//! the test's directory, HTTP on loopback of the gateway namespace, short intervals) and
//! the running child, killed by pid when dropped.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::netns::ChildGuard;
use super::procs;

/// What a test may set in the agent's configuration before starting it.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub stats_interval: Duration,
    pub resync_interval: Duration,
    /// `keep` or a duration (`"30s"`).
    pub offline_policy: String,
    /// Hook name (`pre_up`, `post_up`, `pre_down`, `post_down`) to shell command.
    pub hooks: BTreeMap<String, String>,
    /// `log.level`.
    pub log_level: String,
    /// `firewall.enabled` and `firewall.masquerade` (both off unless a test wants them).
    pub firewall: bool,
    pub masquerade: bool,
    /// `gateway.backend`: `userspace` (wireguard-go) or `kernel`.
    pub backend: String,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            stats_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(2),
            offline_policy: "keep".into(),
            hooks: BTreeMap::new(),
            log_level: "info".into(),
            firewall: false,
            masquerade: false,
            backend: "userspace".into(),
        }
    }
}

/// Fixed facts of one site's agent (the same across restarts).
#[derive(Clone, Debug)]
pub struct AgentPaths {
    pub config: PathBuf,
    pub token_file: PathBuf,
    pub state_dir: PathBuf,
    /// stdout and stderr of every run, appended.
    pub log: PathBuf,
    pub http: SocketAddr,
    pub interface: String,
    pub name: String,
}

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The agent's configuration file as TOML.
pub fn render_config(paths: &AgentPaths, core_url: &str, options: &AgentOptions) -> String {
    let mut root = toml::Table::new();
    let mut core = toml::Table::new();
    core.insert("url".into(), core_url.into());
    core.insert(
        "token_file".into(),
        paths.token_file.display().to_string().into(),
    );
    core.insert("connect_timeout".into(), "2s".into());
    core.insert("keepalive_interval".into(), "2s".into());
    let mut gateway = toml::Table::new();
    gateway.insert("name".into(), paths.name.clone().into());
    gateway.insert("interface".into(), paths.interface.clone().into());
    gateway.insert("backend".into(), options.backend.clone().into());
    gateway.insert(
        "state_dir".into(),
        paths.state_dir.display().to_string().into(),
    );
    gateway.insert("stats_interval".into(), secs(options.stats_interval).into());
    gateway.insert(
        "resync_interval".into(),
        secs(options.resync_interval).into(),
    );
    gateway.insert(
        "offline_policy".into(),
        options.offline_policy.clone().into(),
    );
    let mut http = toml::Table::new();
    http.insert("listen".into(), paths.http.to_string().into());
    let mut log = toml::Table::new();
    log.insert("level".into(), options.log_level.clone().into());
    log.insert("format".into(), "text".into());
    let mut hooks = toml::Table::new();
    for (name, command) in &options.hooks {
        hooks.insert(name.clone(), command.clone().into());
    }
    hooks.insert("timeout".into(), "10s".into());
    let mut firewall = toml::Table::new();
    firewall.insert("enabled".into(), options.firewall.into());
    firewall.insert("masquerade".into(), options.masquerade.into());
    root.insert("core".into(), core.into());
    root.insert("gateway".into(), gateway.into());
    root.insert("http".into(), http.into());
    root.insert("log".into(), log.into());
    root.insert("hooks".into(), hooks.into());
    root.insert("firewall".into(), firewall.into());
    toml::to_string(&root).expect("render the agent configuration")
}

/// A running `gatehouse run` (killed by pid and reaped on drop).
#[derive(Debug)]
pub struct AgentProcess {
    child: ChildGuard,
    pub started: Instant,
}

impl AgentProcess {
    /// Spawns the agent binary in the calling thread's network namespace, its output
    /// appended to `paths.log`, without any `GATEHOUSE_*` variable of the test's own
    /// environment.
    pub fn spawn(paths: &AgentPaths) -> AgentProcess {
        Self::spawn_with_env(paths, &[])
    }

    /// [`AgentProcess::spawn`] with extra environment variables for the agent only (a
    /// benchmark's `LD_PRELOAD` profiler, for one).
    pub fn spawn_with_env(paths: &AgentPaths, env: &[(String, String)]) -> AgentProcess {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .expect("open the agent log");
        let log_err = log.try_clone().expect("dup the agent log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
        cmd.arg("run")
            .arg("--config")
            .arg(&paths.config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("GATEHOUSE_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().expect("start the gatehouse agent");
        AgentProcess {
            child: ChildGuard(child),
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.0.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits up to `within` for the exit; None when it still runs.
    pub fn signal_and_wait(&mut self, signal: libc::c_int, within: Duration) -> Option<ExitStatus> {
        procs::signal(self.pid(), signal);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_renders_every_setting_and_quotes_hooks() {
        let paths = AgentPaths {
            config: "/t/gateway.toml".into(),
            token_file: "/t/token".into(),
            state_dir: "/t/state".into(),
            log: "/t/agent.log".into(),
            http: "127.0.0.1:9180".parse().unwrap(),
            interface: "ghg1".into(),
            name: "e2e".into(),
        };
        let mut options = AgentOptions {
            resync_interval: Duration::from_millis(1500),
            ..AgentOptions::default()
        };
        options
            .hooks
            .insert("pre_up".into(), r#"echo "a \"b\"" >> '/t/x'"#.into());
        let text = render_config(&paths, "http://127.0.0.1:5", &options);
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["gateway"]["resync_interval"].as_str(),
            Some("1500ms")
        );
        assert_eq!(parsed["gateway"]["backend"].as_str(), Some("userspace"));
        assert_eq!(parsed["core"]["token_file"].as_str(), Some("/t/token"));
        assert_eq!(
            parsed["hooks"]["pre_up"].as_str(),
            Some(r#"echo "a \"b\"" >> '/t/x'"#)
        );
        assert_eq!(parsed["http"]["listen"].as_str(), Some("127.0.0.1:9180"));
    }
}
