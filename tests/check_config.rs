//! The example configuration and the loading rules, through the library's public API
//! (`config::load` reads the file, then layers env and flags). The CLI-level test lives with
//! main.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gatehouse::config::{self, ConfigError, Flags, Origin, Secret};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml")
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn token_env() -> BTreeMap<String, String> {
    env(&[("GATEHOUSE_CORE_TOKEN", "example-token")])
}

/// Writes `text` to a fresh config file and loads it.
fn load_text(
    text: &str,
    env: &BTreeMap<String, String>,
    flags: &Flags,
) -> Result<config::Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    config::load(Some(&path), env, flags)
}

#[test]
fn example_config_loads_and_holds_the_defaults() {
    let c = config::load(Some(&example()), &token_env(), &Flags::default()).unwrap();
    // Every key of the example is at its default except the (required) URL.
    let defaults = config::resolve(
        Some("[core]\nurl = \"https://core.example.net:50055\"\n"),
        &token_env(),
        &Flags::default(),
    )
    .unwrap();
    assert_eq!(c.core, defaults.core);
    assert_eq!(c.gateway, defaults.gateway);
    assert_eq!(c.http, defaults.http);
    assert_eq!(c.log, defaults.log);
    assert_eq!(c.hooks, defaults.hooks);
    assert_eq!(c.firewall, defaults.firewall);
}

#[test]
fn example_config_lists_every_key() {
    let c = config::load(Some(&example()), &token_env(), &Flags::default()).unwrap();
    let shown = c.effective_toml();
    // Every key printed by check-config comes from the example file (or, for the token,
    // from the environment): none is left to a built-in default.
    let mut section = String::new();
    for line in shown.lines().filter(|l| !l.is_empty()) {
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').to_owned();
            continue;
        }
        let key = line.split(" = ").next().unwrap();
        let origin = c.origin(&format!("{section}.{key}"));
        assert_ne!(
            origin,
            Origin::Default,
            "{section}.{key} is missing from config/gateway.toml"
        );
    }
}

#[test]
fn errors_name_the_key() {
    let url = "[core]\nurl = \"https://core.example.net:50055\"\n";
    let cases = [
        ("[core]\nurl = 50055\n", "core.url"),
        (
            &format!("{url}[gateway]\nstats_interval = 30\n") as &str,
            "gateway.stats_interval",
        ),
        (&format!("{url}[gateway]\nbogus = 1\n"), "gateway.bogus"),
        (&format!("{url}[bogus]\n"), "bogus"),
        ("[core]\nurl = \"core.example.net:50055\"\n", "core.url"),
        ("[core]\nurl = \"http://192.0.2.1:50055\"\n", "core.url"),
        (
            &format!("{url}[http]\nlisten = \"localhost\"\n"),
            "http.listen",
        ),
        (
            &format!("{url}[gateway]\ninterface = \"a-very-long-name0\"\n"),
            "gateway.interface",
        ),
        (
            &format!("{url}[gateway]\noffline_policy = \"never\"\n"),
            "gateway.offline_policy",
        ),
    ];
    for (text, key) in cases {
        let e = load_text(text, &token_env(), &Flags::default()).unwrap_err();
        assert_eq!(e.key(), key, "{text}: {e}");
        assert!(e.to_string().starts_with(&format!("{key}: ")), "{e}");
    }
    let both = format!("{url}token = \"a\"\ntoken_file = \"/b\"\n");
    let e = load_text(&both, &BTreeMap::new(), &Flags::default()).unwrap_err();
    assert_eq!(e.key(), "core.token");
}

#[test]
fn explicit_config_file_must_exist() {
    let e = config::load(
        Some(Path::new("/nonexistent/gatehouse.toml")),
        &token_env(),
        &Flags::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::File { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/gatehouse.toml"), "{e}");
}

#[test]
fn env_and_flags_layer_over_the_file_key_by_key() {
    let text = "[core]\nurl = \"https://core.example.net:50055\"\ntoken = \"from-file\"\n\
                [gateway]\ninterface = \"wg-file\"\nbackend = \"memory\"\nstate_dir = \"/srv/file\"\n\
                [http]\nlisten = \"127.0.0.1:1\"\n";
    let e = env(&[
        ("GATEHOUSE_GATEWAY_INTERFACE", "wg-env"),
        ("GATEHOUSE_HTTP_LISTEN", "[::1]:9180"),
        ("GATEHOUSE_CORE_URL", "https://[2001:db8::7]:443"),
    ]);
    let flags = Flags {
        interface: Some("wg-flag".into()),
        token: Some(Secret::new("from-flag".into())),
        ..Flags::default()
    };
    let c = load_text(text, &e, &flags).unwrap();
    assert_eq!(c.gateway.interface, "wg-flag");
    assert_eq!(c.http.listen, Some("[::1]:9180".parse().unwrap()));
    assert_eq!(c.core.url.host_str(), Some("[2001:db8::7]"));
    assert_eq!(c.core.token.read().unwrap().expose(), "from-flag");
    // Set only in the file: kept.
    assert_eq!(c.gateway.state_dir, PathBuf::from("/srv/file"));
    assert_eq!(c.gateway.backend.to_string(), "memory");
    assert_eq!(c.origin("gateway.state_dir"), Origin::File);
    assert_eq!(
        c.origin("http.listen"),
        Origin::Env("GATEHOUSE_HTTP_LISTEN".into())
    );
    let shown = c.effective_toml();
    assert!(
        !shown.contains("from-flag") && !shown.contains("from-file"),
        "{shown}"
    );
}
