//! The agent's configuration: keys, layering, validation and the effective view.
//!
//! Sources, each layered over the previous one key by key (a source changes only the keys
//! it names): built-in defaults → TOML file (`--config`, else [`DEFAULT_CONFIG_PATH`] when it
//! exists) → environment `GATEHOUSE_<SECTION>_<KEY>` → command-line flags.
//!
//! Decisions written down here:
//! - `core.token` and `core.token_file` are one setting (the token source): the higher
//!   layer's choice replaces the lower one's; both set in one layer is an error. With
//!   neither set and `$CREDENTIALS_DIRECTORY` present (systemd `LoadCredential=token:...`),
//!   the token is read from `$CREDENTIALS_DIRECTORY/token`. No token at all is an error for
//!   `run` and `check-config` alike.
//! - `core.url` is `http(s)://host[:port]` (port defaults to 443/80), IPv6 literals in
//!   brackets. `http://` (cleartext, the token travels unencrypted) is accepted only for a
//!   loopback host or with `core.allow_insecure = true` (e.g. a compose network).
//! - An empty string means "unset" for optional keys (`gateway.id`, hooks, TLS files,
//!   `http.listen` = HTTP server disabled).
//! - [`resolve`] is pure (text, env map, flags in; config out); [`Config::check_files`]
//!   checks the files the config names; [`load`] does both and reads the file.

mod build;
mod render;
mod schema;
mod secret;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::backend::BackendKind;

pub use schema::Origin;
pub use secret::{Secret, REDACTED};

/// The configuration file read when `--config` is not given (only if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gatehouse/gateway.toml";

/// Why a configuration without a token cannot run.
pub const MISSING_TOKEN: &str = "no Core token: set core.token or core.token_file \
     (GATEHOUSE_CORE_TOKEN, --token-file, or systemd LoadCredential=token:FILE)";

/// Prefix of the configuration environment variables.
pub const ENV_PREFIX: &str = "GATEHOUSE_";

/// Per-peer metrics are on while the interface has at most this many peers, unless
/// `http.peer_metrics_limit` says otherwise: a few thousand series a scrape.
pub const DEFAULT_PEER_METRICS_LIMIT: usize = 1000;

/// The largest `http.peer_metrics_limit`: beyond it a scrape is megabytes.
pub const MAX_PEER_METRICS_LIMIT: usize = 100_000;

/// The effective, validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub core: CoreConfig,
    pub gateway: GatewayConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub hooks: HooksConfig,
    pub firewall: FirewallConfig,
    pub ha: HaConfig,
    /// Who set each key (`section.key`); keys at their default are absent.
    origins: BTreeMap<String, Origin>,
}

/// `[core]`: how to reach and authenticate to the Core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// `http(s)://host:port`, validated.
    pub url: url::Url,
    pub token: TokenSource,
    /// PEM bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// mTLS client certificate and key: both or neither.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Permit `http://` to a non-loopback host.
    pub allow_insecure: bool,
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval (detects a dead Core).
    pub keepalive_interval: Duration,
    /// Longest wait between reconnection attempts (exponential backoff with full jitter).
    pub reconnect_max: Duration,
}

/// Where the Core token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    Inline(Secret),
    /// Read at each connect (so a rotated file is picked up).
    File(PathBuf),
    /// Neither `token` nor `token_file` (nor a systemd credential): `run` refuses to start.
    Missing,
}

/// `[gateway]`: the local WireGuard side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// `None`: generated once and kept in `state_dir`.
    pub id: Option<String>,
    /// `None`: the hostname.
    pub name: Option<String>,
    pub interface: String,
    pub backend: BackendKind,
    /// Binary for the userspace backend (a name looked up in `PATH`, or a path).
    pub wireguard_go: String,
    pub state_dir: PathBuf,
    pub stats_interval: Duration,
    pub resync_interval: Duration,
    pub offline_policy: OfflinePolicy,
    /// SIGTERM removes the interface only when true.
    pub remove_on_shutdown: bool,
}

/// What to do with the peers while the Core is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Keep enforcing the last received state indefinitely (the default).
    Keep,
    /// Remove the peers after this long without the Core (identity and state are kept).
    RemoveAfter(Duration),
}

/// `[http]`: the local status server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// `None`: no HTTP server.
    pub listen: Option<SocketAddr>,
    /// Per-peer series in `/metrics` (and peer rows in `/peers`) while the interface has
    /// at most this many peers; 0: never.
    pub peer_metrics_limit: usize,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A level (`info`) or a tracing filter (`info,gatehouse=debug`), validated.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `[hooks]`: shell commands run at the moments documented in [`crate::hooks`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HooksConfig {
    pub pre_up: Option<String>,
    pub post_up: Option<String>,
    pub pre_down: Option<String>,
    pub post_down: Option<String>,
    pub timeout: Duration,
}

/// `[firewall]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    pub enabled: bool,
    pub masquerade: bool,
}

/// `[ha]`: several gateways per location (design §12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaConfig {
    /// Floating addresses; while one is on this host, the gateway is active.
    pub vip: Vec<std::net::IpAddr>,
    /// Peers active this recently get a handshake on takeover.
    pub takeover_window: Duration,
    /// Most takeover handshakes started per second.
    pub takeover_rate: u32,
    /// gatehouse's own routing table for the takeover source routes.
    pub route_table: u32,
}

/// Settings given on the command line (each `None` leaves the key to the lower layers).
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub core_url: Option<String>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub interface: Option<String>,
    pub backend: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
}

/// A configuration that cannot be used. `Display` is `<key>: <message>`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A key's value (or a key itself) is wrong.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// The configuration file cannot be read or is not TOML.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The key the error is about (`core.url`), or the file path for file errors.
    pub fn key(&self) -> String {
        match self {
            ConfigError::Invalid { key, .. } => key.clone(),
            ConfigError::File { path, .. } => path.display().to_string(),
        }
    }
}

/// Layers the sources and validates the result. Pure: touches no file and no process
/// environment (`env` is the environment as a map; `file` the config file's text).
pub fn resolve(
    file: Option<&str>,
    env: &BTreeMap<String, String>,
    flags: &Flags,
) -> Result<Config, ConfigError> {
    let mut layered = schema::Layered::defaults();
    if let Some(text) = file {
        let table = parse_toml(text).map_err(|message| ConfigError::File {
            path: PathBuf::from("config file"),
            message,
        })?;
        layered.apply_file(&table)?;
    }
    layered.apply_env(env)?;
    layered.apply_flags(&flags.as_layer())?;
    layered.apply_credentials(env);
    build::build(&layered)
}

/// Reads the config file (`path`, which must exist; or [`DEFAULT_CONFIG_PATH`] if it
/// exists), layers env and flags over it, validates, and checks the files it names.
pub fn load(
    path: Option<&Path>,
    env: &BTreeMap<String, String>,
    flags: &Flags,
) -> Result<Config, ConfigError> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ConfigError::File {
                path,
                message: format!("cannot read: {e}"),
            })
        }
    };
    let config = resolve(text.as_deref(), env, flags).map_err(|e| match e {
        ConfigError::File { message, .. } => ConfigError::File {
            path: path.clone(),
            message,
        },
        other => other,
    })?;
    config.check_files(env)?;
    Ok(config)
}

/// `GATEHOUSE_*` environment variables that name no key (likely typos): log a warning.
pub fn unknown_env_vars(env: &BTreeMap<String, String>) -> Vec<String> {
    schema::unknown_env_vars(env)
}

/// Checks an interface name with the shared rule: 1..=15 bytes of `[A-Za-z0-9_.-]`, not
/// `.` or `..` (so `wg%d`, which the kernel expands to a new name, is refused).
pub fn validate_interface_name(name: &str) -> Result<(), String> {
    gatehouse_validate::text::interface_name(name)
}

impl Config {
    /// Who set `key` (`section.key`): [`Origin::Default`] when nobody did.
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// The effective configuration as TOML, secrets shown as `"<redacted>"`, each key not
    /// at its default annotated with its origin. Parses back to the same configuration
    /// (except a redacted token).
    pub fn effective_toml(&self) -> String {
        render::effective_toml(self)
    }

    /// Checks the files the configuration names: the token file readable and non-empty,
    /// TLS files readable, and for the userspace backend the `wireguard-go` binary present.
    pub fn check_files(&self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        build::check_files(self, env)
    }
}

impl CoreConfig {
    /// True when the Core is reached over TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.url.scheme() == "https"
    }
}

impl TokenSource {
    /// The token: the inline value, or the file's content without surrounding whitespace.
    pub fn read(&self) -> Result<Secret, ConfigError> {
        match self {
            TokenSource::Inline(secret) => Ok(secret.clone()),
            TokenSource::File(path) => build::read_token_file(path),
            TokenSource::Missing => Err(ConfigError::invalid("core.token", MISSING_TOKEN)),
        }
    }
}

impl HttpConfig {
    /// The base URL a local client (`gatehouse status`) uses to reach this server: an
    /// unspecified listen address is reached on loopback.
    pub fn local_url(&self) -> Option<String> {
        let addr = self.listen?;
        Some(match addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                format!("http://127.0.0.1:{}", a.port())
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => format!("http://[::1]:{}", a.port()),
            a => format!("http://{a}"),
        })
    }
}

impl HooksConfig {
    /// The command of a hook, `None` when empty.
    pub fn command(&self, hook: crate::hooks::Hook) -> Option<&str> {
        use crate::hooks::Hook;
        match hook {
            Hook::PreUp => self.pre_up.as_deref(),
            Hook::PostUp => self.post_up.as_deref(),
            Hook::PreDown => self.pre_down.as_deref(),
            Hook::PostDown => self.post_down.as_deref(),
        }
    }
}

impl Flags {
    fn as_layer(&self) -> Vec<(&'static str, &'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        let pairs = [
            ("core.url", "core-url", self.core_url.clone()),
            (
                "core.token",
                "token",
                self.token.as_ref().map(|t| t.expose().to_owned()),
            ),
            ("core.token_file", "token-file", path(&self.token_file)),
            ("gateway.interface", "interface", self.interface.clone()),
            ("gateway.backend", "backend", self.backend.clone()),
            ("gateway.state_dir", "state-dir", path(&self.state_dir)),
            ("http.listen", "http-listen", self.http_listen.clone()),
            ("log.level", "log-level", self.log_level.clone()),
            ("log.format", "log-format", self.log_format.clone()),
        ];
        pairs
            .into_iter()
            .filter_map(|(key, flag, value)| value.map(|v| (key, flag, v)))
            .collect()
    }
}

/// Parses TOML, reporting errors by line and column only: the toml crate's own message
/// quotes the offending line, which may hold the token.
fn parse_toml(text: &str) -> Result<toml::Table, String> {
    text.parse::<toml::Table>().map_err(|e| {
        let place = e
            .span()
            .map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        format!("invalid TOML: {place}{}", e.message().trim())
    })
}

#[cfg(test)]
mod tests;
