//! `check-config` output: the effective configuration as TOML, secrets redacted, each key
//! that is not at its default annotated with who set it.

use std::fmt::Write as _;
use std::time::Duration;

use toml::Value;

use super::schema::{Origin, SCHEMA, SECTIONS};
use super::{Config, LogFormat, OfflinePolicy, TokenSource, REDACTED};

pub(super) fn effective_toml(config: &Config) -> String {
    let mut out = String::new();
    for (n, section) in SECTIONS.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "[{section}]");
        for spec in SCHEMA.iter().filter(|k| k.section == *section) {
            let name = spec.name();
            let value = value_of(config, &name);
            let _ = match config.origin(&name) {
                Origin::Default => writeln!(out, "{} = {value}", spec.key),
                origin => writeln!(out, "{} = {value}  # {origin}", spec.key),
            };
        }
    }
    out
}

/// The effective value of one key, in TOML.
fn value_of(c: &Config, name: &str) -> Value {
    let s = |v: &str| Value::String(v.to_owned());
    let opt = |v: &Option<String>| s(v.as_deref().unwrap_or(""));
    let path = |v: &Option<std::path::PathBuf>| {
        s(&v.as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default())
    };
    let dur = |d: Duration| s(&humantime::format_duration(d).to_string());
    match name {
        "core.url" => s(c.core.url.as_str().trim_end_matches('/')),
        "core.token" => match &c.core.token {
            TokenSource::Inline(_) => s(REDACTED),
            TokenSource::File(_) | TokenSource::Missing => s(""),
        },
        "core.token_file" => match &c.core.token {
            TokenSource::File(p) => s(&p.to_string_lossy()),
            TokenSource::Inline(_) | TokenSource::Missing => s(""),
        },
        "core.ca_file" => path(&c.core.ca_file),
        "core.client_cert_file" => path(&c.core.client_cert_file),
        "core.client_key_file" => path(&c.core.client_key_file),
        "core.allow_insecure" => Value::Boolean(c.core.allow_insecure),
        "core.connect_timeout" => dur(c.core.connect_timeout),
        "core.keepalive_interval" => dur(c.core.keepalive_interval),
        "core.reconnect_max" => dur(c.core.reconnect_max),
        "gateway.id" => opt(&c.gateway.id),
        "gateway.name" => opt(&c.gateway.name),
        "gateway.interface" => s(&c.gateway.interface),
        "gateway.backend" => s(&c.gateway.backend.to_string()),
        "gateway.wireguard_go" => s(&c.gateway.wireguard_go),
        "gateway.state_dir" => s(&c.gateway.state_dir.to_string_lossy()),
        "gateway.stats_interval" => dur(c.gateway.stats_interval),
        "gateway.resync_interval" => dur(c.gateway.resync_interval),
        "gateway.offline_policy" => match c.gateway.offline_policy {
            OfflinePolicy::Keep => s("keep"),
            OfflinePolicy::RemoveAfter(d) => dur(d),
        },
        "gateway.remove_on_shutdown" => Value::Boolean(c.gateway.remove_on_shutdown),
        "http.listen" => s(&c.http.listen.map(|a| a.to_string()).unwrap_or_default()),
        "log.level" => s(&c.log.level),
        "log.format" => s(match c.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }),
        "hooks.pre_up" => opt(&c.hooks.pre_up),
        "hooks.post_up" => opt(&c.hooks.post_up),
        "hooks.pre_down" => opt(&c.hooks.pre_down),
        "hooks.post_down" => opt(&c.hooks.post_down),
        "hooks.timeout" => dur(c.hooks.timeout),
        "firewall.enabled" => Value::Boolean(c.firewall.enabled),
        "firewall.masquerade" => Value::Boolean(c.firewall.masquerade),
        "ha.vip" => Value::Array(c.ha.vip.iter().map(|ip| s(&ip.to_string())).collect()),
        "ha.takeover_window" => dur(c.ha.takeover_window),
        "ha.takeover_rate" => Value::Integer(i64::from(c.ha.takeover_rate)),
        "ha.route_table" => Value::Integer(i64::from(c.ha.route_table)),
        "http.peer_metrics_limit" => Value::Integer(c.http.peer_metrics_limit as i64),
        // Every SCHEMA key is listed above (the round-trip test checks it).
        _ => s("<unknown key>"),
    }
}
