//! Validation: the layered raw values become a typed [`Config`], with errors that name the
//! key and, when it did not come from the defaults, who set it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::BackendKind;

use super::schema::{Layered, Origin, SCHEMA};
use super::{
    Config, ConfigError, CoreConfig, FirewallConfig, GatewayConfig, HaConfig, HooksConfig,
    HttpConfig, LogConfig, LogFormat, OfflinePolicy, Secret, TokenSource,
};

/// Builds and validates the typed configuration.
pub(super) fn build(l: &Layered) -> Result<Config, ConfigError> {
    let err = |section: &str, key: &str, message: String| {
        let origin = &l.entry(section, key).origin;
        let message = match origin {
            Origin::Default => message,
            o => format!("{message} (set by {o})"),
        };
        ConfigError::invalid(format!("{section}.{key}"), message)
    };
    let duration = |section: &str, key: &str| {
        parse_duration(l.str(section, key))
            .and_then(|d| check_bounds(section, key, d))
            .map_err(|m| err(section, key, m))
    };
    let optional = |section: &str, key: &str| {
        let v = l.str(section, key);
        (!v.trim().is_empty()).then(|| v.to_owned())
    };
    let path = |section: &str, key: &str| optional(section, key).map(PathBuf::from);

    let allow_insecure = l.bool("core", "allow_insecure");
    let url =
        parse_core_url(l.str("core", "url"), allow_insecure).map_err(|m| err("core", "url", m))?;

    let token = match (optional("core", "token"), path("core", "token_file")) {
        (Some(t), None) if t.trim() == super::REDACTED => {
            return Err(err(
                "core",
                "token",
                "is the redaction placeholder from check-config; put the real token".into(),
            ))
        }
        (Some(t), None) => TokenSource::Inline(Secret::new(t.trim().to_owned())),
        (None, Some(p)) => TokenSource::File(p),
        (Some(_), Some(_)) => {
            return Err(err(
                "core",
                "token",
                "core.token and core.token_file are both set; set only one".into(),
            ))
        }
        // `run` refuses to start without a token; `check-config` only warns, so a
        // configuration whose token arrives later (a systemd credential) still validates.
        (None, None) => TokenSource::Missing,
    };
    let (client_cert_file, client_key_file) = (
        path("core", "client_cert_file"),
        path("core", "client_key_file"),
    );
    match (&client_cert_file, &client_key_file) {
        (Some(_), None) => {
            return Err(err(
                "core",
                "client_key_file",
                "core.client_cert_file is set without core.client_key_file".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "core",
                "client_cert_file",
                "core.client_key_file is set without core.client_cert_file".into(),
            ))
        }
        _ => {}
    }
    let ca_file = path("core", "ca_file");
    if url.scheme() == "http" {
        for (key, set) in [
            ("ca_file", ca_file.is_some()),
            ("client_cert_file", client_cert_file.is_some()),
        ] {
            if set {
                return Err(err(
                    "core",
                    key,
                    "TLS files are set but core.url is http:// (no TLS); use https://".into(),
                ));
            }
        }
    }
    let core = CoreConfig {
        url,
        token,
        ca_file,
        client_cert_file,
        client_key_file,
        allow_insecure,
        connect_timeout: duration("core", "connect_timeout")?,
        keepalive_interval: duration("core", "keepalive_interval")?,
        reconnect_max: duration("core", "reconnect_max")?,
    };

    let interface = l.str("gateway", "interface").to_owned();
    super::validate_interface_name(&interface).map_err(|m| err("gateway", "interface", m))?;
    let id = optional("gateway", "id");
    if let Some(id) = &id {
        check_label(id).map_err(|m| err("gateway", "id", m))?;
    }
    let name = optional("gateway", "name");
    if let Some(name) = &name {
        check_label(name).map_err(|m| err("gateway", "name", m))?;
    }
    let wireguard_go = l.str("gateway", "wireguard_go").trim().to_owned();
    if wireguard_go.is_empty() {
        return Err(err("gateway", "wireguard_go", "must not be empty".into()));
    }
    let state_dir = l.str("gateway", "state_dir");
    if state_dir.trim().is_empty() {
        return Err(err("gateway", "state_dir", "must not be empty".into()));
    }
    let gateway = GatewayConfig {
        id,
        name,
        interface,
        backend: parse_backend(l.str("gateway", "backend"))
            .map_err(|m| err("gateway", "backend", m))?,
        wireguard_go,
        state_dir: PathBuf::from(state_dir),
        stats_interval: duration("gateway", "stats_interval")?,
        resync_interval: duration("gateway", "resync_interval")?,
        offline_policy: parse_offline_policy(l.str("gateway", "offline_policy"))
            .and_then(|p| match p {
                OfflinePolicy::RemoveAfter(d) => {
                    check_bounds("gateway", "offline_policy", d).map(OfflinePolicy::RemoveAfter)
                }
                keep => Ok(keep),
            })
            .map_err(|m| err("gateway", "offline_policy", m))?,
        remove_on_shutdown: l.bool("gateway", "remove_on_shutdown"),
    };

    let http = HttpConfig {
        listen: parse_listen(l.str("http", "listen")).map_err(|m| err("http", "listen", m))?,
        peer_metrics_limit: int_in(
            l.int("http", "peer_metrics_limit"),
            0,
            super::MAX_PEER_METRICS_LIMIT as i64,
        )
        .map_err(|m| err("http", "peer_metrics_limit", m))? as usize,
    };

    let level = l.str("log", "level").trim().to_owned();
    check_log_level(&level).map_err(|m| err("log", "level", m))?;
    let format = match l.str("log", "format").trim() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(err(
                "log",
                "format",
                format!("unknown format {other:?}, expected \"text\" or \"json\""),
            ))
        }
    };

    let hooks = HooksConfig {
        pre_up: optional("hooks", "pre_up"),
        post_up: optional("hooks", "post_up"),
        pre_down: optional("hooks", "pre_down"),
        post_down: optional("hooks", "post_down"),
        timeout: duration("hooks", "timeout")?,
    };

    let firewall = FirewallConfig {
        enabled: l.bool("firewall", "enabled"),
        masquerade: l.bool("firewall", "masquerade"),
    };
    if firewall.masquerade && !firewall.enabled {
        return Err(err(
            "firewall",
            "masquerade",
            "masquerade needs firewall.enabled = true (it is part of the agent's nftables table)"
                .into(),
        ));
    }

    let ha = HaConfig {
        vip: parse_vips(&l.list("ha", "vip")).map_err(|m| err("ha", "vip", m))?,
        takeover_window: duration("ha", "takeover_window")?,
        takeover_rate: int_in(l.int("ha", "takeover_rate"), 1, MAX_TAKEOVER_RATE)
            .map_err(|m| err("ha", "takeover_rate", m))?,
        route_table: parse_route_table(l.int("ha", "route_table"))
            .map_err(|m| err("ha", "route_table", m))?,
    };

    let origins: BTreeMap<String, Origin> = SCHEMA
        .iter()
        .map(|k| (k.name(), l.entry(k.section, k.key).origin.clone()))
        .filter(|(_, o)| *o != Origin::Default)
        .collect();

    Ok(Config {
        core,
        gateway,
        http,
        log: LogConfig { level, format },
        hooks,
        firewall,
        ha,
        origins,
    })
}

/// Most takeover handshakes per second one may ask for.
pub(crate) const MAX_TAKEOVER_RATE: i64 = 100_000;

/// Floating addresses: unicast, not loopback or unspecified, each once.
fn parse_vips(list: &[&str]) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for raw in list {
        let ip: IpAddr = raw.trim().parse().map_err(|_| {
            format!("{raw:?} is not an IP address (write e.g. \"192.0.2.10\" or \"2001:db8::10\", no prefix length)")
        })?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(format!(
                "{ip} cannot be a floating address (unspecified, loopback or multicast)"
            ));
        }
        if out.contains(&ip) {
            return Err(format!("{ip} is listed twice"));
        }
        out.push(ip);
    }
    Ok(out)
}

fn int_in(v: i64, min: i64, max: i64) -> Result<u32, String> {
    if v < min || v > max {
        return Err(format!("{v} is out of range: between {min} and {max}"));
    }
    u32::try_from(v).map_err(|_| format!("{v} is out of range"))
}

/// A routing table of gatehouse's own: not 0 (unspecified) nor the kernel's default (253),
/// main (254) and local (255) tables.
fn parse_route_table(v: i64) -> Result<u32, String> {
    let table = int_in(v, 1, i64::from(u32::MAX))?;
    if (253..=255).contains(&table) {
        return Err(format!(
            "{table} is one of the kernel's own tables (default, main, local); pick another, e.g. 51820"
        ));
    }
    Ok(table)
}

/// File checks for [`Config::check_files`].
pub(super) fn check_files(
    config: &Config,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let with_origin = |key: &str, message: String| {
        let message = match config.origin(key) {
            Origin::Default => message,
            o => format!("{message} (set by {o})"),
        };
        ConfigError::invalid(key, message)
    };
    if let TokenSource::File(path) = &config.core.token {
        read_token_file(path).map_err(|e| match e {
            ConfigError::Invalid { message, .. } => with_origin("core.token_file", message),
            other => other,
        })?;
    }
    let core = &config.core;
    for (key, file) in [
        ("core.ca_file", &core.ca_file),
        ("core.client_cert_file", &core.client_cert_file),
        ("core.client_key_file", &core.client_key_file),
    ] {
        if let Some(path) = file {
            let bytes = std::fs::read(path)
                .map_err(|e| with_origin(key, format!("cannot read {}: {e}", path.display())))?;
            if key != "core.client_key_file" && !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(with_origin(
                    key,
                    format!("{} is not a PEM file", path.display()),
                ));
            }
        }
    }
    if config.gateway.backend == BackendKind::Userspace {
        find_program(&config.gateway.wireguard_go, env)
            .map_err(|m| with_origin("gateway.wireguard_go", m))?;
    }
    Ok(())
}

/// Reads a token file: trimmed, must not be empty. The error never quotes the content.
pub(super) fn read_token_file(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            "core.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = Secret::new(text.trim().to_owned());
    drop(zeroize::Zeroizing::new(text));
    if token.is_empty() {
        return Err(ConfigError::invalid(
            "core.token_file",
            format!("{} is empty", path.display()),
        ));
    }
    Ok(token)
}

fn find_program(program: &str, env: &BTreeMap<String, String>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!("{program} is not an executable file"))
        };
    }
    let path = env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{program} not found in PATH (needed by backend = \"userspace\")"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("bad duration {s:?} ({e}); write e.g. \"30s\", \"5m\", \"24h\""))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// The accepted range of every duration key (section, key, minimum, maximum), as
/// documented in `config/gateway.toml`. The maximum keeps every timer computable (a
/// deadline far beyond the monotonic clock's range would panic) and catches unit typos.
pub(crate) const DURATION_BOUNDS: &[(&str, &str, Duration, Duration)] = &[
    ("core", "connect_timeout", ms(100), secs(600)),
    ("core", "keepalive_interval", secs(1), secs(3600)),
    ("core", "reconnect_max", ms(100), secs(3600)),
    ("gateway", "stats_interval", ms(100), secs(3600)),
    ("gateway", "resync_interval", ms(100), secs(86_400)),
    ("gateway", "offline_policy", secs(1), secs(365 * 86_400)),
    ("hooks", "timeout", ms(100), secs(3600)),
    ("ha", "takeover_window", secs(10), secs(3600)),
];

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `d` when it lies within the key's documented range.
fn check_bounds(section: &str, key: &str, d: Duration) -> Result<Duration, String> {
    let Some(&(_, _, min, max)) = DURATION_BOUNDS
        .iter()
        .find(|(s, k, _, _)| *s == section && *k == key)
    else {
        return Ok(d);
    };
    if d < min || d > max {
        return Err(format!(
            "{} is out of range: between {} and {}",
            humantime::format_duration(d),
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn parse_offline_policy(s: &str) -> Result<OfflinePolicy, String> {
    if s.trim() == "keep" {
        return Ok(OfflinePolicy::Keep);
    }
    parse_duration(s)
        .map(OfflinePolicy::RemoveAfter)
        .map_err(|m| format!("expected \"keep\" or a duration such as \"24h\": {m}"))
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s.trim() {
        "kernel" => Ok(BackendKind::Kernel),
        "userspace" => Ok(BackendKind::Userspace),
        "memory" => Ok(BackendKind::Memory),
        other => Err(format!(
            "unknown backend {other:?}, expected \"kernel\", \"userspace\" or \"memory\""
        )),
    }
}

fn parse_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("bad listen address {s:?}: expected IP:PORT such as \"127.0.0.1:9180\" or \"[::1]:9180\", or \"\" to disable")
    })
}

/// `http(s)://host[:port]`, nothing else: no user info (it would be logged), no path.
fn parse_core_url(s: &str, allow_insecure: bool) -> Result<url::Url, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(
            "not set: the Core's gRPC address, e.g. \"https://core.example.net:50055\"".into(),
        );
    }
    let url = url::Url::parse(s).map_err(|e| format!("bad URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "bad URL {s:?}: the scheme must be https:// (or http://)"
        ));
    }
    let Some(host) = url.host() else {
        return Err(format!("bad URL {s:?}: no host"));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user or password; use core.token".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "bad URL {s:?}: expected http(s)://host:port with no path"
        ));
    }
    if url.port() == Some(0) {
        return Err(format!("bad URL {s:?}: port 0"));
    }
    if url.scheme() == "http" && !allow_insecure {
        let loopback = match host {
            url::Host::Ipv4(ip) => IpAddr::V4(ip).is_loopback(),
            url::Host::Ipv6(ip) => IpAddr::V6(ip).is_loopback(),
            url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        };
        if !loopback {
            return Err(format!(
                "{s:?} is cleartext http:// to a non-loopback host (the token would travel \
                 unencrypted); use https:// or set core.allow_insecure = true"
            ));
        }
    }
    Ok(url)
}

fn check_label(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("longer than 253 bytes".into());
    }
    if s.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    Ok(())
}

/// A plain level, or a tracing filter with `=` or `,` (validated by tracing-subscriber).
/// A bare word that is not a level is refused (tracing would read it as a target name and
/// silently log nothing).
fn check_log_level(s: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    if LEVELS.contains(&s.to_ascii_lowercase().as_str()) {
        return Ok(());
    }
    if s.contains('=') || s.contains(',') {
        return tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| ())
            .map_err(|e| format!("bad filter {s:?}: {e}"));
    }
    Err(format!(
        "unknown level {s:?}, expected one of {} or a filter such as \"info,gatehouse=debug\"",
        LEVELS.join(", ")
    ))
}
