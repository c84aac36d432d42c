//! The table of configuration keys and the layering of sources over the defaults.
//!
//! Every key the agent knows is one [`KeySpec`] row. Layering is key by key: a source sets
//! only the keys it names and leaves every other key as the layers below set it (a config
//! file never wipes environment or flag settings). The result is a [`Layered`] table of raw
//! TOML values, each with the [`Origin`] that set it; `build` turns it into a typed config.

use std::collections::BTreeMap;
use std::fmt;

use toml::Value;

use super::ConfigError;

/// Who set a key's effective value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The TOML configuration file.
    File,
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag (its name without dashes).
    Flag(&'static str),
    /// `$CREDENTIALS_DIRECTORY/token` (systemd `LoadCredential=token:...`).
    Credentials,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File => f.write_str("config file"),
            Origin::Env(name) => write!(f, "environment {name}"),
            Origin::Flag(name) => write!(f, "flag --{name}"),
            Origin::Credentials => f.write_str("systemd credential $CREDENTIALS_DIRECTORY/token"),
        }
    }
}

/// The TOML type of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Bool,
    /// A humantime string ("30s", "24h").
    Duration,
    /// A list of strings (a comma list in the environment).
    List,
    /// An integer.
    Int,
}

/// One configuration key.
#[derive(Debug)]
pub(crate) struct KeySpec {
    pub section: &'static str,
    pub key: &'static str,
    pub kind: Kind,
    pub default: Def,
    /// Never printed: not in errors, not in `check-config`.
    pub secret: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Def {
    Str(&'static str),
    Bool(bool),
    EmptyList,
    Int(i64),
}

impl KeySpec {
    /// `section.key`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }

    /// `GATEHOUSE_SECTION_KEY`.
    pub fn env_name(&self) -> String {
        format!(
            "{}{}_{}",
            super::ENV_PREFIX,
            self.section.to_ascii_uppercase(),
            self.key.to_ascii_uppercase()
        )
    }

    fn default_value(&self) -> Value {
        match self.default {
            Def::Str(s) => Value::String(s.to_owned()),
            Def::Bool(b) => Value::Boolean(b),
            Def::EmptyList => Value::Array(Vec::new()),
            Def::Int(i) => Value::Integer(i),
        }
    }
}

const fn s(section: &'static str, key: &'static str, default: &'static str) -> KeySpec {
    KeySpec {
        section,
        key,
        kind: Kind::Str,
        default: Def::Str(default),
        secret: false,
    }
}

const fn d(section: &'static str, key: &'static str, default: &'static str) -> KeySpec {
    KeySpec {
        section,
        key,
        kind: Kind::Duration,
        default: Def::Str(default),
        secret: false,
    }
}

const fn b(section: &'static str, key: &'static str, default: bool) -> KeySpec {
    KeySpec {
        section,
        key,
        kind: Kind::Bool,
        default: Def::Bool(default),
        secret: false,
    }
}

const fn i(section: &'static str, key: &'static str, default: i64) -> KeySpec {
    KeySpec {
        section,
        key,
        kind: Kind::Int,
        default: Def::Int(default),
        secret: false,
    }
}

/// Sections in the order `check-config` prints them.
pub(crate) const SECTIONS: &[&str] = &["core", "gateway", "http", "log", "hooks", "firewall", "ha"];

/// Every key, in the order `check-config` prints them.
pub(crate) const SCHEMA: &[KeySpec] = &[
    s("core", "url", ""),
    KeySpec {
        section: "core",
        key: "token",
        kind: Kind::Str,
        default: Def::Str(""),
        secret: true,
    },
    s("core", "token_file", ""),
    s("core", "ca_file", ""),
    s("core", "client_cert_file", ""),
    s("core", "client_key_file", ""),
    b("core", "allow_insecure", false),
    d("core", "connect_timeout", "10s"),
    d("core", "keepalive_interval", "10s"),
    d("core", "reconnect_max", "30s"),
    s("gateway", "id", ""),
    s("gateway", "name", ""),
    s("gateway", "interface", "wg0"),
    s("gateway", "backend", "kernel"),
    s("gateway", "wireguard_go", "wireguard-go"),
    s("gateway", "state_dir", "/var/lib/gatehouse"),
    d("gateway", "stats_interval", "30s"),
    d("gateway", "resync_interval", "60s"),
    s("gateway", "offline_policy", "keep"),
    b("gateway", "remove_on_shutdown", false),
    s("http", "listen", "127.0.0.1:9180"),
    i(
        "http",
        "peer_metrics_limit",
        super::DEFAULT_PEER_METRICS_LIMIT as i64,
    ),
    s("log", "level", "info"),
    s("log", "format", "text"),
    s("hooks", "pre_up", ""),
    s("hooks", "post_up", ""),
    s("hooks", "pre_down", ""),
    s("hooks", "post_down", ""),
    d("hooks", "timeout", "30s"),
    b("firewall", "enabled", true),
    b("firewall", "masquerade", false),
    KeySpec {
        section: "ha",
        key: "vip",
        kind: Kind::List,
        default: Def::EmptyList,
        secret: false,
    },
    d("ha", "takeover_window", "5m"),
    i("ha", "takeover_rate", 2000),
    i("ha", "route_table", 51820),
];

/// The index of `section.key` in [`SCHEMA`].
pub(crate) fn index(section: &str, key: &str) -> Option<usize> {
    SCHEMA
        .iter()
        .position(|k| k.section == section && k.key == key)
}

/// One effective value and who set it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub value: Value,
    pub origin: Origin,
}

/// The effective raw value of every key, aligned with [`SCHEMA`].
#[derive(Clone, Debug)]
pub(crate) struct Layered {
    entries: Vec<Entry>,
}

impl Layered {
    /// All keys at their built-in defaults.
    pub fn defaults() -> Self {
        Layered {
            entries: SCHEMA
                .iter()
                .map(|k| Entry {
                    value: k.default_value(),
                    origin: Origin::Default,
                })
                .collect(),
        }
    }

    pub fn entry(&self, section: &str, key: &str) -> &Entry {
        // SCHEMA and `entries` are built together; a wrong name is a bug in this module
        // and is caught by the tests that build every key.
        &self.entries[index(section, key).unwrap_or(usize::MAX)]
    }

    /// The string value of a `Str`/`Duration` key ("" for any other kind).
    pub fn str(&self, section: &str, key: &str) -> &str {
        self.entry(section, key).value.as_str().unwrap_or("")
    }

    /// The value of a `Bool` key.
    pub fn bool(&self, section: &str, key: &str) -> bool {
        self.entry(section, key).value.as_bool().unwrap_or(false)
    }

    /// The strings of a `List` key.
    pub fn list(&self, section: &str, key: &str) -> Vec<&str> {
        self.entry(section, key)
            .value
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// The value of an `Int` key.
    pub fn int(&self, section: &str, key: &str) -> i64 {
        self.entry(section, key).value.as_integer().unwrap_or(0)
    }

    /// Layers a parsed TOML file over the current values.
    pub fn apply_file(&mut self, table: &toml::Table) -> Result<(), ConfigError> {
        let mut set = Vec::new();
        for (section, body) in table {
            if !SECTIONS.contains(&section.as_str()) {
                return Err(ConfigError::invalid(
                    section,
                    format!(
                        "unknown section [{section}] (known sections: {})",
                        SECTIONS.join(", ")
                    ),
                ));
            }
            let Value::Table(body) = body else {
                return Err(ConfigError::invalid(
                    section,
                    format!("expected a table [{section}], found {}", body.type_str()),
                ));
            };
            for (key, value) in body {
                let Some(i) = index(section, key) else {
                    let known: Vec<&str> = SCHEMA
                        .iter()
                        .filter(|k| k.section == section)
                        .map(|k| k.key)
                        .collect();
                    return Err(ConfigError::invalid(
                        format!("{section}.{key}"),
                        format!(
                            "unknown key in section [{section}] (known keys: {})",
                            known.join(", ")
                        ),
                    ));
                };
                check_type(&SCHEMA[i], value)?;
                set.push((i, value.clone(), Origin::File));
            }
        }
        self.apply_layer(set, "the config file")
    }

    /// Layers `GATEHOUSE_<SECTION>_<KEY>` variables over the current values. Variables
    /// that name no key are ignored here (see `unknown_env_vars`).
    pub fn apply_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let mut set = Vec::new();
        for (i, spec) in SCHEMA.iter().enumerate() {
            let name = spec.env_name();
            if let Some(raw) = env.get(&name) {
                let origin = Origin::Env(name);
                set.push((i, from_text(spec, raw, &origin)?, origin));
            }
        }
        self.apply_layer(set, "the environment")
    }

    /// Layers command-line flags (`(section.key, flag name, value)`) over the current values.
    pub fn apply_flags(
        &mut self,
        flags: &[(&'static str, &'static str, String)],
    ) -> Result<(), ConfigError> {
        let mut set = Vec::new();
        for (name, flag, raw) in flags {
            let (section, key) = name.split_once('.').unwrap_or((name, ""));
            let Some(i) = index(section, key) else {
                return Err(ConfigError::invalid(*name, "flag maps to no key"));
            };
            let origin = Origin::Flag(flag);
            set.push((i, from_text(&SCHEMA[i], raw, &origin)?, origin));
        }
        self.apply_layer(set, "the command line")
    }

    /// When no token source is set at all, uses `$CREDENTIALS_DIRECTORY/token` if the
    /// service manager passed a credentials directory.
    pub fn apply_credentials(&mut self, env: &BTreeMap<String, String>) {
        if !self.str("core", "token").is_empty() || !self.str("core", "token_file").is_empty() {
            return;
        }
        if let Some(dir) = env.get("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
            let path = std::path::Path::new(dir).join("token");
            self.set(
                "core",
                "token_file",
                Value::String(path.to_string_lossy().into_owned()),
                Origin::Credentials,
            );
        }
    }

    fn set(&mut self, section: &str, key: &str, value: Value, origin: Origin) {
        if let Some(i) = index(section, key) {
            self.entries[i] = Entry { value, origin };
        }
    }

    /// Sets one layer's keys. `token` and `token_file` are two spellings of one setting
    /// (the token source): a layer that sets one of them replaces the other from the
    /// layers below; a layer that sets both is an error.
    fn apply_layer(
        &mut self,
        set: Vec<(usize, Value, Origin)>,
        layer: &str,
    ) -> Result<(), ConfigError> {
        // The origin of the layer's non-empty `core.<k>`, if it sets one.
        let setter = |k: &str| {
            set.iter()
                .find(|(i, v, _)| {
                    (SCHEMA[*i].section, SCHEMA[*i].key) == ("core", k)
                        && v.as_str().is_some_and(|s| !s.is_empty())
                })
                .map(|(_, _, origin)| origin.clone())
        };
        match (setter("token"), setter("token_file")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "core.token",
                    format!("core.token and core.token_file are both set in {layer}; set only one"),
                ))
            }
            // The replaced spelling is shown as cleared by the layer that replaced it.
            (Some(origin), None) => {
                self.set("core", "token_file", Value::String(String::new()), origin)
            }
            (None, Some(origin)) => self.set("core", "token", Value::String(String::new()), origin),
            (None, None) => {}
        }
        for (i, value, origin) in set {
            self.entries[i] = Entry { value, origin };
        }
        Ok(())
    }
}

/// `GATEHOUSE_*` variables that name no key (probably a typo), for a warning. The
/// variables the agent itself sets for hooks are not reported.
pub(crate) fn unknown_env_vars(env: &BTreeMap<String, String>) -> Vec<String> {
    env.keys()
        .filter(|name| name.starts_with(super::ENV_PREFIX))
        .filter(|name| !crate::hooks::HOOK_ENV_VARS.contains(&name.as_str()))
        .filter(|name| !SCHEMA.iter().any(|k| k.env_name() == **name))
        .cloned()
        .collect()
}

fn check_type(spec: &KeySpec, value: &Value) -> Result<(), ConfigError> {
    let ok = match spec.kind {
        Kind::Str | Kind::Duration => value.is_str(),
        Kind::Bool => value.is_bool(),
        Kind::List => value
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_str)),
        Kind::Int => value.is_integer(),
    };
    if ok {
        return Ok(());
    }
    let expected = match spec.kind {
        Kind::Str => "a string",
        Kind::Bool => "a boolean (true or false)",
        Kind::Duration => "a duration string such as \"30s\" or \"24h\"",
        Kind::List => "a list of strings such as [\"192.0.2.10\", \"2001:db8::10\"]",
        Kind::Int => "an integer",
    };
    let found = if spec.secret || matches!(value, Value::Table(_) | Value::Array(_)) {
        value.type_str().to_owned()
    } else {
        format!("{} {value}", value.type_str())
    };
    Err(ConfigError::invalid(
        spec.name(),
        format!("expected {expected}, found {found}"),
    ))
}

/// Converts an environment or flag value to the key's TOML type.
fn from_text(spec: &KeySpec, raw: &str, origin: &Origin) -> Result<Value, ConfigError> {
    match spec.kind {
        Kind::Str | Kind::Duration => Ok(Value::String(raw.to_owned())),
        Kind::List => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
        Kind::Int => raw.trim().parse::<i64>().map(Value::Integer).map_err(|_| {
            ConfigError::invalid(
                spec.name(),
                format!("expected an integer, found {raw:?} ({origin})"),
            )
        }),
        Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err(ConfigError::invalid(
                spec.name(),
                format!("expected true or false, found {raw:?} ({origin})"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_unique_and_sections_known() {
        for (i, k) in SCHEMA.iter().enumerate() {
            assert!(SECTIONS.contains(&k.section), "{}", k.name());
            assert_eq!(index(k.section, k.key), Some(i), "duplicate {}", k.name());
        }
    }

    #[test]
    fn env_names_follow_the_contract() {
        let i = index("gateway", "stats_interval").unwrap();
        assert_eq!(SCHEMA[i].env_name(), "GATEHOUSE_GATEWAY_STATS_INTERVAL");
        let i = index("core", "url").unwrap();
        assert_eq!(SCHEMA[i].env_name(), "GATEHOUSE_CORE_URL");
    }

    #[test]
    fn wrong_type_of_a_secret_does_not_show_the_value() {
        let table: toml::Table = "[core]\ntoken = 123456789".parse().unwrap();
        let err = Layered::defaults()
            .apply_file(&table)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("core.token: expected a string"), "{err}");
        assert!(!err.contains("123456789"), "{err}");
    }

    #[test]
    fn a_higher_layer_token_file_replaces_a_lower_layer_token() {
        let mut l = Layered::defaults();
        let table: toml::Table = "[core]\ntoken = \"t\"".parse().unwrap();
        l.apply_file(&table).unwrap();
        let env = BTreeMap::from([("GATEHOUSE_CORE_TOKEN_FILE".to_owned(), "/x".to_owned())]);
        l.apply_env(&env).unwrap();
        assert_eq!(l.str("core", "token"), "");
        assert_eq!(l.str("core", "token_file"), "/x");
    }

    #[test]
    fn unknown_env_vars_are_listed_but_hook_vars_are_not() {
        let env = BTreeMap::from([
            ("GATEHOUSE_CORE_URLL".to_owned(), String::new()),
            ("GATEHOUSE_CORE_URL".to_owned(), String::new()),
            ("GATEHOUSE_INTERFACE".to_owned(), String::new()),
            ("PATH".to_owned(), String::new()),
        ]);
        assert_eq!(
            unknown_env_vars(&env),
            vec!["GATEHOUSE_CORE_URLL".to_owned()]
        );
    }
}
